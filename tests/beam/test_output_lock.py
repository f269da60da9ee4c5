"""One writer per output folder: the lock object on local disk, GCS and S3, and in the commands."""

import json
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import pytest

from soundshard.pipelines import features
from soundshard.schemas.errors import OutputLockedError
from soundshard.transforms.io import lock

from ..helpers import tone, write_audio


def test_second_holder_is_refused_until_the_first_releases(tmp_path):
    out = str(tmp_path / "out")
    with lock.output_lock(out, command="soundshard features"):
        assert (tmp_path / "out" / lock.LOCK_NAME).is_file()
        with pytest.raises(OutputLockedError, match=r"in use by `soundshard features` \(host .*--break-lock"):
            with lock.output_lock(out, command="soundshard tag"):
                pass
    assert not (tmp_path / "out" / lock.LOCK_NAME).exists()
    with lock.output_lock(out, command="soundshard tag") as holder:
        assert json.loads((tmp_path / "out" / lock.LOCK_NAME).read_text())["token"] == holder.token


def _plant(path, *, host: str, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = {"token": "x", "command": "soundshard features", "host": host, "pid": pid, "started_utc": "t"}
    path.write_text(json.dumps(holder))


def test_stale_lock_of_a_dead_local_process_is_broken(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(tmp_path / "out" / lock.LOCK_NAME, host=socket.gethostname(), pid=dead.pid)
    with lock.output_lock(str(tmp_path / "out"), command="soundshard features"):
        pass
    assert "that process no longer exists" in capsys.readouterr().err


def test_lock_of_another_host_needs_break_lock(tmp_path, capsys):
    _plant(tmp_path / "out" / lock.LOCK_NAME, host="sensor-gateway-7", pid=1)
    with pytest.raises(OutputLockedError, match="sensor-gateway-7"):
        with lock.output_lock(str(tmp_path / "out"), command="soundshard features"):
            pass
    with lock.output_lock(str(tmp_path / "out"), command="soundshard features", break_lock=True):
        pass
    assert "breaking the lock" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_lock_in_object_storage_is_create_only(store, request):
    request.getfixturevalue(f"{store}_env")
    protocol = {"gcs": "gs", "s3": "s3"}[store]
    bucket = f"lock-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem(protocol, skip_instance_cache=True)
    fs.mkdir(bucket)
    out = f"{protocol}://{bucket}/night"
    with lock.output_lock(out, command="soundshard features"):
        with pytest.raises(OutputLockedError):
            with lock.output_lock(out, command="soundshard features"):
                pass
        assert fs.exists(f"{bucket}/night/{lock.LOCK_NAME}")
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/night/{lock.LOCK_NAME}")


def test_features_into_a_locked_output_exits_75_and_writes_nothing(tmp_path, capsys):
    write_audio(tmp_path / "in" / "a.wav", tone(duration_s=1.0), 22050)
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in"), "--output", str(out), "--format", "parquet"]
    _plant(out / lock.LOCK_NAME, host="other-host", pid=1)
    assert features.run(argv) == features.EXIT_LOCKED
    err = capsys.readouterr().err
    assert "is in use by `soundshard features` (host other-host" in err and "--break-lock" in err
    assert sorted(p.name for p in out.iterdir()) == [lock.LOCK_NAME]
    assert features.run([*argv, "--break-lock"]) == 0
    assert (out / "dataset.json").is_file() and not (out / lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_overlapping_runs_one_writes_the_other_is_refused(tmp_path):
    for i in range(6):
        write_audio(tmp_path / "in" / f"r{i}.wav", tone(duration_s=30.0, seed=i), 22050)
    out = tmp_path / "out"
    argv = [
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--incremental",
        "--run_date",
        "2026-11-24",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "soundshard.pipelines.cli", "features", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (out / lock.LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second started"
    assert features.run(argv) == features.EXIT_LOCKED
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    assert not (out / lock.LOCK_NAME).exists()
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["figures"]["files_processed"] == 6
    assert features.run(argv) == 0  # the lock is free again; nothing new
