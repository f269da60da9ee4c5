"""Progress of local runs: files, work units, audio hours, speed and time left."""

import json
import re

import numpy as np

from soundshard.pipelines import features
from soundshard.pipelines.runner import progress_line

from ..helpers import write_audio


def test_progress_line_counts_units_audio_speed_and_time_left():
    totals = {
        "files": 1,
        "files_planned": 3,
        "units": 10,
        "units_planned": 40,
        "audio_s": 1800.0,
        "audio_s_planned": 7200.0,
        "windows": 3875,
    }
    line = progress_line(totals, total_files=3, label="features", elapsed_s=20.0)
    # 1800 s of audio in 20 s: 90x real time; 5400 s left at that speed: 60 s
    assert (
        line
        == "[features] files 1/3  units 10/40  audio 0.50/2.00 h  windows 3875  90x real time  ETA 1:00  0:20"
    )
    # while files are still being planned the total is not known: no time left yet
    planning = progress_line({**totals, "files_planned": 2}, total_files=3, label="tag", elapsed_s=20.0)
    assert "ETA" not in planning and planning.startswith("[tag] files 1/3  units 10/40")
    assert progress_line({}, total_files=2, label="embed", elapsed_s=3725.0) == (
        "[embed] files 0/2  windows 0  1:02:05"
    )


def test_a_long_recording_reports_its_units_as_they_finish(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_audio(tmp_path / "in" / "long.wav", 0.1 * rng.standard_normal(16000 * 40).astype(np.float32), 16000)
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--unit_s", "10"]
    assert features.run([*argv, "--format", "parquet"]) == 0
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[features]")][-1]
    assert re.match(
        r"\[features\] files 1/1  units 5/5  audio 0\.01/0\.01 h  windows 86  \d+x real time  \d+:\d\d$", last
    ), last


def test_on_a_terminal_rich_draws_the_bar_and_the_figures(capsys):
    import json
    import os

    from soundshard.pipelines.runner import progress

    with progress(2, label="tag", terminal=True) as folder:
        state = {"files": 1, "files_planned": 2, "units": 3, "units_planned": 4, "audio_s": 90.0}
        with open(os.path.join(folder, "worker.json"), "w") as f:
            json.dump({**state, "audio_s_planned": 120.0, "windows": 7}, f)
    err = capsys.readouterr().err
    assert "tag" in err and "files 1/2  units 3/4  audio 0.03/0.03 h  windows 7" in err
    assert "[tag]" not in err  # the label is the bar's own column


def test_stages_report_only_where_a_launcher_asked(tmp_path, monkeypatch):
    import json

    from soundshard.transforms import outcomes

    monkeypatch.delenv(outcomes.PROGRESS_DIR_ENV, raising=False)
    outcomes.progress(files=1)  # no launcher: nothing written anywhere
    monkeypatch.setenv(outcomes.PROGRESS_DIR_ENV, str(tmp_path))
    outcomes.progress(files=1, windows=40)
    outcomes.progress(units=2, audio_s=1.5)
    outcomes.flush_progress()
    (written,) = tmp_path.glob("*.json")
    assert json.loads(written.read_text()) == {
        **dict.fromkeys(outcomes.PROGRESS_FIELDS, 0),
        "files": 1,
        "windows": 40,
        "units": 2,
        "audio_s": 1.5,
    }
    other = tmp_path / "next-run"
    other.mkdir()
    monkeypatch.setenv(outcomes.PROGRESS_DIR_ENV, str(other))
    outcomes.progress(files=1)  # a new run's folder: its own totals from zero
    outcomes.flush_progress()
    (again,) = other.glob("*.json")
    assert json.loads(again.read_text())["files"] == 1


def test_worker_processes_report_to_the_launcher(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for k in range(3):
        write_audio(
            tmp_path / "in" / f"f{k}.wav", 0.1 * rng.standard_normal(16000 * 12).astype(np.float32), 16000
        )
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--unit-s", "5"]
    workers = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
    assert features.run([*argv, "--format", "parquet", *workers]) == 0
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[features]")][-1]
    manifest_windows = json.loads((tmp_path / "out" / "dataset.json").read_text())["figures"]["windows"]
    assert re.match(
        rf"\[features\] files 3/3  units (\d+)/\1  audio 0\.01/0\.01 h  windows {manifest_windows} ", last
    ), last
