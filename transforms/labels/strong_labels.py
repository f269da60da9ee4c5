"""Strong (time-stamped) labels of analysis windows from annotation events (pure numpy, no Beam).

A recording annotated in Audacity or Raven (``transforms/labels/annotations.py`` reads the files) carries
its events as ``(start_s, end_s, label)`` tuples; each analysis window gets the labels of the
events it overlaps enough (:func:`window_labels`), several when events overlap, none when it lies
outside every event (background).

The rule, for a window ``[ws, we)`` and an event ``[es, ee]`` with ``overlap = min(we, ee) -
max(ws, es)``:

- **Interval events** (``ee > es``) label the window when ``overlap > EPSILON_S`` and
  ``overlap >= min_overlap * min(we - ws, ee - es)``. Relative to the *shorter* of the two, so a
  long event labels the windows it covers at least ``min_overlap`` of (default 0.25: a 0.95 s
  window needs 0.24 s of the event, not a sliver at the event's edge that is mostly background),
  and an event shorter than a window labels every window that holds at least ``min_overlap`` of
  the event (an event wholly inside a window always labels it). An event that ends exactly where a
  window starts (within ``EPSILON_S``, the rounding of the times written in annotation files)
  does not label it.
- **Point events** (``ee == es``, Audacity's point labels) label the windows that contain the
  point: ``ws <= es < we``.
- Events beyond the recording's end label nothing (no window reaches them); an event that starts
  before the end labels the windows it overlaps as any other.

Labels depend only on the window times, which lie on one grid per recording, so they are the same
whether a recording is split into work units or not.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import numpy as np

from soundshard.transforms.labels.annotations import AnnotationError

#: Default share of the shorter of window and event that must overlap (``--min-label-overlap``).
MIN_OVERLAP = 0.25
#: Overlaps up to this many seconds do not count: annotation files write times rounded to about a
#: microsecond, so an event ending "at" a window start may end a rounding error after it.
EPSILON_S = 1e-6
#: Key of the windows of strongly labelled recordings that no event labels, in dataset counts.
BACKGROUND = "<background>"

Event = tuple[float, float, str]


def check_min_overlap(min_overlap: float) -> float:
    """``min_overlap`` as a float in [0, 1].

    Raises:
        ValueError: outside [0, 1] or not a number (the message names the value).
    """
    value = float(min_overlap)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"min_overlap={min_overlap!r} must lie between 0 and 1 (a share of the window or event)"
        )
    return value


def window_labels(
    starts_s: np.ndarray,
    ends_s: np.ndarray,
    events: Sequence[Event],
    *,
    min_overlap: float = MIN_OVERLAP,
) -> list[tuple[str, ...]]:
    """The labels of each window: the events it overlaps by the module's rule.

    Windows must be ordered (starts and ends both non-decreasing), as they are on a recording's
    window grid: the windows an event overlaps are then found by binary search, so the cost is
    ``O(n_events log n_windows + n_windows + pairs)`` where ``pairs`` are the (window, event)
    pairs that overlap at all.

    Args:
        starts_s: float ``[n_windows]`` window starts, seconds from the recording start.
        ends_s: float ``[n_windows]`` window ends (``>= starts_s``).
        events: ``(start_s, end_s, label)`` per event, any order; overlapping events allowed.
        min_overlap: Share of the shorter of window and event that must overlap, in [0, 1]
            (0: any overlap longer than ``EPSILON_S``).

    Returns:
        One tuple per window with its sorted, distinct labels (empty for background).

    Raises:
        ValueError: ``starts_s`` and ``ends_s`` differ in shape, are not ordered, or
            ``min_overlap`` is outside [0, 1].
    """
    min_overlap = check_min_overlap(min_overlap)
    starts = np.asarray(starts_s, dtype=np.float64).reshape(-1)
    ends = np.asarray(ends_s, dtype=np.float64).reshape(-1)
    if starts.shape != ends.shape:
        raise ValueError(f"starts_s {starts.shape} and ends_s {ends.shape} differ in shape")
    if len(starts) > 1 and (np.any(np.diff(starts) < 0) or np.any(np.diff(ends) < 0)):
        raise ValueError("window starts and ends must be non-decreasing (windows on one grid)")
    found: list[set[str]] = [set() for _ in range(len(starts))]
    if not len(starts):
        return []
    for start_s, end_s, label in events:
        if end_s <= start_s:  # a point label: the windows that contain the point
            first = int(np.searchsorted(ends, start_s, side="right"))
            last = int(np.searchsorted(starts, start_s, side="right"))
            for k in range(first, last):
                found[k].add(label)
            continue
        # Candidates overlap the event at all: they end after it starts and start before it ends.
        first = int(np.searchsorted(ends, start_s + EPSILON_S, side="right"))
        last = int(np.searchsorted(starts, end_s - EPSILON_S, side="left"))
        if first >= last:
            continue
        ws, we = starts[first:last], ends[first:last]
        overlap = np.minimum(we, end_s) - np.maximum(ws, start_s)
        needed = min_overlap * np.minimum(we - ws, end_s - start_s)
        for k in np.flatnonzero((overlap > EPSILON_S) & (overlap >= needed - EPSILON_S)):
            found[first + int(k)].add(label)
    return [tuple(sorted(labels)) for labels in found]


def events_of(annotations: Iterable, *, source: str) -> tuple[Event, ...]:
    """The events of parsed annotations (``transforms.annotations.Annotation``), sorted by start,
    end and label, as carried by ``SourceItem.annotations``.

    Args:
        annotations: Parsed annotations (anything with ``start_s``, ``end_s`` and ``label``).
        source: The annotation file, for messages.

    Raises:
        AnnotationError: an annotation with an empty label (it cannot name a class), or with the
            reserved label ``<background>``; the message names the file and the times.
    """
    events = []
    for a in annotations:
        label = a.label.strip()
        if not label:
            raise AnnotationError(
                f"{source}: the annotation at {a.start_s:g}-{a.end_s:g} s has an empty label "
                "(every annotation must name its class)"
            )
        if label == BACKGROUND:
            raise AnnotationError(
                f"{source}: the annotation at {a.start_s:g}-{a.end_s:g} s is labelled {BACKGROUND!r}, "
                "which names the windows outside every annotation; leave background unannotated"
            )
        events.append((float(a.start_s), float(a.end_s), label))
    return tuple(sorted(events))


def trim_events(events: Sequence[Event], *, start_s: float, end_s: float) -> tuple[Event, ...]:
    """The events that can label a window within ``[start_s, end_s]`` (a work unit's span).

    A long recording's work units each carry only their own events, so a unit's size does not
    grow with the recording's annotation count; labels do not change (see :func:`window_labels`:
    only events that meet a window count).
    """
    return tuple(e for e in events if e[1] >= start_s and e[0] <= end_s)


def count_labels(labels: Sequence[tuple[str, ...]]) -> dict[str, int]:
    """Windows per label (a window with two labels counts for both); :data:`BACKGROUND` for windows
    without any."""
    counts: collections.Counter = collections.Counter()
    for window in labels:
        counts.update(window if window else (BACKGROUND,))
    return dict(sorted(counts.items()))
