"""Nightly incremental runs: only new inputs, date/site partitions, killed and repeated runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import features
from soundshard.transforms.io import ledger

from ..helpers import tone, write_audio

SITES = "sites/(?P<site>[^/]+)/"


def night_files(root, names, *, duration_s=2.0):
    for i, name in enumerate(names):
        write_audio(root / name, tone(duration_s=duration_s, freq_hz=300 + 50 * i, seed=i), 22050)


def run_night(inputs, out, run_date, *extra):
    argv = [
        "--input",
        inputs,
        "--output",
        out,
        "--incremental",
        "--run_date",
        run_date,
        "--site_pattern",
        SITES,
    ]
    return features.run([str(a) for a in (*argv, "--format", "parquet", *extra)])


def window_rows(out) -> dict:
    """``{(clip_id, window_index): (start_utc, site, features)}`` over every shard of every night."""
    rows = {}
    for path in sorted((out / "parquet").rglob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            key = (row["clip_id"], row["window_index"])
            assert key not in rows, f"duplicate window {key} in {path}"
            rows[key] = (row["start_utc"], row["site"], np.asarray(row["log_mel"], np.float32))
    return rows


def same_rows(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][:2] == b[k][:2] and np.array_equal(a[k][2], b[k][2]) for k in a)


def test_nights_add_only_new_inputs(tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    night_files(inputs, ["sites/north/20261124_010000.wav", "sites/south/20261124_010000.wav"])
    assert run_night(inputs, out, "2026-11-24") == 0
    first = window_rows(out)
    assert len(first) == 8  # two 2 s files, 4 windows each
    north = sorted((out / "parquet" / "run_date=2026-11-24" / "site=north").iterdir())
    assert len(north) == 1 and ledger.RUN_ID.search(north[0].name)
    assert (out / "parquet" / "run_date=2026-11-24" / "site=south").is_dir()

    # Repeating the night finds nothing new and changes nothing.
    capsys.readouterr()
    assert run_night(inputs, out, "2026-11-24") == 0
    assert "nothing new: all 2 input(s)" in capsys.readouterr().out
    assert same_rows(window_rows(out), first)

    # The next night: two new recordings (one at a new site) and a broken file.
    night_files(inputs, ["sites/north/20261125_010000.wav", "sites/east/20261125_010000.wav"])
    (inputs / "sites" / "east" / "20261125_020000.wav").write_bytes(b"RIFF not really a wav")
    assert run_night(inputs, out, "2026-11-25") == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["incremental"] == {"run_date": "2026-11-25", "unchanged_skipped": 2, "earlier_runs": 1}
    assert (dataset["figures"]["inputs"], dataset["figures"]["files_processed"]) == (3, 2)
    assert dataset["figures"]["accounted_for"] is True
    second = window_rows(out)
    assert len(second) == 16 and all(second[k][:2] == first[k][:2] for k in first)
    new_clips = {k[0] for k in second.keys() - first.keys()}
    assert new_clips == {"sites/north/20261125_010000", "sites/east/20261125_010000"}
    assert sorted(p.name for p in (out / "parquet" / "run_date=2026-11-25").iterdir()) == [
        "site=east",
        "site=north",
    ]
    dead = pq.read_table(out / "dead_letters" / "run_date=2026-11-25").to_pylist()
    assert [(d["clip_id"], d["reason"]) for d in dead] == [("sites/east/20261125_020000", "decode_error")]

    table = ledger.read_ledger(str(out))
    assert table.num_rows == 5
    status = dict(zip(table.column("clip_id").to_pylist(), table.column("status").to_pylist(), strict=True))
    assert status["sites/east/20261125_020000"] == "dead_letter"
    assert sum(s == "processed" for s in status.values()) == 4

    # A broken file is not taken on again until it changes (or --retry_dead_letters).
    capsys.readouterr()
    assert run_night(inputs, out, "2026-11-26") == 0
    assert "nothing new: all 5 input(s)" in capsys.readouterr().out
    night_files(inputs, ["sites/east/20261125_020000.wav"])  # re-uploaded, now good
    assert run_night(inputs, out, "2026-11-26") == 0
    assert len(window_rows(out)) == 20

    # Readers need no soundshard code: DuckDB over the partitions.
    import duckdb

    glob = str(out / "parquet" / "**" / "*.parquet")
    got = duckdb.sql(
        f"SELECT run_date::VARCHAR, site, count(*) FROM read_parquet('{glob}', hive_partitioning=true) "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert got == [
        ("2026-11-24", "north", 4),
        ("2026-11-24", "south", 4),
        ("2026-11-25", "east", 4),
        ("2026-11-25", "north", 4),
        ("2026-11-26", "east", 4),
    ]


def test_changed_config_takes_everything_on_again(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    night_files(inputs, ["sites/a/x.wav"])
    assert run_night(inputs, out, "2026-11-24") == 0
    assert run_night(inputs, out, "2026-11-25", "--n_mels", "40") == 0
    fingerprints = set(ledger.read_ledger(str(out)).column("feature_fingerprint").to_pylist())
    assert len(fingerprints) == 2


def test_leftovers_of_a_run_killed_during_its_commit_are_removed(tmp_path, capsys):
    inputs, out, clean = tmp_path / "in", tmp_path / "out", tmp_path / "clean"
    night_files(inputs, ["sites/a/20261124_000000.wav", "sites/b/20261124_000000.wav"])
    assert run_night(inputs, clean, "2026-11-24") == 0
    assert run_night(inputs, out, "2026-11-24") == 0
    # What a run killed half-way through its commit leaves: some shards and its manifest moved
    # into place under its run id, its temporary folder, and no ledger file.
    ghost = "20261124T235959-0123abcd"
    for shard in list((out / "parquet").rglob("windows-*.parquet"))[:1]:
        shutil.copy(shard, shard.with_name(shard.name.replace(shard.name[8:32], ghost)))
    (out / "runs" / f"{ghost}.json").write_text("{}")
    (out / f"_tmp-{ghost}" / "fragments").mkdir(parents=True)
    (out / f"_tmp-{ghost}" / "fragments" / "00000-x.arrow").write_bytes(b"partial")
    capsys.readouterr()
    assert run_night(inputs, out, "2026-11-24") == 0
    assert "removed 3 file(s) left by runs that never committed" in capsys.readouterr().err
    assert not list(out.glob("_tmp-*"))
    assert not list(out.rglob(f"*{ghost}*"))
    assert same_rows(window_rows(out), window_rows(clean))


@pytest.mark.slow
def test_killed_and_restarted_run_gives_the_rows_of_one_clean_run(tmp_path):
    inputs, out, clean = tmp_path / "in", tmp_path / "out", tmp_path / "clean"
    night_files(
        inputs, [f"sites/s{i % 3}/2026112{4 + i % 2}_0{i}0000.wav" for i in range(8)], duration_s=20.0
    )
    argv = ["--input", inputs, "--incremental", "--run_date", "2026-11-24", "--site_pattern", SITES]
    argv = [str(a) for a in argv]
    command = [sys.executable, "-m", "soundshard.pipelines.cli", "features", *argv, "--output", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("_tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert ledger.read_ledger(str(out)).num_rows == 0  # killed before its commit point
    assert features.run([*argv, "--output", str(out)]) == 0
    assert features.run([*argv, "--output", str(out)]) == 0  # and once more: nothing new
    assert features.run([*argv, "--output", str(clean)]) == 0
    got, want = window_rows(out), window_rows(clean)
    assert len(want) > 8 * 40 and same_rows(got, want)
    assert ledger.read_ledger(str(out)).num_rows == 8
    assert not list(out.glob("_tmp-*"))
    tfrecords = sorted(p.name.split("-", 3)[-1] for p in (out / "tfrecord").rglob("*.tfrecord"))
    assert tfrecords == sorted(p.name.split("-", 3)[-1] for p in (clean / "tfrecord").rglob("*.tfrecord"))


def test_touched_but_unchanged_file_is_not_taken_on_again(tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    night_files(inputs, ["sites/a/20261124_010000.wav", "sites/a/20261124_020000.wav"])
    assert run_night(inputs, out, "2026-11-24") == 0
    first = window_rows(out)
    touched = inputs / "sites" / "a" / "20261124_010000.wav"
    os.utime(touched, (time.time() + 3600, time.time() + 3600))  # copied again, same bytes
    capsys.readouterr()
    assert run_night(inputs, out, "2026-11-25") == 0
    assert "nothing new: all 2 input(s)" in capsys.readouterr().out
    assert same_rows(window_rows(out), first)
    contents = ledger.read_ledger(str(out)).column("content").to_pylist()
    assert len(contents) == 2 and all(c.startswith("sha256:") for c in contents)


def test_readers_see_every_night_and_only_the_latest_version_of_a_changed_file(tmp_path):
    from soundshard.transforms.models import training

    inputs, out = tmp_path / "in", tmp_path / "out"

    def night(run_date):
        argv = ["--input", inputs, "--output", out, "--incremental", "--run_date", run_date]
        return features.run([str(a) for a in (*argv, "--label_from_parent", "--format", "parquet")])

    write_audio(inputs / "dog" / "d1.wav", tone(duration_s=2.0, freq_hz=300), 22050)
    assert night("2026-11-24") == 0
    write_audio(inputs / "cat" / "c1.wav", tone(duration_s=2.0, freq_hz=900), 22050)
    write_audio(inputs / "dog" / "d1.wav", tone(duration_s=2.0, freq_hz=500), 22050)  # same size, new audio
    assert night("2026-11-25") == 0

    latest = json.loads((out / "dataset.json").read_text())
    assert latest["label_map"] == {"cat": 0, "dog": 1}  # this night alone
    dataset = training.read_dataset_json(str(out))
    assert [n["run_date"] for n in dataset["nights"]["included"]] == ["2026-11-24", "2026-11-25"]
    assert dataset["label_map"] == {"cat": 0, "dog": 1}
    assert [e["rows"] for e in dataset["shards"]["parquet"]] == [4, 8]
    windows = training.load_windows(str(out), dataset)
    # d1 twice in the shards (both nights) but read once, from the night that saw its new audio
    assert sorted(windows.clip_ids.tolist()) == ["cat/c1"] * 4 + ["dog/d1"] * 4
    assert {(c, int(lab)) for c, lab in zip(windows.clip_ids, windows.labels, strict=True)} == {
        ("cat/c1", 0),
        ("dog/d1", 1),
    }
    second_night = [e["path"] for e in dataset["shards"]["parquet"] if "2026-11-25" in e["path"]]
    newest = pq.read_table(out / second_night[0]).to_pylist()
    new_d1 = np.stack([np.asarray(r["log_mel"], np.float32) for r in newest if r["clip_id"] == "dog/d1"])
    got_d1 = windows.features[windows.clip_ids == "dog/d1"].reshape(new_d1.shape)
    assert np.array_equal(got_d1, new_d1)


def test_readers_leave_out_nights_with_other_features(tmp_path):
    from soundshard.transforms.models import training

    inputs, out = tmp_path / "in", tmp_path / "out"
    night_files(inputs, ["sites/a/x.wav"])
    assert run_night(inputs, out, "2026-11-24") == 0
    assert run_night(inputs, out, "2026-11-25", "--n_mels", "40") == 0
    dataset = training.read_dataset_json(str(out))
    assert [n["run_date"] for n in dataset["nights"]["included"]] == ["2026-11-25"]
    assert [n["run_date"] for n in dataset["nights"]["excluded"]] == ["2026-11-24"]
    assert training.load_windows(str(out), dataset).features.shape[1] == 40
