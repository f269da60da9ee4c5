"""The one place that touches the internals of fsspec, gcsfs and s3fs (no Beam).

soundshard retries object-store requests itself (``StorageConfig``: one schedule, counted,
with a deadline), so the libraries' own retry loops must be off, and reads of many objects run
together on an async filesystem's event loop. Neither is public API:

- gcsfs retries inside ``GCSFileSystem._request`` (a ``retry_request`` decorator): the subclass
  here takes the undecorated coroutine (``_request.__wrapped__``).
- s3fs retries around each botocore call (class attribute ``retries``) and botocore retries again:
  ``retries = 1`` and botocore's ``config_kwargs`` (one attempt, time limits) turn both off.
- fsspec's async filesystems have a coroutine ``_<method>`` for each method and an event loop
  (``loop``, ``async_impl``); ``fsspec.asyn.sync`` runs a coroutine on it.

:func:`layout_problems` says what of this a library release no longer has (an empty list when
all is in place); a test asserts that it is empty, so an upgrade that changes a layout fails the
suite instead of quietly bringing back a library's retry loop.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable

import fsspec

_LOG = logging.getLogger(__name__)


def layout_problems() -> list[str]:
    """What the adapters below rely on and the installed libraries do not have (empty: all there)."""
    import fsspec.asyn
    import gcsfs
    import s3fs

    problems = []
    request = getattr(getattr(gcsfs.GCSFileSystem, "_request", None), "__wrapped__", None)
    if request is None or not inspect.iscoroutinefunction(request):
        problems.append("gcsfs.GCSFileSystem._request has no undecorated coroutine __wrapped__")
    if not isinstance(getattr(s3fs.S3FileSystem, "retries", None), int):
        problems.append("s3fs.S3FileSystem has no integer class attribute retries")
    if "config_kwargs" not in inspect.signature(s3fs.S3FileSystem.__init__).parameters:
        problems.append("s3fs.S3FileSystem takes no config_kwargs")
    if not callable(getattr(fsspec.asyn, "sync", None)):
        problems.append("fsspec.asyn.sync is gone")
    for method in ("_cat_file", "_info"):
        if not inspect.iscoroutinefunction(getattr(fsspec.asyn.AsyncFileSystem, method, None)):
            problems.append(f"fsspec.asyn.AsyncFileSystem.{method} is not a coroutine function")
    return problems


@functools.cache
def single_attempt_class(cls: type) -> type:
    """``cls`` without its own retry loop, so that ``StorageConfig`` alone decides (and counts).

    gcsfs retries HTTP 408/429/5xx and connection errors up to 6 times per request, sleeping
    1, 2, 4, 8 and 16 s plus up to 1 s of jitter each (31 to 36 s per request); the subclass keeps
    its request method without the retry decorator. s3fs retries up to 5 times (0.1 to 0.8 s
    apart) around each botocore call, nested twice for file reads, and botocore retries up to 4
    more times itself with exponential backoff; the subclass sets ``retries`` to 1 and
    :func:`single_attempt` turns botocore's retries off and its timeouts down. Other filesystems
    are used as they are. A gcsfs whose layout this does not know keeps its retry loop (with a
    warning); each attempt is still cut off at ``StorageConfig.attempt_timeout_s``.
    """
    import gcsfs
    import s3fs

    if issubclass(cls, gcsfs.GCSFileSystem):
        request = getattr(cls._request, "__wrapped__", None)
        if request is None or not inspect.iscoroutinefunction(request):
            _LOG.warning("gcsfs %s: unknown request layout; its own retries stay on", gcsfs.__version__)
            return cls

        class SingleAttemptGCSFileSystem(cls):
            _request = request

        return SingleAttemptGCSFileSystem
    if issubclass(cls, s3fs.S3FileSystem):

        class SingleAttemptS3FileSystem(cls):
            retries = 1

        return SingleAttemptS3FileSystem
    return cls


def single_attempt(fs: fsspec.AbstractFileSystem, *, attempt_timeout_s: float) -> fsspec.AbstractFileSystem:
    """A filesystem like ``fs`` (same options) whose requests are not retried inside it."""
    cls = single_attempt_class(type(fs))
    if cls is type(fs):
        return fs
    options = dict(fs.storage_options)
    import s3fs

    if isinstance(fs, s3fs.S3FileSystem):
        options["config_kwargs"] = {
            **options.get("config_kwargs", {}),
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": attempt_timeout_s,
            "read_timeout": attempt_timeout_s,
        }
    return cls(*fs.storage_args, **options)


def is_async(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` runs its requests as coroutines on an event loop (gcsfs, s3fs)."""
    return bool(getattr(fs, "async_impl", False))


def coroutine(fs: fsspec.AbstractFileSystem, method: str) -> Callable[..., Awaitable]:
    """The coroutine behind ``fs.<method>`` of an async filesystem (fsspec's ``_<method>``)."""
    return getattr(fs, "_" + method)


def event_loop(fs: fsspec.AbstractFileSystem):
    """The event loop an async filesystem's coroutines run on."""
    return fs.loop


def run_on_loop(
    fs: fsspec.AbstractFileSystem, function: Callable[..., Awaitable], *args, timeout_s=None, **kwargs
):
    """Runs the coroutine ``function(*args, **kwargs)`` on ``fs``'s event loop from this thread,
    cancelled after ``timeout_s`` (``None``: no limit)."""
    from fsspec.asyn import sync

    return sync(event_loop(fs), function, *args, timeout=timeout_s, **kwargs)
