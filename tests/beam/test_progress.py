"""Progress of local runs: files, work units, audio hours, speed and time left."""

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
