"""``soundshard score``: tag outputs against reference annotations (sed_eval metrics, segment AP).

Tag output folders are built by hand with the table functions ``soundshard tag`` itself writes
them with (``transforms/tagging/classify.py``), so the columns and types are the real ones.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from soundshard.pipelines import cli
from soundshard.pipelines import score as sc
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.records import SourceItem
from soundshard.schemas.tagging import TagConfig
from soundshard.transforms.tagging import classify as tagging
from soundshard.transforms.tagging import events as ev
from soundshard.transforms.tagging import scoring

LABELS = ("dog", "rain")
PNG = b"\x89PNG\r\n\x1a\n"

# The worked example. One 10 s recording; reference: 4 events of 2 classes (and a 'bird' that
# the model does not know: reported, not scored):
REFERENCE = "1.0\t2.0\tdog\n3.0\t4.0\train\n5.0\t6.0\tdog\n7.5\t8.5\train\n2.0\t2.5\tbird\n"
# Estimate: one hit within the collar (dog 1.3: onset 0.3 s late), one onset outside the collar
# (dog 6.0 for the reference at 5.0: 1.0 s late), one false alarm (dog 9.2), one miss (rain 3.0),
# and a second hit (rain 7.6).
ESTIMATED = [(1.3, 2.2, "dog"), (6.0, 7.0, "dog"), (7.6, 8.4, "rain"), (9.2, 9.8, "dog")]
# Event-based, 0.5 s onset collar, offsets not evaluated:
#   dog:  Nref 2, Nsys 3, TP 1 (1.3~1.0)     -> P 1/3, R 1/2, F 2*1/(3+2) = 0.4
#   rain: Nref 2, Nsys 1, TP 1 (7.6~7.5)     -> P 1,   R 1/2, F 2*1/(1+2) = 2/3
#   overall: Nref 4, Nsys 4, TP 2, FP 2, FN 2 -> P = R = F = 0.5; no substitution (no unmatched
#   estimate has its onset within 0.5 s of an unmatched reference), ER = (0 + 2 + 2) / 4 = 1.0
# Segment-based, 1 s segments (onset rounded down, offset up), 10 segments:
#   reference: dog {1, 5}, rain {3, 7, 8}    estimate: dog {1, 2, 6, 9}, rain {7, 8}
#   dog:  TP 1 (seg 1), FP 3, FN 1           -> P 1/4, R 1/2, F 2*1/(4+2) = 1/3
#   rain: TP 2, FP 0, FN 1                   -> P 1,   R 2/3, F 2*2/(2+3) = 0.8
#   overall: TP 3, Nsys 6, Nref 5            -> P 1/2, R 3/5, F 2*3/(6+5) = 6/11
#   ER per segment: I in 2, 6, 9; D in 3, 5; S 0 -> (0 + 2 + 3) / 5 = 1.0
EVENT = {"dog": (1 / 3, 1 / 2, 0.4), "rain": (1.0, 1 / 2, 2 / 3), "overall": (0.5, 0.5, 0.5)}
SEGMENT = {"dog": (1 / 4, 1 / 2, 1 / 3), "rain": (1.0, 2 / 3, 0.8), "overall": (0.5, 0.6, 6 / 11)}

# Window scores, 1 s windows with a 1 s hop (each window's cell is the window: segment k is
# window k). dog separates its reference segments {1, 5} perfectly (AP 1); rain ranks its
# reference segments {3, 7, 8} below all 7 others: they come at ranks 8, 9 and 10, so
# AP = (1/8 + 2/9 + 3/10) / 3.
DOG_SCORES = np.where(np.isin(np.arange(10), [1, 5]), 0.9, 0.1) + np.arange(10) * 1e-3
RAIN_SCORES = np.array([0.60, 0.59, 0.58, 0.03, 0.57, 0.56, 0.55, 0.02, 0.01, 0.54])
RAIN_AP = (1 / 8 + 2 / 9 + 3 / 10) / 3


def _item(clip_id: str, uri: str) -> SourceItem:
    return SourceItem(uri=uri, clip_id=clip_id, site="site1")


def write_tags(
    root,
    recordings,
    *,
    top_k: int = 0,
    formats=("parquet",),
    window_s: float = 1.0,
    hop_s: float = 1.0,
):
    """A ``soundshard tag`` output folder: run.json and the window, file and event tables.

    Args:
        root: The folder.
        recordings: ``(clip_id, uri, scores [n_windows, n_classes], events)`` per recording.
        top_k: As ``--top_k``.
        formats: Table formats written.
        window_s: Window length.
        hop_s: Window hop.
    """
    config = TagConfig(
        label_names=LABELS, window_thresholds=(0.5, 0.5), file_thresholds=(0.5, 0.5), top_k=top_k
    )
    tables = {"windows": [], "files": [], "events": []}
    n_events = 0
    for clip_id, uri, scores, found in recordings:
        item = _item(clip_id, uri)
        n = len(scores)
        start_s = np.arange(n) * hop_s
        end_s = start_s + window_s
        batch = tagging.ScoredBatch(item, 0, start_s, end_s, np.asarray(scores, np.float32))
        tables["windows"].append(tagging.window_table(item, batch, config, np.arange(n)))
        events = [ev.Event(label, a, b, 0.8, 0.9, 1) for a, b, label in found]
        n_events += len(events)
        if events:  # tag writes rows only for what it found
            tables["events"].append(tagging.event_table(item, events))
        tables["files"].append(
            tagging.file_table(
                item,
                np.asarray(scores).mean(axis=0),
                config,
                n_windows=n,
                duration_s=float(end_s[-1]),
                complete=True,
                n_events=len(events),
            )
        )
    for table, parts in tables.items():
        if not parts:
            continue  # as tag: no file for an empty table
        merged = pa.concat_tables(parts)
        for fmt, data in tagging.table_files(merged, formats).items():
            path = root / fmt / table / f"part-run1-00000.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    manifest = {
        "format": "soundshard-tags/1",
        "model": {"uri": "models/esc10-f4", "label_names": list(LABELS)},
        "tag_config": config.to_dict(),
        "thresholds_from": "--thresholds/--threshold",
        "run": {"run_id": "run1"},
        "figures": {"events": n_events},
    }
    (root / "run.json").write_text(json.dumps(manifest))
    return root


def worked_example(tmp_path, **kwargs):
    """The worked example's tag output and reference folder."""
    scores = np.stack([DOG_SCORES, RAIN_SCORES], axis=1)
    tags = write_tags(
        tmp_path / "tags", [("site1/night1", "/data/site1/night1.flac", scores, ESTIMATED)], **kwargs
    )
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "night1.txt").write_text(REFERENCE)
    return tags, refs


def _prf(block: dict) -> tuple:
    return block["precision"], block["recall"], block["f1"]


def test_worked_example_gives_the_values_of_the_definitions(tmp_path):
    tags, refs = worked_example(tmp_path)
    result = sc.score_tags(str(refs), str(tags))
    for label in LABELS:
        assert _prf(result["event"]["per_class"][label]) == pytest.approx(EVENT[label])
        assert _prf(result["segment"]["per_class"][label]) == pytest.approx(SEGMENT[label])
    assert _prf(result["event"]["overall"]) == pytest.approx(EVENT["overall"])
    assert _prf(result["segment"]["overall"]) == pytest.approx(SEGMENT["overall"])
    event = result["event"]["overall"]
    assert (event["n_reference"], event["n_estimated"], event["tp"], event["fp"], event["fn"]) == (
        4,
        4,
        2,
        2,
        2,
    )
    assert event["substitutions"] == 0 and event["error_rate"] == pytest.approx(1.0)
    segment = result["segment"]["overall"]
    assert (segment["n_reference"], segment["n_estimated"], segment["tp"]) == (5, 6, 3)
    assert segment["error_rate"] == pytest.approx(1.0)
    assert result["event"]["per_class"]["dog"]["n_estimated"] == 3
    assert result["event"]["macro"]["f1"] == pytest.approx((0.4 + 2 / 3) / 2)
    # the label the model does not know is reported, not scored
    assert result["reference_labels_ignored"] == {"bird": 1}
    assert result["recordings"]["scored"][0]["matched_by"] == "stem"
    assert result["recordings"]["scored"][0]["n_reference"] == 4
    assert result["settings"]["collar_s"] == 0.5 and result["settings"]["evaluate_offset"] is False
    assert result["versions"]["sed_eval"]


def test_worked_example_equals_sed_eval_called_directly(tmp_path):
    import sed_eval

    tags, refs = worked_example(tmp_path)
    result = sc.score_tags(str(refs), str(tags))
    reference = [
        {"filename": "x", "event_label": label, "onset": a, "offset": b}
        for a, b, label in (line.split("\t") for line in REFERENCE.splitlines())
        if label in LABELS
    ]
    reference = [{**e, "onset": float(e["onset"]), "offset": float(e["offset"])} for e in reference]
    estimated = [
        {"filename": "x", "event_label": label, "onset": a, "offset": b} for a, b, label in ESTIMATED
    ]
    segment = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=list(LABELS), time_resolution=1.0)
    event = sed_eval.sound_event.EventBasedMetrics(
        event_label_list=list(LABELS), t_collar=0.5, evaluate_onset=True, evaluate_offset=False
    )
    segment.evaluate(reference, estimated, evaluated_length_seconds=10.0)
    event.evaluate(reference, estimated)
    for ours, theirs in ((result["segment"], segment), (result["event"], event)):
        overall = theirs.results_overall_metrics()
        assert ours["overall"]["f1"] == pytest.approx(overall["f_measure"]["f_measure"])
        assert ours["overall"]["error_rate"] == pytest.approx(overall["error_rate"]["error_rate"])
        for label, values in theirs.results_class_wise_metrics().items():
            assert ours["per_class"][label]["f1"] == pytest.approx(values["f_measure"]["f_measure"])
            assert ours["per_class"][label]["recall"] == pytest.approx(values["f_measure"]["recall"])


def test_offsets_evaluated_on_request(tmp_path):
    tags, refs = worked_example(tmp_path)
    result = sc.score_tags(str(refs), str(tags), evaluate_offset=True)
    # dog 1.3-2.2 for 1.0-2.0: offset 0.2 s off, within max(0.5, 0.2 x 1 s): still a hit; as is
    # rain 7.6-8.4 for 7.5-8.5 (0.1 s)
    assert result["event"]["overall"]["tp"] == 2
    narrow = sc.score_tags(str(refs), str(tags), evaluate_offset=True, collar_s=0.15)
    assert narrow["event"]["overall"]["tp"] == 1  # only rain: dog's offset is 0.2 s off
    assert narrow["settings"]["offset_fraction"] == 0.2


def test_segment_average_precision_known_answers(tmp_path):
    tags, refs = worked_example(tmp_path)
    result = sc.score_tags(str(refs), str(tags))
    ap = result["threshold_free"]
    assert ap["method"] == "segment_average_precision"
    assert ap["per_class"]["dog"]["ap"] == pytest.approx(1.0)
    assert ap["per_class"]["rain"]["ap"] == pytest.approx(RAIN_AP)
    assert ap["per_class"]["rain"]["positives"] == 3 and ap["per_class"]["rain"]["segments"] == 10
    assert ap["macro"] == pytest.approx((1.0 + RAIN_AP) / 2)
    assert ap["curves"]["dog"]["precision"][0] == 1.0 and ap["curves"]["dog"]["recall"][-1] == 1.0
    # Best F1: dog is separated at its lower reference score (DOG_SCORES[1] = 0.901): F1 1. Rain's
    # reference segments rank 8-10: F1 with the top 8, 9, 10 segments is 2/11, 4/12 and 6/13, so the
    # best is all ten (threshold 0.01: 3 TP, 7 FP). Micro: TP 2 + 3, FP 0 + 7, FN 0 -> 10/17.
    assert ap["per_class"]["dog"]["best_f1"] == pytest.approx(1.0)
    assert ap["per_class"]["dog"]["best_threshold"] == pytest.approx(DOG_SCORES[1])
    assert ap["per_class"]["rain"]["best_f1"] == pytest.approx(6 / 13)
    assert ap["per_class"]["rain"]["best_threshold"] == pytest.approx(0.01)
    assert ap["best_f1"]["micro"] == pytest.approx(10 / 17)
    assert ap["best_f1"]["macro"] == pytest.approx((1 + 6 / 13) / 2)


def test_best_f1_is_the_maximum_over_thresholds_and_prefers_the_highest():
    rng = np.random.default_rng(1)
    truth = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + truth * 0.4, 2)
    f1, threshold, tp, fp, fn = scoring.best_f1(truth, scores)
    brute = []
    for t in np.unique(scores):
        p = scores >= t
        brute.append((2 * np.sum(p & truth) / (np.sum(p) + np.sum(truth)), t))
    best = max(b for b, _ in brute)
    assert f1 == pytest.approx(best)
    assert threshold == max(t for b, t in brute if b == pytest.approx(best))
    assert (tp, fp, fn) == (
        np.sum((scores >= threshold) & truth),
        np.sum((scores >= threshold) & ~truth),
        np.sum((scores < threshold) & truth),
    )
    assert math.isnan(scoring.best_f1(np.zeros(4, bool), np.arange(4.0))[0])


def test_average_precision_matches_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.2
    scores = np.round(rng.random(300) + truth * 0.3, 1)  # coarse: many ties
    assert scoring.average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores))
    assert scoring.average_precision(truth, truth * 1.0) == 1.0
    # everything tied: precision is the prevalence
    assert scoring.average_precision(truth, np.zeros(300)) == pytest.approx(truth.mean())
    assert math.isnan(scoring.average_precision(np.zeros(5, bool), np.arange(5)))


def test_segment_scores_use_window_cells():
    # 1 s windows every 0.5 s: cells are 0.5 s wide (0-0.75, 0.75-1.25, ...), so a high score in
    # window 2 (1.0-2.0 s, cell 1.25-1.75) reaches segment 1 only, not segment 0 or 2 as the
    # window's own span would
    start_s = np.arange(6) * 0.5
    end_s = start_s + 1.0
    cell_start, cell_end = ev.window_cells(start_s, end_s, np.arange(6))
    scores = np.zeros((6, 1))
    scores[2, 0] = 0.9
    out = scoring.segment_scores(scores, cell_start_s=cell_start, cell_end_s=cell_end, segment_s=1.0, n=4)
    assert out[:, 0].tolist() == [0.0, 0.9, 0.0, 0.0]


def test_top_k_window_table_and_csv_layout(tmp_path):
    tags, refs = worked_example(tmp_path, top_k=1, formats=("csv",))
    result = sc.score_tags(str(refs), str(tags))
    assert result["tag_layout"] == "csv" and "top 1 per window" in result["threshold_free"]["window_scores"]
    # dog is the top class in its reference segments (0.9 against rain's 0.03 and 0.56), so
    # ranking on top-1 scores still separates them
    assert result["threshold_free"]["per_class"]["dog"]["ap"] == pytest.approx(1.0)
    assert _prf(result["event"]["overall"]) == pytest.approx(EVENT["overall"])
    tag = sc.read_tag_output(str(tags))
    _, _, _, scores = sc.window_scores(tag)["site1/night1"]
    assert scores[1].tolist() == pytest.approx([0.901, 0.0])  # rain is not in window 1's top 1


def test_windows_are_sorted_per_recording_whatever_the_table_order(tmp_path):
    import dataclasses

    tags, _ = worked_example(tmp_path)
    tag = sc.read_tag_output(str(tags))
    shuffled = tag.windows.take(pa.array(np.random.default_rng(1).permutation(tag.windows.num_rows)))
    start_s, _, index, scores = sc.window_scores(dataclasses.replace(tag, windows=shuffled))["site1/night1"]
    assert index.tolist() == list(range(10)) and start_s.tolist() == [float(k) for k in range(10)]
    assert scores[:, 1].tolist() == pytest.approx(RAIN_SCORES)


def test_score_column_names_agree_with_tagging():
    assert sc.tagging_score_column("crackling_fire") == tagging.score_column("crackling_fire")


def test_no_events_at_all_is_scored_when_the_run_says_so(tmp_path):
    scores = np.full((10, 2), 0.1)
    tags = write_tags(tmp_path / "tags", [("night1", "/d/night1.wav", scores, [])])
    ref = tmp_path / "night1.txt"
    ref.write_text("1\t2\tdog\n")
    result = sc.score_tags(str(ref), str(tags))
    assert result["event"]["overall"]["n_estimated"] == 0 and result["event"]["overall"]["recall"] == 0.0
    assert result["event"]["overall"]["precision"] is None  # 0/0: null in score.json
    run = json.loads((tags / "run.json").read_text())
    run["figures"]["events"] = 3
    (tags / "run.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match="no event table"):
        sc.score_tags(str(ref), str(tags))


def _two_recordings(tmp_path):
    scores = np.full((10, 2), 0.1)
    return write_tags(
        tmp_path / "tags",
        [
            ("site1/night1", "/d/site1/night1.flac", scores, [(1.0, 2.0, "dog")]),
            ("site2/night1", "/d/site2/night1.flac", scores, []),
            ("site2/night2", "/d/site2/night2.flac", scores, []),
        ],
    )


def test_matching_by_clip_id_path_then_stem(tmp_path):
    tags = _two_recordings(tmp_path)
    refs = tmp_path / "refs"
    (refs / "site1").mkdir(parents=True)
    (refs / "site2").mkdir()
    (refs / "site1" / "night1.txt").write_text("1\t2\tdog\n")
    (refs / "site2" / "night1.Table.1.selections.txt").write_text("Begin Time (s)\tEnd Time (s)\tLabel\n")
    result = sc.score_tags(str(refs), str(tags))
    scored = {r["clip_id"]: r["matched_by"] for r in result["recordings"]["scored"]}
    assert scored == {"site1/night1": "clip_id", "site2/night1": "clip_id"}
    assert result["recordings"]["without_reference"] == ["site2/night2"]
    assert result["event"]["overall"]["tp"] == 1
    # a flat folder: the stem night1 belongs to two recordings
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "night1.txt").write_text("1\t2\tdog\n")
    with pytest.raises(ConfigError, match="matches recordings 'site1/night1' and 'site2/night1'"):
        sc.score_tags(str(flat), str(tags))


def test_references_without_recording(tmp_path):
    tags, refs = worked_example(tmp_path)
    (refs / "night9.txt").write_text("1\t2\tdog\n")
    with pytest.raises(ConfigError, match=r"1 reference file\(s\) match no recording.*night9\.txt"):
        sc.score_tags(str(refs), str(tags))
    result = sc.score_tags(str(refs), str(tags), allow_missing=True)
    assert [p.rsplit("/", 1)[1] for p in result["recordings"]["references_without_recording"]] == [
        "night9.txt"
    ]
    assert _prf(result["event"]["overall"]) == pytest.approx(EVENT["overall"])


def test_single_reference_file_for_the_only_recording_and_label_map(tmp_path):
    tags, _ = worked_example(tmp_path)
    ref = tmp_path / "annotated-by-anna.Table.1.selections.txt"
    ref.write_text(
        "Selection\tView\tBegin Time (s)\tEnd Time (s)\tSpecies\n"
        "1\tWaveform 1\t1.0\t2.0\tDog\n1\tSpectrogram 1\t1.0\t2.0\tDog\n2\tSpectrogram 1\t7.5\t8.5\train\n"
    )
    result = sc.score_tags(str(ref), str(tags))
    assert result["recordings"]["scored"][0]["matched_by"] == "only_recording"
    assert result["reference_labels_ignored"] == {"Dog": 1}
    assert result["label_map_hints"] == {"Dog": "--label-map 'Dog=dog'"}
    mapped = sc.score_tags(str(ref), str(tags), label_map="Dog=dog")
    assert mapped["event"]["overall"]["n_reference"] == 2 and mapped["event"]["overall"]["tp"] == 2
    with pytest.raises(ConfigError, match="'cat' is not one of the classes"):
        sc.score_tags(str(ref), str(tags), label_map="Dog=cat")


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    tags, refs = worked_example(tmp_path)
    assert cli.main(["score", "--reference", str(refs), "--tags", str(tags)]) == 0
    out = capsys.readouterr().out
    assert "overall (micro)" in out and "bird 1" in out
    dog_row = next(line for line in out.splitlines() if line.startswith("dog "))
    assert dog_row.split() == [
        "dog",
        "2",
        "3",
        "0.250",
        "0.500",
        "0.333",
        "0.333",
        "0.500",
        "0.400",
        "1.000",
        "1.000",
    ]
    written = json.loads((tags / "score" / "score.json").read_text())
    assert written["event"]["overall"]["f1"] == pytest.approx(0.5)
    assert written["segment"]["overall"]["f1"] == pytest.approx(6 / 11)
    assert written["reference"] == str(refs) and written["tags"] == str(tags)
    assert written["settings"]["segment_s"] == 1.0
    assert (tags / "score" / "score.png").read_bytes()[:8] == PNG
    other = tmp_path / "elsewhere"
    args = ["--reference", str(refs), "--tags", str(tags), "--output", str(other), "--segment-s", "2"]
    assert sc.run(args) == 0
    assert json.loads((other / "score.json").read_text())["settings"]["segment_s"] == 2.0


def _fails(argv, capsys) -> str:
    assert cli.main(["score", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_cli_bad_input_exits_2_naming_the_value(tmp_path, capsys):
    tags, refs = worked_example(tmp_path)
    (refs / "night1.txt").write_text("1.0\t2.0\tdog\n\n2.0\tlater\tdog\n")
    err = _fails(["--reference", str(refs), "--tags", str(tags)], capsys)
    assert f"{refs / 'night1.txt'}:3: end 'later' is not a number" in err
    err = _fails(["--reference", str(refs), "--tags", str(tmp_path / "nope")], capsys)
    assert "--tags" in err and "no such folder" in err
    err = _fails(["--reference", str(tmp_path / "missing"), "--tags", str(tags)], capsys)
    assert "no such file or folder" in err
    err = _fails(["--reference", str(refs), "--tags", str(tmp_path)], capsys)
    assert "no run.json" in err
    (refs / "night1.txt").write_text("1\t2\tdog\n")
    err = _fails(["--reference", str(refs), "--tags", str(tags), "--collar-s", "0"], capsys)
    assert "--collar-s=0.0 must be positive" in err


def test_help_shows_defaults():
    text = " ".join(sc.make_parser().format_help().split())  # help is wrapped to the terminal
    for flag in ("--segment-s", "--collar-s", "--offset-fraction", "--evaluate-offset", "--allow-missing"):
        assert flag in text
    assert "(default: 1.0)" in text and "(default: 0.5)" in text and "(default: 0.2)" in text
    assert "score" in cli.USAGE
