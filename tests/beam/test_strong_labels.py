"""Strong labels from Audacity label tracks and Raven selection tables (``features --labels``)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import features
from soundshard.schemas import fields
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.records import SourceItem, WindowBatch
from soundshard.transforms.features.compute import _LabelWindowsFn, plan
from soundshard.transforms.io import listing
from soundshard.transforms.labels import strong_labels

from ..helpers import tone, write_audio

# -- the overlap rule on hand-made tracks ----------------------------------------------------------

#: Windows of 1 s every 0.5 s: window k is [0.5 k, 0.5 k + 1).
STARTS = np.arange(12) * 0.5
ENDS = STARTS + 1.0


def labels_of(events, *, min_overlap=strong_labels.MIN_OVERLAP, starts=STARTS, ends=ENDS):
    return strong_labels.window_labels(starts, ends, events, min_overlap=min_overlap)


def test_event_ending_at_a_window_start_does_not_label_it():
    got = labels_of([(1.0, 2.0, "dog")])
    # window 0 ends where the event starts, window 4 starts where it ends: neither counts
    assert got[:5] == [(), ("dog",), ("dog",), ("dog",), ()]
    # the same within the rounding of times written to annotation files
    assert labels_of([(1.0 + 4e-7, 2.0 - 4e-7, "dog")])[:5] == [(), ("dog",), ("dog",), ("dog",), ()]


def test_long_event_needs_a_quarter_of_the_window():
    # [0, 1.2): window 2 ([1, 2)) holds 0.2 s of it, below 0.25 of the 1 s window
    assert labels_of([(0.0, 1.2, "rain")])[:3] == [("rain",), ("rain",), ()]
    # [0, 1.3): 0.3 s is enough
    assert labels_of([(0.0, 1.3, "rain")])[:3] == [("rain",), ("rain",), ("rain",)]
    # min_overlap 0: any overlap longer than a microsecond; 1: the whole window
    assert labels_of([(0.0, 1.2, "rain")], min_overlap=0.0)[:3] == [("rain",)] * 3
    assert labels_of([(0.0, 1.2, "rain")], min_overlap=1.0)[:3] == [("rain",), (), ()]


def test_short_event_inside_a_window_labels_it():
    # 0.05 s inside windows 7 ([3.5, 4.5)) and 8 ([4, 5)); window 6 ([3, 4)) only touches it
    got = labels_of([(4.0, 4.05, "click")])
    assert [k for k, names in enumerate(got) if names] == [7, 8]
    # a 0.4 s event: a window needs 0.1 s of it (a quarter of the shorter of the two)
    got = labels_of([(0.45, 0.85, "owl")])
    assert got[:3] == [("owl",), ("owl",), ()]  # window 1 holds 0.35 s
    got = labels_of([(0.9, 1.3, "owl")])
    assert got[:3] == [("owl",)] * 3  # window 0 holds 0.1 s of 0.4: exactly a quarter is enough
    got = labels_of([(0.95, 1.35, "owl")])
    assert got[:3] == [(), ("owl",), ("owl",)]  # window 0 holds 0.05 s: not enough


def test_overlapping_events_give_several_sorted_labels():
    got = labels_of([(1.0, 2.0, "dog"), (1.8, 2.1, "bird"), (1.2, 1.9, "dog")])
    assert got[:6] == [(), ("dog",), ("bird", "dog"), ("bird", "dog"), ("bird",), ()]


def test_point_labels_label_the_windows_that_contain_them():
    got = labels_of([(5.2, 5.2, "knock")])
    assert [k for k, names in enumerate(got) if names] == [9, 10]
    got = labels_of([(1.0, 1.0, "knock")])  # on a boundary: windows [0.5, 1.5) and [1, 2)
    assert [k for k, names in enumerate(got) if names] == [1, 2]


def test_labels_outside_the_recording_label_nothing_or_what_they_reach():
    got = labels_of([(20.0, 21.0, "ghost"), (6.3, 9.0, "rain")])
    # windows reach 6.5 s: window 11 ([5.5, 6.5)) holds 0.2 s of rain, below a quarter
    assert all(not names for names in got)
    got = labels_of([(6.2, 9.0, "rain")])
    assert [k for k, names in enumerate(got) if names] == [11]
    assert labels_of([(0.0, 1.0, "x")], starts=np.zeros(0), ends=np.zeros(0)) == []


def test_window_labels_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    starts = np.arange(400) * 0.4644
    ends = starts + 0.952
    events = []
    for _ in range(150):
        start = rng.uniform(-1, 200)
        events.append((start, start + rng.choice([0.0, rng.uniform(0, 0.3), rng.uniform(0, 8)]), f"c{_ % 5}"))
    got = strong_labels.window_labels(starts, ends, events, min_overlap=0.25)
    for k, (ws, we) in enumerate(zip(starts, ends, strict=True)):
        want = set()
        for es, ee, label in events:
            if ee == es:
                if ws <= es < we:
                    want.add(label)
                continue
            overlap = min(we, ee) - max(ws, es)
            if overlap > 1e-6 and overlap >= 0.25 * min(we - ws, ee - es) - 1e-6:
                want.add(label)
        assert got[k] == tuple(sorted(want)), k


def test_window_labels_refuse_bad_arguments():
    with pytest.raises(ValueError, match="min_overlap=1.5"):
        labels_of([], min_overlap=1.5)
    with pytest.raises(ValueError, match="non-decreasing"):
        strong_labels.window_labels(np.array([1.0, 0.0]), np.array([2.0, 1.0]), [])


def test_events_refuse_empty_and_reserved_labels():
    from soundshard.transforms.labels.annotations import AnnotationError, parse_audacity

    with pytest.raises(AnnotationError, match=r"t\.txt: the annotation at 1-2 s has an empty label"):
        strong_labels.events_of(parse_audacity("1\t2\t\n"), source="t.txt")
    with pytest.raises(AnnotationError, match="<background>"):
        strong_labels.events_of(parse_audacity("1\t2\t<background>\n"), source="t.txt")
    events = strong_labels.events_of(parse_audacity("3\t4\tb\n1\t2\t a \n"), source="t.txt")
    assert events == ((1.0, 2.0, "a"), (3.0, 4.0, "b"))


def test_time_stretched_copies_are_labelled_at_their_own_times():
    item = SourceItem(
        "/x/a.wav", "a~time_stretch=0.5", augmentation="time_stretch=0.5", annotations=((1.0, 2.0, "dog"),)
    )
    # a copy at rate 0.5 plays the original's [1, 2) s at [2, 4) s
    batch = WindowBatch(item, np.zeros((12, 1, 1), np.float32), STARTS, ENDS)
    labelled, count = list(_LabelWindowsFn(0.25).process(batch))
    assert [k for k, names in enumerate(labelled.labels) if names] == [3, 4, 5, 6, 7]
    assert count.value.augmented and dict(count.value.by_label) == {"<background>": 7, "dog": 5}


# -- end to end through `soundshard features --labels` ---------------------------------------------

#: Windows of exactly 1 s every 0.5 s (16 kHz, 400-sample hops, 40 frames per window, 20 between).
CONFIG_FLAGS = [
    "--sample_rate_hz",
    "16000",
    "--n_fft",
    "512",
    "--hop_length",
    "400",
    "--n_mels",
    "20",
    "--window_frames",
    "40",
    "--window_hop_frames",
    "20",
]
RATE = 16000

AUDACITY = (
    "1.000000\t2.000000\tdog\n1.8\t2.1\tbird\n4.0\t4.05\tcar\n5.2\t5.2\tknock\n5.9\t7.0\train\n8\t9\tghost\n"
)
#: Window k of a 6 s recording: hand-computed from the track above (window k is [0.5 k, 0.5 k + 1)).
AUDACITY_EXPECTED = {
    0: [],
    1: ["dog"],
    2: ["bird", "dog"],
    3: ["bird", "dog"],
    4: ["bird"],
    5: [],
    6: [],
    7: ["car"],
    8: ["car"],
    9: ["knock"],
    10: ["knock"],
    11: ["rain"],
}
RAVEN = (
    "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)\tAnnotation\n"
    "1\tWaveform 1\t1\t0.2\t0.7\t\t\towl\n"
    "1\tSpectrogram 1\t1\t0.2\t0.7\t300\t900\towl\n"
    "2\tSpectrogram 1\t1\t3.0\t4.0\t300\t900\towl\n"
)
RAVEN_EXPECTED = {0: ["owl"], 1: ["owl"], 2: [], 5: ["owl"], 6: ["owl"], 7: ["owl"], 8: []}


def run(*argv) -> int:
    return features.run([str(a) for a in [*argv, *CONFIG_FLAGS]])


def window_labels_by_clip(out) -> dict[str, dict[int, list[str] | None]]:
    table = pq.read_table(out / "parquet")
    found: dict = {}
    for row in table.select(["clip_id", "window_index", "labels"]).to_pylist():
        found.setdefault(row["clip_id"], {})[row["window_index"]] = row["labels"]
    return found


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """Recordings with an Audacity track, a Raven table, a malformed track and none."""
    root = tmp_path_factory.mktemp("annotated")
    audio = root / "audio"
    write_audio(audio / "night1.wav", tone(sample_rate_hz=RATE, duration_s=6.0), RATE)
    (audio / "night1.txt").write_text(AUDACITY)
    write_audio(audio / "night2.flac", tone(sample_rate_hz=RATE, duration_s=5.0, seed=1), RATE)
    (audio / "night2.Table.1.selections.txt").write_text(RAVEN)
    write_audio(audio / "broken.wav", tone(sample_rate_hz=RATE, duration_s=3.0, seed=2), RATE)
    (audio / "broken.txt").write_text("0.5\t1.0\tdog\n2.0\tsoon\tcat\n")
    write_audio(audio / "unlabelled.wav", tone(sample_rate_hz=RATE, duration_s=2.0, seed=3), RATE)
    return root


def test_audacity_and_raven_files_beside_recordings(annotated, tmp_path):
    out = tmp_path / "out"
    assert run("--input", annotated / "audio", "--output", out, "--labels") == 0
    got = window_labels_by_clip(out)
    assert {k: got["night1"][k] for k in AUDACITY_EXPECTED} == AUDACITY_EXPECTED
    assert max(got["night1"]) == 11  # the 6 s recording has 12 windows; 'ghost' (8-9 s) labels none
    assert {k: got["night2"][k] for k in RAVEN_EXPECTED} == RAVEN_EXPECTED

    table = pq.read_table(out / "parquet")
    rows = {(r["clip_id"], r["window_index"]): r for r in table.to_pylist()}
    assert rows["night1", 1]["label"] == "dog" and rows["night1", 2]["label"] is None  # two labels
    assert rows["night1", 0]["label"] is None and rows["night1", 0]["label_index"] == -1
    assert all(r["strong"] for r in rows.values())

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["schema_version"] == 5
    # every annotation label seen, 'ghost' (beyond the recording's end) too
    names = ["bird", "car", "dog", "ghost", "knock", "owl", "rain"]
    assert dataset["label_map"] == {n: i for i, n in enumerate(names)}
    assert rows["night1", 1]["label_index"] == dataset["label_map"]["dog"]
    # a malformed track is a dead letter naming file and line; a recording without one too
    dead = {r["clip_id"]: r for r in pq.read_table(out / "dead_letters.parquet").to_pylist()}
    assert dead["broken"]["stage"] == "source" and dead["broken"]["reason"] == "bad_labels"
    assert f"{annotated / 'audio' / 'broken.txt'}:2: end 'soon' is not a number" in dead["broken"]["message"]
    assert dead["unlabelled"]["reason"] == "missing_labels"
    assert (
        "unlabelled.txt" in dead["unlabelled"]["message"]
        and "--labels-optional" in dead["unlabelled"]["message"]
    )
    assert set(got) == {"night1", "night2"}
    counts = dataset["counts"]
    by_label = counts["windows_by_label"]
    n_windows = len(got["night1"]) + len(got["night2"])
    background = sum(1 for clip in got.values() for names in clip.values() if not names)
    assert by_label["<background>"] == background and by_label["dog"] == 3 and by_label["bird"] == 3
    assert by_label["owl"] == 5
    assert counts["strong_labels"] == {
        "recordings": 2,
        "windows": n_windows,
        "background_windows": background,
        "multi_label_windows": 2,
    }
    assert counts["clips_by_label"]["owl"] == 1 and counts["clips_by_label"]["dog"] == 1
    figures = dataset["figures"]
    assert figures["inputs"] == 4 and figures["files_processed"] == 2 and figures["accounted_for"]
    assert dataset["strong_labels"]["min_overlap"] == 0.25


def test_labels_optional_keeps_recordings_without_a_file_as_background(annotated, tmp_path):
    out = tmp_path / "out"
    assert run("--input", annotated / "audio", "--output", out, "--labels", "--labels-optional") == 0
    table = pq.read_table(out / "parquet").to_pandas()
    unlabelled = table[table.clip_id == "unlabelled"]
    assert len(unlabelled) and unlabelled.strong.all()
    assert all(list(v) == [] for v in unlabelled["labels"]) and unlabelled.label.isna().all()
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    assert [d["reason"] for d in dead] == ["bad_labels"]  # a malformed file is never forgiven


def test_without_labels_the_annotation_files_are_ignored(annotated, tmp_path):
    out = tmp_path / "out"
    assert run("--input", annotated / "audio", "--output", out) == 0
    table = pq.read_table(out / "parquet")
    assert table.column("labels").null_count == table.num_rows
    assert not any(table.column("strong").to_pylist())
    assert json.loads((out / "dataset.json").read_text())["strong_labels"] is None


def test_manifest_column_names_label_files(tmp_path):
    audio = tmp_path / "audio"
    write_audio(audio / "rec" / "a.wav", tone(sample_rate_hz=RATE, duration_s=6.0), RATE)
    write_audio(audio / "rec" / "b.wav", tone(sample_rate_hz=RATE, duration_s=5.0, seed=1), RATE)
    write_audio(audio / "rec" / "c.wav", tone(sample_rate_hz=RATE, duration_s=2.0, seed=2), RATE)
    write_audio(audio / "d.wav", tone(sample_rate_hz=RATE, duration_s=2.0, seed=3), RATE)
    (audio / "notes").mkdir()
    (audio / "notes" / "a-labels.txt").write_text(AUDACITY)
    (audio / "notes" / "b-selections.txt").write_text(RAVEN)
    (tmp_path / "outside.txt").write_text("0\t1\tdog\n")
    manifest = tmp_path / "meta.csv"
    manifest.write_text(
        "filename,labels_file,fold\n"
        "rec/a.wav,notes/a-labels.txt,1\n"
        "rec/b.wav,b-selections.txt,2\n"  # found by its name, as audio paths are
        "rec/c.wav,,1\n"  # no file named: missing_labels
        f"d.wav,{tmp_path / 'outside.txt'},2\n"
    )
    out = tmp_path / "out"
    code = run("--input", audio, "--manifest", manifest, "--output", out, "--labels")
    assert code == 0
    got = window_labels_by_clip(out)
    assert {k: got["rec/a"][k] for k in AUDACITY_EXPECTED} == AUDACITY_EXPECTED
    assert {k: got["rec/b"][k] for k in RAVEN_EXPECTED} == RAVEN_EXPECTED
    dead = {r["clip_id"]: r for r in pq.read_table(out / "dead_letters.parquet").to_pylist()}
    assert (
        dead["rec/c"]["reason"] == "missing_labels" and "'labels_file' is empty" in dead["rec/c"]["message"]
    )
    assert dead["d"]["reason"] == "outside_input" and "labels_file" in dead["d"]["message"]
    schema = pq.read_schema(next((out / "parquet").glob("*.parquet")))
    assert "meta_labels_file" not in schema.names and "fold" in schema.names


def test_manifest_without_labels_column_mixes_weak_clips_and_annotated_recordings(tmp_path):
    audio = tmp_path / "audio"
    write_audio(audio / "dog1.wav", tone(sample_rate_hz=RATE, duration_s=2.0), RATE)
    write_audio(audio / "night.wav", tone(sample_rate_hz=RATE, duration_s=6.0, seed=1), RATE)
    (audio / "night.txt").write_text(AUDACITY)  # found beside the recording
    manifest = tmp_path / "meta.csv"
    manifest.write_text("filename,label,fold\ndog1.wav,dog,1\nnight.wav,,2\n")
    out = tmp_path / "out"
    argv = ["--input", audio, "--manifest", manifest, "--output", out, "--labels", "--labels-optional"]
    assert run(*argv) == 0
    table = pq.read_table(out / "parquet").to_pandas()
    weak = table[table.clip_id == "dog1"]
    assert (weak.label == "dog").all() and weak["labels"].isna().all() and not weak.strong.any()
    got = window_labels_by_clip(out)
    assert {k: got["night"][k] for k in AUDACITY_EXPECTED} == AUDACITY_EXPECTED
    counts = json.loads((out / "dataset.json").read_text())["counts"]
    assert counts["windows_by_label"]["dog"] == len(weak) + 3 and counts["strong_labels"]["recordings"] == 1


def test_labels_flags_are_checked_before_any_work(annotated, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--input", annotated / "audio", "--output", out, "--labels-optional") == 2
    assert "--labels-optional needs --labels" in capsys.readouterr().err
    assert run("--input", annotated / "audio", "--output", out, "--labels", "--min-label-overlap", "2") == 2
    assert "--min-label-overlap=2.0 must lie between 0 and 1" in capsys.readouterr().err
    code = run("--input", annotated / "audio", "--output", out, "--labels", "--labels-column", "x")
    assert code == 2 and "--labels-column 'x' needs a --manifest" in capsys.readouterr().err
    archive = tmp_path / "in"
    archive.mkdir()
    write_audio(tmp_path / "m.wav", tone(sample_rate_hz=RATE), RATE)
    with zipfile.ZipFile(archive / "batch.zip", "w") as z:
        z.write(tmp_path / "m.wav", "m.wav")
    assert run("--input", archive, "--output", out, "--labels") == 2
    assert "archive members" in capsys.readouterr().err
    assert not (out / "dataset.json").exists()


def test_split_and_unsplit_recordings_get_the_same_labels(tmp_path):
    audio = tmp_path / "audio"
    write_audio(audio / "long.wav", tone(sample_rate_hz=RATE, duration_s=180.0), RATE)
    rng = np.random.default_rng(1)
    lines = []
    for k in range(60):
        start = rng.uniform(0, 185)
        length = rng.choice([0.0, rng.uniform(0.02, 0.5), rng.uniform(1, 10)])
        lines.append(f"{start:.6f}\t{start + length:.6f}\t{['dog', 'bird', 'car'][k % 3]}\n")
    (audio / "long.txt").write_text("".join(lines))
    tables = {}
    for unit_s in ("20", "0"):
        out = tmp_path / f"out{unit_s}"
        assert run("--input", audio, "--output", out, "--labels", "--unit_s", unit_s) == 0
        dataset = json.loads((out / "dataset.json").read_text())
        tables[unit_s] = pq.read_table(out / "parquet").sort_by("window_index")
        assert dataset["figures"]["work_units"] == (1 if unit_s == "0" else 9)
    split, whole = tables["20"], tables["0"]
    assert split.num_rows == whole.num_rows == 360
    for column in ("window_index", "start_s", "labels", "label", "label_index", "strong"):
        assert split.column(column).to_pylist() == whole.column(column).to_pylist(), column
    assert sum(1 for names in whole.column("labels").to_pylist() if names) > 50

    # the units of the split recording carry only the events that can meet their windows
    item = listing.attach_annotations(
        [SourceItem(str(audio / "long.wav"), "long")], labels=listing.StrongLabels()
    )[0][0]
    config = FeatureConfig.from_dict(
        {"sample_rate_hz": 16000, "n_fft": 512, "hop_length": 400, "n_mels": 20, "window_frames": 40}
    )
    units = plan(item, config, unit_s=20)
    assert len(units) == 9 and all(len(u.source.annotations) < len(item.annotations) for u in units)
    assert set().union(*(u.source.annotations for u in units)) <= set(item.annotations)


def test_embed_labels_embedding_windows(annotated, tmp_path):
    from soundshard.pipelines import embed

    from .. import embedding_fixtures as fx

    model = fx.make_saved_model(tmp_path / "tiny", window_samples=16000)
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[embedding]\nsample_rate_hz = 16000\nwindow_s = 1.0\nhop_s = 0.5\n"
        f'embedding_size = {fx.EMBEDDING_SIZE}\noutput = "embedding"\n'
    )
    out = tmp_path / "out"
    argv = ["--input", annotated / "audio", "--output", out, "--labels", "--labels-optional"]
    argv += [
        "--embedding-model",
        f"saved_model:{model}",
        "--embedding-config",
        config,
        "--max-batch-size",
        "4",
    ]
    assert embed.run([str(a) for a in argv]) == 0
    got = window_labels_by_clip(out)
    # embedding windows of 1 s every 0.5 s: the same hand-computed labels as log-mel windows
    assert got["night1"] == {k: AUDACITY_EXPECTED[k] for k in got["night1"]} and len(got["night1"]) >= 10
    assert got["unlabelled"] and all(v == [] for v in got["unlabelled"].values())  # background


# -- schema round trip ------------------------------------------------------------------------------


def strong_batch() -> WindowBatch:
    config = FeatureConfig()
    features_ = np.random.default_rng(0).standard_normal((4, *config.feature_shape)).astype(np.float32)
    starts = np.arange(4) * config.window_hop_s
    item = SourceItem("/x/n.wav", "n", "cat", 1, annotations=((0.0, 1.0, "dog"),))
    labels = (("dog",), ("bird", "dog"), (), ("bird",))
    return WindowBatch(item, features_, starts, starts + config.window_s, labels=labels)


def test_parquet_and_tfrecord_round_trip_with_multi_hot(tmp_path):
    tf = pytest.importorskip("tensorflow")
    config = FeatureConfig()
    label_map = {"bird": 0, "cat": 1, "dog": 2}
    strong = fields.batch_to_table(strong_batch(), config=config, label_map=label_map)
    weak_item = SourceItem("/x/w.wav", "w", "cat", 2)
    weak = fields.batch_to_table(
        WindowBatch(weak_item, strong_batch().features[:2], np.zeros(2), np.ones(2)),
        config=config,
        label_map=label_map,
    )
    table = pa.concat_tables([strong, weak])
    assert table.schema.equals(fields.arrow_schema(config), check_metadata=True)
    pq.write_table(table, tmp_path / "w.parquet")
    back, features_ = fields.read_parquet_windows(str(tmp_path / "w.parquet"))
    assert back.column("labels").to_pylist() == [["dog"], ["bird", "dog"], [], ["bird"], None, None]
    assert back.column("label").to_pylist() == ["dog", None, None, "bird", "cat", "cat"]
    assert back.column("label_index").to_pylist() == [2, -1, -1, 0, 1, 1]
    assert back.column("strong").to_pylist() == [True] * 4 + [False] * 2
    expected = np.array(
        [[0, 0, 1], [1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]],
        np.float32,
    )
    np.testing.assert_array_equal(fields.multi_hot(back, label_map), expected)
    assert features_.shape == (6, 60, 41)

    path = tmp_path / "w.tfrecord"
    with open(path, "wb") as f:
        for record in fields.table_to_examples(table):
            f.write(fields.tfexample.tfrecord_frame(record))
    parsed = list(fields.tfrecord_dataset(str(path), config, label_map=label_map).as_numpy_iterator())
    assert [list(p["labels"]) for p in parsed] == [[b"dog"], [b"bird", b"dog"], [], [b"bird"], [], []]
    assert [bool(p["strong"]) for p in parsed] == [True] * 4 + [False] * 2
    np.testing.assert_array_equal(np.stack([p["multi_hot"] for p in parsed]), expected)
    np.testing.assert_array_equal(
        fields.multi_hot([p["labels"] for p in parsed], label_map, label=[p["label"] for p in parsed]),
        expected,
    )
    # background is an empty list on the wire, a weak row has no labels feature at all
    example = tf.train.Example.FromString(next(fields.table_to_examples(table.slice(2, 1))))
    assert "labels" in example.features.feature and not example.features.feature["labels"].bytes_list.value
    example = tf.train.Example.FromString(next(fields.table_to_examples(table.slice(4, 1))))
    assert "labels" not in example.features.feature


def test_multi_hot_names_unknown_labels():
    with pytest.raises(ValueError, match="label 'fox' is not in the label map"):
        fields.multi_hot([["fox"]], {"dog": 0})
    assert fields.multi_hot([None, []], {"dog": 0}, label=["dog", None]).tolist() == [[1.0], [0.0]]


def test_strong_batch_without_labels_is_refused():
    batch = strong_batch()
    unlabelled = WindowBatch(batch.source, batch.features, batch.start_s, batch.end_s)
    with pytest.raises(ValueError, match="AssignWindowLabels"):
        fields.batch_to_table(unlabelled, config=FeatureConfig(), label_map={})
