"""Event rules set for the events ``soundshard tag`` reports, on annotated validation recordings
(pure numpy, no Beam, no TensorFlow).

A model trained with strongly labelled recordings (``features --labels``) holds some of them out to
validate. Their window scores, run through the event rules of ``soundshard tag``
(:func:`soundshard.transforms.tagging.events.find_events`) with the model's thresholds, give events that
can be compared with the annotations. :func:`calibrate` tries a small grid of rules (running
median, hysteresis, merging gap, the gate above the recording's floor) and keeps the one whose
events score best: the mean of segment F1 (1 s segments) and event F1 (onsets within 0.5 s),
micro-averaged over the classes, as ``soundshard score`` reports them. How well a rule works
depends on the model (a model that scores the whole of a sound high wants little hysteresis; one
whose scores dip inside sounds wants more), so it is set per model on its own validation data.

The reference events are the annotations as the windows see them: each run of consecutive windows
that the strong labels mark for a class becomes one event spanning the run's cells (the span
:func:`~soundshard.transforms.tagging.events.window_cells` gives, the one detected events get). Detected and
reference events then lie on the same grid. An event matches a reference event of its class when
their onsets are at most ``collar_s`` apart (sed_eval's event-based rule with offsets ignored), each
used once; on a line, greedy matching in time order finds the largest such matching. Segments
follow sed_eval's segment-based rule (``scoring.segment_truth``): an event makes active every
segment it touches.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import numpy as np

from soundshard.schemas.tagging import TagConfig
from soundshard.transforms.tagging import events, scoring

#: Onset collar in seconds and segment length, as ``soundshard score`` uses by default.
COLLAR_S = 0.5
SEGMENT_S = 1.0
#: Rules tried: every combination (those fixed by the caller take one value).
GRID = {
    "median_filter_windows": (1, 3, 5, 7),
    "hysteresis": (0.1, 0.2, 0.3, 0.4),
    "max_gap_s": (0.5, 1.0, 1.5, 2.0),
    "min_level_above_floor_db": (None, 3.0, 6.0, 9.0),
}


@dataclasses.dataclass(frozen=True)
class Recording:
    """One annotated recording's windows, sorted by window index.

    Attributes:
        clip_id: The recording.
        scores: float ``[n, n_classes]`` window scores.
        truth: ``[n, n_classes]`` the windows' strong labels (0/1).
        window_index: int ``[n]`` window indices on the recording's grid.
        start_s: ``[n]`` window starts (s).
        end_s: ``[n]`` window ends (s).
        level_db: ``[n]`` loudest log-mel value of each window (the gates), or ``None``.
        silent: bool ``[n]`` digitally silent windows, or ``None``.
    """

    clip_id: str
    scores: np.ndarray
    truth: np.ndarray
    window_index: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray
    level_db: np.ndarray | None = None
    silent: np.ndarray | None = None

    @property
    def duration_s(self) -> float:
        return float(self.end_s.max()) if len(self.end_s) else 0.0

    def reference(self, c: int) -> list[tuple[float, float]]:
        """Class ``c``'s reference events: each run of adjacent windows labelled ``c``, as the
        span of its cells."""
        return self._references[c]

    @functools.cached_property
    def _references(self) -> list[list[tuple[float, float]]]:
        # the truth does not change with the rules tried: found once per recording
        cell_start, cell_end = events.window_cells(self.start_s, self.end_s, self.window_index)
        adjacent = np.concatenate([[False], np.diff(self.window_index) == 1])
        out = []
        for c in range(self.truth.shape[1]):
            on = self.truth[:, c] > 0.5
            spans: list[list[float]] = []
            for k in np.flatnonzero(on):
                if spans and adjacent[k] and on[k - 1]:
                    spans[-1][1] = float(cell_end[k])
                else:
                    spans.append([float(cell_start[k]), float(cell_end[k])])
            out.append([(a, b) for a, b in spans])
        return out


def recordings(
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    clip_ids: np.ndarray,
    times: np.ndarray,
    level_db: np.ndarray | None = None,
    silent: np.ndarray | None = None,
) -> list[Recording]:
    """Windows of several recordings (any order) as :class:`Recording` s, in clip id order.

    Args:
        scores: ``[n, n_classes]`` window scores.
        truth: ``[n, n_classes]`` strong labels.
        clip_ids: ``[n]`` recording of each window.
        times: ``[n, 3]`` window index, start and end (``WindowSet.times``).
        level_db: ``[n]`` loudest log-mel value of each window.
        silent: ``[n]`` digitally silent windows.
    """
    out = []
    clip_ids = np.asarray(clip_ids, dtype=object)
    for clip in sorted(set(clip_ids.tolist())):
        rows = np.flatnonzero(clip_ids == clip)
        rows = rows[np.argsort(times[rows, 0], kind="stable")]
        out.append(
            Recording(
                clip_id=str(clip),
                scores=np.asarray(scores[rows], np.float32),
                truth=np.asarray(truth[rows]),
                window_index=times[rows, 0].astype(np.int64),
                start_s=times[rows, 1],
                end_s=times[rows, 2],
                level_db=None if level_db is None else np.asarray(level_db)[rows],
                silent=None if silent is None else np.asarray(silent, bool)[rows],
            )
        )
    return out


def matched(reference: Sequence[float], estimated: Sequence[float], *, collar_s: float = COLLAR_S) -> int:
    """How many estimated onsets pair with a reference onset at most ``collar_s`` away, each onset
    used once (the largest such matching: greedy in time order is optimal on a line)."""
    ref, est = np.sort(np.asarray(reference, float)), np.sort(np.asarray(estimated, float))
    i = j = hits = 0
    while i < len(ref) and j < len(est):
        if abs(ref[i] - est[j]) <= collar_s + 1e-9:
            hits, i, j = hits + 1, i + 1, j + 1
        elif est[j] < ref[i]:
            j += 1
        else:
            i += 1
    return hits


def counts(
    recs: Sequence[Recording],
    config: TagConfig,
    *,
    collar_s: float = COLLAR_S,
    segment_s: float = SEGMENT_S,
) -> np.ndarray:
    """int ``[n_classes, 2, 3]``: per class, for events and for segments, the matched, reference
    and detected counts over ``recs`` when their events are found with ``config``."""
    out = np.zeros((len(config.label_names), 2, 3), np.int64)
    for rec in recs:
        found = events.find_events(
            rec.scores,
            start_s=rec.start_s,
            end_s=rec.end_s,
            window_index=rec.window_index,
            config=config,
            level_db=rec.level_db,
            duration_s=rec.duration_s,
            silent=rec.silent,
        )
        labels = config.label_names
        reference = [(a, b, label) for c, label in enumerate(labels) for a, b in rec.reference(c)]
        n = scoring.n_segments(rec.duration_s, segment_s=segment_s)
        want = scoring.segment_truth(reference, labels=labels, segment_s=segment_s, n=n)
        got = scoring.segment_truth(
            [(e.start_s, e.end_s, e.label) for e in found], labels=labels, segment_s=segment_s, n=n
        )
        out[:, 1] += np.stack([(want & got).sum(axis=0), want.sum(axis=0), got.sum(axis=0)], axis=1)
        for c, label in enumerate(labels):
            onsets = [e.start_s for e in found if e.label == label]
            ref = [a for a, _ in rec.reference(c)]
            out[c, 0] += (matched(ref, onsets, collar_s=collar_s), len(ref), len(onsets))
    return out


def f1(counts: np.ndarray) -> np.ndarray:
    """F1 of ``[..., 3]`` (matched, reference, detected) counts; 0 where there is nothing."""
    counts = np.asarray(counts, float)
    total = counts[..., 1] + counts[..., 2]
    return np.divide(2 * counts[..., 0], total, out=np.zeros(total.shape), where=total > 0)


def overall(found: np.ndarray) -> tuple[float, float]:
    """``(segment F1, event F1)`` of :func:`counts`, micro over every class (as sed_eval's overall
    figures: false alarms of classes without reference events count too)."""
    event_f1, segment_f1 = f1(np.asarray(found).sum(axis=0))
    return float(segment_f1), float(event_f1)


def calibrate(
    recs: Sequence[Recording],
    config: TagConfig,
    *,
    grid: dict | None = None,
    collar_s: float = COLLAR_S,
    segment_s: float = SEGMENT_S,
) -> dict:
    """The event rules whose events on ``recs`` have the best mean of segment and event F1.

    Args:
        recs: Annotated validation recordings.
        config: Thresholds and the rules not searched (``grid`` names those searched).
        grid: ``{rule: candidate values}`` (default :data:`GRID`); a rule given one value is fixed.

    Returns:
        ``{"rules": {rule: value}, "segment_f1", "event_f1", "score" (their mean; micro over the
        classes, as sed_eval's overall figures), "per_class": {label: {"segment_f1", "event_f1",
        "reference"}}, "recordings", "tried", "collar_s", "segment_s"}``. Of equally good rules,
        the first in the grid's order (the lightest: shortest median, least hysteresis).
    """
    grid = dict(GRID if grid is None else grid)
    names = list(grid)
    best = None
    for values in itertools.product(*(grid[k] for k in names)):
        rules = dict(zip(names, values, strict=True))
        found = counts(recs, dataclasses.replace(config, **rules), collar_s=collar_s, segment_s=segment_s)
        segment_f1, event_f1 = overall(found)
        score = (event_f1 + segment_f1) / 2
        if best is None or score > best[0] + 1e-12:
            best = (score, rules, found, event_f1, segment_f1)
    score, rules, found, event_f1, segment_f1 = best
    return {
        "rules": rules,
        "score": round(score, 4),
        "segment_f1": round(segment_f1, 4),
        "event_f1": round(event_f1, 4),
        "per_class": {
            label: {
                "segment_f1": round(float(f1(found[c, 1])), 4),
                "event_f1": round(float(f1(found[c, 0])), 4),
                "reference": int(found[c, 0, 1]),
            }
            for c, label in enumerate(config.label_names)
        },
        "recordings": len(recs),
        "tried": int(np.prod([len(v) for v in grid.values()])),
        "collar_s": collar_s,
        "segment_s": segment_s,
    }
