"""Scoring tags against reference annotations: the DCASE metrics and a threshold-free figure.

Pure numpy and sed_eval (no Beam, no TF, no I/O). ``pipelines/score.py`` reads the files.

- **Segment-based** and **event-based** precision, recall, F1 and error rate, overall (micro:
  counts summed over classes and recordings) and per class, computed by sed_eval itself
  (Mesaros, Heittola & Virtanen, "Metrics for polyphonic sound event detection", 2016), so the
  numbers are those the DCASE challenges report. Segment-based: on a grid of ``segment_s``
  segments a class is active in a segment when an event of it overlaps the segment (onset
  rounded down, offset up). Event-based: an estimated event matches a reference event of the same
  label whose onset is within ``collar_s`` (and, with ``evaluate_offset``, whose offset is within
  ``max(collar_s, offset_fraction x reference length)``); one-to-one, optimal matching.
- **Segment average precision** (threshold-free): per class, the segments of the same grid ranked
  by the highest window score covering them, against the segment truth above; the area under the
  precision-recall steps (``sum (R_n - R_{n-1}) P_n``, as scikit-learn's
  ``average_precision_score``). A window covers the stretch nearer its centre than its
  neighbours' (its *cell*, as events are built in ``transforms/tagging/events.py``), so overlapping windows
  do not smear a score over half a window more.
- **Best segment F1** (threshold-free too): per class, the segment F1 at the threshold of that
  ranking which maximises it (the ``best_fscore`` of the DCASE threshold-free toolboxes), and the
  micro F1 over classes when each class sits at its own best threshold. Set on the scored data
  itself, it is what threshold tuning alone could reach with these scores: a ceiling, not a result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from soundshard.schemas.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Recording:
    """One recording to score: its reference and estimated events.

    Attributes:
        name: Identifier (the clip id); events of different recordings never match.
        duration_s: Length of the recording (the segment grid covers it).
        reference: ``(start_s, end_s, label)`` reference events, labels among the scored classes.
        estimated: ``(start_s, end_s, label)`` estimated events.
    """

    name: str
    duration_s: float
    reference: tuple[tuple[float, float, str], ...]
    estimated: tuple[tuple[float, float, str], ...]


def _finite(value) -> float | None:
    """A float for JSON: ``None`` for NaN (a ratio with a zero denominator)."""
    value = float(value)
    return None if math.isnan(value) else value


def _event_dicts(name: str, events: Sequence[tuple[float, float, str]]) -> list[dict]:
    return [
        {"filename": name, "event_label": label, "onset": float(a), "offset": float(b)}
        for a, b, label in events
    ]


def _summary(metrics, labels: Sequence[str], *, kind: str) -> dict:
    """Overall, per-class and macro figures of an evaluated sed_eval metrics object."""
    overall = metrics.results_overall_metrics()
    f, er = overall["f_measure"], overall["error_rate"]
    counts = metrics.overall
    out = {
        "overall": {
            "precision": _finite(f["precision"]),
            "recall": _finite(f["recall"]),
            "f1": _finite(f["f_measure"]),
            "error_rate": _finite(er["error_rate"]),
            "substitution_rate": _finite(er["substitution_rate"]),
            "deletion_rate": _finite(er["deletion_rate"]),
            "insertion_rate": _finite(er["insertion_rate"]),
            "n_reference": int(counts["Nref"]),
            "n_estimated": int(counts["Nsys"]),
            "tp": int(counts["Ntp"]),
            "fp": int(counts["Nfp"]),
            "fn": int(counts["Nfn"]),
        }
    }
    if kind == "event":
        out["overall"]["substitutions"] = int(counts["Nsubs"])
    per_class = {}
    class_wise = metrics.results_class_wise_metrics()
    for label in labels:
        cf, cer = class_wise[label]["f_measure"], class_wise[label]["error_rate"]
        c = metrics.class_wise[label]
        per_class[label] = {
            "precision": _finite(cf["precision"]),
            "recall": _finite(cf["recall"]),
            "f1": _finite(cf["f_measure"]),
            "error_rate": _finite(cer["error_rate"]),
            "deletion_rate": _finite(cer["deletion_rate"]),
            "insertion_rate": _finite(cer["insertion_rate"]),
            "n_reference": int(c["Nref"]),
            "n_estimated": int(c["Nsys"]),
            "tp": int(c["Ntp"]),
            "fp": int(c["Nfp"]),
            "fn": int(c["Nfn"]),
        }
    out["per_class"] = per_class
    # sed_eval's class-wise average skips NaN, which would drop a class that has reference events
    # but was never detected (its F1 is 0/0 there) and flatter the mean: it counts 0 here.
    present = [v for v in per_class.values() if v["n_reference"] > 0]
    out["macro"] = {
        "f1": float(np.mean([v["f1"] or 0.0 for v in present])) if present else None,
        "classes": len(present),
    }
    return out


def sed_metrics(
    recordings: Sequence[Recording],
    *,
    labels: Sequence[str],
    segment_s: float = 1.0,
    collar_s: float = 0.5,
    evaluate_offset: bool = False,
    offset_fraction: float = 0.2,
) -> dict:
    """Segment-based and event-based metrics of estimated against reference events (sed_eval).

    Args:
        recordings: The recordings; metrics are accumulated over all of them (micro).
        labels: The classes scored (events of other labels must be filtered out before).
        segment_s: Segment length of the segment-based metrics, seconds.
        collar_s: Onset (and offset) collar of the event-based metrics, seconds.
        evaluate_offset: Event-based matching also checks offsets (within
            ``max(collar_s, offset_fraction x reference length)``).
        offset_fraction: sed_eval's ``percentage_of_length`` for offsets.

    Returns:
        ``{"segment": {...}, "event": {...}}``, each with ``overall`` (precision, recall, f1,
        error_rate and its parts, n_reference, n_estimated, tp, fp, fn; NaN as ``None``),
        ``per_class`` (the same per label) and ``macro`` (mean F1 over classes with reference
        events).

    Raises:
        ConfigError: a non-positive ``segment_s`` or ``collar_s``, an ``offset_fraction`` outside
            [0, 1], or an event whose label is not in ``labels``.
    """
    import sed_eval

    check_settings(segment_s=segment_s, collar_s=collar_s, offset_fraction=offset_fraction)
    labels = list(labels)
    known = set(labels)
    for rec in recordings:
        for what, events in (("reference", rec.reference), ("estimated", rec.estimated)):
            unknown = sorted({label for _, _, label in events} - known)
            if unknown:
                raise ConfigError(f"{rec.name}: {what} labels {unknown} are not among the classes {labels}")
    segment = sed_eval.sound_event.SegmentBasedMetrics(
        event_label_list=labels, time_resolution=float(segment_s)
    )
    event = sed_eval.sound_event.EventBasedMetrics(
        event_label_list=labels,
        evaluate_onset=True,
        evaluate_offset=evaluate_offset,
        t_collar=float(collar_s),
        percentage_of_length=float(offset_fraction),
    )
    for rec in recordings:
        reference = _event_dicts(rec.name, rec.reference)
        estimated = _event_dicts(rec.name, rec.estimated)
        # The whole recording is evaluated (its silent tail too), not only up to the last event;
        # events running past the end (a reference drawn too long) still count.
        length_s = max([rec.duration_s] + [e[1] for e in rec.reference] + [e[1] for e in rec.estimated])
        segment.evaluate(reference, estimated, evaluated_length_seconds=float(length_s))
        event.evaluate(reference, estimated)
    return {
        "segment": _summary(segment, labels, kind="segment"),
        "event": _summary(event, labels, kind="event"),
    }


def check_settings(*, segment_s: float, collar_s: float, offset_fraction: float, flags: bool = False) -> None:
    """Raises ConfigError naming a non-positive segment length or collar, or an offset fraction
    outside [0, 1] (as the command's flags, ``--segment-s``, with ``flags``)."""

    def name(field: str) -> str:
        return "--" + field.replace("_", "-") if flags else field

    if not segment_s > 0:
        raise ConfigError(f"{name('segment_s')}={segment_s} must be positive (seconds)")
    if not collar_s > 0:
        raise ConfigError(f"{name('collar_s')}={collar_s} must be positive (seconds)")
    if not 0.0 <= offset_fraction <= 1.0:
        raise ConfigError(f"{name('offset_fraction')}={offset_fraction} must be in [0, 1]")


def n_segments(duration_s: float, *, segment_s: float) -> int:
    """Segments of ``segment_s`` covering ``duration_s`` (the last one may be partial)."""
    return int(math.ceil(duration_s / segment_s - 1e-9)) if duration_s > 0 else 0


def segment_truth(
    events: Sequence[tuple[float, float, str]], *, labels: Sequence[str], segment_s: float, n: int
) -> np.ndarray:
    """Segment activity of events, as sed_eval's event roll (onset rounded down, offset up).

    Args:
        events: ``(start_s, end_s, label)``; labels outside ``labels`` are ignored.
        labels: Class names (columns).
        segment_s: Segment length, seconds.
        n: Number of segments.

    Returns:
        bool ``[n, n_classes]``.
    """
    column = {label: c for c, label in enumerate(labels)}
    roll = np.zeros((n, len(labels)), dtype=bool)
    for start_s, end_s, label in events:
        if label in column:
            first = int(math.floor(start_s / segment_s))
            last = int(math.ceil(end_s / segment_s))
            roll[first:last, column[label]] = True
    return roll


def segment_scores(
    scores: np.ndarray, *, cell_start_s: np.ndarray, cell_end_s: np.ndarray, segment_s: float, n: int
) -> np.ndarray:
    """Per segment and class, the highest score of the windows whose cell overlaps the segment.

    Args:
        scores: ``[n_windows, n_classes]`` window scores.
        cell_start_s: ``[n_windows]`` start of each window's cell, seconds.
        cell_end_s: ``[n_windows]`` end of each window's cell.
        segment_s: Segment length, seconds.
        n: Number of segments.

    Returns:
        float64 ``[n, n_classes]``; 0 for a segment no window covers (nothing was detected there).
    """
    out = np.zeros((n, scores.shape[1]), dtype=np.float64)
    for row, start_s, end_s in zip(scores, cell_start_s, cell_end_s, strict=True):
        # Same rounding as the truth: a cell touches the segments its span rounds out to.
        first = max(0, int(math.floor(start_s / segment_s)))
        last = min(n, int(math.ceil(end_s / segment_s)))
        if last > first:
            out[first:last] = np.maximum(out[first:last], row)
    return out


def precision_recall(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score, highest threshold first (tied scores are
    one step).

    Args:
        truth: bool ``[n]``.
        scores: ``[n]``.

    Returns:
        ``(precision, recall, thresholds)``, each ``[n_distinct]``; empty when ``n == 0``.
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    tp = np.cumsum(sorted_truth)
    predicted = np.arange(1, len(scores) + 1)
    # the last position of each run of equal scores: a threshold admits all of a tie or none
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1] if len(scores) else np.zeros(0, int)
    positives = max(int(truth.sum()), 1)
    return tp[last] / predicted[last], tp[last] / positives, sorted_scores[last]


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n`` over the thresholds (scikit-learn's
    ``average_precision_score``); NaN when ``truth`` has no positive.

    Args:
        truth: bool ``[n]``.
        scores: ``[n]``.
    """
    truth = np.asarray(truth, dtype=bool)
    if not truth.any():
        return float("nan")
    precision, recall, _ = precision_recall(truth, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1(truth: np.ndarray, scores: np.ndarray) -> tuple[float, float, int, int, int]:
    """The highest F1 over the thresholds of a ranking, and where it is reached.

    Args:
        truth: bool ``[n]``.
        scores: ``[n]``.

    Returns:
        ``(f1, threshold, tp, fp, fn)``: the best F1 and the threshold (score >= it is positive;
        the highest such threshold where several tie), with the counts there; ``(nan, nan, 0, 0,
        0)`` when ``truth`` has no positive.
    """
    truth = np.asarray(truth, dtype=bool)
    if not truth.any():
        return float("nan"), float("nan"), 0, 0, 0
    precision, recall, thresholds = precision_recall(truth, scores)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = int(np.argmax(f1))  # the first maximum: the highest threshold reaching it
    predicted = np.asarray(scores, dtype=np.float64) >= thresholds[best]
    tp = int(np.sum(predicted & truth))
    return float(f1[best]), float(thresholds[best]), tp, int(np.sum(predicted)) - tp, int(truth.sum()) - tp


def segment_average_precision(truth: np.ndarray, scores: np.ndarray, *, labels: Sequence[str]) -> dict:
    """Per-class and macro segment average precision, and the best segment F1.

    Args:
        truth: bool ``[n_segments, n_classes]`` segment activity (all recordings stacked).
        scores: ``[n_segments, n_classes]`` segment scores.
        labels: Class names.

    Returns:
        ``{"per_class": {label: {"ap", "best_f1", "best_threshold", "positives", "segments"}},
        "macro": mean AP over classes with positive segments (``None`` if none), "classes": how
        many, "best_f1": {"micro", "macro"}}``: the best F1 per class (:func:`best_f1`), its
        macro mean, and the micro F1 with every class at its best threshold (a class without
        positive segments reports nothing there).
    """
    per_class = {}
    counts = np.zeros(3, dtype=np.int64)
    for c, label in enumerate(labels):
        ap = average_precision(truth[:, c], scores[:, c])
        f1, threshold, *tp_fp_fn = best_f1(truth[:, c], scores[:, c])
        counts += tp_fp_fn
        per_class[label] = {
            "ap": _finite(ap),
            "best_f1": _finite(f1),
            "best_threshold": _finite(threshold),
            "positives": int(truth[:, c].sum()),
            "segments": int(truth.shape[0]),
        }
    values = [v["ap"] for v in per_class.values() if v["ap"] is not None]
    bests = [v["best_f1"] for v in per_class.values() if v["best_f1"] is not None]
    tp, fp, fn = (int(x) for x in counts)
    return {
        "per_class": per_class,
        "macro": float(np.mean(values)) if values else None,
        "classes": len(values),
        "best_f1": {
            "micro": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "macro": float(np.mean(bests)) if bests else None,
        },
    }
