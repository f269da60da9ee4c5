"""Archives as inputs: tar and zip members listed with safe names, and opened for reading (no Beam).

A member whose name would leave the archive (an absolute path, a ``..`` part) or that is not a
regular file (a link, a device) is a dead letter at listing time, and so is what lies behind a
damaged tar header (never a silent end of the list). An archive is opened once per process with
its member index (``open_source``), local or in an object store (``storage.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import threading
from collections.abc import Callable, Iterator, Sequence

from soundshard.schemas.storage import StorageConfig
from soundshard.transforms.io.storage import (
    READ_BLOCK_BYTES,
    RemoteFile,
    fs_and_path,
    open_remote,
)

#: Archive suffixes and the fsspec filesystem (and options) that opens their members.
ARCHIVES = {
    ".zip": ("zip", {}),
    ".tar": ("tar", {}),
    ".tar.gz": ("tar", {"compression": "gzip"}),
    ".tgz": ("tar", {"compression": "gzip"}),
    ".tar.bz2": ("tar", {"compression": "bz2"}),
    ".tar.xz": ("tar", {"compression": "xz"}),
}
_MEMBER_IN_MEMORY_BYTES = 256 * 2**20


def archive_kind(uri: str) -> tuple[str, dict] | None:
    """``(fsspec protocol, options)`` for an archive path, or ``None`` when ``uri`` is no archive."""
    lower = uri.lower()
    for suffix in sorted(ARCHIVES, key=len, reverse=True):
        if lower.endswith(suffix):
            return ARCHIVES[suffix]
    return None


def strip_archive_suffix(path: str) -> str:
    lower = path.lower()
    for suffix in sorted(ARCHIVES, key=len, reverse=True):
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return path


def member_problem(name: str, kind: str) -> str | None:
    if kind != "file":
        return f"member {name!r} is a {kind}, not a regular file"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":") or ".." in parts:
        return f"member name {name!r} points outside the archive"
    return None


@dataclasses.dataclass(frozen=True)
class ArchiveMember:
    """One entry of a tar/zip archive, as listed.

    Attributes:
        name: Path inside the archive, as stored.
        kind: ``file``, ``directory``, ``link`` or ``other``.
        size_bytes: Size of the member's data.
        occurrence: 1 for the first entry with this name, 2 for the second, ... (a tar appended
            to, or a zip written twice, holds several entries of one name; all are read).
        duplicates: How many entries of the archive have this name.
    """

    name: str
    kind: str
    size_bytes: int | None
    occurrence: int = 1
    duplicates: int = 1

    @property
    def key(self) -> str:
        """The member's address in URIs and clip ids: its name, plus ``#k`` when the name repeats."""
        return self.name if self.duplicates == 1 else f"{self.name}#{self.occurrence}"


@dataclasses.dataclass(frozen=True)
class ArchiveListing:
    """What could be read of an archive's index.

    Attributes:
        members: The entries listed, in archive order.
        problem: Why the listing stopped before the archive's end (with the byte offset), or
            ``None`` when it was read to its end.
    """

    members: tuple[ArchiveMember, ...]
    problem: str | None = None


def _number_occurrences(entries: Sequence[tuple[str, str, int | None]]) -> tuple[ArchiveMember, ...]:
    totals = collections.Counter(name for name, _, _ in entries)
    seen: collections.Counter = collections.Counter()
    members = []
    for name, kind, size in entries:
        seen[name] += 1
        members.append(ArchiveMember(name, kind, size, seen[name], totals[name]))
    return tuple(members)


def _tar_kind(info) -> str:
    if info.isfile():
        return "file"
    if info.isdir():
        return "directory"
    if info.issym() or info.islnk():
        return "link"
    return "other"


def _checked_tarinfo(problems: list):
    """A TarInfo class that records the header errors after which tarfile stops listing silently.

    ``tarfile`` ends its member list without an error at a damaged header anywhere but the first
    (``TarFile.next``), so a corrupt second header looked like the archive's end and the members
    behind it were lost without a trace.
    """
    import tarfile

    class _Checked(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            offset = tar.offset
            try:
                return super().fromtarfile(tar)
            except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
                problems.append(f"damaged member header at byte {offset} of the tar stream ({exc})")
                raise

    return _Checked


def tar_members(archive) -> Iterator:
    """Iterates a ``tarfile.TarFile`` opened with ``tarinfo=_checked_tarinfo(problems)``; an error
    part-way is added to ``problems`` (with the byte offset) and ends the iteration."""
    problems = archive.tarinfo.problems
    try:
        yield from archive
    except Exception as exc:  # noqa: BLE001 - what was listed before the damage still counts
        problems.append(f"unreadable at byte {archive.offset} of the tar stream: {type(exc).__name__}: {exc}")


def open_tar(fileobj, *, stream: bool, compression: str | None):
    import tarfile

    problems: list[str] = []
    tarinfo = _checked_tarinfo(problems)
    tarinfo.problems = problems
    if stream:
        suffix = {"gzip": "gz", "bz2": "bz2", "xz": "xz"}.get(compression, "")
        return tarfile.open(fileobj=fileobj, mode=f"r|{suffix}", tarinfo=tarinfo)
    return tarfile.TarFile(fileobj=_decompressed(fileobj, compression), tarinfo=tarinfo)


def _decompressed(fileobj, compression: str | None):
    if compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if compression == "bz2":
        import bz2

        return bz2.BZ2File(fileobj, mode="rb")
    if compression == "xz":
        import lzma

        return lzma.LZMAFile(fileobj, mode="rb")
    return fileobj


def list_archive(uri: str) -> ArchiveListing:
    """Entries of a tar/zip archive (the zip central directory, or a scan of the tar headers; a
    compressed tar is decompressed once for that).

    A tar that cannot be read to its end (a damaged header, truncated or corrupt compressed data)
    gives the entries before the damage and the ``problem``, with its byte offset.

    Raises:
        Exception: when nothing of the archive can be read (not an archive, damaged zip directory,
            unreadable first header).
    """
    import stat
    import zipfile

    protocol, options = archive_kind(uri)
    fs, path = fs_and_path(uri)
    entries: list[tuple[str, str, int | None]] = []
    problem = None
    with fs.open(path, "rb", cache_type="readahead", block_size=READ_BLOCK_BYTES) as f:
        if protocol == "zip":
            with zipfile.ZipFile(f) as archive:
                for info in archive.infolist():
                    mode = info.external_attr >> 16
                    if info.is_dir():
                        kind = "directory"
                    elif stat.S_ISLNK(mode):
                        kind = "link"
                    else:
                        kind = "file"
                    entries.append((info.filename, kind, info.file_size))
        else:
            with open_tar(f, stream=True, compression=options.get("compression")) as archive:
                for info in tar_members(archive):
                    entries.append((info.name, _tar_kind(info), info.size))
                problems = archive.tarinfo.problems
                problem = problems[0] if problems else None
    return ArchiveListing(_number_occurrences(entries), problem)


#: Archives kept open (with their member index) per process.
_OPEN_ARCHIVES = 4


class _OpenArchive:
    """An archive opened once per process: its member index and a lock for reads from it.

    Members are found by :attr:`ArchiveMember.key` (the name, with ``#k`` for the k-th of
    several entries of one name), so every entry can be read, not only the last one of a name
    (what a lookup by name gives in tarfile, zipfile and fsspec's archive filesystems).
    """

    def __init__(self, archive_uri: str, on_retry: Callable[[BaseException], None] | None = None):
        import zipfile

        protocol, options = archive_kind(archive_uri)
        local = "://" not in archive_uri or archive_uri.startswith("file://")
        if local:
            self.file = open(archive_uri.removeprefix("file://"), "rb")
        else:
            self.file = open_remote(archive_uri, on_retry=on_retry)
        if protocol == "zip":
            self._archive = zipfile.ZipFile(self.file)
            infos = [(i.filename, i) for i in self._archive.infolist()]
        else:
            self._archive = open_tar(self.file, stream=False, compression=options.get("compression"))
            infos = [(i.name, i) for i in tar_members(self._archive)]
        totals = collections.Counter(name for name, _ in infos)
        seen: collections.Counter = collections.Counter()
        self._members = {}
        for name, info in infos:
            seen[name] += 1
            self._members[name if totals[name] == 1 else f"{name}#{seen[name]}"] = info
        self.lock = threading.Lock()

    def _info(self, key: str):
        try:
            return self._members[key]
        except KeyError:
            raise FileNotFoundError(f"no member {key!r} in the archive") from None

    def size(self, key: str) -> int:
        """Size of a member's data in bytes."""
        info = self._info(key)
        return info.file_size if hasattr(info, "file_size") else info.size

    def open(self, key: str):
        """A binary file object on a member's data."""
        info = self._info(key)
        if hasattr(info, "file_size"):
            return self._archive.open(info)
        stream = self._archive.extractfile(info)
        if stream is None:
            raise ValueError(f"member {key!r} is not a regular file")
        return stream


class _ArchiveCache:
    """The archives this process keeps open (the ``_OPEN_ARCHIVES`` used last), shared by every
    DoFn that reads sources. Each such DoFn takes a hold in ``setup`` and lets go in
    ``teardown``; the archives are forgotten when the last hold goes, so one DoFn's teardown
    never closes an archive another one is reading."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[str, _OpenArchive] = collections.OrderedDict()
        self._holds = 0

    def get(self, archive_uri: str) -> _OpenArchive:
        with self._lock:
            archive = self._open.get(archive_uri)
            if archive is not None:
                self._open.move_to_end(archive_uri)
                return archive
        archive = _OpenArchive(archive_uri)  # outside the lock: opening reads the member index
        with self._lock:
            archive = self._open.setdefault(archive_uri, archive)
            self._open.move_to_end(archive_uri)
            while len(self._open) > self._size:
                self._open.popitem(last=False)
            return archive

    def forget(self, archive_uri: str) -> None:
        with self._lock:
            self._open.pop(archive_uri, None)

    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            self._holds = max(0, self._holds - 1)
            if self._holds == 0:
                self._open.clear()

    def clear(self) -> None:
        with self._lock:
            self._open.clear()

    @property
    def open_uris(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._open)


_ARCHIVES = _ArchiveCache(_OPEN_ARCHIVES)


def _open_archive(archive_uri: str) -> _OpenArchive:
    return _ARCHIVES.get(archive_uri)


def hold_archives() -> None:
    """Takes a hold on the archives this process keeps open (a reading DoFn's ``setup``)."""
    _ARCHIVES.hold()


def release_archives() -> None:
    """Lets go of a hold (a reading DoFn's ``teardown``); the last one forgets the archives."""
    _ARCHIVES.release()


def close_archives() -> None:
    """Forgets every archive this process keeps open, whoever holds them."""
    _ARCHIVES.clear()


def open_source(
    uri: str,
    *,
    size_bytes: int | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
    retry: StorageConfig | None = None,
):
    """Opens an input for reading: a local path as is, a URL as a ``RemoteFile``.

    Remote reads retry transient errors (``StorageConfig``); one that gives up raises a
    ``StorageError``, which ``storage_error(source)`` also returns afterwards. Archive members
    (``tar://name::archive``, ``zip://name::archive``) are read from an archive opened once per
    process, so a tar's member index is built once, not once per member. A member up to
    ``_MEMBER_IN_MEMORY_BYTES`` is returned as bytes in memory (compressed tars seek by re-reading,
    and the shared archive must not be read by two threads at once); a larger one streams from its
    own handle on the archive. An archive whose reads gave up is opened afresh for the next member.

    Args:
        uri: Local path, URL or archive member URL.
        size_bytes: The object's size when known (saves a request); not used for members.
        on_retry: Called with the error before each retry of a remote request.
        retry: Retry settings of a remote object's reads (default: the process's, ``storage.active``;
            archives opened once per process always use those).

    Raises:
        StorageError: a remote read gave up (or the object is missing: ``missing_file``).
    """
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    if "::" in uri:
        member_url, archive_uri = uri.split("::", 1)
        member = member_url.split("://", 1)[1]
        archive = _open_archive(archive_uri)
        try:
            with archive.lock:
                if isinstance(archive.file, RemoteFile):
                    archive.file.on_retry = on_retry
                size = archive.size(member)
                if size <= _MEMBER_IN_MEMORY_BYTES:
                    with archive.open(member) as f:
                        return io.BytesIO(f.read())
        except Exception as exc:
            failure = getattr(archive.file, "storage_error", None)
            if failure is None:
                raise
            _ARCHIVES.forget(archive_uri)  # opened afresh for the next member
            if failure is exc:
                raise
            raise failure from failure.__cause__  # the store's error, not what tarfile made of it
        own = _OpenArchive(archive_uri, on_retry)
        stream = own.open(member)
        stream.archive = own  # keeps the archive's file open as long as the stream
        return stream
    return open_remote(uri, size_bytes=size_bytes, on_retry=on_retry, retry=retry)
