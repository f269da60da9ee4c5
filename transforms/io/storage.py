"""Reading objects from stores: a retrying, read-ahead file on fsspec, and checks of a store (no Beam).

Every request has a time limit and transient errors retry on one schedule (:class:`StorageConfig`);
a read that gives up raises a ``StorageError`` that names the object (credentials redacted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import fsspec

from soundshard.schemas.errors import ConfigError, StorageError
from soundshard.schemas.storage import StorageConfig
from soundshard.schemas.uris import redact
from soundshard.transforms.io import adapters


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Full URI of a path returned by an fsspec listing (plain path for local files)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def object_version(info: dict) -> str | None:
    """What identifies an object's content in an fsspec listing entry, without reading it.

    GCS object generation, S3 ETag, else the modification time (local files and other stores).
    """
    for key, tag in (("generation", "generation"), ("ETag", "etag"), ("etag", "etag")):
        if info.get(key):
            return f"{tag}:{str(info[key]).strip(chr(34))}"
    for key in ("mtime", "LastModified", "updated", "last_modified", "modified"):
        if info.get(key) is not None:
            value = info[key]
            return f"mtime:{value.isoformat() if hasattr(value, 'isoformat') else value}"
    return None


def object_content(info: dict) -> str | None:
    """A digest of an object's content from an fsspec listing entry, when the store keeps one.

    GCS keeps CRC32C (and MD5 for objects that are not composite), S3 an ETag that is derived from
    the content. Local files have none: :func:`content_digest` computes one.
    """
    for key, tag in (("md5Hash", "md5"), ("crc32c", "crc32c"), ("ETag", "etag"), ("etag", "etag")):
        if info.get(key):
            return f"{tag}:{str(info[key]).strip(chr(34))}"
    return None


def content_digest(uri: str) -> str | None:
    """SHA-256 of a local file's bytes (of the archive, for an archive member); ``None`` for
    remote objects (their listing gives :func:`object_content`) or when it cannot be read."""
    import hashlib

    path = uri.split("::", 1)[1] if "::" in uri else uri
    if "://" in path and not path.startswith("file://"):
        return None
    digest = hashlib.sha256()
    try:
        with open(path.removeprefix("file://"), "rb") as f:
            for block in iter(lambda: f.read(READ_BLOCK_BYTES), b""):
                digest.update(block)
    except OSError:
        return None
    return f"sha256:{digest.hexdigest()}"


#: Block size of the read-ahead buffer for object-store reads (libsndfile reads in small pieces).
READ_BLOCK_BYTES = 4 * 2**20
#: Largest range asked for in one request (larger reads take several), so that a request's time
#: limit stays meaningful.
_MAX_REQUEST_BYTES = 4 * READ_BLOCK_BYTES
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable (503)
        getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: InternalError (500)
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
    }
)
_LOG = logging.getLogger(__name__)


#: The storage settings' old name.
StorageRetry = StorageConfig
#: The settings of reads in this process: the run's (``configure``, called by the stages that read
#: from their own copy of the launcher's resolved config), else the defaults. Workers never read
#: the environment.
_ACTIVE = StorageConfig()


def configure(config: StorageConfig | None) -> None:
    """Makes ``config`` the settings of this process's reads (a stage's ``setup``; ``None``:
    leaves them as they are)."""
    global _ACTIVE
    if config is not None:
        _ACTIVE = config


def active() -> StorageConfig:
    """The settings of this process's reads (see :func:`configure`)."""
    return _ACTIVE


class FetchedObjects:
    """Small remote objects fetched whole, kept in memory for one later read in the same process.

    Planning reads each recording's header; for an object no larger than the read-ahead block,
    that read fetched all of it. Decoding, a later stage, takes it from here instead of asking the
    store again: what the page cache does for local files. On the local runner every header is
    read before the first unit is decoded, all in one process; on a distributed runner a unit may
    be decoded in another process, which then fetches the object itself.

    Entries are keyed by URL, size and version (object generation, ETag or mtime), so a replaced
    object never matches. An entry is dropped once taken as often as it was put for (a recording
    and its augmented copies); the oldest are dropped first when more than ``limit_bytes`` are
    held. Thread-safe.

    Args:
        limit_bytes: Most bytes held; ``None`` takes ``active().cache_mb`` when first used.
    """

    def __init__(self, limit_bytes: int | None = None):
        self._limit = limit_bytes
        self._entries: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: tuple, data: bytes, *, reads: int = 1) -> bool:
        """Keeps ``data`` for ``reads`` takes; returns False when it is larger than the limit."""
        with self._lock:
            if self._limit is None:
                self._limit = int(active().cache_mb * 2**20)
            if reads < 1 or len(data) > self._limit:
                return False
            self._drop(key)
            while self._entries and self._held + len(data) > self._limit:
                self._drop(next(iter(self._entries)))
            self._entries[key] = [data, reads]
            self._held += len(data)
            return True

    def take(self, key: tuple) -> bytes | None:
        """The bytes kept for ``key`` (counting one read), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry[1] -= 1
            if entry[1] <= 0:
                self._drop(key)
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._held = 0
            self._limit = None

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._held -= len(entry[0])


#: This process's small objects between planning and decoding (see ``FetchedObjects``).
FETCHED = FetchedObjects()


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: a timeout, a dropped or refused connection, or
    an HTTP 408/429/5xx answer, as gcsfs, s3fs (botocore), aiohttp or requests raise them."""
    import aiohttp
    import botocore.exceptions
    import gcsfs.retry
    import requests

    for cause in _causes(exc):
        if isinstance(cause, gcsfs.retry.HttpError):
            return gcsfs.retry.is_retriable(cause)  # its rule: 408, 429, 5xx, expired credentials
        status = None
        if isinstance(cause, aiohttp.ClientResponseError):
            status = cause.status
        elif isinstance(cause, botocore.exceptions.ClientError):
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        elif isinstance(cause, requests.HTTPError) and cause.response is not None:
            status = cause.response.status_code
        if status is not None:
            return status in (408, 429) or status >= 500
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    transient = (
        TimeoutError,
        asyncio.TimeoutError,
        ConnectionError,
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
        botocore.exceptions.HTTPClientError,
        botocore.exceptions.ConnectionError,
        requests.ConnectionError,
        requests.Timeout,
    )
    return isinstance(exc, transient) or (isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not str(exc):
        return f"{type(exc).__name__}: no answer within {timeout_s:.3g} s"
    return f"{type(exc).__name__}: {exc}"


class _Attempts:
    """The one retry schedule of a request, for blocking and async callers alike.

    Iterating gives each attempt's time limit (``attempt_timeout_s``, less near the deadline);
    :meth:`failed` classifies an attempt's error and gives the pause before the next, or raises
    the ``StorageError`` (kept in the file's ``storage_error``) when the error is not transient or
    the attempts or the deadline are spent.
    """

    def __init__(self, file: RemoteFile, what: str):
        self.file, self.what = file, what
        self.started = time.monotonic()
        self.attempt = 0
        self.timeout_s = 0.0

    def __iter__(self):
        retry = self.file.retry
        while True:
            self.attempt += 1
            deadline = self.started + retry.deadline_s
            self.timeout_s = max(0.001, min(retry.attempt_timeout_s, deadline - time.monotonic()))
            yield self.timeout_s

    def failed(self, failed: Exception) -> float:
        """The pause before the next attempt after ``failed``; or raises (and keeps) the
        StorageError."""
        file, retry, attempt = self.file, self.file.retry, self.attempt
        description = _describe(failed, self.timeout_s)
        pause_s = retry.pause_s(attempt - 1)
        transient = is_transient(failed)
        if (
            transient
            and attempt < retry.attempts
            and time.monotonic() + pause_s < self.started + retry.deadline_s
        ):
            _LOG.info(
                "%s: %s: attempt %d failed, retry in %.2f s: %s",
                file.uri,
                self.what,
                attempt,
                pause_s,
                description,
            )
            if file.on_retry is not None:
                file.on_retry(failed)
            return pause_s
        elapsed_s = time.monotonic() - self.started
        if transient:
            why = f"gave up after {attempt} attempt(s) in {elapsed_s:.1f} s"
        else:
            why = "failed (not retried: not a transient error)"
        reason = "missing_file" if isinstance(failed, FileNotFoundError) else "storage_error"
        error = StorageError(f"{file.uri}: {self.what} {why}: {description}", reason=reason)
        error.__cause__ = failed
        file.storage_error = error
        raise error


class RemoteFile(io.RawIOBase):
    """An object in a store, read by byte ranges with a read-ahead block and retried requests.

    libsndfile and tarfile read in small pieces and seek back and forth near them; the block (the
    last range fetched, at least ``READ_BLOCK_BYTES``) turns that into few range requests. Each
    request retries transient errors (``StorageConfig``). A read that gives up raises a
    ``StorageError`` and keeps it in ``storage_error``; every later read raises it again at once,
    so a decoder that swallows exceptions (libsndfile turns an error in its read callback into its
    own generic error or a short read) cannot hide the cause, and a dead object costs one retry
    budget, not one per read.

    Args:
        uri: The object's URL.
        retry: Retry limits.
        size_bytes: The object's size when known; otherwise it is asked for (one request).
        on_retry: Called with the error before each retry (e.g. to count it).

    Attributes:
        size: Object size in bytes.
        storage_error: The ``StorageError`` a read gave up with, or ``None``.
        on_retry: As above; may be replaced while the file is open.

    Raises:
        StorageError: the size could not be read.
    """

    def __init__(
        self,
        uri: str,
        *,
        retry: StorageConfig,
        size_bytes: int | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
    ):
        super().__init__()
        self.uri = uri
        self.retry = retry
        self.on_retry = on_retry
        self.storage_error: StorageError | None = None
        fs, self._path = fsspec.core.url_to_fs(uri)
        self._fs = adapters.single_attempt(fs, attempt_timeout_s=retry.attempt_timeout_s)
        self._pos = 0
        self._block_start = 0
        self._block = b""
        if size_bytes is None:
            size_bytes = int(self._retried("reading its size", "info", self._path)["size"])
        self.size = size_bytes

    @property
    def name(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"<RemoteFile name={self.uri!r}>"

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        """The filesystem the object is read through (without retries of its own)."""
        return self._fs

    def _call(self, method: str, *args, timeout_s: float, **kwargs):
        """``fs.<method>``; on an async filesystem cancelled after ``timeout_s`` (with any retry
        loop of its own)."""
        if adapters.is_async(self._fs):
            coroutine = adapters.coroutine(self._fs, method)
            return adapters.run_on_loop(self._fs, coroutine, *args, timeout_s=timeout_s, **kwargs)
        return getattr(self._fs, method)(*args, **kwargs)

    def _retried(self, what: str, method: str, *args, **kwargs):
        """``fs.<method>(*args, **kwargs)``, retried as ``StorageConfig`` says."""
        attempts = self._attempts(what)
        for timeout_s in attempts:
            try:
                return self._call(method, *args, timeout_s=timeout_s, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified by the schedule; the cause is kept
                time.sleep(attempts.failed(exc))

    async def _retried_async(self, what: str, method: str, *args, **kwargs):
        """As ``_retried``, as a coroutine on the event loop of an async filesystem."""
        attempts = self._attempts(what)
        for timeout_s in attempts:
            try:
                return await asyncio.wait_for(
                    adapters.coroutine(self._fs, method)(*args, **kwargs), timeout_s
                )
            except Exception as exc:  # noqa: BLE001 - classified by the schedule; the cause is kept
                await asyncio.sleep(attempts.failed(exc))

    def _attempts(self, what: str) -> _Attempts:
        if self.storage_error is not None:
            raise self.storage_error
        return _Attempts(self, what)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset} in {self.uri}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        """Fills ``buffer`` from the current position (short only at the end of the object)."""
        if self.storage_error is not None:
            raise self.storage_error
        out = memoryview(buffer).cast("B")
        done = 0
        while done < len(out) and self._pos < self.size:
            offset = self._pos - self._block_start
            if not 0 <= offset < len(self._block):
                self._fetch(len(out) - done)
                offset = 0
                if not self._block:  # shorter than its listed size (replaced since): its end
                    break
            n = min(len(out) - done, len(self._block) - offset)
            out[done : done + n] = self._block[offset : offset + n]
            done += n
            self._pos += n
        return done

    def _fetch_range(self, wanted: int) -> tuple[str, int, int]:
        """What to fetch for a read of ``wanted`` bytes at the current position: ``(what, start,
        end)``, at least a read-ahead block."""
        start = self._pos
        end = min(self.size, start + min(max(wanted, READ_BLOCK_BYTES), _MAX_REQUEST_BYTES))
        return f"reading bytes {start}..{end - 1}", start, end

    def _fetch(self, wanted: int) -> None:
        what, start, end = self._fetch_range(wanted)
        self._block_start = start
        self._block = self._retried(what, "cat_file", self._path, start=start, end=end)

    def needs_fill(self) -> bool:
        """Whether the read-ahead block lacks the current position (and the object goes on)."""
        return not 0 <= self._pos - self._block_start < len(self._block) and self._pos < self.size

    def fill(self) -> None:
        """Fetches the read-ahead block at the current position now, unless it is held already.

        A decoder can then open the file from memory: soundfile opens files one at a time (a
        process-wide lock around libsndfile's open), so a first read that waits on the store
        inside the open would make every other thread's open wait too.
        """
        if self.needs_fill():
            self._fetch(READ_BLOCK_BYTES)

    async def fill_async(self) -> None:
        """``fill()`` as a coroutine on the event loop of an async filesystem."""
        if self.needs_fill():
            what, start, end = self._fetch_range(READ_BLOCK_BYTES)
            self._block_start = start
            self._block = await self._retried_async(what, "cat_file", self._path, start=start, end=end)

    def whole_block(self) -> bytes | None:
        """The whole object, when the read-ahead block already holds all of it; else ``None``."""
        if self._block_start == 0 and len(self._block) == self.size:
            return bytes(self._block)
        return None

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when negative); fewer only at the end."""
        left = max(0, self.size - self._pos)
        buffer = bytearray(left if size is None or size < 0 else min(size, left))
        return bytes(memoryview(buffer)[: self.readinto(buffer)])

    def readall(self) -> bytes:
        return self.read()

    def close(self) -> None:
        self._block = b""
        super().close()


def open_remote(
    uri: str,
    *,
    size_bytes: int | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
    retry: StorageConfig | None = None,
) -> RemoteFile:
    """Opens a URL for reading with a read-ahead buffer and retried requests (``retry``, else the
    process's :func:`active` settings). Without ``size_bytes`` the object's size is asked first.

    Raises:
        StorageError: the size could not be read.
    """
    return RemoteFile(uri, retry=retry or active(), size_bytes=size_bytes, on_retry=on_retry)


def fill_all(files: Sequence[RemoteFile], *, in_flight: int) -> None:
    """``fill()`` of every file, with up to ``in_flight`` requests at once.

    Reads on an async filesystem (gcsfs, s3fs) run together on its event loop, each with its own
    retries; others one after another. A read that gives up leaves its ``StorageError`` in the
    file's ``storage_error`` (raised by its next read) instead of raising here. Each file's
    ``on_retry`` is called on the calling thread, after all reads are done.
    """
    together = []
    for f in files:
        if adapters.is_async(f.filesystem) and f.needs_fill():
            together.append(f)
        else:
            with contextlib.suppress(StorageError):
                f.fill()
    if not together:
        return
    callbacks = {f: f.on_retry for f in together}
    failures: dict[RemoteFile, list[BaseException]] = {f: [] for f in together}
    by_loop: dict[int, list[RemoteFile]] = collections.defaultdict(list)
    for f in together:  # fsspec's async filesystems normally share one loop
        f.on_retry = failures[f].append
        by_loop[id(adapters.event_loop(f.filesystem))].append(f)

    async def fill_each(group: list[RemoteFile]):
        limit = asyncio.Semaphore(max(1, in_flight))

        async def fill_one(f: RemoteFile):
            async with limit:
                with contextlib.suppress(StorageError):
                    await f.fill_async()

        await asyncio.gather(*(fill_one(f) for f in group))

    try:
        for group in by_loop.values():
            adapters.run_on_loop(group[0].filesystem, fill_each, group)
    finally:
        for f, callback in callbacks.items():
            f.on_retry = callback
            if callback is not None:
                for failed in failures[f]:
                    callback(failed)


def storage_error(source) -> StorageError | None:
    """The ``StorageError`` a read of ``source`` (from ``open_source``) gave up with, if any.

    libsndfile turns an exception raised in its read callback into its own generic error (or a
    short read); the pipeline asks here for the real cause before it classifies a failure.
    """
    for candidate in (source, getattr(getattr(source, "archive", None), "file", None)):
        error = getattr(candidate, "storage_error", None)
        if error is not None:
            return error
    return None


def credential_source(protocol: str) -> str:
    """Where the credentials for a store come from, in words (for messages; never the secret)."""
    if protocol in ("gs", "gcs"):
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return f"none needed: the emulator at {os.environ['STORAGE_EMULATOR_HOST']}"
        key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if key_file:
            return f"the key file in GOOGLE_APPLICATION_CREDENTIALS ({key_file})"
        adc = os.path.expanduser("~/.config/gcloud/application_default_credentials.json")
        if os.path.exists(adc):
            return f"gcloud's application-default credentials ({adc})"
        return "the metadata server (no key file or gcloud login found)"
    if protocol in ("s3", "s3a"):
        try:
            import botocore.session

            found = botocore.session.Session().get_credentials()
        except Exception:  # noqa: BLE001 - only for the message
            found = None
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
        where = f" for the endpoint {endpoint}" if endpoint else ""
        return (
            f"the AWS chain's {found.method!r} credentials" if found else "no credentials in the AWS chain"
        ) + where
    return "the filesystem's defaults"


def check_store(uri: str, *, flag: str, timeout_s: float = 20.0) -> None:
    """One bounded request to the store behind a remote ``uri`` before a run relies on it.

    Unreachable or refusing stores otherwise surface as a library traceback after the libraries'
    own retries (80 to 100 s for GCS). This asks once, without retries, for the bucket (or the
    object) and turns a failure into one line that names the bucket and where the credentials
    came from.

    Raises:
        ConfigError: the store cannot be reached in ``timeout_s``, refuses the credentials, or has
            no such bucket.
    """
    if "://" not in uri or uri.startswith("file://") or "::" in uri:
        return
    fs, path = fs_and_path(uri)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in ("gs", "gcs", "s3", "s3a"):
        return
    bucket = path.split("/", 1)[0]
    shown = redact(f"{protocol}://{bucket}")
    single = adapters.single_attempt(fs, attempt_timeout_s=timeout_s)
    try:
        single.info(bucket, timeout=timeout_s)
    except FileNotFoundError:
        raise ConfigError(f"{flag} {redact(uri)!r}: the bucket {shown} does not exist") from None
    except (PermissionError, ConfigError) as exc:
        raise ConfigError(
            f"{flag} {redact(uri)!r}: the store refused access to {shown} with "
            f"{credential_source(protocol)} ({redact(str(exc))[:200]})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - unreachable, timed out, or an error the store gave
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            problem = f"the store of {shown} did not answer within {timeout_s:g} s"
        else:
            problem = f"cannot reach the store of {shown} ({type(exc).__name__}: {redact(str(exc))[:200]})"
        raise ConfigError(
            f"{flag} {redact(uri)!r}: {problem}; credentials: {credential_source(protocol)}"
        ) from None
