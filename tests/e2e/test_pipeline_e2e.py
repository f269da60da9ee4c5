"""The features command end to end: bad inputs, outputs read back without project code, workers."""

import json
import shutil

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import features
from soundshard.pipelines.demo import make_dataset
from soundshard.schemas import fields
from soundshard.schemas.config import FeatureConfig

from ..helpers import require_esc10, tone, write_audio


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A folder with one good file and every kind of bad input, and a manifest listing them."""
    root = tmp_path_factory.mktemp("bad")
    audio = root / "audio"
    write_audio(audio / "good.wav", tone(duration_s=2.0), 22050)
    write_audio(
        audio / "eight_ch.wav", tone(sample_rate_hz=96000, duration_s=1.5, channels=8), 96000, "PCM_24"
    )
    write_audio(audio / "short.wav", tone(duration_s=0.3), 22050)
    write_audio(audio / "silence.flac", np.zeros(22050, np.float32), 22050)
    nan = tone(duration_s=1.0)
    nan[500] = np.nan
    write_audio(audio / "nan.wav", nan, 22050, "FLOAT")
    full = write_audio(audio / "full.flac", tone(duration_s=3.0), 22050).read_bytes()
    (audio / "truncated.flac").write_bytes(full[: len(full) // 3])
    (audio / "full.flac").unlink()
    (audio / "zero.wav").write_bytes(b"")
    (audio / "text.wav").write_text("this is not a wav file\n")
    write_audio(audio / "no_label.wav", tone(duration_s=1.0), 22050)
    rows = [
        ("good.wav", "tone", 1),
        ("eight_ch.wav", "tone", 2),
        ("short.wav", "tone", 3),
        ("silence.flac", "quiet", 1),
        ("nan.wav", "tone", 2),
        ("truncated.flac", "tone", 3),
        ("zero.wav", "tone", 1),
        ("text.wav", "tone", 2),
        ("no_label.wav", "", 3),
        ("missing.wav", "tone", 1),
    ]
    manifest = root / "meta.csv"
    manifest.write_text("filename,label,fold\n" + "".join(f"{f},{lab},{fold}\n" for f, lab, fold in rows))
    return root


def run_features(*argv) -> int:
    return features.run([str(a) for a in argv])


EXPECTED_DEAD = {
    "nan.wav": ("decode", "non_finite_audio"),
    "truncated.flac": ("decode", "corrupt_audio"),
    "zero.wav": ("plan", "empty_file"),
    "text.wav": ("plan", "decode_error"),
    "no_label.wav": ("manifest", "empty_label"),
    "missing.wav": ("source", "missing_file"),
}


def test_bad_inputs_are_accounted_for(bad_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_features(
        "--input", bad_inputs / "audio", "--manifest", bad_inputs / "meta.csv", "--output", out
    )
    # most inputs failed: the outputs are written, and the exit code says the run failed
    assert code == features.EXIT_TOO_MANY_FAILURES
    printed = capsys.readouterr()
    assert "6 of 10 inputs (60%) failed, more than --max-failed-fraction 0.5" in printed.err
    dataset = json.loads((out / "dataset.json").read_text())
    fig = dataset["figures"]
    assert fig["inputs"] == 10
    assert fig["files_processed"] == 4  # good, eight_ch, short (padded), silence
    assert fig["dead_letters"] == 6
    assert fig["files_processed"] + fig["dead_letters"] == fig["inputs"]
    assert fig["accounted_for"] is True
    assert fig["digital_silence_files"] == 1
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    got = {d["source_uri"].rsplit("/", 1)[-1].split(":")[0]: (d["stage"], d["reason"]) for d in dead}
    assert got == EXPECTED_DEAD
    assert all(d["message"] and d["error_type"] for d in dead)
    table, feats = fields.read_parquet_windows(sorted(str(p) for p in (out / "parquet").glob("*.parquet")))
    per_clip = table.group_by("clip_id").aggregate([("window_index", "count")]).to_pydict()
    counts = dict(zip(per_clip["clip_id"], per_clip["window_index_count"], strict=True))
    # 2 s -> 4 windows, 1.5 s -> 3, 0.3 s -> 1 padded, 1 s -> 2 (41-frame windows every 20 frames)
    assert counts == {"good": 4, "eight_ch": 3, "short": 1, "silence": 2}
    assert np.isfinite(feats).all()
    assert dataset["label_map"] == {"quiet": 0, "tone": 1}
    assert "dead letters" in printed.out


def test_drop_config_dead_letters_short_file(bad_inputs, tmp_path):
    out = tmp_path / "out"
    code = run_features(
        "--input",
        bad_inputs / "audio",
        "--manifest",
        bad_inputs / "meta.csv",
        "--output",
        out,
        "--last_window",
        "drop",
        "--format",
        "parquet",
        "--max-failed-fraction",
        "1",
    )
    assert code == 0
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    short = [d for d in dead if d["source_uri"].endswith("short.wav")]
    assert [(d["stage"], d["reason"]) for d in short] == [("plan", "audio_too_short")]
    assert "shorter than one window" in short[0]["message"]
    assert not (out / "tfrecord").exists()


def test_no_input_succeeding_exits_1(tmp_path):
    (tmp_path / "a.wav").write_text("junk")
    assert run_features("--input", tmp_path, "--output", tmp_path / "out") == 1
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["figures"]["dead_letters"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fmax_hz", "30000"], "fmax_hz=30000.0 is above the Nyquist"),
        (["--n_mels", "many"], "n_mels='many' must be int"),
        (["--num_shards", "0"], "--num-shards=0 must be at least 1"),
        (["--no_such_flag", "1"], "unknown option(s): --no_such_flag"),
    ],
)
def test_config_errors_stop_early_and_name_the_value(bad_inputs, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = run_features("--input", bad_inputs / "audio", "--output", out, *argv)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_outputs_read_back_without_project_code_and_rerun_replaces_shards(tmp_path):
    data = tmp_path / "demo"
    manifest = make_dataset(str(data))
    out = tmp_path / "out"
    args = ["--input", data / "audio", "--manifest", manifest, "--output", out, "--num_shards", "3"]
    assert run_features(*args) == 0
    shard_files = sorted((out / "parquet").glob("*.parquet"))
    assert [p.name for p in shard_files] == [f"windows-0000{i}-of-00003.parquet" for i in range(3)]
    frame = pd.read_parquet(out / "parquet")
    assert len(frame) == 32 * 6  # 32 clips of 3 s: 6 windows each
    assert len(frame["log_mel"].iloc[0]) == 60 * 41
    by_label = duckdb.sql(
        f"SELECT label, count(*) AS n, count(DISTINCT clip_id) AS clips FROM '{out}/parquet/*.parquet' "
        "GROUP BY label ORDER BY label"
    ).fetchall()
    assert by_label == [("chirp", 48, 8), ("click_train", 48, 8), ("hum", 48, 8), ("noise_burst", 48, 8)]
    assert duckdb.sql(f"SELECT len(log_mel) FROM '{out}/parquet/*.parquet' LIMIT 1").fetchall() == [(2460,)]
    # fewer shards the second time: stale shards of the first run are removed, none left half-written
    assert run_features(*args[:-1], "1") == 0
    assert sorted(p.name for p in (out / "parquet").glob("*")) == ["windows-00000-of-00001.parquet"]
    assert not list(out.glob("_tmp-*"))
    assert len(pd.read_parquet(out / "parquet")) == 32 * 6


def test_tfrecords_read_with_tf_data(tmp_path):
    tf = pytest.importorskip("tensorflow")
    data = tmp_path / "demo"
    manifest = make_dataset(str(data))
    out = tmp_path / "out"
    assert run_features("--input", data / "audio", "--manifest", manifest, "--output", out) == 0
    files = sorted(str(p) for p in (out / "tfrecord").glob("*.tfrecord"))
    spec = {
        "log_mel": tf.io.FixedLenFeature([60 * 41], tf.float32),
        "label": tf.io.FixedLenFeature([], tf.string),
        "fold": tf.io.FixedLenFeature([], tf.int64),
    }
    ds = tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, spec))
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 32 * 6
    assert {r["label"] for r in rows} == {b"chirp", b"click_train", b"hum", b"noise_burst"}
    assert {int(r["fold"]) for r in rows} == {1, 2, 3, 4}
    # the project's reader helper gives [n_mels, n_frames] and the same values as Parquet
    first = next(iter(fields.tfrecord_dataset(files, FeatureConfig()).take(1)))
    assert first["log_mel"].shape == (60, 41)
    table, feats = fields.read_parquet_windows(sorted(str(p) for p in (out / "parquet").glob("*.parquet")))
    row = table.to_pylist().index(
        next(
            r
            for r in table.to_pylist()
            if r["clip_id"] == first["clip_id"].numpy().decode()
            and r["window_index"] == int(first["window_index"])
        )
    )
    np.testing.assert_array_equal(feats[row], first["log_mel"].numpy())


@pytest.mark.slow
def test_one_and_two_workers_write_identical_shards(tmp_path):
    data = tmp_path / "demo"
    manifest = make_dataset(str(data))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert (
            run_features(
                "--input",
                data / "audio",
                "--manifest",
                manifest,
                "--output",
                out,
                "--num_shards",
                "2",
                "--direct_num_workers",
                workers,
            )
            == 0
        )
        outs.append(out)
    for name in (
        "parquet/windows-00000-of-00002.parquet",
        "parquet/windows-00001-of-00002.parquet",
        "tfrecord/windows-00000-of-00002.tfrecord",
        "tfrecord/windows-00001-of-00002.tfrecord",
    ):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.data
def test_esc10_command(tmp_path):
    esc10 = require_esc10()
    out = tmp_path / "esc10"
    code = run_features("--input", esc10 / "audio", "--manifest", esc10 / "meta.csv", "--output", out)
    assert code == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["figures"]["files_processed"] == 400
    assert dataset["figures"]["dead_letters"] == 0
    assert dataset["figures"]["windows"] == 4000  # 5 s clips: 9 full windows + 1 padded
    assert dataset["counts"]["clips_by_label"] == {name: 40 for name in dataset["label_map"]}
    assert dataset["counts"]["clips_by_fold"] == {str(f): 80 for f in range(1, 6)}
    assert dataset["feature_fingerprint"] == FeatureConfig().fingerprint
    con = duckdb.connect()
    folds = con.sql(
        f"SELECT fold, count(DISTINCT clip_id) FROM '{out}/parquet/*.parquet' GROUP BY fold ORDER BY fold"
    ).fetchall()
    assert folds == [(f, 80) for f in range(1, 6)]
    frame = pd.read_parquet(out / "parquet", columns=["clip_id", "label", "meta_target", "start_s"])
    dogs = frame[frame.label == "dog"]
    assert set(dogs.meta_target) == {"0"} and dogs.clip_id.nunique() == 40
    assert frame.start_s.max() == pytest.approx(9 * 20 * 512 / 22050)
    shutil.rmtree(out)


def test_long_recording_split_into_units_matches_unsplit(tmp_path):
    rng = np.random.default_rng(3)
    y = (tone(sample_rate_hz=44100, duration_s=20.0) + 0.05 * rng.standard_normal(20 * 44100)).astype(
        np.float32
    )
    write_audio(tmp_path / "in" / "long.flac", y, 44100)
    tables = {}
    for unit_s in ("0", "3"):
        out = tmp_path / f"out{unit_s}"
        assert (
            run_features(
                "--input", tmp_path / "in", "--output", out, "--unit_s", unit_s, "--format", "parquet"
            )
            == 0
        )
        dataset = json.loads((out / "dataset.json").read_text())
        assert dataset["figures"]["files_processed"] == 1
        assert dataset["figures"]["audio_s"] == pytest.approx(20.0, abs=1e-3)
        tables[unit_s] = (
            dataset,
            fields.read_parquet_windows(str(out / "parquet" / "windows-00000-of-00001.parquet")),
        )
    assert tables["0"][0]["figures"]["work_units"] == 1
    assert tables["3"][0]["figures"]["work_units"] == 8  # 43 windows, 6 per unit
    (whole_table, whole), (split_table, split) = tables["0"][1], tables["3"][1]
    assert whole_table.column("window_index").to_pylist() == list(range(43))
    assert split_table.select(["window_index", "start_s", "end_s"]).equals(
        whole_table.select(["window_index", "start_s", "end_s"])
    )
    np.testing.assert_allclose(split, whole, atol=2e-3)


@pytest.mark.slow
@pytest.mark.data
def test_longform_recording_in_units(tmp_path):
    from ..helpers import SHARED_DATA

    longform = SHARED_DATA / "longform"
    wavs = sorted(longform.glob("*.wav")) + sorted(longform.glob("*.flac"))
    if not wavs:
        pytest.skip(f"longform recording not found in {longform}")
    out = tmp_path / "out"
    assert run_features("--input", wavs[0], "--output", out, "--format", "parquet") == 0
    dataset = json.loads((out / "dataset.json").read_text())
    fig = dataset["figures"]
    assert fig["files_processed"] == 1 and fig["work_units"] >= 10  # 10 minutes in 60 s units
    assert fig["audio_s"] == pytest.approx(600, abs=1.0)
    expected = melspec_windows_for(fig["audio_s"])
    assert fig["windows"] == expected


def melspec_windows_for(duration_s: float) -> int:
    from soundshard.transforms.features.melspec import window_count

    return window_count(round(duration_s * 22050), FeatureConfig())
