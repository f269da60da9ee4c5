"""Tagging: event and aggregation maths on hand-made scores, then `soundshard tag` end to end."""

from __future__ import annotations

import csv
import io
import json
import uuid
from functools import partial
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import tag
from soundshard.pipelines.demo import make_long_recording
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.records import FileSummary, SourceItem
from soundshard.schemas.tagging import TagConfig, parse_thresholds
from soundshard.transforms.tagging import classify as tagging
from soundshard.transforms.tagging import events as ev

from ..helpers import reseal_model_folder

LABELS = ("a", "b")


def config(**overrides) -> TagConfig:
    values = dict(label_names=LABELS, window_thresholds=(0.5, 0.5), file_thresholds=(0.5, 0.5))
    values.update(overrides)
    return TagConfig(**values)


def grid(n: int, *, hop_s: float = 0.5, window_s: float = 1.0):
    start = np.arange(n) * hop_s
    return start, start + window_s, np.arange(n)


def scores_of(column_a) -> np.ndarray:
    a = np.asarray(column_a, np.float64)
    return np.stack([a, 1 - a], axis=1)


# -- maths ----------------------------------------------------------------------------------------


def test_window_cells_split_overlaps_at_centre_midpoints_and_keep_own_bounds_at_gaps():
    start, end, index = grid(4)
    index = np.array([0, 1, 2, 5])  # window 5 is not next to 2 (3 and 4 missing)
    start, end = index * 0.5, index * 0.5 + 1.0
    cell_start, cell_end = ev.window_cells(start, end, index)
    np.testing.assert_allclose(cell_start, [0.0, 0.75, 1.25, 2.5])
    np.testing.assert_allclose(cell_end, [0.75, 1.25, 2.0, 3.5])


def test_events_hysteresis_gap_merging_and_minimum_duration():
    start, end, index = grid(8)
    s = scores_of([0.1, 0.7, 0.8, 0.45, 0.2, 0.1, 0.6, 0.1])
    found = ev.find_events(s, start_s=start, end_s=end, window_index=index, config=config(hysteresis=0.1))
    a = [(e.start_s, e.end_s, e.n_windows) for e in found if e.label == "a"]
    # windows 1-3 (0.45 holds above 0.5 - 0.1), window 6 alone; cells are 0.5 s wide
    assert a == [(0.75, 2.25, 3), (3.25, 3.75, 1)]
    first = next(e for e in found if e.label == "a")
    assert first.confidence == pytest.approx((0.7 + 0.8 + 0.45) / 3)
    assert first.peak == pytest.approx(0.8)
    # without hysteresis the 0.45 window ends the first event
    strict = ev.find_events(s, start_s=start, end_s=end, window_index=index, config=config(hysteresis=0.0))
    assert [(e.start_s, e.end_s) for e in strict if e.label == "a"][0] == (0.75, 1.75)
    # a gap of 1 s merges with max_gap_s 1.0; a minimum duration drops the short one
    merged = ev.find_events(s, start_s=start, end_s=end, window_index=index, config=config(max_gap_s=1.0))
    assert [(e.start_s, e.end_s, e.n_windows) for e in merged if e.label == "a"] == [(0.75, 3.75, 4)]
    longer = ev.find_events(
        s, start_s=start, end_s=end, window_index=index, config=config(min_duration_s=0.6)
    )
    assert [(e.start_s, e.end_s) for e in longer if e.label == "a"] == [(0.75, 2.25)]
    # class b (1 - a): window 0; then 3 starts (0.55) and 4-7 hold (0.4 is at the 0.4 hold level)
    b = [(e.start_s, e.end_s) for e in found if e.label == "b"]
    assert b == [(0.0, 0.75), (1.75, 4.5)]


def test_events_reach_back_over_holding_windows_and_stop_at_missing_windows():
    start, end, _ = grid(4)
    s = scores_of([0.45, 0.7, 0.2, 0.2])
    found = ev.find_events(s, start_s=start, end_s=end, window_index=np.arange(4), config=config())
    assert [(e.start_s, e.end_s) for e in found if e.label == "a"] == [(0.0, 1.25)]
    index = np.array([0, 3, 4, 5])  # windows 1 and 2 missing (a failed unit): 0.5 s uncovered
    start, end = index * 0.5, index * 0.5 + 1.0
    s = scores_of([0.8, 0.8, 0.2, 0.2])
    found = ev.find_events(s, start_s=start, end_s=end, window_index=index, config=config(max_gap_s=0.0))
    assert [(e.start_s, e.end_s) for e in found if e.label == "a"] == [(0.0, 1.0), (1.5, 2.25)]
    bridged = ev.find_events(s, start_s=start, end_s=end, window_index=index, config=config(max_gap_s=0.5))
    assert [(e.start_s, e.end_s, e.n_windows) for e in bridged if e.label == "a"] == [(0.0, 2.25, 2)]


def test_activity_gate_and_recording_end():
    start, end, index = grid(4)
    s = scores_of([0.9, 0.9, 0.9, 0.9])
    level = np.array([-20.0, -80.0, -80.0, -20.0])
    found = ev.find_events(
        s, start_s=start, end_s=end, window_index=index, config=config(min_level_db=-60.0), level_db=level
    )
    assert [(e.start_s, e.end_s) for e in found if e.label == "a"] == [(0.0, 0.75), (1.75, 2.5)]
    ungated = ev.find_events(s, start_s=start, end_s=end, window_index=index, config=config(), duration_s=2.2)
    assert [(e.start_s, e.end_s) for e in ungated if e.label == "a"] == [(0.0, 2.2)]


def test_file_scores_and_multi_label():
    s = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    np.testing.assert_allclose(ev.file_scores(s, "mean"), [0.6, 0.4])
    np.testing.assert_allclose(ev.file_scores(s, "max"), [0.9 / 1.6, 0.7 / 1.6])
    np.testing.assert_allclose(ev.file_scores(s, "majority"), [2 / 3, 1 / 3])
    silent = np.array([True, False, False])  # as in training, silence has no say
    np.testing.assert_allclose(ev.file_scores(s, "mean", silent=silent), [0.45, 0.55])
    np.testing.assert_allclose(ev.file_scores(s, "mean", silent=np.ones(3, bool)), [0.6, 0.4])
    c = config(file_thresholds=(0.5, 0.35))
    assert ev.file_labels(np.array([0.6, 0.4]), c) == ["a", "b"]
    assert ev.file_labels(np.array([0.3, 0.3]), c) == []


def test_hourly_rows_share_duration_across_hours():
    hour = ev.HOUR_US
    rows = ev.hourly_rows(
        [
            {
                "site": "s1",
                "label": "a",
                "confidence": 0.8,
                "start_us": hour - 10_000_000,
                "end_us": hour + 20_000_000,
            },
            {
                "site": "s1",
                "label": "a",
                "confidence": 0.6,
                "start_us": hour + 60_000_000,
                "end_us": hour + 70_000_000,
            },
            {"site": "s1", "label": "a", "confidence": 0.9, "start_us": None, "end_us": None},
        ]
    )
    assert [(r["hour_us"], r["events"], r["duration_s"]) for r in rows] == [(0, 1, 10.0), (hour, 1, 30.0)]
    assert rows[1]["confidence_sum"] == pytest.approx(0.6)


def test_best_thresholds_maximise_f1_per_class():
    scores = scores_of([0.9, 0.8, 0.35, 0.3, 0.1])
    labels = np.array([0, 0, 0, 1, 1])
    window = ev.best_thresholds(scores, labels, lowest=0.05)
    assert 0.3 < window[0] <= 0.35  # takes in the 0.35 positive, leaves out the 0.3 negative
    assert ev.best_thresholds(scores, np.array([0, 0, 0, 0, 0]))[1] == 0.5  # absent class
    # near chance a score is no evidence: no threshold below MIN_THRESHOLD; class a never gets
    # there (F1 0 at every threshold: the default), class b is separated at 0.9
    low = scores_of([0.2, 0.25, 0.15, 0.1, 0.05])
    assert ev.best_thresholds(low, labels, lowest=0.05)[0] == 0.15
    assert ev.best_thresholds(low, labels) == [0.5, 0.9]


def test_label_files_are_tab_separated_in_their_formats():
    found = [ev.Event("dog", 1.5, 3.25, 0.91, 0.97, 4), ev.Event("rain", 4.0, 9.0, 0.6, 0.7, 10)]
    lines = ev.audacity_labels(found).splitlines()
    assert lines == ["1.500000\t3.250000\tdog", "4.000000\t9.000000\train"]
    rows = list(csv.DictReader(io.StringIO(ev.raven_table(found, high_freq_hz=8000.0)), delimiter="\t"))
    assert list(rows[0]) == list(ev.RAVEN_COLUMNS)
    assert [(r["Selection"], r["Begin Time (s)"], r["End Time (s)"], r["Annotation"]) for r in rows] == [
        ("1", "1.500000", "3.250000", "dog"),
        ("2", "4.000000", "9.000000", "rain"),
    ]
    assert rows[1]["High Freq (Hz)"] == "8000.0" and rows[0]["View"] == "Spectrogram 1"


def test_tag_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="window_thresholds: b=1.5"):
        config(window_thresholds=(0.5, 1.5))
    with pytest.raises(ConfigError, match="top_k=3"):
        config(top_k=3)
    with pytest.raises(ConfigError, match="aggregation='median'"):
        config(aggregation="median")
    assert parse_thresholds("a=0.7, b=0.2", LABELS) == {"a": 0.7, "b": 0.2}
    with pytest.raises(ConfigError, match="unknown label 'dog'"):
        parse_thresholds("dog=0.7", LABELS)


def test_units_of_a_recording_meet_again_before_events():
    """Events spanning a unit boundary come out whole, whatever order the units arrive in."""
    start, end, index = grid(10)
    a = [0.1, 0.2, 0.8, 0.9, 0.9, 0.9, 0.7, 0.1, 0.1, 0.1]  # an event over windows 2-6
    s = scores_of(a).astype(np.float32)
    item = SourceItem(uri="x.wav", clip_id="x", recording_start_us=ev.HOUR_US - 2_000_000)
    parts = [tagging.ScoredBatch(item, k, start[k : k + 4], end[k : k + 4], s[k : k + 4]) for k in (4, 0, 8)]
    parts[2] = tagging.ScoredBatch(item, 8, start[8:], end[8:], s[8:])
    summaries = [
        FileSummary("x", "x.wav", None, None, None, w, 2.0, False, i, 3) for i, w in enumerate((4, 4, 2))
    ]
    fn = tagging._TagRecordingFn(config(), temp_dir="unused", label_files=(), high_freq_hz=8000.0)
    out = {r.table: r.rows for r in fn.process(("x", {"scored": parts, "summaries": summaries}))}
    events = out["events"].to_pylist()
    assert [(e["label"], e["start_s"], e["end_s"]) for e in events if e["label"] == "a"] == [
        ("a", 1.25, 3.75)
    ]
    first = next(e for e in events if e["label"] == "a")
    assert first["start_utc"].timestamp() == pytest.approx(3600 - 2 + 1.25)
    assert out["windows"].column("window_index").to_pylist() == list(range(10))
    assert out["files"].column("complete").to_pylist() == [True]
    np.testing.assert_allclose(out["files"].column("score_a").to_pylist(), [np.mean(a)], rtol=1e-6)


# -- the pipeline ---------------------------------------------------------------------------------


def demo_root(demo_features):
    return demo_features.parent


def run_tag(*argv) -> int:
    return tag.run([str(a) for a in argv])


@pytest.mark.slow
def test_tag_demo_set_tables_label_files_and_accounting(demo_features, demo_model, tmp_path):
    root = demo_root(demo_features)
    out = tmp_path / "tags"
    code = run_tag(
        "--input", root / "audio", "--manifest", root / "manifest.csv", "--model-dir", demo_model,
        "--output", out, "--audacity", "--raven",
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "run.json").read_text())
    fig = manifest["figures"]
    assert (fig["inputs"], fig["files_processed"], fig["dead_letter_inputs"], fig["accounted_for"]) == (
        34,
        32,
        2,
        True,
    )
    assert fig["windows_scored"] == 32 * 6 and fig["recordings_tagged"] == 32
    assert manifest["thresholds_from"] == "model validation fold"
    assert (
        manifest["feature_fingerprint"]
        == json.loads((demo_model / "model.json").read_text())["feature_fingerprint"]
    )
    files = pd.read_parquet(out / "parquet" / "files")
    assert len(files) == 32 and files["complete"].all()
    assert (files["predicted"] == files["label"]).mean() >= 0.9  # learnt classes, mostly training clips
    windows = pd.read_parquet(out / "parquet" / "windows")
    score_columns = [f"score_{k}" for k in ("chirp", "click_train", "hum", "noise_burst")]
    np.testing.assert_allclose(windows[score_columns].sum(axis=1), 1.0, rtol=1e-5)
    # file scores are the mean of their windows' scores
    hum = windows[windows["clip_id"] == "hum-03"]
    assert files.set_index("clip_id").loc["hum-03", "score_hum"] == pytest.approx(
        hum["score_hum"].mean(), rel=1e-5
    )
    events = pd.read_parquet(out / "parquet" / "events")
    assert (events["end_s"] <= 3.0 + 1e-9).all() and (events["start_s"] >= 0).all()
    assert set(events["clip_id"]) <= set(files["clip_id"])
    # the CSV tables hold the same rows
    assert len(pd.read_csv(next((out / "csv" / "events").glob("*.csv")))) == len(events)
    assert fig["events_by_label"] == events["label"].value_counts().to_dict()
    assert list(fig["events_by_label"].values()) == sorted(fig["events_by_label"].values(), reverse=True)
    summary = tag.summary_text(manifest, str(out))
    assert "events by label  " + ", ".join(f"{k} {v}" for k, v in fig["events_by_label"].items()) in summary
    assert "hourly rows 0 (no recording start times" in summary  # the demo clips have none
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    assert sorted(d["reason"] for d in dead) == ["decode_error", "empty_file"]
    # one label file per tagged recording, holding that recording's events
    assert len(list((out / "audacity").glob("*.txt"))) == 32
    lines = (out / "audacity" / "hum-03.txt").read_text().splitlines()
    assert len(lines) == int((events["clip_id"] == "hum-03").sum())
    raven = list(csv.DictReader((out / "raven" / "hum-03.Table.1.selections.txt").open(), delimiter="\t"))
    assert [r["Annotation"] for r in raven] == [line.split("\t")[2] for line in lines]
    # a second run into the same folder replaces the tables, never adds to them
    assert (
        run_tag(
            "--input",
            root / "audio",
            "--manifest",
            root / "manifest.csv",
            "--model-dir",
            demo_model,
            "--output",
            out,
        )
        == 0
    )
    assert len(list((out / "parquet" / "files").glob("*.parquet"))) == 1
    assert not list((out / "audacity").rglob("*.txt"))  # label files of the earlier run are gone
    again = json.loads((out / "run.json").read_text())
    assert again["replaced"]["audacity"] == 32 and again["replaced"]["raven"] == 32  # and said so
    assert "replaced         an earlier run's outputs here; files removed: " in tag.summary_text(
        again, str(out)
    )


@pytest.mark.slow
def test_long_recording_split_into_units_gives_the_same_tags(demo_model, tmp_path):
    path, truth = make_long_recording(str(tmp_path / "rec"))
    path = Path(path)
    outputs = {}
    for unit_s in (0, 7):
        out = tmp_path / f"tags-{unit_s}"
        assert (
            run_tag("--input", path.parent, "--model-dir", demo_model, "--output", out, "--unit_s", unit_s)
            == 0
        )
        outputs[unit_s] = out
    manifest = json.loads((outputs[7] / "run.json").read_text())
    assert manifest["figures"]["work_units"] > 4
    for table in ("windows", "events", "files"):
        whole = pd.read_parquet(outputs[0] / "parquet" / table)
        split = pd.read_parquet(outputs[7] / "parquet" / table)
        pd.testing.assert_frame_equal(whole, split, check_exact=False, rtol=1e-4, atol=1e-5)
    events = pd.read_parquet(outputs[7] / "parquet" / "events")
    hum = events[events["label"] == "hum"]
    assert ((hum["start_s"] <= 12) & (hum["end_s"] >= 18)).any(), events
    # absolute times from the AudioMoth file name; the hum crosses 01:00 UTC
    start = pd.Timestamp("2026-11-24T00:59:45Z")
    first = hum.sort_values("duration_s").iloc[-1]
    assert first["start_utc"] == start + pd.to_timedelta(first["start_s"], unit="s").round("us")
    hourly = pd.read_parquet(outputs[7] / "parquet" / "hourly")
    hum_hours = hourly[hourly["label"] == "hum"].set_index("hour_utc")
    assert list(hum_hours.index.hour) == [0, 1]
    assert hum_hours["duration_s"].sum() == pytest.approx(hum["duration_s"].sum(), rel=1e-6)


@pytest.mark.slow
def test_incremental_tagging_takes_on_only_new_recordings(demo_features, demo_model, tmp_path):
    root = demo_root(demo_features)
    out = tmp_path / "tags"
    base = ["--input", root / "audio", "--model-dir", demo_model, "--output", out, "--incremental"]
    assert run_tag(*base, "--run_date", "2026-11-24") == 0
    first = json.loads((out / "run.json").read_text())
    assert first["figures"]["inputs"] == 34
    assert run_tag(*base, "--run_date", "2026-11-25") == 0  # nothing new: no new run written
    assert json.loads((out / "run.json").read_text())["run"]["run_id"] == first["run"]["run_id"]
    files = pd.read_parquet(out / "parquet" / "files")
    assert len(files) == 32 and files["clip_id"].is_unique
    assert [p.name for p in (out / "parquet" / "files").iterdir()] == ["run_date=2026-11-24"]
    assert len(list((out / "ledger").glob("*.parquet"))) == 1


def test_mismatched_model_is_refused_before_any_data(demo_features, demo_model, tmp_path, capsys):
    root = demo_root(demo_features)
    base = ["--input", root / "audio", "--model-dir", demo_model, "--output", tmp_path / "tags"]
    assert run_tag(*base, "--n_mels", "40") == 2
    err = capsys.readouterr().err
    assert "n_mels: model 60 vs the features asked for" in err
    assert not (tmp_path / "tags").exists()
    tampered = tmp_path / "model"
    tampered.mkdir()
    for item in demo_model.iterdir():
        if item.is_file():
            (tampered / item.name).write_bytes(item.read_bytes())
    description = json.loads((demo_model / "model.json").read_text())
    description["feature_config"]["hop_length"] = 256
    (tampered / "model.json").write_text(json.dumps(description))
    assert run_tag("--input", root / "audio", "--model-dir", tampered, "--output", tmp_path / "tags") == 2
    assert "model.json edited: fields feature_config changed since training" in capsys.readouterr().err
    reseal_model_folder(tampered)  # a consistent folder whose features are not these maths'
    assert run_tag("--input", root / "audio", "--model-dir", tampered, "--output", tmp_path / "tags") == 2
    assert "trained with other feature maths" in capsys.readouterr().err
    assert run_tag("--input", root / "audio", "--model-dir", tmp_path, "--output", tmp_path / "tags") == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert run_tag(*base, "--thresholds", "dog=0.3") == 2
    assert "unknown label 'dog'" in capsys.readouterr().err


@pytest.mark.slow
def test_inference_failures_become_tag_dead_letters(demo_features, demo_model, tmp_path):
    import apache_beam as beam

    from soundshard.pipelines import runner as runners

    root = demo_root(demo_features)
    parser = tag.make_parser()
    args, _ = parser.parse_known_args(
        ["--input", str(root / "audio"), "--model-dir", str(demo_model), "--output", str(tmp_path / "t")]
    )
    run = tag.prepare(args)
    bad = "hum-03"

    class Handler(tagging.ClassifierHandler):
        def run_inference(self, batch, model, inference_args=None):
            if any(b.source.clip_id == bad for b in batch):
                raise RuntimeError(f"cannot score {bad}")
            return super().run_inference(batch, model, inference_args)

        def batch_elements_kwargs(self):
            return {"min_batch_size": 1, "max_batch_size": 1}

    options = beam.options.pipeline_options.PipelineOptions([])
    with runners.make_pipeline(options, local=True) as p:
        tag.build(p, run, handler=Handler(str(demo_model)))
    manifest = json.loads((tmp_path / "t" / "run.json").read_text())
    fig = manifest["figures"]
    assert fig["accounted_for"] and fig["files_processed"] == 31 and fig["dead_letter_inputs"] == 3
    dead = pq.read_table(tmp_path / "t" / "dead_letters.parquet").to_pylist()
    tagged = [d for d in dead if d["stage"] == "tag"]
    assert [(d["clip_id"], d["reason"]) for d in tagged] == [(bad, "inference_error")]
    assert f"cannot score {bad}" in tagged[0]["message"]
    files = pd.read_parquet(tmp_path / "t" / "parquet" / "files")
    assert bad not in set(files["clip_id"]) and len(files) == 31


@pytest.mark.slow
def test_tag_from_and_to_gcs(gcs_env, demo_model, tmp_path):
    from tests.integration.test_object_storage import upload_demo

    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"tags-{uuid.uuid4().hex[:8]}"
    audio = upload_demo(tmp_path, fs, bucket)
    fs.put(str(demo_model) + "/", f"{bucket}/model/", recursive=True)
    out = f"gs://{bucket}/tags"
    code = run_tag(
        "--input", f"gs://{audio}", "--model-dir", f"gs://{bucket}/model", "--output", out, "--raven"
    )
    assert code == 0
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{out}/run.json"))
    assert manifest["figures"]["files_processed"] == 32 and manifest["figures"]["accounted_for"]
    names = fs.find(f"{out}/parquet/events")
    table = pq.read_table(io.BytesIO(fs.cat_file(names[0])))
    assert table.num_rows == manifest["figures"]["events"] > 0
    assert all(uri.startswith("gs://") for uri in table.column("source_uri").to_pylist())
    assert len(fs.find(f"{out}/raven")) == 32
    assert not [p for p in fs.find(bucket) if "_tmp-" in p]


def test_median_filter_removes_single_window_blips_and_never_crosses_a_gap():
    s = np.array([[0.1], [0.9], [0.1], [0.8], [0.9], [0.7], [0.1], [0.2]])
    smooth = ev.median_filtered(s, size=3)
    np.testing.assert_allclose(smooth[:, 0], [0.1, 0.1, 0.8, 0.8, 0.8, 0.7, 0.2, 0.2])
    assert ev.median_filtered(s, size=1) is s
    # windows 0-3 and 5-7 (4 missing): each run filtered on its own, edges repeated
    adjacent = np.array([False, True, True, True, False, True, True, True])
    apart = ev.median_filtered(s, size=3, adjacent=adjacent)
    np.testing.assert_allclose(apart[:, 0], [0.1, 0.1, 0.8, 0.8, 0.9, 0.7, 0.2, 0.2])
    start, end, index = grid(8)
    blip = scores_of([0.1, 0.9, 0.1, 0.8, 0.9, 0.7, 0.1, 0.1])
    plain = ev.find_events(blip, start_s=start, end_s=end, window_index=index, config=config(max_gap_s=0))
    smoothed = ev.find_events(
        blip,
        start_s=start,
        end_s=end,
        window_index=index,
        config=config(max_gap_s=0, median_filter_windows=3),
    )
    assert [e.n_windows for e in plain if e.label == "a"] == [1, 3]  # the blip at window 1 is an event
    assert [(e.start_s, e.end_s) for e in smoothed if e.label == "a"] == [(1.25, 3.25)]  # windows 2-5
    with pytest.raises(ConfigError, match="median_filter_windows=4 must be an odd number"):
        config(median_filter_windows=4)


def test_event_rules_come_from_the_model_unless_a_flag_is_given():
    description = {
        "label_names": list(LABELS),
        "thresholds": {"window": [0.4, 0.6], "clip": [0.5, 0.5]},
        "postprocessing": {"median_filter_windows": 5, "min_duration_s": 1.0},
    }
    args = tag.make_parser().parse_args(["--input", "x", "--model-dir", "m", "--output", "o"])
    rules = tag.tag_config_from_args(args, description)
    assert (rules.median_filter_windows, rules.min_duration_s, rules.hysteresis) == (5, 1.0, 0.1)
    assert rules.window_thresholds == (0.4, 0.6)
    args = tag.make_parser().parse_args(
        [
            "--input",
            "x",
            "--model-dir",
            "m",
            "--output",
            "o",
            "--median-filter-windows",
            "1",
            "--min-duration-s",
            "0",
        ]
    )
    rules = tag.tag_config_from_args(args, description)
    assert (rules.median_filter_windows, rules.min_duration_s) == (1, 0.0)
    assert tag.tag_config_from_args(args, {"label_names": list(LABELS)}).max_gap_s == 0.5


def test_floor_gate_rule_from_the_model_a_flag_or_off():
    parse = tag.make_parser().parse_args
    base = ["--input", "x", "--model-dir", "m", "--output", "o"]
    old_model = {"label_names": list(LABELS)}  # written before the gate: the default applies
    assert tag.tag_config_from_args(parse(base), old_model).min_level_above_floor_db == 6.0
    ungated = {"label_names": list(LABELS), "postprocessing": {"min_level_above_floor_db": None}}
    assert tag.tag_config_from_args(parse(base), ungated).min_level_above_floor_db is None
    flagged = parse([*base, "--min-level-above-floor-db", "9"])
    assert tag.tag_config_from_args(flagged, ungated).min_level_above_floor_db == 9.0
    off = parse([*base, "--min-level-above-floor-db", "off"])
    assert tag.tag_config_from_args(off, old_model).min_level_above_floor_db is None
    with pytest.raises(SystemExit):
        parse([*base, "--min-level-above-floor-db", "loud"])
    with pytest.raises(ConfigError, match="min_level_above_floor_db=-3.0 must be a finite number >= 0"):
        config(min_level_above_floor_db=-3.0)


def test_floor_gate_keeps_what_stands_above_the_recordings_background():
    n = 200
    start = np.arange(n) * 0.5
    end = start + 1.0
    level = np.full(n, -40.0)
    scores = np.zeros((n, 2), np.float32)
    scores[20:24, 0] = 0.9  # an event barely above the bed (2 dB)
    level[20:24] = -38.0
    scores[100:104, 0] = 0.9  # one well above it (20 dB)
    level[100:104] = -20.0
    found = partial(ev.find_events, scores, start_s=start, end_s=end, window_index=np.arange(n))
    gated = found(config=config(min_level_above_floor_db=6.0), level_db=level)
    assert [(e.start_s, e.end_s) for e in gated] == [(50.25, 52.25)]  # cells of windows 100-103
    assert len(found(config=config(min_level_above_floor_db=None), level_db=level)) == 2
    # digitally silent windows are no background: left out of the floor, it stays at the bed
    silent = np.zeros(n, bool)
    silent[150:] = True
    quiet = level.copy()
    quiet[150:] = -100.0
    assert ev.level_floor(quiet, silent=silent) == -40.0
    assert ev.level_floor(quiet) == -100.0
    assert len(found(config=config(min_level_above_floor_db=6.0), level_db=quiet, silent=silent)) == 1
    # a short recording has no floor: one sound may fill it
    assert ev.level_floor(level[:63]) is None
    short = ev.find_events(
        scores[:63] + 0.9 * (np.arange(63) < 10)[:, None] * [1, 0],
        start_s=start[:63],
        end_s=end[:63],
        window_index=np.arange(63),
        config=config(min_level_above_floor_db=6.0),
        level_db=level[:63],
    )
    assert len(short) == 2


def _onset_recording(onset_s: float = 10.30, *, rise_db: float = 30.0, n: int = 60):
    """1 s windows every 0.5 s of 50 frames of 20 ms over a bed at -40 dB that rises by
    ``rise_db`` at ``onset_s``; label a scores 0.9 on windows 21-24 (from 10.5 s), late for
    that onset, as a window that needs enough of a sound in it is."""
    frame_s, per_window, hop = 0.02, 50, 25
    times = np.arange((n - 1) * hop + per_window) * frame_s
    track = np.where(times >= onset_s - 1e-9, -40.0 + rise_db, -40.0)
    frames = np.stack([track[k * hop : k * hop + per_window] for k in range(n)])
    start = np.arange(n) * 0.5
    scores = np.zeros((n, 2), np.float32)
    scores[21:25, 0] = 0.9
    return scores, start, start + 1.0, frames


def test_frame_track_puts_windows_frames_back_on_the_recordings_grid():
    start, end = np.array([0.0, 0.5, 2.0]), np.array([1.0, 1.5, 3.0])  # 4 frames of 0.25 s each
    frames = np.array([[0, 1, 2, 3], [2, 3, 4, 5], [8, 9, 10, 11]], float)
    frames[1, 0] = 7.0  # a frame a window's top_db clamp raised: the other window's value holds
    times, levels = ev.frame_track(frames, start_s=start, end_s=end)
    np.testing.assert_allclose(times, np.arange(12) * 0.25)
    np.testing.assert_array_equal(levels[:6], [0, 1, 2, 3, 4, 5])
    assert np.isnan(levels[6:8]).all()  # no window holds 1.5-2.0 s
    np.testing.assert_array_equal(levels[8:], [8, 9, 10, 11])


def test_event_starts_move_to_where_the_sound_rises():
    scores, start, end, frames = _onset_recording()
    found = partial(ev.find_events, scores, start_s=start, end_s=end, window_index=np.arange(len(start)))
    on_grid = found(config=config(onset_rise_db=None, min_level_above_floor_db=None))
    assert [(e.label, e.start_s, e.end_s) for e in on_grid] == [("a", 10.75, 12.75)]
    # Smoothed over 3 frames, the level is -40 to 10.26 s, -30 at 10.28, -20 at 10.30 and -10 from
    # 10.32 s, the frame of the largest rise over the 0.3 s before it (30 dB); the last frame before
    # it within 1 dB of the lowest is 10.26 s: the start moves there, the end stays.
    placed = found(config=config(min_level_above_floor_db=None), frame_db=frames)
    assert [(e.label, e.start_s, e.end_s) for e in placed] == [("a", pytest.approx(10.26), 12.75)]
    assert placed[0].peak == on_grid[0].peak and placed[0].n_windows == on_grid[0].n_windows
    # a rise under onset_rise_db, or one outside the span searched, leaves the start on the grid
    small = _onset_recording(rise_db=4.0)[3]
    assert found(config=config(min_level_above_floor_db=None), frame_db=small)[0].start_s == 10.75
    early = _onset_recording(onset_s=9.0)[3]
    assert found(config=config(min_level_above_floor_db=None), frame_db=early)[0].start_s == 10.75
    # never into the label's previous event
    event = ev.Event("a", 10.75, 12.75, 0.9, 0.9, 4)
    times, levels = ev.frame_track(frames, start_s=start, end_s=end)
    moved = ev.refine_onsets([event], times=times, levels=levels, rise_db=6.0, previous_end={"a": 10.5})
    assert moved[0].start_s == 10.5
    with pytest.raises(ConfigError, match="onset_rise_db=0.0 must be a positive number"):
        config(onset_rise_db=0.0)


def test_frame_levels_are_the_power_sum_of_the_bands():
    from soundshard.schemas.config import FeatureConfig
    from soundshard.transforms.features import melspec

    features = np.full((1, 60, 41), -100.0, np.float32)
    features[0, :2, 5] = -10.0  # two bands at -10 dB: 10 log10(2 x 0.1) = -6.99 dB
    levels = melspec.frame_levels_db(features, FeatureConfig())
    assert levels.shape == (1, 41)
    assert levels[0, 5] == pytest.approx(10 * np.log10(2 * 0.1 + 58 * 1e-10), abs=1e-4)
    assert levels[0, 0] == pytest.approx(-100 + 10 * np.log10(60), abs=1e-4)
    mfcc = FeatureConfig(feature_type="mfcc", n_mfcc=13)
    c0 = np.full((1, 13, 41), 0.0, np.float32)
    c0[0, 0, :] = -40.0 * np.sqrt(60)  # c0 of frames whose 60 bands are all at -40 dB
    np.testing.assert_allclose(melspec.frame_levels_db(c0, mfcc), -40.0, rtol=1e-6)


def test_onset_rule_from_the_model_a_flag_or_off():
    parse = tag.make_parser().parse_args
    base = ["--input", "x", "--model-dir", "m", "--output", "o"]
    old_model = {"label_names": list(LABELS)}
    assert tag.tag_config_from_args(parse(base), old_model).onset_rise_db == 6.0
    assert tag.tag_config_from_args(parse([*base, "--onset-rise-db", "off"]), old_model).onset_rise_db is None
    assert tag.tag_config_from_args(parse([*base, "--onset-rise-db", "10"]), old_model).onset_rise_db == 10.0
