"""Runner choice, option parsing and the progress line for local runs.

Local runs never depend on the network: unless ``--runner`` is given, pipelines run on Beam's
FnApiRunner directly (in-process, or one worker process per core for larger inputs) instead of
the DirectRunner, which first tries to download its Prism binary.

Other runners (``--runner DataflowRunner``, ``PortableRunner`` for Flink, Spark or Beam's job
service) get the pipeline as the options describe it. A Dataflow run with
``--template_location`` (what a Flex Template launcher passes) only writes the job for the
service to start: :func:`run_remote` then returns at once, and the command ends without waiting
for a job that is not running yet.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from soundshard.schemas.errors import ConfigError, SoundshardError
from soundshard.transforms import outcomes

#: Inputs of this size or more run with one worker thread per core when no worker count is given
#: (ESC-10, 38 MB: 2.1-2.7 s with 2 threads against 2.6-2.9 s with one; below a few MB the
#: thread pool brings nothing).
PARALLEL_MIN_BYTES = 16 * 2**20


def _all_option_classes(cls=PipelineOptions):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_option_classes(sub)


def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every flag that a Beam option class defines."""
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    seen = set()
    for cls in _all_option_classes():
        if cls in seen or "_add_argparse_args" not in cls.__dict__:
            continue
        seen.add(cls)
        with contextlib.suppress(argparse.ArgumentError):
            cls._add_argparse_args(parser)
    return parser


def beam_option_names() -> set[str]:
    """Every ``--flag`` spelling a Beam option class defines."""
    return {name for name in _beam_parser()._option_string_actions if name.startswith("--")}


def check_beam_args(beam_args: Sequence[str]) -> None:
    """Rejects flags that no Beam option class knows (Beam itself only warns and drops them).

    Raises:
        ConfigError: naming the unknown flags.
    """
    _, unknown = _beam_parser().parse_known_args(list(beam_args))
    flags = [a for a in unknown if a.startswith("--")]
    if flags:
        raise ConfigError(f"unknown option(s): {' '.join(flags)} (see --help)")
    workers = PipelineOptions(list(beam_args)).view_as(DirectOptions).direct_num_workers
    if workers is not None and workers < 0:
        raise ConfigError(f"--direct_num_workers={workers} must be 0 (one per core) or more")


def local_run(options: PipelineOptions, *, input_bytes: int | None, workers_given: bool) -> bool:
    """Configures ``options`` for a local FnApiRunner run when no runner was chosen.

    Without ``--direct_num_workers``, inputs of ``PARALLEL_MIN_BYTES`` or more run with one
    worker thread per core, smaller ones with one. ``--direct_num_workers 0`` means one per core;
    ``--direct_running_mode multi_processing`` asks for worker processes instead of threads.

    Returns:
        True when the pipeline will run locally on the FnApiRunner.
    """
    if options.view_as(StandardOptions).runner:
        return False
    direct = options.view_as(DirectOptions)
    cores = os.cpu_count() or 1
    if not workers_given:
        direct.direct_num_workers = cores if (input_bytes or 0) >= PARALLEL_MIN_BYTES else 1
    elif direct.direct_num_workers == 0:
        direct.direct_num_workers = cores
    if direct.direct_num_workers > 1 and direct.direct_running_mode == "in_memory":
        # Threads, not processes: decoding (libsndfile), resampling (soxr) and the spectrogram
        # maths (numpy FFT, BLAS) release the GIL, so threads use the cores without the ~2 s
        # start-up of each worker process and without sending every window back through the
        # launcher (a 1 h recording: 3.7 s with 2 threads against 5.5 s with 2 processes).
        direct.direct_running_mode = "multi_threading"
    if direct.direct_num_workers > 1:
        single_threaded_math_in_workers()
    return True


def single_threaded_math_in_workers() -> None:
    """Makes worker processes started from now on use one BLAS/OpenMP thread each.

    With one worker process per core, a multi-threaded BLAS in each worker oversubscribes the
    cores; measured here, that made the per-file feature time 4x slower. Values already set by the
    user are kept.
    """
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def writes_job_only(options: PipelineOptions) -> bool:
    """True when the runner only writes the job (Dataflow with ``--template_location``)."""
    return bool(options.view_as(GoogleCloudOptions).template_location)


def make_pipeline(options: PipelineOptions, *, local: bool) -> beam.Pipeline:
    """A pipeline on the FnApiRunner for local runs, else on the runner named in the options.

    Local runs bind the runner's gRPC servers to loopback (:func:`bind_local_servers_to_loopback`).
    """
    if local:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        bind_local_servers_to_loopback()
        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


# -- loopback-only gRPC servers for local runs ---------------------------------------------------

LOOPBACK_HOST = "127.0.0.1"
#: What Beam's local runner binds (every interface); it becomes LOOPBACK_HOST.
_WILDCARD_HOSTS = ("[::]", "0.0.0.0", "[0:0:0:0:0:0:0:0]")
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
#: What the adapter rewrites, per Beam function: how many ``add_insecure_port('[::]:0')`` calls
#: (all its binds), and text that must be there. Checked against Beam's source at every install,
#: so a Beam upgrade that binds another way, elsewhere, or names its servers otherwise stops local
#: runs with an error instead of silently listening on every interface again.
_PATCHED = {
    # control, data, state and logging servers of the runner
    "worker_handlers.GrpcServer.__init__": (4, ("grpc.server(",)),
    # each worker process's logging server, named to the process as localhost:<port>
    "local_job_service.SubprocessSdkWorker.run": (
        1,
        ("grpc.server(", "endpoints_pb2.ApiServiceDescriptor(url='localhost:%s' % logging_port)"),
    ),
    # what the runner names to its workers (see _loopback_host)
    "worker_handlers.GrpcWorkerHandler.host_from_worker": (0, ("return 'localhost'",)),
    "worker_handlers.ExternalWorkerHandler.host_from_worker": (0, ("return socket.getfqdn()",)),
}
_BIND_CALL = "add_insecure_port('[::]:0')"
#: Ports that were asked for on every interface and bound on LOOPBACK_HOST instead.
_LOOPBACK_PORTS: set[int] = set()
_install_lock = threading.Lock()


def loopback_address(address: str) -> str:
    """The address to bind instead of ``address``: 127.0.0.1 where every interface was asked for.

    Args:
        address: A gRPC bind address, ``host:port``.

    Returns:
        ``127.0.0.1:<port>`` for ``[::]`` or ``0.0.0.0``; a loopback address unchanged.

    Raises:
        SoundshardError: any other host (Beam binding somewhere this adapter does not know).
    """
    host, _, port = address.rpartition(":")
    if host in _WILDCARD_HOSTS:
        return f"{LOOPBACK_HOST}:{port}"
    if host in _LOOPBACK_NAMES:
        return address
    raise SoundshardError(
        f"Beam's local runner asked to bind {address!r}; soundshard only knows how to keep "
        "[::] and 0.0.0.0 on loopback (update pipelines/runner.py for this Beam version)"
    )


class _LoopbackServer:
    """A ``grpc.Server`` whose ports are bound on loopback (see :func:`loopback_address`)."""

    def __init__(self, server):
        self._server = server

    def add_insecure_port(self, address: str) -> int:
        bound = loopback_address(address)
        port = self._server.add_insecure_port(bound)
        if bound != address:
            _LOOPBACK_PORTS.add(port)
        return port

    def add_secure_port(self, address: str, server_credentials) -> int:
        return self._server.add_secure_port(loopback_address(address), server_credentials)

    def __getattr__(self, name: str):
        return getattr(self._server, name)


class _LoopbackGrpc:
    """Stands in for the ``grpc`` module inside Beam's local-runner modules: ``server()`` gives
    :class:`_LoopbackServer` objects; everything else is grpc's own."""

    def __init__(self, module):
        self._grpc = module

    def server(self, *args, **kwargs) -> _LoopbackServer:
        return _LoopbackServer(self._grpc.server(*args, **kwargs))

    def __getattr__(self, name: str):
        return getattr(self._grpc, name)


class _LoopbackEndpoints:
    """Stands in for ``endpoints_pb2`` in ``local_job_service``: a worker process is told
    ``localhost:<port>`` for its logging server; where that port was bound on 127.0.0.1, it is
    told 127.0.0.1 (``localhost`` may resolve to ::1 first, where nothing of the run listens: the
    worker then waits a minute for the channel, and another process could hold that port)."""

    def __init__(self, module):
        self._endpoints = module

    def ApiServiceDescriptor(self, *args, url: str = "", **kwargs):  # noqa: N802 (protobuf's name)
        host, _, port = url.rpartition(":")
        if host == "localhost" and port.isdigit() and int(port) in _LOOPBACK_PORTS:
            url = f"{LOOPBACK_HOST}:{port}"
        return self._endpoints.ApiServiceDescriptor(*args, url=url, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._endpoints, name)


def _loopback_host(self) -> str:
    # What the runner names to its workers: 127.0.0.1, where its servers listen, rather than
    # 'localhost' (which may resolve to ::1 first) or, for external workers, the host's FQDN (a
    # non-loopback address). The workers of a local run are on this host.
    return LOOPBACK_HOST


def _check_beam(modules: dict) -> None:
    """Raises unless Beam's local runner binds and names its servers as :data:`_PATCHED` says."""
    import grpc
    from apache_beam.portability.api import endpoints_pb2

    for name, attribute, real, proxy in (
        ("worker_handlers", "grpc", grpc, _LoopbackGrpc),
        ("local_job_service", "grpc", grpc, _LoopbackGrpc),
        ("local_job_service", "endpoints_pb2", endpoints_pb2, _LoopbackEndpoints),
    ):
        value = getattr(modules[name], attribute, None)
        if value is not real and not isinstance(value, proxy):
            raise SoundshardError(
                f"apache_beam {beam.__version__}: {name}.{attribute} is not the {attribute} module; "
                "cannot keep the local runner's servers on loopback (update pipelines/runner.py)"
            )
    for qualified, (binds, needed) in _PATCHED.items():
        module_name, *path = qualified.split(".")
        target = modules[module_name]
        for part in path:
            target = getattr(target, part, None)
        if getattr(target, "__name__", None) == _loopback_host.__name__:
            continue  # installed already
        try:
            source = inspect.getsource(target)
        except (OSError, TypeError) as exc:
            raise SoundshardError(
                f"apache_beam {beam.__version__}: cannot read {qualified} ({exc}) to check that local "
                "runs stay on loopback"
            ) from exc
        found = source.count("add_insecure_port(")
        if not (found == source.count(_BIND_CALL) == binds and all(text in source for text in needed)):
            raise SoundshardError(
                f"apache_beam {beam.__version__}: {qualified} binds or names its servers differently than "
                f"soundshard expects ({found} add_insecure_port calls, expected {binds} x {_BIND_CALL}, "
                f"and {needed}); update bind_local_servers_to_loopback in pipelines/runner.py"
            )


def bind_local_servers_to_loopback() -> None:
    """Makes the FnApiRunner's gRPC servers listen on 127.0.0.1 only, and its workers dial 127.0.0.1.

    Beam binds them with ``add_insecure_port('[::]:0')``, hard-coded, in two modules: this swaps
    their ``grpc`` name for :class:`_LoopbackGrpc` (and ``local_job_service``'s ``endpoints_pb2``
    for :class:`_LoopbackEndpoints`), and has the worker handlers name 127.0.0.1. Idempotent.
    The swap is process-wide and stays: a later run in this process on an in-process job server
    (``PortableRunner`` without ``--job_endpoint``) also listens on loopback only, which suits
    workers on this host only.

    Raises:
        SoundshardError: this Beam version binds or names its servers otherwise than checked for
            (the adapter would no longer cover them).
    """
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    modules = {"worker_handlers": worker_handlers, "local_job_service": local_job_service}
    with _install_lock:
        _check_beam(modules)
        for module in modules.values():
            if not isinstance(module.grpc, _LoopbackGrpc):
                module.grpc = _LoopbackGrpc(module.grpc)
        if not isinstance(local_job_service.endpoints_pb2, _LoopbackEndpoints):
            local_job_service.endpoints_pb2 = _LoopbackEndpoints(local_job_service.endpoints_pb2)
        worker_handlers.GrpcWorkerHandler.host_from_worker = _loopback_host
        worker_handlers.ExternalWorkerHandler.host_from_worker = _loopback_host


def run_remote(p: beam.Pipeline, options: PipelineOptions) -> bool:
    """Runs ``p`` on its (non-local) runner and waits for it; returns False when the runner only
    wrote the job for a later start (``--template_location``), so there are no outputs to read."""
    result = p.run()
    if writes_job_only(options):
        location = options.view_as(GoogleCloudOptions).template_location
        print(f"job written to {location}; it runs when the Dataflow service starts it")
        return False
    result.wait_until_finish()
    return True


def _clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(totals: dict, *, total_files: int, label: str, elapsed_s: float) -> str:
    """One progress line from the workers' summed totals (``outcomes.PROGRESS_FIELDS``): files and
    work units done, audio done (hours), speed as audio seconds per second (x real time), and the
    time left once every file is planned (from the audio left at the speed so far)."""
    parts = [f"[{label}] files {totals.get('files', 0)}/{total_files}"]
    units, planned = totals.get("units", 0), totals.get("units_planned", 0)
    if planned:
        parts.append(f"units {units}/{planned}")
    audio, audio_planned = totals.get("audio_s", 0.0), totals.get("audio_s_planned", 0.0)
    if audio_planned:
        parts.append(f"audio {audio / 3600:.2f}/{audio_planned / 3600:.2f} h")
    parts.append(f"windows {totals.get('windows', 0)}")
    speed = audio / elapsed_s if elapsed_s > 0 else 0.0
    if audio > 0:
        parts.append(f"{speed:.0f}x real time")
    all_planned = total_files and totals.get("files_planned", 0) >= total_files
    if all_planned and speed > 0 and units < planned:
        parts.append(f"ETA {_clock(max(0.0, audio_planned - audio) / speed)}")
    parts.append(_clock(elapsed_s))
    return "  ".join(parts)


class _TerminalProgress:
    """The progress line on a terminal, drawn by rich: a bar of the audio done out of the audio
    planned, then :func:`progress_line`'s figures (files, units, hours, speed, ETA, elapsed)."""

    def __init__(self, label: str):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn
        from rich.table import Column

        self._progress = Progress(
            TextColumn(f"[bold]{label}", table_column=Column(no_wrap=True, min_width=len(label))),
            BarColumn(bar_width=10),
            # on a narrow terminal the figures' end is cut, never the label or the bar
            TextColumn(
                "{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)
            ),
            console=Console(stderr=True),
            auto_refresh=False,
            transient=False,
        )
        self._task = self._progress.add_task(label, total=None, detail="")
        self._prefix = f"[{label}] "

    def __enter__(self):
        self._progress.start()
        return self

    def show(self, totals: dict, line: str) -> None:
        planned = totals.get("audio_s_planned") or None
        self._progress.update(
            self._task,
            completed=totals.get("audio_s", 0.0),
            total=planned,
            detail=line.removeprefix(self._prefix),
        )
        self._progress.refresh()

    def __exit__(self, *exc):
        self._progress.stop()


@contextlib.contextmanager
def progress(total_files: int, *, label: str, terminal: bool | None = None) -> Iterator[str]:
    """Shows the progress the run's stages report (``outcomes.progress``) while the block runs
    (:func:`progress_line`); yields the folder their processes write it to.

    The folder is named to the workers in ``outcomes.PROGRESS_DIR_ENV`` for the block's duration
    (the threads of this process, and worker processes started in it, which inherit it).

    On a terminal (``terminal``; default: whether stderr is one) a rich progress bar of the audio
    done with those figures, redrawn twice a second; otherwise one plain line every 10 s and at
    the end.
    """
    directory = tempfile.mkdtemp(prefix="soundshard-progress-")
    stop = threading.Event()
    tty = sys.stderr.isatty() if terminal is None else terminal
    started = time.monotonic()

    def totals() -> dict:
        out: dict = {}
        for name in os.listdir(directory):
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(directory, name)) as f:
                        state = json.load(f)
                    for key, value in state.items():
                        out[key] = out.get(key, 0) + value
        return out

    def line(done: dict) -> str:
        return progress_line(done, total_files=total_files, label=label, elapsed_s=time.monotonic() - started)

    display = _TerminalProgress(label) if tty else None

    def loop():
        last = time.monotonic()
        while not stop.wait(0.5):
            if display is not None:
                done = totals()
                display.show(done, line(done))
            elif time.monotonic() - last >= 10:
                sys.stderr.write(line(totals()) + "\n")
                last = time.monotonic()

    thread = threading.Thread(target=loop, daemon=True)
    previous = os.environ.get(outcomes.PROGRESS_DIR_ENV)
    os.environ[outcomes.PROGRESS_DIR_ENV] = directory
    with display or contextlib.nullcontext():
        thread.start()
        try:
            yield directory
        finally:
            outcomes.flush_progress()  # what this process's stages did last
            if previous is None:
                del os.environ[outcomes.PROGRESS_DIR_ENV]
            else:
                os.environ[outcomes.PROGRESS_DIR_ENV] = previous
            stop.set()
            thread.join()
            sys.stdout.flush()
            done = totals()
            if display is not None:
                display.show(done, line(done))
            else:
                sys.stderr.write(line(done) + "\n")
            sys.stderr.flush()
            shutil.rmtree(directory, ignore_errors=True)
