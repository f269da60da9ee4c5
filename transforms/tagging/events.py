"""From window scores to what people read: file labels, events, hourly summaries, label files.

Pure numpy and text (no Beam, no TF). A recording's windows are scored by a classifier
(``[n_windows, n_classes]`` probabilities); here they become

- per-file scores and labels (:func:`file_scores`, :func:`file_labels`): the mean (or max, or
  majority vote) of the window scores, then per-class thresholds (multi-label);
- events (:func:`find_events`): per class, runs of windows whose score reaches the class's
  threshold, held on with hysteresis, merged across short gaps, short ones dropped;
- hourly summaries per site and label (:func:`hourly_rows`);
- an Audacity label track and a Raven selection table per recording.

Windows overlap (hop < window), so an event's bounds are built from each window's *cell*: the
stretch of time nearer to its centre than to its neighbours' (the window's own bounds at the
recording's ends and around missing windows). A run of windows then covers exactly the time
those windows are the best evidence for, rather than half a window more on each side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from soundshard.schemas.tagging import (
    FLOOR_MIN_WINDOWS,
    FLOOR_PERCENTILE,
    ONSET_BASE_DB,
    ONSET_RISE_SPAN_S,
    ONSET_SEARCH_AFTER_S,
    ONSET_SEARCH_BEFORE_S,
    ONSET_SMOOTH_FRAMES,
    TagConfig,
)
from soundshard.transforms.models import training

HOUR_US = 3_600_000_000


@dataclasses.dataclass(frozen=True)
class Event:
    """A stretch of a recording where one label was detected.

    Attributes:
        label: Class name.
        start_s: Start, seconds from the recording start.
        end_s: End, seconds from the recording start.
        confidence: Mean score of the label over the event's windows.
        peak: Highest window score of the label within the event.
        n_windows: Windows the event is made of (not counting those of gaps merged over).
    """

    label: str
    start_s: float
    end_s: float
    confidence: float
    peak: float
    n_windows: int

    @property
    def duration_s(self) -> float:
        """Length of the event in seconds."""
        return self.end_s - self.start_s


def window_cells(
    start_s: np.ndarray, end_s: np.ndarray, window_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each window's cell: from the midpoint with its previous neighbour's centre to the midpoint
    with its next one's, where the neighbour is the adjacent window on the grid; otherwise (first,
    last, next to a missing window) the window's own bound.

    Args:
        start_s: ``[n]`` window starts (sorted by window index).
        end_s: ``[n]`` window ends.
        window_index: ``[n]`` window indices on the recording's grid.

    Returns:
        ``(cell_start_s, cell_end_s)``, each ``[n]``.
    """
    centre = (start_s + end_s) / 2
    cell_start = start_s.astype(np.float64).copy()
    cell_end = end_s.astype(np.float64).copy()
    adjacent = np.diff(window_index) == 1
    mid = (centre[:-1] + centre[1:]) / 2
    cell_end[:-1] = np.where(adjacent, mid, cell_end[:-1])
    cell_start[1:] = np.where(adjacent, mid, cell_start[1:])
    return cell_start, cell_end


def file_scores(scores: np.ndarray, method: str, *, silent: np.ndarray | None = None) -> np.ndarray:
    """One recording's scores ``[n_classes]`` from its window scores ``[n_windows, n_classes]``
    (mean, max renormalised, or majority vote; digitally ``silent`` windows left out unless all
    are; as clip aggregation in training)."""
    _, out = training.aggregate(scores, np.zeros(len(scores), dtype=np.int64), method=method, silent=silent)
    return out[0]


def file_labels(scores: np.ndarray, config: TagConfig) -> list[str]:
    """Labels whose file score reaches their threshold, best first (multi-label)."""
    order = np.argsort(-scores, kind="stable")
    return [config.label_names[i] for i in order if scores[i] >= config.file_thresholds[i]]


def find_events(
    scores: np.ndarray,
    *,
    start_s: np.ndarray,
    end_s: np.ndarray,
    window_index: np.ndarray,
    config: TagConfig,
    level_db: np.ndarray | None = None,
    duration_s: float | None = None,
    silent: np.ndarray | None = None,
    floor_db: float | None = None,
    frame_db: np.ndarray | None = None,
) -> list[Event]:
    """Events of every label in one recording, sorted by start then label.

    Per class: an event starts at a window whose score reaches the class's threshold and goes on
    while consecutive windows (adjacent on the grid) score at least the threshold minus
    ``config.hysteresis``, after each class's scores are smoothed over
    ``config.median_filter_windows`` windows; events of a label less than ``config.max_gap_s``
    apart are merged; events shorter than ``config.min_duration_s`` are dropped. With
    ``config.min_level_db`` set,
    windows quieter than it (``level_db``) take no part in events; with
    ``config.min_level_above_floor_db`` set, neither do windows less than that above the
    recording's floor (:func:`level_floor`). With ``config.onset_rise_db`` and ``frame_db``, each
    event's start then moves to where the sound rises (:func:`refine_onsets`).

    Args:
        scores: ``[n, n_classes]`` window scores, windows sorted by index.
        start_s: ``[n]`` window starts in seconds from the recording start.
        end_s: ``[n]`` window ends.
        window_index: ``[n]`` window indices on the recording's grid.
        config: Thresholds and event rules.
        level_db: ``[n]`` loudest log-mel value of each window, for the activity gate.
        duration_s: Length of the recording: events end there at the latest (the last window
            may be padded beyond it).
        silent: ``[n]`` digitally silent windows, left out of the recording's floor.
        floor_db: The floor to gate on, when the recording's windows are not all given (a stream:
            the floor of what was heard so far; ``-inf`` for none yet); ``None``: from ``level_db``.
        frame_db: ``[n, window_frames]`` broadband level of each window's frames
            (``melspec.frame_levels_db``), for placing onsets; ``None``: starts stay on the grid.

    Returns:
        The events.
    """
    n = len(scores)
    if n == 0:
        return []
    cell_start, cell_end = window_cells(start_s, end_s, window_index)
    if duration_s is not None:
        cell_end = np.minimum(cell_end, duration_s)
    gate = np.ones(n, dtype=bool)
    if config.min_level_db is not None and level_db is not None:
        gate = np.asarray(level_db) >= config.min_level_db
    if config.min_level_above_floor_db is not None and level_db is not None:
        floor = level_floor(level_db, silent=silent) if floor_db is None else floor_db
        if floor is not None:
            gate &= np.asarray(level_db) >= floor + config.min_level_above_floor_db
    adjacent = np.concatenate([[False], np.diff(window_index) == 1])
    scores = median_filtered(scores, size=config.median_filter_windows, adjacent=adjacent)
    events = []
    for c, label in enumerate(config.label_names):
        on = config.window_thresholds[c]
        off = max(on - config.hysteresis, 1e-9)
        column = scores[:, c]
        starts_here = (column >= on) & gate
        holds = (column >= off) & gate
        runs = []  # [first, last] window positions
        for k in range(n):
            if runs and runs[-1][1] == k - 1 and adjacent[k] and holds[k]:
                runs[-1][1] = k
            elif starts_here[k]:
                runs.append([k, k])
        # A run is held on only forwards; let it also reach back over the windows just before it
        # that hold (the onset usually lies there).
        for run in runs:
            while run[0] > 0 and adjacent[run[0]] and holds[run[0] - 1]:
                run[0] -= 1
        merged: list[list[list[int]]] = []  # groups of runs
        for run in runs:
            if merged:
                last = merged[-1][-1][1]
                if last >= run[0] or cell_start[run[0]] - cell_end[last] <= config.max_gap_s:
                    merged[-1].append(run)
                    continue
            merged.append([run])
        for group in merged:
            first, last = group[0][0], max(r[1] for r in group)
            begin, end = float(cell_start[first]), float(cell_end[last])
            if end - begin < config.min_duration_s:
                continue
            members = np.zeros(n, dtype=bool)
            for a, b in group:
                members[a : b + 1] = True
            gated = members & gate
            values = column[gated] if gated.any() else column[members]
            events.append(
                Event(label, begin, end, float(values.mean()), float(values.max()), int(members.sum()))
            )
    events.sort(key=lambda e: (e.start_s, e.label))
    if frame_db is not None and config.onset_rise_db is not None:
        times, levels = frame_track(frame_db, start_s=start_s, end_s=end_s)
        events = refine_onsets(events, times=times, levels=levels, rise_db=config.onset_rise_db)
    return events


def frame_track(
    frame_db: np.ndarray, *, start_s: np.ndarray, end_s: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A recording's frame levels on its frame grid, from its windows' frames.

    Window ``k``'s frame ``j`` is centred at ``start_s[k] + j * (end_s[k] - start_s[k]) /
    window_frames``; overlapping windows hold the same frames (where their ``top_db`` clamps differ,
    the lowest value is the unclamped one). Frames no window holds (missing windows) are absent.

    Args:
        frame_db: ``[n, window_frames]`` levels of each window's frames, dB.
        start_s: ``[n]`` window starts.
        end_s: ``[n]`` window ends.

    Returns:
        ``(times_s, levels_db)``, each ``[n_frames]``, sorted by time, NaN levels where no window
        covers a frame between covered ones.
    """
    frame_db = np.asarray(frame_db, np.float64)
    if frame_db.size == 0:
        return np.zeros(0), np.zeros(0)
    n_frames = frame_db.shape[1]
    frame_s = float(end_s[0] - start_s[0]) / n_frames
    first = np.rint(np.asarray(start_s, np.float64) / frame_s).astype(np.int64)
    index = (first[:, None] + np.arange(n_frames)[None, :]).ravel()
    low = int(index.min())
    levels = np.full(int(index.max()) - low + 1, np.inf)
    np.minimum.at(levels, index - low, frame_db.ravel())
    levels[np.isinf(levels)] = np.nan
    return (np.arange(len(levels)) + low) * frame_s, levels


def refine_onsets(
    events: Sequence[Event],
    *,
    times: np.ndarray,
    levels: np.ndarray,
    rise_db: float,
    previous_end: dict[str, float] | None = None,
) -> list[Event]:
    """Each event's start moved to where the sound rises, when it rises clearly.

    The frame levels are smoothed (a running mean of ``ONSET_SMOOTH_FRAMES``); a frame's rise is
    its level over the lowest level of the frames in the ``ONSET_RISE_SPAN_S`` before it. Among
    the frames from ``ONSET_SEARCH_BEFORE_S`` before an event's start to ``ONSET_SEARCH_AFTER_S``
    after it (and before its end), the one with the largest rise marks the onset if that rise is
    at least ``rise_db``: the start moves to where the climb begins, the last of the frames before
    it within ``ONSET_BASE_DB`` of their lowest level (never before 0 or before the end of the
    label's previous event). Otherwise it stays.

    Args:
        events: Events sorted by start (:func:`find_events`).
        times: ``[m]`` frame centres, seconds, evenly spaced (:func:`frame_track`).
        levels: ``[m]`` frame levels, dB (NaN where unknown).
        rise_db: Smallest rise that moves a start.
        previous_end: Per label, the end of its last event before these (a stream's events
            emitted earlier); updated with these events' ends.

    Returns:
        The events, with starts moved, sorted by start then label.
    """
    previous_end = {} if previous_end is None else previous_end
    span = max(1, int(round(ONSET_RISE_SPAN_S / float(times[1] - times[0])))) if len(times) > 1 else 1
    if len(times) <= span or not events:  # too short to hold a rise and the frames before it
        for event in events:
            previous_end[event.label] = event.end_s
        return list(events)
    smooth = _running_mean(np.asarray(levels, np.float64), ONSET_SMOOTH_FRAMES)
    # lowest level (and where) among the `span` frames before each frame k >= span
    before = np.lib.stride_tricks.sliding_window_view(smooth, span)[:-1]
    filled = np.where(np.isnan(before), np.inf, before)
    lowest_at = np.argmin(filled, axis=1)
    lowest = filled[np.arange(len(filled)), lowest_at]
    rise = smooth[span:] - lowest  # rise[k - span] is frame k's
    out = []
    for event in events:
        a = int(np.searchsorted(times, event.start_s - ONSET_SEARCH_BEFORE_S, side="left"))
        b = int(np.searchsorted(times, min(event.start_s + ONSET_SEARCH_AFTER_S, event.end_s), side="right"))
        a, b = max(a, span), min(b, len(times))
        start = event.start_s
        if b > a:
            window = rise[a - span : b - span]
            if np.isfinite(window).any():
                k = int(np.nanargmax(np.where(np.isfinite(window), window, -np.inf)))
                if window[k] >= rise_db:
                    # where the climb begins: the last frame before it still near the lowest level
                    f = a + k  # the frame of the largest rise
                    base = smooth[f - span : f]
                    near = np.flatnonzero(base <= lowest[f - span] + ONSET_BASE_DB)
                    onset = float(times[f - span + (near[-1] if len(near) else lowest_at[f - span])])
                    floor = max(0.0, previous_end.get(event.label, 0.0))
                    start = min(max(onset, floor), event.end_s)
        moved = dataclasses.replace(event, start_s=start) if start != event.start_s else event
        previous_end[event.label] = moved.end_s
        out.append(moved)
    out.sort(key=lambda e: (e.start_s, e.label))
    return out


def _running_mean(values: np.ndarray, size: int) -> np.ndarray:
    """Running mean over ``size`` values (odd), the ends averaging what they have; NaN stays NaN."""
    if size <= 1:
        return values
    half = size // 2
    known = np.isfinite(values)
    padded = np.pad(np.where(known, values, 0.0), half)
    counts = np.pad(known.astype(np.float64), half)
    kernel = np.ones(size)
    total = np.convolve(padded, kernel, mode="valid")
    n = np.convolve(counts, kernel, mode="valid")
    out = np.divide(total, n, out=np.full(len(values), np.nan), where=n > 0)
    out[~known] = np.nan
    return out


def level_floor(level_db: np.ndarray, *, silent: np.ndarray | None = None) -> float | None:
    """A recording's background level: the ``FLOOR_PERCENTILE`` th percentile of its sounding
    windows' levels (as L90, the level exceeded 90 % of the time, is of a sound level meter's
    readings), or ``None`` with fewer than ``FLOOR_MIN_WINDOWS`` sounding windows (a short clip
    may hold one sound throughout: no background to stand above)."""
    level_db = np.asarray(level_db, np.float64)
    heard = level_db if silent is None else level_db[~np.asarray(silent, bool)]
    if len(heard) < FLOOR_MIN_WINDOWS:
        return None
    return float(np.percentile(heard, FLOOR_PERCENTILE))


def median_filtered(scores: np.ndarray, *, size: int, adjacent: np.ndarray | None = None) -> np.ndarray:
    """Each class's scores ``[n, n_classes]`` replaced by their running median over ``size``
    windows (odd; 1 returns them as they are). A run of adjacent windows (``adjacent[k]``: window
    ``k`` follows window ``k - 1`` on the grid) is filtered on its own, its ends repeating their
    edge values, so a gap in the windows never mixes scores from either side of it."""
    if size <= 1 or len(scores) == 0:
        return scores
    from scipy.ndimage import median_filter

    if adjacent is None:
        adjacent = np.concatenate([[False], np.ones(len(scores) - 1, bool)])
    out = np.empty_like(scores)
    starts = np.flatnonzero(~adjacent)
    for a, b in zip(starts, np.r_[starts[1:], len(scores)], strict=True):
        out[a:b] = median_filter(scores[a:b], size=(size, 1), mode="nearest")
    return out


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, values)``, each ``[n, k]``: the k best classes per window, best first."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def hourly_rows(events: Iterable[dict]) -> list[dict]:
    """Hourly summaries of events with absolute times: per (site, hour, label) the number of
    events starting in the hour, the seconds of events within the hour (an event spanning hours
    is shared out between them) and the mean confidence of the events starting in it.

    Args:
        events: Rows with ``site``, ``label``, ``confidence``, ``start_us`` and ``end_us``
            (microseconds since the Unix epoch, UTC). Rows without times are skipped.

    Returns:
        Rows ``{site, hour_us, label, events, duration_s, confidence_sum}`` sorted by site,
        hour and label (``confidence_sum / events`` is the mean; sums combine across workers).
    """
    table: dict[tuple, list] = {}
    for row in events:
        start, end = row.get("start_us"), row.get("end_us")
        if start is None or end is None:
            continue
        key = (row.get("site"), row["label"])
        hour = start - start % HOUR_US
        first = table.setdefault((*key, hour), [0, 0.0, 0.0])
        first[0] += 1
        first[2] += float(row["confidence"])
        while hour < end:
            share_us = min(end, hour + HOUR_US) - max(start, hour)
            cell = table.setdefault((*key, hour), [0, 0.0, 0.0])
            cell[1] += share_us / 1e6
            hour += HOUR_US
    return [
        {
            "site": site,
            "hour_us": hour,
            "label": label,
            "events": count,
            "duration_s": duration,
            "confidence_sum": confidence,
        }
        for (site, label, hour), (count, duration, confidence) in sorted(
            table.items(), key=lambda kv: (kv[0][0] or "", kv[0][2], kv[0][1])
        )
    ]


def audacity_labels(events: Sequence[Event]) -> str:
    """An Audacity label track: ``start<TAB>end<TAB>label`` per line, seconds with 6 decimals."""
    return "".join(f"{e.start_s:.6f}\t{e.end_s:.6f}\t{e.label}\n" for e in events)


RAVEN_COLUMNS = (
    "Selection",
    "View",
    "Channel",
    "Begin Time (s)",
    "End Time (s)",
    "Low Freq (Hz)",
    "High Freq (Hz)",
    "Annotation",
    "Confidence",
)


def raven_table(events: Sequence[Event], *, high_freq_hz: float) -> str:
    """A Raven selection table (tab-separated, header row, one selection per event)."""
    lines = ["\t".join(RAVEN_COLUMNS)]
    for i, e in enumerate(events, start=1):
        values = (
            str(i),
            "Spectrogram 1",
            "1",
            f"{e.start_s:.6f}",
            f"{e.end_s:.6f}",
            "0.0",
            f"{high_freq_hz:.1f}",
            e.label,
            f"{e.confidence:.4f}",
        )
        lines.append("\t".join(values))
    return "\n".join(lines) + "\n"


#: Lowest threshold :func:`best_thresholds` picks: scores are probabilities over all classes, and
#: near chance (0.1 of 10 classes) a score is no evidence of a sound: a low threshold found best
#: on a validation fold of weakly labelled windows turns hours of background into one event.
MIN_THRESHOLD = 0.3


def best_thresholds(
    scores: np.ndarray, labels: np.ndarray, *, default: float = 0.5, lowest: float = MIN_THRESHOLD
) -> list[float]:
    """Per class, the score threshold (0.05 steps from ``lowest`` to 0.95) with the best F1 of
    "score >= threshold" against the truth (one-vs-rest) on held-out data; ties go to the
    threshold nearest ``default``; a class absent from the truth keeps ``default``.

    Args:
        scores: ``[n, n_classes]`` scores.
        labels: ``[n]`` true class indices (-1: none of the classes), or ``[n, n_classes]``
            multi-hot truth.
        default: Threshold of absent classes, and the preferred one among equals.
        lowest: Lowest threshold considered.

    Returns:
        ``n_classes`` thresholds in [``lowest``, 0.95].
    """
    labels = np.asarray(labels)
    grid = np.round(np.arange(lowest, 0.951, 0.05), 2)
    out = []
    for c in range(scores.shape[1]):
        truth = labels == c if labels.ndim == 1 else labels[:, c] > 0
        if not truth.any():
            out.append(default)
            continue
        best, best_t = -1.0, default
        for t in grid:
            predicted = scores[:, c] >= t
            tp = float(np.sum(predicted & truth))
            f1 = 2 * tp / (predicted.sum() + truth.sum()) if predicted.any() else 0.0
            if f1 > best + 1e-12 or (math.isclose(f1, best) and abs(t - default) < abs(best_t - default)):
                best, best_t = f1, float(t)
        out.append(best_t)
    return out


def mean_average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """The mean over classes with true windows of :func:`average_precision` (``scores`` and
    ``truth`` ``[n, n_classes]``); 0 when no class has any."""
    from soundshard.transforms.tagging.scoring import average_precision

    values = [average_precision(truth[:, c] > 0, scores[:, c]) for c in range(scores.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else 0.0


def window_f1(scores: np.ndarray, truth: np.ndarray, thresholds, label_names) -> dict:
    """Per class and overall (micro) precision, recall and F1 of "score >= threshold" against a
    multi-hot ``truth`` ``[n, n_classes]``, with each class's average precision."""
    from soundshard.transforms.tagging.scoring import average_precision

    predicted = scores >= np.asarray(thresholds, np.float32)[None, :]
    truth = truth > 0
    per_class = {}
    for c, name in enumerate(label_names):
        tp = int((predicted[:, c] & truth[:, c]).sum())
        fp, fn = int(predicted[:, c].sum()) - tp, int(truth[:, c].sum()) - tp
        per_class[name] = {
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None,
            "average_precision": None
            if not truth[:, c].any()
            else round(average_precision(truth[:, c], scores[:, c]), 4),
        }
    tp = int((predicted & truth).sum())
    fp, fn = int(predicted.sum()) - tp, int(truth.sum()) - tp
    return {
        "windows": len(scores),
        "per_class": per_class,
        "micro": {
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None,
        },
        "mean_average_precision": round(mean_average_precision(scores, truth), 4),
    }
