"""The README's quick start, run as written: its commands must keep working on the shared data."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import ROOT, SHARED_DATA, require_esc10


def quick_start_commands() -> list[list[str]]:
    """The commands of the first code block under "## Quick start with real data"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start with real data", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_quick_start_block_is_found():
    commands = quick_start_commands()
    assert [c[:2] for c in commands] == [
        ["soundshard", "features"],
        ["soundshard", "train"],
        ["soundshard", "evaluate"],
        ["soundshard", "tag"],
        ["soundshard", "score"],
        ["soundshard", "compile-edge"],
        ["soundshard", "info"],
    ]


@pytest.mark.slow
@pytest.mark.data
def test_the_quick_start_runs_as_written(tmp_path):
    require_esc10()
    if not (SHARED_DATA / "longform").is_dir():
        pytest.skip(f"longform recording not found in {SHARED_DATA / 'longform'}")
    # a working folder beside a "shared" folder, as the repository checkout is
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    exe = Path(sys.executable).with_name("soundshard")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for command in quick_start_commands():
        argv = [str(exe) if exe.exists() else "soundshard", *command[1:]]
        done = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=1200, env=env)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    model = json.loads((work / "models" / "esc10-f4" / "model.json").read_text())
    assert model["split"]["test_fold"] == 4 and model["training"]["model"] == "edgecnn"
    report = json.loads((work / "reports" / "esc10-f4.json").read_text())
    assert report["clip_mean"]["n"] == 80 and report["clip_mean"]["accuracy"] > 0.6  # chance 0.1
    score = json.loads((work / "out" / "tags" / "score" / "score.json").read_text())
    assert score["event"]["overall"]["n_reference"] == 81
    assert (work / "edge" / "esc10-f4" / "model_int8.tflite").is_file()
