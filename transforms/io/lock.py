"""One writer per output folder: a lock object created only if absent (no Beam).

Two runs into one output folder (a nightly cron job overlapping a manual run) would interleave
their shards, or one would delete the other's temporary folder while it is in use. So every run
that writes an output folder first creates ``<output>/_soundshard.lock`` with a create-only write,
which the store itself refuses when the object exists: ``O_EXCL`` on local disk, a generation
precondition (``ifGenerationMatch=0``) on GCS, a conditional put (``If-None-Match: *``) on S3
(fsspec's ``pipe_file(..., mode="create")`` for all three). The lock says who holds it; the run
removes it when it ends, however it ends, unless it is killed.

A lock left by a killed run is stale. One held by a process of this host that no longer exists is
broken automatically (with a note); any other needs ``--break-lock`` (or deleting the object), after
checking that its run is really gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import posixpath
import socket
import sys
import uuid
from collections.abc import Iterator

import fsspec

from soundshard.schemas.errors import ConfigError, OutputLockedError

LOCK_NAME = "_soundshard.lock"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds an output's lock (the lock object's content)."""

    token: str
    command: str
    host: str
    pid: int
    started_utc: str

    def describe(self) -> str:
        """One line for messages."""
        return f"`{self.command}` (host {self.host}, pid {self.pid}, since {self.started_utc})"


def lock_path(output: str) -> str:
    """Where the lock object of an output folder lives."""
    return output.rstrip("/") + "/" + LOCK_NAME


def _fs(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(lock_path(output))
    return fs, path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return protocol in ("file", "local")


def _create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes ``path`` only if it does not exist, atomically where the store can (raises
    FileExistsError otherwise)."""
    if _is_local(fs):  # fsspec's local pipe_file checks, then writes: two steps
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    fs.pipe_file(path, data, mode="create")


def _read_holder(fs: fsspec.AbstractFileSystem, path: str) -> LockHolder | None:
    try:
        data = json.loads(fs.cat_file(path))
        return LockHolder(**{f.name: data[f.name] for f in dataclasses.fields(LockHolder)})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return LockHolder("?", "unknown (unreadable lock)", "?", -1, "?")


def _process_gone(holder: LockHolder) -> bool:
    """True when the holder ran on this host and its process no longer exists."""
    if holder.host != socket.gethostname() or holder.pid <= 0:
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


@contextlib.contextmanager
def output_lock(output: str, *, command: str, break_lock: bool = False) -> Iterator[LockHolder]:
    """Holds ``output``'s lock while the block runs.

    Args:
        output: The output folder (local path or object-store URL).
        command: What runs (for the message another run gets).
        break_lock: Remove a lock that is there first (the user checked that its run is gone).

    Raises:
        OutputLockedError: another run holds the lock; the message names it and how to break it.
    """
    fs, path = _fs(output)
    folder = posixpath.dirname(path)
    created = _is_local(fs) and not fs.exists(folder)
    if created:
        try:
            fs.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--output {output}: cannot create the folder ({exc})") from None
    elif _is_local(fs) and not fs.isdir(folder):
        raise ConfigError(f"--output {output} is a file, not a folder")
    holder = LockHolder(
        token=uuid.uuid4().hex,
        command=command,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    data = json.dumps(dataclasses.asdict(holder), indent=2).encode()
    for attempt in range(2):
        try:
            _create(fs, path, data)
            break
        except FileExistsError:
            if _is_local(fs) and os.path.isdir(path):
                raise ConfigError(f"--output {output}: {lock_path(output)} is a folder") from None
            other = _read_holder(fs, path)
            if other is None and attempt == 0:  # released meanwhile
                continue
            stale = other is not None and _process_gone(other)
            if attempt == 0 and (break_lock or stale):
                print(
                    f"breaking the lock of {output} held by {other.describe() if other else 'nobody'}"
                    + (": that process no longer exists" if stale and not break_lock else ""),
                    file=sys.stderr,
                )
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
                continue
            who = other.describe() if other else "another run"
            raise OutputLockedError(
                f"--output {output} is in use by {who}: only one run may write to an output folder at "
                f"a time. If that run is no longer running (a killed run leaves its lock), run again "
                f"with --break-lock, or delete {lock_path(output)}"
            ) from None
        except OSError as exc:  # read-only, no permission, a file in the way, store refused
            raise ConfigError(f"--output {output}: cannot write there ({exc})") from None
    try:
        yield holder
    finally:
        current = _read_holder(fs, path)
        if current is not None and current.token == holder.token:
            try:
                fs.rm_file(path)
            except OSError as exc:  # the run's outputs are complete; say so, do not fail it
                _LOG.warning("could not remove the lock %s: %s", lock_path(output), exc)
        if created:  # a run that stopped before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)
