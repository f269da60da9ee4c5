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

from soundshard.schemas.errors import ConfigError

#: Inputs of this size or more run with one worker thread per core when no worker count is given
#: (ESC-10, 38 MB: 2.1-2.7 s with 2 threads against 2.6-2.9 s with one; below a few MB the
#: thread pool brings nothing).
PARALLEL_MIN_BYTES = 16 * 2**20


def _all_option_classes(cls=PipelineOptions):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_option_classes(sub)


def check_beam_args(beam_args: Sequence[str]) -> None:
    """Rejects flags that no Beam option class knows (Beam itself only warns and drops them).

    Raises:
        ConfigError: naming the unknown flags.
    """
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    seen = set()
    for cls in _all_option_classes():
        if cls in seen or "_add_argparse_args" not in cls.__dict__:
            continue
        seen.add(cls)
        with contextlib.suppress(argparse.ArgumentError):
            cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(list(beam_args))
    flags = [a for a in unknown if a.startswith("--")]
    if flags:
        raise ConfigError(f"unknown option(s): {' '.join(flags)} (see --help)")


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
    """A pipeline on the FnApiRunner for local runs, else on the runner named in the options."""
    if local:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


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


@contextlib.contextmanager
def progress(total_files: int, *, label: str) -> Iterator[str]:
    """Yields a folder the workers write progress files to, and prints a progress line.

    On a terminal the line is redrawn twice a second; otherwise one line every 10 s.
    """
    directory = tempfile.mkdtemp(prefix="soundshard-progress-")
    stop = threading.Event()
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def totals() -> tuple[int, int]:
        files = windows = 0
        for name in os.listdir(directory):
            if name.endswith(".json"):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(directory, name)) as f:
                        state = json.load(f)
                    files += state["files"]
                    windows += state["windows"]
        return files, windows

    def line() -> str:
        files, windows = totals()
        return f"[{label}] files {files}/{total_files}  windows {windows}  {time.monotonic() - started:.0f} s"

    def loop():
        last = time.monotonic()
        while not stop.wait(0.5):
            if tty:
                sys.stderr.write("\r" + line())
                sys.stderr.flush()
            elif time.monotonic() - last >= 10:
                sys.stderr.write(line() + "\n")
                last = time.monotonic()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield directory
    finally:
        stop.set()
        thread.join()
        sys.stdout.flush()
        sys.stderr.write(("\r" if tty else "") + line() + "\n")
        sys.stderr.flush()
        shutil.rmtree(directory, ignore_errors=True)
