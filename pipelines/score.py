"""Score a ``soundshard tag`` output against reference annotations (Audacity or Raven files).

Usage::

    soundshard score --reference ../shared/data/longform/esc10_longform_10min_seed0.txt \\
        --tags out/tags
    soundshard score --reference annotations/ --tags gs://bucket/tags/ --output out/score \\
        --segment-s 1.0 --collar-s 0.5 --evaluate-offset --label-map 'Dog bark=dog'

No Beam pipeline: the tag output's tables are small (a row per window or event) and are read
directly (local or through fsspec). What is computed, with the DCASE definitions (sed_eval):

- segment-based precision, recall, F1 and error rate on ``--segment-s`` segments, and
  event-based ones with an onset collar of ``--collar-s`` (offsets with ``--evaluate-offset``:
  within ``max(collar, 0.2 x reference length)``), overall (micro) and per class, with the
  counts of reference and estimated events (and TP/FP/FN);
- segment average precision per class and its macro mean, from the window table's scores
  (threshold-free: how well the scores rank, whatever the thresholds), and the best segment F1
  per class on that ranking with the micro F1 of all classes at their best thresholds (a ceiling
  for threshold tuning: it is set on the scored data).

Matching references to recordings: ``--reference`` is one annotation file or a folder of them
(searched recursively; every ``*.txt`` in it is read as one). A reference file belongs to the
recording whose clip id equals its path in the folder without the annotation suffix
(``site1/night1.Table.1.selections.txt`` → ``site1/night1``), else to the recording whose file
name has the same stem (``night1.txt`` → ``night1.flac``). A single reference file that matches no
recording by name is scored against the tag output's recording if there is exactly one.
Recordings without a reference are left out and listed; references without a recording are an
error unless ``--allow-missing``. Only the model's classes are scored: reference labels outside
them are counted and listed, not scored (``--label-map`` renames labels first).

Output (``--output``, default ``<tags>/score/``)::

    score.json   every figure, the settings, sed_eval's version, the reference and tag paths
    score.png    per-class segment and event F1 bars; per-class segment precision-recall curves

Exit status: 0 when scored; 2 on bad input, with one line naming the value (missing folder,
a reference file and line that do not parse, no events table, ...).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import posixpath
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

import soundshard
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.labels import annotations as ann
from soundshard.transforms.tagging import events as ev
from soundshard.transforms.tagging import scoring

PROG = "soundshard score"
FORMAT = "soundshard-score/1"
#: Points kept of each precision-recall curve in ``score.json`` (the plot needs no more).
CURVE_POINTS = 200
#: Why the threshold-free figure is segment AP rather than PSDS (recorded in score.json).
THRESHOLD_FREE_NOTE = (
    "segment-based average precision from the window scores; PSDS is not used: sed_scores_eval lists "
    "the obsolete PyPI 'pathlib' backport (and Cython) as install requirements, and psds_eval 0.5.3 "
    "calls DataFrame.fillna(method=...), which pandas 3 removed"
)
# Text columns of the tag tables: read as strings from CSV whatever they look like (a clip id
# '0001' must not become the number 1).
_TEXT_COLUMNS = ("source_uri", "clip_id", "archive_member", "site", "deployment", "label", "top_label")
_FLOAT_COLUMNS = ("start_s", "end_s", "duration_s", "confidence", "peak", "top_score", "level_db")


# -- the tag output -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TagOutput:
    """What scoring needs of a ``soundshard tag`` output folder.

    Attributes:
        path: The folder.
        layout: ``parquet`` or ``csv`` (the tables read).
        manifest: Its ``run.json``.
        labels: The model's classes, in output order.
        top_k: Classes per window in the window table (0: all).
        recordings: One row per recording: ``clip_id``, ``source_uri``, ``archive_member``,
            ``duration_s``.
        events: The event table (``clip_id``, ``label``, ``start_s``, ``end_s``, ...).
        windows: The window table (``clip_id``, ``window_index``, ``start_s``, ``end_s`` and
            the score columns).
    """

    path: str
    layout: str
    manifest: dict
    labels: tuple[str, ...]
    top_k: int
    recordings: pa.Table
    events: pa.Table
    windows: pa.Table


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _with_protocol(uri: str, path: str) -> str:
    if "://" in uri:
        protocol = uri.split("://", 1)[0] + "://"
        return path if path.startswith(protocol) else protocol + path
    return path


def _table_files(tags: str, layout: str, table: str) -> list[str]:
    fs, root = _fs(tags)
    folder = posixpath.join(root.rstrip("/"), layout, table)
    if not fs.isdir(folder):
        return []
    # incremental runs keep each night's files under run_date=<date>/: all of them are read
    return sorted(p for p in fs.find(folder) if p.endswith(f".{layout}"))


def _read_table_files(
    tags: str, layout: str, table: str, labels: Sequence[str], top_k: int
) -> pa.Table | None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    paths = _table_files(tags, layout, table)
    if not paths:
        return None
    fs, _ = _fs(tags)
    types = {name: pa.string() for name in _TEXT_COLUMNS}
    types.update({name: pa.float64() for name in _FLOAT_COLUMNS})
    types.update({tagging_score_column(label): pa.float64() for label in labels})
    for j in range(1, top_k + 1):
        types[f"label_{j}"] = pa.string()
        types[f"score_{j}"] = pa.float64()
    parts = []
    for path in paths:
        with fs.open(path, "rb") as f:
            data = f.read()
        try:
            if layout == "parquet":
                part = pq.read_table(io.BytesIO(data))
            else:
                part = pacsv.read_csv(
                    io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types)
                )
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"{_with_protocol(tags, path)}: not a readable {layout} table: {exc}") from None
        parts.append(part)
    return pa.concat_tables(parts, promote_options="permissive")


def _require(table: pa.Table, columns: Sequence[str], *, what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ConfigError(f"{what} lacks column(s) {missing}; it has {table.column_names}")


def read_tag_output(tags: str) -> TagOutput:
    """Reads ``run.json`` and the window, file and event tables of a tag output folder (Parquet
    when there, else CSV).

    Args:
        tags: The folder ``soundshard tag --output`` wrote (local or fsspec URL).

    Returns:
        The :class:`TagOutput`.

    Raises:
        ConfigError: naming the folder or file: no such folder, no ``run.json``, no window table,
            no event table although the run found events, missing columns.
    """
    tags = tags.rstrip("/")
    fs, root = _fs(tags)
    if not fs.isdir(root):
        raise ConfigError(f"--tags {tags!r}: no such folder")
    manifest_path = posixpath.join(root, "run.json")
    if not fs.exists(manifest_path):
        raise ConfigError(f"--tags {tags!r}: no run.json (not a finished `soundshard tag` output)")
    with fs.open(manifest_path, "rb") as f:
        try:
            manifest = json.loads(f.read())
        except ValueError as exc:
            raise ConfigError(f"{tags}/run.json: not JSON: {exc}") from None
    tag_config = manifest.get("tag_config") or {}
    labels = tuple(tag_config.get("label_names") or (manifest.get("model") or {}).get("label_names") or ())
    if not labels:
        raise ConfigError(f"{tags}/run.json names no model classes (tag_config.label_names)")
    top_k = int(tag_config.get("top_k") or 0)
    layouts = [layout for layout in ("parquet", "csv") if _table_files(tags, layout, "windows")]
    if not layouts:
        raise ConfigError(f"--tags {tags!r}: no window table (parquet/windows/ or csv/windows/)")
    layout = layouts[0]
    windows = _read_table_files(tags, layout, "windows", labels, top_k)
    _require(windows, ("clip_id", "window_index", "start_s", "end_s"), what=f"{tags}/{layout}/windows")
    events = _read_table_files(tags, layout, "events", labels, top_k)
    if events is None:
        # tag writes no event file when it found no event at all
        if (manifest.get("figures") or {}).get("events") != 0:
            raise ConfigError(
                f"--tags {tags!r}: no event table ({layout}/events/), and run.json does not say the run "
                "found no events"
            )
        events = pa.table(
            {
                "clip_id": pa.array([], pa.string()),
                "label": pa.array([], pa.string()),
                "start_s": pa.array([], pa.float64()),
                "end_s": pa.array([], pa.float64()),
            }
        )
    _require(events, ("clip_id", "label", "start_s", "end_s"), what=f"{tags}/{layout}/events")
    files = _read_table_files(tags, layout, "files", labels, top_k)
    recordings = _recordings(files, windows, what=f"{tags}/{layout}/files")
    return TagOutput(tags, layout, manifest, labels, top_k, recordings, events, windows)


def _recordings(files: pa.Table | None, windows: pa.Table, *, what: str) -> pa.Table:
    """One row per recording; from the file table, else from the window table (its last end)."""
    if files is not None:
        _require(files, ("clip_id", "source_uri", "duration_s"), what=what)
        ids = files.column("clip_id").to_pylist()
        repeated = sorted({c for c, n in collections.Counter(ids).items() if n > 1})
        if repeated:
            # an incremental output re-tagged a changed file: two sets of rows for one recording
            raise ConfigError(f"{what}: recording(s) {repeated[:5]} tagged more than once; score one run")
        member = (
            files.column("archive_member") if "archive_member" in files.column_names else pa.nulls(len(ids))
        )
        return pa.table(
            {
                "clip_id": files.column("clip_id"),
                "source_uri": files.column("source_uri"),
                "archive_member": member.cast(pa.string()),
                "duration_s": files.column("duration_s").cast(pa.float64()),
            }
        )
    ends: dict[str, float] = {}
    first: dict[str, tuple] = {}
    member = windows.column("archive_member") if "archive_member" in windows.column_names else None
    for i, (clip, end) in enumerate(
        zip(windows.column("clip_id").to_pylist(), windows.column("end_s").to_pylist(), strict=True)
    ):
        ends[clip] = max(ends.get(clip, 0.0), float(end))
        if clip not in first:
            uri = windows.column("source_uri")[i].as_py() if "source_uri" in windows.column_names else clip
            first[clip] = (uri, member[i].as_py() if member is not None else None)
    clips = sorted(ends)
    return pa.table(
        {
            "clip_id": pa.array(clips, pa.string()),
            "source_uri": pa.array([first[c][0] for c in clips], pa.string()),
            "archive_member": pa.array([first[c][1] for c in clips], pa.string()),
            "duration_s": pa.array([ends[c] for c in clips], pa.float64()),
        }
    )


def recording_stem(*, clip_id: str, source_uri: str | None, archive_member: str | None = None) -> str:
    """A recording's file name without extension (of the archive member, else of the source URI,
    else the clip id's last part)."""
    path = archive_member or (source_uri or "").split("::", 1)[0].split("?", 1)[0] or clip_id
    name = posixpath.basename(path.replace("\\", "/").rstrip("/"))
    return posixpath.splitext(name)[0] if "." in name else name


def window_scores(tag: TagOutput) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Each recording's windows sorted by index: ``{clip_id: (start_s, end_s, window_index,
    scores)}``, ``scores`` ``[n_windows, n_classes]`` in the order of ``tag.labels``.

    With a ``--top_k`` window table a class outside a window's k best has no score there: it
    counts 0 (below the k-th best, which is all that is known).
    """
    w = tag.windows
    what = f"{tag.path}/{tag.layout}/windows"
    n = w.num_rows
    scores = np.zeros((n, len(tag.labels)), dtype=np.float64)
    if tag.top_k == 0:
        columns = [tagging_score_column(label) for label in tag.labels]
        _require(w, columns, what=what)
        for c, name in enumerate(columns):
            scores[:, c] = w.column(name).to_numpy(zero_copy_only=False)
    else:
        for j in range(1, tag.top_k + 1):
            _require(w, (f"label_{j}", f"score_{j}"), what=what)
            names = np.asarray(w.column(f"label_{j}").to_pylist(), dtype=object)
            values = w.column(f"score_{j}").to_numpy(zero_copy_only=False)
            for c, label in enumerate(tag.labels):
                chosen = names == label
                scores[chosen, c] = values[chosen]
    start_s = w.column("start_s").to_numpy(zero_copy_only=False).astype(np.float64)
    end_s = w.column("end_s").to_numpy(zero_copy_only=False).astype(np.float64)
    index = w.column("window_index").to_numpy(zero_copy_only=False).astype(np.int64)
    clips, which = np.unique(np.asarray(w.column("clip_id").to_pylist(), dtype=str), return_inverse=True)
    # one sort for all recordings (by recording, then window index), then cut at the boundaries
    order = np.lexsort((index, which))
    bounds = np.searchsorted(which[order], np.arange(len(clips) + 1))
    out = {}
    for k, clip in enumerate(clips.tolist()):
        rows = order[bounds[k] : bounds[k + 1]]
        out[clip] = (start_s[rows], end_s[rows], index[rows], scores[rows])
    return out


def tagging_score_column(label: str) -> str:
    """Column of a class's score in the window table: ``transforms.tagging.score_column``'s name,
    restated because importing that module loads Beam, which scoring does not need (a test checks
    that the two agree)."""
    return f"score_{label}"


# -- references ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Match:
    """A recording and its reference file.

    Attributes:
        clip_id: The recording's clip id.
        reference: The annotation file.
        matched_by: ``clip_id``, ``stem`` or ``only_recording``.
    """

    clip_id: str
    reference: str
    matched_by: str


def match_references(
    reference: str, recordings: pa.Table, *, allow_missing: bool = False
) -> tuple[list[Match], list[str], list[str]]:
    """Pairs reference files with the tag output's recordings (rules in the module docstring).

    Args:
        reference: An annotation file or a folder of them.
        recordings: The tag output's recordings (``clip_id``, ``source_uri``, ``archive_member``).
        allow_missing: References without a recording are listed instead of refused.

    Returns:
        ``(matches, recordings without a reference, references without a recording)``.

    Raises:
        ConfigError: ``reference`` does not exist; a reference matches several recordings (or a
            recording several references); references without a recording (unless
            ``allow_missing``); nothing matches at all.
    """
    fs, path = _fs(reference)
    clips = recordings.column("clip_id").to_pylist()
    stems = {
        clip: recording_stem(clip_id=clip, source_uri=uri, archive_member=member)
        for clip, uri, member in zip(
            clips,
            recordings.column("source_uri").to_pylist(),
            recordings.column("archive_member").to_pylist(),
            strict=True,
        )
    }
    matches: list[Match] = []
    if fs.isdir(path):
        files = ann.annotation_files(reference.rstrip("/"))
        if not files:
            raise ConfigError(f"--reference {reference!r}: no annotation files (*.txt) in the folder")
        by_stem = collections.defaultdict(list)
        for key in files:
            by_stem[posixpath.basename(key)].append(key)
        used: dict[str, str] = {}
        for clip in clips:
            if clip in files:
                key, how = clip, "clip_id"
            else:
                candidates = by_stem.get(stems[clip], [])
                if len(candidates) > 1:
                    raise ConfigError(
                        f"recording {clip!r}: several references have its name {stems[clip]!r}: "
                        f"{[files[k] for k in candidates]}; put them in folders as the clip ids are"
                    )
                if not candidates:
                    continue
                key, how = candidates[0], "stem"
            if key in used:
                raise ConfigError(
                    f"reference {files[key]!r} matches recordings {used[key]!r} and {clip!r}; name it "
                    "by the clip id's path to tell them apart"
                )
            used[key] = clip
            matches.append(Match(clip, files[key], how))
        orphans = [files[k] for k in files if k not in used]
    elif fs.isfile(path):
        stem = ann.annotation_stem(path) or posixpath.splitext(posixpath.basename(path))[0]
        found = [c for c in clips if c == stem or stems[c] == stem]
        if len(found) > 1:
            raise ConfigError(f"--reference {reference!r} matches several recordings by name: {found}")
        if found:
            matches.append(Match(found[0], reference, "clip_id" if found[0] == stem else "stem"))
        elif len(clips) == 1:
            matches.append(Match(clips[0], reference, "only_recording"))
        orphans = [] if matches else [reference]
    else:
        raise ConfigError(f"--reference {reference!r}: no such file or folder")
    matched = {m.clip_id for m in matches}
    without_reference = [c for c in clips if c not in matched]
    if orphans and not allow_missing:
        shown = ", ".join(orphans[:5]) + (f" (+{len(orphans) - 5} more)" if len(orphans) > 5 else "")
        raise ConfigError(
            f"--reference: {len(orphans)} reference file(s) match no recording of the tag output: {shown} "
            "(--allow-missing to score the others)"
        )
    if not matches:
        raise ConfigError(
            f"--reference {reference!r}: no recording of the tag output has a reference "
            f"(recordings: {sorted(stems.values())[:5]})"
        )
    return matches, without_reference, orphans


def parse_label_map(text: str | None, labels: Sequence[str]) -> dict[str, str]:
    """``'Dog bark=dog,Rain=rain'`` → ``{reference label: model class}``; targets must be classes.

    Raises:
        ConfigError: naming a malformed pair or a target that is not a class.
    """
    out: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        source, sep, target = pair.partition("=")
        if not sep or not source.strip():
            raise ConfigError(f"--label-map: {pair.strip()!r} is not 'reference label=class'")
        if target.strip() not in labels:
            raise ConfigError(f"--label-map: {target.strip()!r} is not one of the classes {list(labels)}")
        out[source.strip()] = target.strip()
    return out


def _normalised(label: str) -> str:
    return "".join(ch for ch in label.lower() if ch.isalnum())


# -- scoring ------------------------------------------------------------------------------------


def _decimated(values: np.ndarray, keep: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values[keep]]


def score_tags(
    reference: str,
    tags: str,
    *,
    segment_s: float = 1.0,
    collar_s: float = 0.5,
    evaluate_offset: bool = False,
    offset_fraction: float = 0.2,
    allow_missing: bool = False,
    label_map: Mapping[str, str] | str | None = None,
    label_columns: Sequence[str] = ann.LABEL_COLUMNS,
) -> dict:
    """Scores a tag output against reference annotations.

    Args:
        reference: An Audacity/Raven annotation file or a folder of them (local or fsspec URL).
        tags: The ``soundshard tag`` output folder.
        segment_s: Segment length of the segment-based metrics and the segment AP, seconds.
        collar_s: Onset (and offset) collar of the event-based metrics, seconds.
        evaluate_offset: Event matching also checks offsets.
        offset_fraction: With ``evaluate_offset``, offsets may also be off by this fraction of
            the reference event's length (sed_eval's ``percentage_of_length``).
        allow_missing: References matching no recording are listed rather than refused.
        label_map: Reference label → model class renames (a mapping or ``'a=b,c=d'``).
        label_columns: Raven columns the label may come from, first present wins.

    Returns:
        JSON-ready dict: ``settings``, ``versions``, ``classes``, ``recordings`` (scored, without
        reference, references without recording), ``reference_labels_ignored``, ``segment`` and
        ``event`` (see :func:`soundshard.transforms.tagging.scoring.sed_metrics`), ``threshold_free``
        (segment AP per class and macro, with decimated precision-recall curves).

    Raises:
        ConfigError: bad settings or input, naming the value (annotation errors name file:line).
    """
    import sed_eval

    scoring.check_settings(
        segment_s=segment_s, collar_s=collar_s, offset_fraction=offset_fraction, flags=True
    )
    tag = read_tag_output(tags)
    labels = list(tag.labels)
    mapping = (
        parse_label_map(label_map, labels)
        if isinstance(label_map, str) or label_map is None
        else dict(label_map)
    )
    bad_targets = sorted({t for t in mapping.values() if t not in labels})
    if bad_targets:
        raise ConfigError(f"label_map targets {bad_targets} are not among the classes {labels}")
    matches, without_reference, orphans = match_references(
        reference, tag.recordings, allow_missing=allow_missing
    )

    durations = dict(
        zip(
            tag.recordings.column("clip_id").to_pylist(),
            tag.recordings.column("duration_s").to_pylist(),
            strict=True,
        )
    )
    estimated_by_clip = collections.defaultdict(list)
    for clip, label, a, b in zip(
        tag.events.column("clip_id").to_pylist(),
        tag.events.column("label").to_pylist(),
        tag.events.column("start_s").to_pylist(),
        tag.events.column("end_s").to_pylist(),
        strict=True,
    ):
        estimated_by_clip[clip].append((float(a), float(b), label))
    windows = window_scores(tag)
    no_windows = (np.zeros(0), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, len(labels))))
    ignored = collections.Counter()
    point_labels = 0
    recordings, scored = [], []
    truth_parts, score_parts = [], []
    for match in matches:
        found = ann.read_annotations(match.reference, label_columns=label_columns)
        reference_events = []
        for a in found:
            label = mapping.get(a.label, a.label)
            if label in labels:
                reference_events.append((a.start_s, a.end_s, label))
                point_labels += a.start_s == a.end_s
            else:
                ignored[a.label] += 1
        estimated = sorted(e for e in estimated_by_clip.get(match.clip_id, []) if e[2] in labels)
        duration_s = float(durations[match.clip_id] or 0.0)
        recordings.append(
            scoring.Recording(match.clip_id, duration_s, tuple(sorted(reference_events)), tuple(estimated))
        )
        length_s = max([duration_s] + [e[1] for e in reference_events] + [e[1] for e in estimated])
        n = scoring.n_segments(length_s, segment_s=segment_s)
        truth_parts.append(scoring.segment_truth(reference_events, labels=labels, segment_s=segment_s, n=n))
        start_s, end_s, index, scores = windows.get(match.clip_id, no_windows)
        cell_start, cell_end = ev.window_cells(start_s, end_s, index) if len(index) else (start_s, end_s)
        score_parts.append(
            scoring.segment_scores(
                scores, cell_start_s=cell_start, cell_end_s=cell_end, segment_s=segment_s, n=n
            )
        )
        scored.append(
            {
                "clip_id": match.clip_id,
                "reference": match.reference,
                "matched_by": match.matched_by,
                "duration_s": duration_s,
                "n_reference": len(reference_events),
                "n_estimated": len(estimated),
                "n_windows": len(index),
            }
        )
    metrics = scoring.sed_metrics(
        recordings,
        labels=labels,
        segment_s=segment_s,
        collar_s=collar_s,
        evaluate_offset=evaluate_offset,
        offset_fraction=offset_fraction,
    )
    truth = np.concatenate(truth_parts) if truth_parts else np.zeros((0, len(labels)), bool)
    segment_scores = np.concatenate(score_parts) if score_parts else np.zeros((0, len(labels)))
    ap = scoring.segment_average_precision(truth, segment_scores, labels=labels)
    curves = {}
    for c, label in enumerate(labels):
        if not truth[:, c].any():
            continue
        precision, recall, _ = scoring.precision_recall(truth[:, c], segment_scores[:, c])
        keep = np.unique(np.linspace(0, len(precision) - 1, min(len(precision), CURVE_POINTS)).astype(int))
        curves[label] = {"precision": _decimated(precision, keep), "recall": _decimated(recall, keep)}
    hints = {}
    for label in ignored:
        close = [c for c in labels if _normalised(c) == _normalised(label)]
        if close:
            hints[label] = f"--label-map '{label}={close[0]}'"
    manifest = tag.manifest
    return {
        "format": FORMAT,
        "reference": reference,
        "tags": tag.path,
        "tag_layout": tag.layout,
        "settings": {
            "segment_s": float(segment_s),
            "collar_s": float(collar_s),
            "evaluate_onset": True,
            "evaluate_offset": bool(evaluate_offset),
            "offset_fraction": float(offset_fraction) if evaluate_offset else None,
            "event_matching": "optimal",
            "allow_missing": bool(allow_missing),
            "label_map": dict(mapping),
            "label_columns": list(label_columns),
        },
        "versions": {"sed_eval": sed_eval.__version__, "soundshard": soundshard.__version__},
        "tag_run": {
            "run_id": (manifest.get("run") or {}).get("run_id"),
            "model": (manifest.get("model") or {}).get("uri"),
            "window_thresholds": dict(
                zip(labels, (manifest.get("tag_config") or {}).get("window_thresholds") or [], strict=False)
            ),
            "thresholds_from": manifest.get("thresholds_from"),
            "top_k": tag.top_k,
        },
        "classes": labels,
        "recordings": {
            "scored": scored,
            "without_reference": without_reference,
            "references_without_recording": orphans,
        },
        "reference_labels_ignored": dict(sorted(ignored.items())),
        "label_map_hints": hints,
        "reference_point_labels": int(point_labels),
        "segment": metrics["segment"],
        "event": metrics["event"],
        "threshold_free": {
            "method": "segment_average_precision",
            "note": THRESHOLD_FREE_NOTE,
            "segment_s": float(segment_s),
            "window_scores": (
                "every class's score"
                if tag.top_k == 0
                else f"top {tag.top_k} per window; other classes count 0 there"
            ),
            **ap,
            "curves": curves,
        },
    }


# -- report -------------------------------------------------------------------------------------


def _fmt(value: float | None, width: int = 7) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}"


def table_text(result: dict) -> str:
    """The per-class and overall table printed by the command."""
    seg, evt, ap = result["segment"], result["event"], result["threshold_free"]
    name_w = max([len("overall (micro)")] + [len(c) for c in result["classes"]]) + 2
    header = (
        f"{'class':<{name_w}}{'ref':>6}{'est':>6}{'seg P':>7}{'seg R':>7}{'seg F1':>7}"
        f"{'evt P':>7}{'evt R':>7}{'evt F1':>7}{'seg AP':>8}{'best F1':>8}"
    )
    lines = [header, "-" * len(header)]

    def row(name, s, e, ap_value, best):
        return (
            f"{name:<{name_w}}{e['n_reference']:>6}{e['n_estimated']:>6}{_fmt(s['precision'])}"
            f"{_fmt(s['recall'])}{_fmt(s['f1'])}{_fmt(e['precision'])}{_fmt(e['recall'])}{_fmt(e['f1'])}"
            f"{_fmt(ap_value, 8)}{_fmt(best, 8)}"
        )

    for label in result["classes"]:
        c = ap["per_class"][label]
        lines.append(row(label, seg["per_class"][label], evt["per_class"][label], c["ap"], c["best_f1"]))
    lines.append("-" * len(header))
    lines.append(row("overall (micro)", seg["overall"], evt["overall"], ap["macro"], ap["best_f1"]["micro"]))
    s = result["settings"]
    offsets = (
        f"offsets within max(collar, {s['offset_fraction']:g} x length)"
        if s["evaluate_offset"]
        else "onsets only"
    )
    recs = result["recordings"]
    lines += [
        "",
        f"segments {s['segment_s']:g} s; events: collar {s['collar_s']:g} s, {offsets}; "
        f"seg AP: macro over {ap['classes']} class(es) with reference segments (overall row); "
        f"ref/est: events",
        "best F1: segment F1 at each class's best threshold on these scores (overall: micro), "
        "what tuning thresholds alone could reach",
        f"error rate   segment {_fmt(seg['overall']['error_rate'], 0)}"
        f"  event {_fmt(evt['overall']['error_rate'], 0)}",
        f"recordings   scored {len(recs['scored'])}  without reference {len(recs['without_reference'])}"
        f"  references without recording {len(recs['references_without_recording'])}",
    ]
    if recs["without_reference"]:
        lines.append("  not scored (no reference): " + ", ".join(recs["without_reference"][:10]))
    if recs["references_without_recording"]:
        lines.append(
            "  references without recording: " + ", ".join(recs["references_without_recording"][:10])
        )
    if result["reference_labels_ignored"]:
        lines.append(
            "reference labels not among the model's classes (not scored): "
            + ", ".join(f"{k or '<empty>'} {v}" for k, v in result["reference_labels_ignored"].items())
        )
        for label, hint in result["label_map_hints"].items():
            lines.append(f"  {label!r} looks like a class: {hint}")
    return "\n".join(lines)


def plot_png(result: dict) -> bytes:
    """``score.png``: per-class segment and event F1 bars, and segment precision-recall curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = result["classes"]
    names = [*labels, "overall"]
    seg = [result["segment"]["per_class"][c]["f1"] for c in labels] + [result["segment"]["overall"]["f1"]]
    evt = [result["event"]["per_class"][c]["f1"] for c in labels] + [result["event"]["overall"]["f1"]]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(max(10, 0.6 * len(names) + 6), 4.5))
    x = np.arange(len(names))
    bars.bar(
        x - 0.2,
        [v or 0.0 for v in seg],
        width=0.4,
        label=f"segment F1 ({result['settings']['segment_s']:g} s)",
    )
    bars.bar(
        x + 0.2,
        [v or 0.0 for v in evt],
        width=0.4,
        label=f"event F1 (collar {result['settings']['collar_s']:g} s)",
    )
    bars.set_xticks(x, names, rotation=45, ha="right")
    bars.set_ylim(0, 1)
    bars.set_ylabel("F1")
    bars.set_title("F1 per class")
    bars.legend(loc="upper left", fontsize="small")
    for label, curve in result["threshold_free"]["curves"].items():
        ap = result["threshold_free"]["per_class"][label]["ap"]
        # AP is the area under these steps: precision P_n holds over (R_{n-1}, R_n]
        recall = [0.0, *curve["recall"]]
        precision = [curve["precision"][0], *curve["precision"]]
        curves.step(recall, precision, where="pre", label=f"{label} (AP {ap:.2f})")
    curves.set_xlim(0, 1)
    curves.set_ylim(0, 1.02)
    curves.set_xlabel("recall (segments)")
    curves.set_ylabel("precision")
    macro = result["threshold_free"]["macro"]
    curves.set_title("segment precision-recall" + (f" (macro AP {macro:.2f})" if macro is not None else ""))
    if result["threshold_free"]["curves"]:
        curves.legend(loc="lower left", fontsize="x-small")
    fig.tight_layout()
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=100)
    plt.close(fig)
    return sink.getvalue()


def write_report(result: dict, output: str) -> dict[str, str]:
    """Writes ``score.json`` and ``score.png`` into ``output`` (local or fsspec URL).

    Returns:
        ``{"json": path, "png": path}``.
    """
    fs, root = _fs(output)
    fs.makedirs(root, exist_ok=True)
    paths = {"json": posixpath.join(root, "score.json"), "png": posixpath.join(root, "score.png")}
    with fs.open(paths["json"], "wb") as f:
        f.write((json.dumps(result, indent=2) + "\n").encode())
    with fs.open(paths["png"], "wb") as f:
        f.write(plot_png(result))
    return {k: _with_protocol(output, v) for k, v in paths.items()}


# -- command ------------------------------------------------------------------------------------


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of the score command (defaults shown in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Score a `soundshard tag` output against reference annotations (Audacity label "
        "tracks or Raven selection tables): sed_eval segment- and event-based precision, recall, F1 "
        "and error rate per class and overall, and segment average precision from the window scores.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--reference",
        required=True,
        metavar="PATH",
        help="Annotation file (Audacity .txt or Raven .selections.txt) or a folder of them, one per "
        "recording, matched by clip id path, else by file stem.",
    )
    parser.add_argument("--tags", required=True, metavar="FOLDER", help="Output folder of `soundshard tag`.")
    parser.add_argument(
        "--output",
        default=None,
        metavar="FOLDER",
        help="Folder for score.json and score.png (default: <tags>/score).",
    )
    parser.add_argument(
        "--segment-s",
        type=float,
        default=1.0,
        metavar="S",
        help="Segment length of segment-based metrics and segment AP, seconds (default: %(default)s).",
    )
    parser.add_argument(
        "--collar-s",
        type=float,
        default=0.5,
        metavar="S",
        help="Onset (and offset) collar of event-based metrics, seconds (default: %(default)s).",
    )
    parser.add_argument(
        "--evaluate-offset",
        action="store_true",
        help="Event-based: offsets must match too, within max(collar, --offset-fraction x reference "
        "length) (default: onsets only).",
    )
    parser.add_argument(
        "--offset-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="With --evaluate-offset: allowed offset error as a fraction of the reference event's "
        "length (default: %(default)s).",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="List reference files that match no recording of the tag output instead of failing "
        "(default: fail).",
    )
    parser.add_argument(
        "--label-map",
        default=None,
        metavar="MAP",
        help="Rename reference labels to model classes first, e.g. 'Dog bark=dog,Rain=rain' "
        "(default: none; other labels are listed and not scored).",
    )
    parser.add_argument(
        "--label-columns",
        default=",".join(ann.LABEL_COLUMNS),
        metavar="COLUMNS",
        help="Raven columns the label is taken from, first present wins, comma-separated "
        "(default: %(default)s).",
    )
    return parser


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs the score command; returns the exit code (0 scored, 2 bad input)."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    label_columns = tuple(c.strip() for c in args.label_columns.split(",") if c.strip())
    try:
        if not label_columns:
            raise ConfigError("--label-columns is empty")
        result = score_tags(
            args.reference,
            args.tags,
            segment_s=args.segment_s,
            collar_s=args.collar_s,
            evaluate_offset=args.evaluate_offset,
            offset_fraction=args.offset_fraction,
            allow_missing=args.allow_missing,
            label_map=args.label_map,
            label_columns=label_columns,
        )
        output = args.output or args.tags.rstrip("/") + "/score"
        written = write_report(result, output)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(table_text(result))
    print(f"\n-> {written['json']}\n-> {written['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
