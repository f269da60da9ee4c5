"""Outcomes of inputs: the dead letter of a failure, the Beam counters every outcome is counted
in, and the work done that a local run's progress line shows (no Beam transforms here).

Stages report work done with :func:`progress` and know nothing of who reads it. A local run's
launcher (``pipelines/runner.py``) names a folder in :data:`PROGRESS_DIR_ENV` for its own workers
(threads of its process, or the worker processes it starts, which inherit its environment); each
process then keeps one file of its totals there. Elsewhere (remote runners) the variable is unset
and :func:`progress` costs a dictionary lookup.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time

from apache_beam.metrics import Metrics

from soundshard.schemas.errors import DataError
from soundshard.schemas.outcomes import Stage
from soundshard.schemas.records import DeadLetter, SourceItem

#: Namespace of soundshard's Beam counters.
NAMESPACE = "soundshard"
_LOG = logging.getLogger(__name__)


def count(reason: str, n: int = 1) -> None:
    """Increments the Beam counter ``soundshard/<reason>``."""
    Metrics.counter(NAMESPACE, reason).inc(n)


def dead_letter(
    item: SourceItem, stage: Stage, exc: BaseException, *, where: str | None = None
) -> DeadLetter:
    """A dead letter for ``item`` failing at ``stage``; counts it under its reason.

    ``where`` names the part that failed (e.g. a unit's window range) when not the whole file.
    """
    reason = exc.reason if isinstance(exc, DataError) else "unexpected_error"
    if not isinstance(exc, DataError):
        _LOG.warning("unexpected %s in stage %s for %s", type(exc).__name__, stage, item.uri, exc_info=exc)
    count(reason)
    count("dead_letters")
    message = str(exc) if where is None or where in str(exc) else f"{where}: {exc}"
    return DeadLetter(item.uri, item.clip_id, stage, reason, type(exc).__name__, message, item.augmentation)


# -- progress of local runs ---------------------------------------------------------------------

#: Folder of a local run's progress files, set by its launcher for its own workers only (not a
#: setting: a user never sets it, and remote workers never see it).
PROGRESS_DIR_ENV = "SOUNDSHARD_PROGRESS_DIR"
#: What is reported: files finished, windows computed, work units planned and done, files
#: planned, and seconds of audio planned and done.
PROGRESS_FIELDS = (
    "files",
    "windows",
    "units_planned",
    "units",
    "files_planned",
    "audio_s_planned",
    "audio_s",
)
#: Seconds between writes of a process's progress file.
PROGRESS_INTERVAL_S = 0.5


class _ProgressFile:
    """One process's progress totals for one run, written to ``<folder>/<pid>-<id>.json`` (atomic
    replace) by a daemon thread every :data:`PROGRESS_INTERVAL_S` while they change, and at exit:
    reporting work only adds to the totals (no I/O on the stages' path)."""

    def __init__(self, folder: str):
        self.folder, self.pid = folder, os.getpid()
        self._path = os.path.join(folder, f"{self.pid}-{id(self):x}.json")
        self._totals = dict.fromkeys(PROGRESS_FIELDS, 0)
        self._lock = threading.Lock()
        self._dirty = False

    def add(self, done: dict) -> None:
        with self._lock:
            for key, value in done.items():
                self._totals[key] += value
            self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            state, self._dirty = dict(self._totals), False
        tmp = f"{self._path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self._path)
        except OSError:  # the run ended and its folder went: nobody reads it any more
            pass


_progress_lock = threading.Lock()
_progress_file: _ProgressFile | None = None


def _progress_sink() -> _ProgressFile | None:
    """This process's progress file for the folder the environment names now (``None``: none)."""
    global _progress_file
    folder = os.environ.get(PROGRESS_DIR_ENV)
    if folder is None:
        return None

    def current(sink: _ProgressFile | None) -> bool:
        return sink is not None and sink.folder == folder and sink.pid == os.getpid()

    if current(_progress_file):
        return _progress_file
    with _progress_lock:
        if not current(_progress_file):
            flush_progress()  # an earlier run's totals in this process, before they are dropped
            _progress_file = _ProgressFile(folder)
            threading.Thread(target=_flush_while_current, args=(_progress_file,), daemon=True).start()
        return _progress_file


def _flush_while_current(sink: _ProgressFile) -> None:
    """Writes what changed every interval, so the last updates of a quiet stage show too."""
    while _progress_file is sink:
        time.sleep(PROGRESS_INTERVAL_S)
        sink.flush()


def progress(**done: float) -> None:
    """Reports work done (keywords among :data:`PROGRESS_FIELDS`) to a local run's progress line;
    does nothing where no launcher asked for it."""
    sink = _progress_sink()
    if sink is not None:
        sink.add(done)


def flush_progress() -> None:
    """Writes this process's progress now (the launcher of an in-process run, before its last line)."""
    sink = _progress_file
    if sink is not None and sink.pid == os.getpid():
        sink.flush()


atexit.register(flush_progress)
