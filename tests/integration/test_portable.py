"""Pipelines on Beam's portable runner: the job API and worker protocol of Flink, Spark and Dataflow.

``soundshard <command> --runner PortableRunner --environment_type EXTERNAL`` is submitted to
Beam's own job service (``apache_beam.runners.portability.local_job_service_main``), which runs
the job on an external SDK worker pool (``apache_beam.runners.worker.worker_pool_main``), each a
process of its own; inputs and outputs are on the GCS emulator, and the workers get its
environment as a cluster's workers get their credentials.

The code reaches the workers as it reaches a cluster's: a wheel built here from this checkout is
passed as ``--extra_package``, staged through the job service's artifact API, and fetched and
installed by ``infra/worker_boot.py`` (the pool's ``--container_executable``: the SDK
container's boot, in Python) into the worker's own folder. The worker logs where it imported
soundshard from; the test checks that it is that folder, not the source tree nor the test
environment's installation. (A wheel rather than an sdist: installing it needs no build step on
the worker, so it works offline and takes a second.)

Beam's servers listen on every interface (``[::]``) and tell workers to reach them at the host's
name; here both processes start through a small bootstrap that binds every gRPC server of theirs
to 127.0.0.1 and names 127.0.0.1 to workers, and the test checks every listening socket of both
process trees while the job runs. The local job service runs one worker: this proves the
protocol, not the speed.

Adding a pipeline: one entry in ``CASES`` (a function that uploads its inputs and returns the
command line and a check of its outputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import cli

from ..emulators import free_port, stop_group, wait_for_port
from ..helpers import listening_sockets
from .test_object_storage import check_outputs, upload_demo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: What the wheel is built from (pyproject.toml names README.md as the long description).
SOURCES = ("pyproject.toml", "README.md", "api", "pipelines", "transforms", "schemas")
JOB_TIMEOUT_S = 300
LOOPBACK_HOSTS = {"127.0.0.1", "::ffff:127.0.0.1"}

# Runs a Beam module (`python -m MODULE ARGS...`) with every gRPC server it starts bound to
# 127.0.0.1, and 127.0.0.1 as the address that an external worker is told to reach the runner at
# (Beam binds '[::]' and names the host's FQDN).
LOOPBACK = textwrap.dedent(
    """
    import runpy, sys
    import grpc

    _server = grpc.server

    def server(*args, **kwargs):
        s = _server(*args, **kwargs)
        add = s.add_insecure_port
        s.add_insecure_port = lambda address: add("127.0.0.1:" + address.rpartition(":")[2])
        return s

    grpc.server = server
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.ExternalWorkerHandler.host_from_worker = lambda self: "127.0.0.1"
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)


def build_wheel(workdir: Path) -> Path:
    """Builds soundshard's wheel from a copy of the checkout (nothing is written into it)."""
    src = workdir / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check"]
    if importlib.util.find_spec("setuptools") is not None:
        command += ["--no-build-isolation", "--no-index"]  # offline, with the environment's setuptools
    command += ["-w", str(workdir / "dist"), str(src)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = (workdir / "dist").glob("soundshard-*.whl")
    return wheel


@contextlib.contextmanager
def process_group(command: list[str], *, log: Path, env: dict, cwd: Path) -> Iterator[subprocess.Popen]:
    """Runs ``command`` in a new process group (output to ``log``) until the block ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_group(proc)


@dataclasses.dataclass
class PortableCluster:
    """A running job service and worker pool, and what a job needs to use them."""

    job_port: int
    pool_port: int
    wheel: Path
    workdir: Path
    log_dir: Path
    processes: tuple[subprocess.Popen, ...]

    @property
    def flags(self) -> list[str]:
        """Beam options that submit a job to this cluster, with soundshard's wheel."""
        return [
            "--runner",
            "PortableRunner",
            "--job_endpoint",
            f"127.0.0.1:{self.job_port}",
            "--environment_type",
            "EXTERNAL",
            "--environment_config",
            f"127.0.0.1:{self.pool_port}",
            "--extra_package",
            str(self.wheel),
        ]

    def logs(self) -> dict[Path, str]:
        return {path: path.read_text(errors="replace") for path in sorted(self.log_dir.glob("*.log"))}

    def listening(self) -> set[tuple[str, int]]:
        """``(address, port)`` of every listening TCP socket of the cluster's processes."""
        found = set()
        for root in self.processes:
            found |= listening_sockets(root.pid)
        return found

    @contextlib.contextmanager
    def watch(self) -> Iterator[set[tuple[str, int]]]:
        """Collects listening sockets while the block runs; kills the cluster after JOB_TIMEOUT_S
        (a stuck job then fails instead of hanging the suite)."""
        seen: set[tuple[str, int]] = set()
        stop = threading.Event()

        def sample():
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not stop.wait(0.1):
                seen.update(self.listening())
                if time.monotonic() > deadline:
                    for proc in self.processes:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            stop.set()
            thread.join()


@pytest.fixture(scope="module")
def portable(gcs_env, tmp_path_factory) -> Iterator[PortableCluster]:
    """Beam's local job service and an external worker pool on 127.0.0.1, for this module."""
    workdir = tmp_path_factory.mktemp("portable")
    wheel = build_wheel(workdir / "build")
    log_dir = workdir / "logs"
    log_dir.mkdir()
    cwd = workdir / "cwd"  # not the checkout: nothing is importable from the working directory
    cwd.mkdir()
    boot = workdir / "boot.sh"
    boot.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "infra" / "worker_boot.py"}" "$@"\n')
    boot.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        SOUNDSHARD_WORKER_LOG_DIR=str(log_dir),
        TMPDIR=str(workdir / "tmp"),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    (workdir / "tmp").mkdir()
    job_port, pool_port = free_port(), free_port()
    job_service = [sys.executable, "-c", LOOPBACK, "apache_beam.runners.portability.local_job_service_main"]
    job_service += ["--port", str(job_port), "--staging_dir", str(workdir / "staging")]
    pool = [sys.executable, "-c", LOOPBACK, "apache_beam.runners.worker.worker_pool_main"]
    pool += ["--service_port", str(pool_port), "--container_executable", str(boot)]
    with (
        process_group(job_service, log=log_dir / "job-service.log", env=env, cwd=cwd) as job_proc,
        process_group(pool, log=log_dir / "worker-pool.log", env=env, cwd=cwd) as pool_proc,
    ):
        wait_for_port(job_port, timeout_s=60)
        wait_for_port(pool_port, timeout_s=60)
        yield PortableCluster(job_port, pool_port, wheel, workdir, log_dir, (job_proc, pool_proc))


# -- pipelines --------------------------------------------------------------------------------------


def features_case(fs, bucket: str, tmp_path: Path, request) -> tuple[list[str], Callable[[], None]]:
    """The demo set (34 files, 2 of them broken) → log-mel shards, all on the GCS emulator."""
    audio = upload_demo(tmp_path, fs, bucket)
    out = f"gs://{bucket}/features"
    argv = ["features", "--input", f"gs://{audio}", "--manifest", f"gs://{bucket}/manifest.csv"]
    argv += ["--output", out]

    def check():
        check_outputs(fs, out)  # 34 inputs = 32 processed + 2 dead letters; 192 windows; shard names
        assert not [p for p in fs.find(bucket) if "_tmp-" in p]

    return argv, check


def tag_case(fs, bucket: str, tmp_path: Path, request) -> tuple[list[str], Callable[[], None]]:
    """The demo set tagged with the demo model, audio, model and tables on the GCS emulator."""
    model = request.getfixturevalue("demo_model")
    audio = upload_demo(tmp_path, fs, bucket)
    fs.put(str(model) + "/", f"{bucket}/model/", recursive=True)
    out = f"gs://{bucket}/tags"
    argv = ["tag", "--input", f"gs://{audio}", "--model-dir", f"gs://{bucket}/model", "--output", out]

    def check():
        manifest = json.loads(fs.cat_file(f"{out}/run.json"))
        fig = manifest["figures"]
        assert (fig["inputs"], fig["files_processed"], fig["dead_letter_inputs"]) == (34, 32, 2)
        assert fig["accounted_for"] and fig["windows_scored"] == 32 * 6
        files = [p for p in fs.find(f"{out}/parquet/files") if p.endswith(".parquet")]
        rows = sum(pq.read_metadata(io.BytesIO(fs.cat_file(p))).num_rows for p in files)
        assert rows == 32
        assert not [p for p in fs.find(bucket) if "_tmp-" in p]

    return argv, check


#: name → function(fs, bucket, tmp_path, request) returning (soundshard command line, check of its
#: outputs); ``request.getfixturevalue`` gives a case the fixtures it needs (a trained model, ...).
CASES = {"features": features_case, "tag": tag_case}


def _origin(log_text: str) -> dict[str, str]:
    found = re.findall(r"soundshard imported from (\{.*\})", log_text)
    assert found, f"no worker reported its imports; log tail:\n{log_text[-3000:]}"
    return json.loads(found[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_on_portable_runner(case, portable, gcs_env, tmp_path, request):
    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"portable-{uuid.uuid4().hex[:8]}"
    argv, check = CASES[case](fs, bucket, tmp_path, request)
    before = {path: len(text) for path, text in portable.logs().items()}
    started = time.monotonic()
    with portable.watch() as listening:
        code = cli.main([*argv, *portable.flags])
    logs = portable.logs()
    new = {path: text[before.get(path, 0) :] for path, text in logs.items()}
    tails = "\n".join(f"== {path.name}\n{text[-2000:]}" for path, text in new.items())
    assert code == 0, tails
    assert time.monotonic() - started < JOB_TIMEOUT_S, tails
    fs.invalidate_cache()
    check()

    # The job ran on a worker that installed the wheel staged with the job.
    worker_logs = "".join(text for path, text in new.items() if path.name.startswith("worker-worker"))
    assert f"installed: {portable.wheel.name}" in worker_logs, tails
    origin = _origin(worker_logs)
    assert set(origin) == {"soundshard.pipelines", "soundshard.transforms", "soundshard.schemas"}
    for package, folder in origin.items():
        relative = Path(folder).relative_to(portable.workdir / "tmp")  # the worker's own folder
        assert relative.parts[1:] == ("site", *package.split(".")), origin
    # Every server of the job service and the worker pool listened on loopback only, and the
    # runner's own servers (control, data, state, logging) were seen besides the two fixed ports.
    assert listening and {host for host, _ in listening} <= LOOPBACK_HOSTS, listening
    assert {port for _, port in listening} - {portable.job_port, portable.pool_port}, listening
