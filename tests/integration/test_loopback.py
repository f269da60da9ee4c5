"""Local runs listen on loopback only (``pipelines/runner.py``, ``bind_local_servers_to_loopback``).

With worker threads or processes, Beam's FnApiRunner serves its workers through gRPC servers that
Beam binds to every interface; soundshard rebinds them to 127.0.0.1. These tests run small
features pipelines while a thread records every listening socket of the process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from soundshard.pipelines import features
from soundshard.pipelines import runner as runners
from soundshard.schemas.errors import SoundshardError

from ..helpers import not_loopback, tone, watch_listening, write_audio


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Four short labelled recordings and their manifest."""
    root = tmp_path_factory.mktemp("loopback")
    rows = []
    for index in range(4):
        name = f"clip{index}.wav"
        write_audio(
            root / "audio" / name, tone(duration_s=1.5, freq_hz=300.0 + 200 * index, seed=index), 22050
        )
        rows.append(f"{name},{'low' if index < 2 else 'high'},{index % 2 + 1}\n")
    (root / "meta.csv").write_text("filename,label,fold\n" + "".join(rows))
    return root


def _argv(audio, out, *beam_args) -> list[str]:
    return [
        "--input", str(audio / "audio"), "--manifest", str(audio / "meta.csv"), "--output", str(out),
        "--format", "parquet", *beam_args,
    ]  # fmt: skip


def _check_run(audio, out, *beam_args) -> set[tuple[str, int]]:
    with watch_listening() as seen:
        assert features.run(_argv(audio, out, *beam_args)) == 0
    assert json.loads((out / "dataset.json").read_text())["figures"]["files_processed"] == 4
    return seen


# -- the address rewrite -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "bound"),
    [
        ("[::]:0", "127.0.0.1:0"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("localhost:0", "localhost:0"),
        ("127.0.0.1:5", "127.0.0.1:5"),
        ("[::1]:0", "[::1]:0"),
    ],
)
def test_wildcard_binds_become_loopback(asked, bound):
    assert runners.loopback_address(asked) == bound


def test_an_unknown_bind_address_is_refused():
    with pytest.raises(SoundshardError, match="10.0.0.5:0"):
        runners.loopback_address("10.0.0.5:0")


def test_install_is_idempotent():
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    runners.bind_local_servers_to_loopback()
    first = worker_handlers.grpc, local_job_service.grpc
    runners.bind_local_servers_to_loopback()
    assert (worker_handlers.grpc, local_job_service.grpc) == first
    assert isinstance(worker_handlers.grpc, runners._LoopbackGrpc)
    assert not isinstance(worker_handlers.grpc._grpc, runners._LoopbackGrpc)  # one layer, not two


def test_a_beam_that_binds_otherwise_stops_the_run(monkeypatch):
    """A Beam upgrade that binds its servers another way must fail loudly, not listen on every
    interface again."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    def changed_init(self, state, provision_info, worker_manager):
        self.control_server = grpc.server(None)  # noqa: F821 (never called, only read)
        self.control_port = self.control_server.add_insecure_port(f"{host}:0")  # noqa: F821

    monkeypatch.setattr(worker_handlers.GrpcServer, "__init__", changed_init)
    with pytest.raises(SoundshardError, match=r"GrpcServer.__init__ binds or names its servers differently"):
        runners.bind_local_servers_to_loopback()


def test_a_replaced_grpc_module_stops_the_run(monkeypatch):
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    monkeypatch.setattr(worker_handlers, "grpc", object())
    with pytest.raises(SoundshardError, match="not the grpc module"):
        runners.bind_local_servers_to_loopback()


# -- whole runs ----------------------------------------------------------------------------------


def test_worker_threads_listen_on_loopback_only(audio, tmp_path):
    seen = _check_run(audio, tmp_path / "out", "--direct_num_workers", "2")
    assert len(seen) >= 4, seen  # control, data, state, logging: the check is not vacuous
    assert not not_loopback(seen), f"listening beyond loopback: {sorted(not_loopback(seen))}"


def test_worker_processes_listen_on_loopback_only(audio, tmp_path):
    seen = _check_run(
        audio, tmp_path / "out", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"
    )
    assert len(seen) >= 5, seen  # the runner's four, and each worker process's logging server
    assert not not_loopback(seen), f"listening beyond loopback: {sorted(not_loopback(seen))}"


# Runs a features run and reports its exit code, wall time and the listening sockets seen (the
# watcher runs in that process).
_WATCHED_RUN = textwrap.dedent(
    """
    import json, sys, time
    from tests.helpers import watch_listening
    from soundshard.pipelines import features

    started = time.monotonic()
    with watch_listening() as seen:
        code = features.run(sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "wall_s": time.monotonic() - started, "seen": sorted(seen)}, f)
    """
)
#: Beam's worker waits this long for a logging channel it cannot reach, then goes on without.
_CHANNEL_WAIT_S = 60


def _mount_namespace_available() -> bool:
    if not shutil.which("unshare"):
        return False
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("mode", ["multi_threading", "multi_processing"])
def test_workers_connect_where_localhost_is_ipv6(audio, tmp_path, mode):
    """Workers reach the loopback-bound servers where ``localhost`` resolves to ::1 only (nothing
    of the run listens there): every address named to them must be 127.0.0.1."""
    if not _mount_namespace_available():
        pytest.skip("needs unprivileged user and mount namespaces (unshare) to replace /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 localhost ip6-localhost\n")
    report = tmp_path / "report.json"
    argv = _argv(audio, tmp_path / "out", "--direct_num_workers", "2", "--direct_running_mode", mode)
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(hosts)]
    command += [sys.executable, "-c", _WATCHED_RUN, str(report), *argv]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # gRPC's default resolver answers localhost itself; the native one asks the system (/etc/hosts),
    # as other gRPC builds and platforms do.
    env = dict(os.environ, GRPC_DNS_RESOLVER="native")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["code"] == 0, done.stderr[-3000:]
    assert "Failed to set up logging handler" not in done.stderr
    assert result["wall_s"] < _CHANNEL_WAIT_S * 0.75, result["wall_s"]  # no worker waited for a channel
    seen = {tuple(s) for s in result["seen"]}
    assert len(seen) >= (5 if mode == "multi_processing" else 4), seen
    assert not not_loopback(seen), f"listening beyond loopback: {sorted(not_loopback(seen))}"
