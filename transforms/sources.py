"""Input listing: folders, globs and manifests become SourceItems and dead letters (no Beam).

Listing runs once on the launcher (one recursive listing per input root, not one request per
file); decoding and header probing happen on the workers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import inspect
import io
import logging
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import fsspec
import pyarrow as pa

from soundshard.schemas.config import RecordingConfig
from soundshard.schemas.errors import ConfigError, StorageError
from soundshard.schemas.outcomes import Stage
from soundshard.schemas.records import DeadLetter, SourceItem
from soundshard.schemas.uris import redact
from soundshard.transforms import annotations, recordings, strong_labels

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".opus")
#: Archive suffixes and the fsspec filesystem (and options) that opens their members.
ARCHIVES = {
    ".zip": ("zip", {}),
    ".tar": ("tar", {}),
    ".tar.gz": ("tar", {"compression": "gzip"}),
    ".tgz": ("tar", {"compression": "gzip"}),
    ".tar.bz2": ("tar", {"compression": "bz2"}),
    ".tar.xz": ("tar", {"compression": "xz"}),
}
_GLOB_CHARS = "*?["
_MEMBER_IN_MEMORY_BYTES = 256 * 2**20
FILENAME_CANDIDATES = ("filename", "slice_file_name", "file", "path")
LABEL_CANDIDATES = ("label", "category", "class")
START_TIME_CANDIDATES = ("start_time", "recording_start")
#: Manifest columns that name a recording's annotation file (``--labels``), first present wins.
LABELS_FILE_CANDIDATES = ("labels_file",)
#: Annotation files looked up and read at once while listing: small files, each a few round trips
#: on an object store, so a few in flight hide the latency without crowding the store.
ANNOTATION_READERS = 8
DEFAULT_RECORDING = RecordingConfig()


@dataclasses.dataclass(frozen=True)
class StrongLabels:
    """Where a run's strong (time-stamped) labels come from (``--labels``).

    Each recording's annotation file (an Audacity label track or a Raven selection table, see
    ``transforms/annotations.py``) is the file named in the manifest's labels column, or else the
    file beside the recording with its stem (``night1.wav`` → ``night1.txt``,
    ``night1.Table.1.selections.txt`` or ``night1.selections.txt``).

    Attributes:
        optional: What a recording without an annotation file becomes. ``False`` (the default):
            a dead letter (``missing_labels``), because a recording nobody annotated must not
            train as pure background. ``True``: it is kept, weakly labelled when it has a clip
            label (manifest label column, ``--label-from-parent``) and otherwise annotated as
            all background. A file that a manifest names but that does not exist is always a
            dead letter.
        column: Manifest column naming each recording's annotation file (relative paths resolve
            like audio paths); ``None`` takes ``labels_file`` when the manifest has it, ``""``
            never reads a column (files beside the recordings).
    """

    optional: bool = False
    column: str | None = None


@dataclasses.dataclass(frozen=True)
class ManifestColumns:
    """Manifest column names; ``None`` picks the first present of the usual names.

    Attributes:
        filename: Column with the audio path (default: ``filename``, ``slice_file_name``, ...).
        label: Label column (default: ``label``, ``category``, ``class``); ``""`` for none.
        fold: Fold column (default ``fold`` when present); ``""`` for none.
        split: Split column (default ``split`` when present); ``""`` for none.
        start_time: Recording start column, ISO 8601 (default ``start_time`` or
            ``recording_start`` when present); ``""`` for none.
    """

    filename: str | None = None
    label: str | None = None
    fold: str | None = None
    split: str | None = None
    start_time: str | None = None


@dataclasses.dataclass(frozen=True)
class SourceListing:
    """What the launcher found: inputs to process, inputs already failed, labels.

    Attributes:
        items: Inputs to decode.
        dead_letters: Inputs rejected while listing (missing file, empty label, ...).
        extra_columns: Manifest columns copied to every window as ``meta_<name>``.
        label_map: Label name to index, sorted by name, over every labelled input.
    """

    items: tuple[SourceItem, ...]
    dead_letters: tuple[DeadLetter, ...]
    extra_columns: tuple[str, ...]
    label_map: dict[str, int]

    @property
    def n_inputs(self) -> int:
        """Every input seen: to process plus already dead-lettered."""
        return len(self.items) + len(self.dead_letters)


def _fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Full URI of a path returned by an fsspec listing (plain path for local files)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def _is_glob(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` is a pattern; in an HTTP(S) URL, ``?`` starts the query (signed URLs)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "http" in protocols or "https" in protocols:
        path = path.split("?", 1)[0]
    return any(ch in path for ch in _GLOB_CHARS)


def _is_audio(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(extensions))


@dataclasses.dataclass(frozen=True)
class Listed:
    """What a listing says about one object: its size, its version and, when the store gives
    one, a digest of its content."""

    size_bytes: int | None
    version: str | None
    content: str | None = None


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


def with_content(items: Sequence[SourceItem], *, where: Callable[[SourceItem], bool]) -> list[SourceItem]:
    """``items`` with the content digest of local files filled in (:func:`content_digest`) where
    ``where(item)`` holds and the listing gave none; each file is read once, a few at a time."""
    import concurrent.futures

    paths = sorted({i.uri.split("::", 1)[-1] for i in items if i.content is None and where(i)})
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        digests = dict(zip(paths, pool.map(content_digest, paths), strict=True))
    return [
        dataclasses.replace(i, content=digests[i.uri.split("::", 1)[-1]])
        if i.content is None and i.uri.split("::", 1)[-1] in digests
        else i
        for i in items
    ]


def list_audio(input_uri: str, *, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> dict[str, Listed]:
    """Audio files under a folder, matching a glob (``**`` allowed), or a single file.

    Returns:
        ``{uri: Listed}`` sorted by URI.

    Raises:
        ConfigError: when the input does not exist.
    """
    fs, path = _fs_and_path(input_uri)
    if _is_glob(fs, path):
        found = fs.glob(path, detail=True)
        entries = {p: info for p, info in found.items() if info.get("type") != "directory"}
    elif fs.isdir(path):
        entries = fs.find(path, detail=True)
    elif fs.exists(path):
        entries = {path: fs.info(path)}
        extensions = ()  # an explicitly named file is taken whatever its extension
    else:
        raise ConfigError(f"--input {input_uri!r} does not exist")
    return {
        _unstrip(fs, p): Listed(info.get("size"), object_version(info), object_content(info))
        for p, info in sorted(entries.items())
        if not extensions or _is_audio(p, extensions)
    }


def input_root(input_uri: str) -> str:
    """The folder clip ids are relative to: the input folder, or a glob's fixed prefix."""
    fs, path = _fs_and_path(input_uri)
    if _is_glob(fs, path):
        head = path
        while any(ch in head for ch in _GLOB_CHARS):
            head = posixpath.dirname(head)
        return _unstrip(fs, head)
    if fs.isdir(path):
        return _unstrip(fs, path.rstrip("/"))
    return _unstrip(fs, posixpath.dirname(path))


def clip_id_for(uri: str, root: str) -> str:
    """Path of ``uri`` relative to ``root``, without extension (``uri``'s stem if outside)."""
    prefix = root.rstrip("/") + "/"
    if "://" in uri and "?" in uri:  # a signed URL: the query is no part of the name
        uri = uri.split("?", 1)[0]
    relative = uri[len(prefix) :] if uri.startswith(prefix) else posixpath.basename(uri)
    stem, _ = posixpath.splitext(relative)
    return stem


def unique_clip_ids(items: Sequence[SourceItem]) -> list[SourceItem]:
    """The items with clip ids that tell every input apart (deterministic; readable ids kept).

    Ids are paths without extension, so ``x.wav`` and ``x.flac`` in one folder, or a file and an
    archive member, can meet on one id; two inputs must never share one (their windows would be
    attributed to one, the other lost). Inputs whose id is shared get their extension back
    (``x.wav``, ``x.flac``); ids still shared after that (same name in two places outside the
    input root) get ``#1``, ``#2``, ... in listing order. Ids used once are unchanged.
    """
    out = list(items)
    counts = collections.Counter(item.clip_id for item in out)
    for i, item in enumerate(out):
        if counts[item.clip_id] > 1:
            path = item.archive_member or item.uri.split("::", 1)[0].split("?", 1)[0]
            out[i] = dataclasses.replace(item, clip_id=item.clip_id + posixpath.splitext(path)[1])
    for _ in range(3):
        counts = collections.Counter(item.clip_id for item in out)
        if max(counts.values(), default=1) <= 1:
            return out
        seen: collections.Counter = collections.Counter()
        for i, item in enumerate(out):
            if counts[item.clip_id] > 1:
                seen[item.clip_id] += 1
                out[i] = dataclasses.replace(item, clip_id=f"{item.clip_id}#{seen[item.clip_id]}")
    raise AssertionError("clip ids could not be made unique")  # unreachable: '#k' ids are new


def archive_kind(uri: str) -> tuple[str, dict] | None:
    """``(fsspec protocol, options)`` for an archive path, or ``None`` when ``uri`` is no archive."""
    lower = uri.lower()
    for suffix in sorted(ARCHIVES, key=len, reverse=True):
        if lower.endswith(suffix):
            return ARCHIVES[suffix]
    return None


def _strip_archive_suffix(path: str) -> str:
    lower = path.lower()
    for suffix in sorted(ARCHIVES, key=len, reverse=True):
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _member_problem(name: str, kind: str) -> str | None:
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


def _tar(fileobj, *, stream: bool, compression: str | None):
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
    fs, path = _fs_and_path(uri)
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
            with _tar(f, stream=True, compression=options.get("compression")) as archive:
                for info in tar_members(archive):
                    entries.append((info.name, _tar_kind(info), info.size))
                problems = archive.tarinfo.problems
                problem = problems[0] if problems else None
    return ArchiveListing(_number_occurrences(entries), problem)


def expand_archive(
    uri: str,
    *,
    root: str,
    member_glob: str | None = None,
    label_from_parent: bool = False,
    version: str | None = None,
    content: str | None = None,
) -> tuple[list[SourceItem], list[DeadLetter]]:
    """SourceItems for the audio members of an archive; unsafe members become dead letters.

    Member names never become output paths, but names that point outside the archive
    (absolute, ``..``) and links are refused all the same, as an extractor would have to.
    Entries that share a name are all read, told apart by ``#1``, ``#2``, ... in their URI and
    clip id. An archive that cannot be listed is one dead letter (``bad_archive``); one that can
    be listed only part-way gives its members up to the damage and a dead letter for the rest
    (``archive_incomplete``, naming the byte offset).

    Args:
        uri: The archive.
        root: Folder clip ids are relative to.
        member_glob: ``fnmatch`` pattern on member paths; default: audio extensions.
        label_from_parent: Label = the member's parent folder name.
        version: The archive's version (from its listing); members inherit it.
        content: The archive's content digest (from its listing); members inherit it.
    """
    import fnmatch

    protocol, _ = archive_kind(uri)
    prefix = _strip_archive_suffix(clip_id_for(uri, root) + posixpath.splitext(uri)[1])
    items, dead = [], []
    try:
        listing = list_archive(uri)
    except Exception as exc:  # noqa: BLE001 - a bad archive is a dead letter, not a stop
        dead.append(
            DeadLetter(
                uri,
                prefix,
                Stage.SOURCE,
                "bad_archive",
                type(exc).__name__,
                f"cannot list archive {uri}: {exc}",
            )
        )
        return items, dead
    for member in listing.members:
        name, kind = member.name, member.kind
        if kind == "directory":
            continue
        selected = fnmatch.fnmatch(name, member_glob) if member_glob else _is_audio(name, AUDIO_EXTENSIONS)
        if not selected:
            continue
        member_uri = f"{protocol}://{member.key}::{uri}"
        problem = _member_problem(name, kind)
        stem = posixpath.splitext(name.lstrip("/"))[0]
        clip_id = f"{prefix}/{stem}" if member.duplicates == 1 else f"{prefix}/{stem}#{member.occurrence}"
        if problem:
            dead.append(
                DeadLetter(
                    member_uri, clip_id, Stage.SOURCE, "unsafe_member", "SourceError", f"{uri}: {problem}"
                )
            )
            continue
        label = posixpath.basename(posixpath.dirname(name)) or None if label_from_parent else None
        items.append(
            SourceItem(
                member_uri,
                clip_id,
                label,
                size_bytes=member.size_bytes,
                archive_member=name,
                version=version,
                content=content,
            )
        )
    if listing.problem:
        dead.append(
            DeadLetter(
                uri,
                prefix,
                Stage.SOURCE,
                "archive_incomplete",
                "ArchiveError",
                f"archive {uri} cannot be read to its end: {listing.problem}; "
                f"the {len(listing.members)} entries before it are taken, anything after it is lost",
            )
        )
    return items, dead


def from_listing(
    input_uri: str,
    *,
    label_from_parent: bool = False,
    member_glob: str | None = None,
    recording: RecordingConfig = DEFAULT_RECORDING,
    labels: StrongLabels | None = None,
) -> SourceListing:
    """Sources for every audio file under ``input_uri`` and every audio member of its archives.

    Labels come from parent folders if asked; start times from recorder file names and sites
    from the path as ``recording`` says. With ``labels``, each recording's annotation file beside
    it is read (see :func:`attach_annotations`).

    Raises:
        ConfigError: nothing found; or ``labels`` with archive members (annotation files are
            looked up beside plain files only: list the members in a manifest with a labels
            column, or extract them).
    """
    files = list_audio(input_uri, extensions=AUDIO_EXTENSIONS + tuple(ARCHIVES))
    if not files:
        raise ConfigError(
            f"--input {input_uri!r} matched no audio files or archives "
            f"(extensions {', '.join(AUDIO_EXTENSIONS + tuple(ARCHIVES))})"
        )
    root = input_root(input_uri)
    items: list[SourceItem] = []
    dead: list[DeadLetter] = []
    for uri, listed in files.items():
        if archive_kind(uri):
            members, rejected = expand_archive(
                uri,
                root=root,
                member_glob=member_glob,
                label_from_parent=label_from_parent,
                version=listed.version,
                content=listed.content,
            )
            items += members
            dead += rejected
            continue
        label = posixpath.basename(posixpath.dirname(uri)) if label_from_parent else None
        items.append(
            SourceItem(
                uri=uri,
                clip_id=clip_id_for(uri, root),
                label=label,
                size_bytes=listed.size_bytes,
                version=listed.version,
                content=listed.content,
            )
        )
    items = [recordings.annotate(item, recording) for item in unique_clip_ids(items)]
    if labels is not None:
        members = [i.uri for i in items if i.archive_member is not None]
        if members:
            raise ConfigError(
                f"--labels: {len(members)} input(s) are archive members (e.g. {redact(members[0])!r}); "
                "annotation files are looked up beside plain files only: extract the archive, or "
                "list its members in a --manifest with a labels_file column"
            )
        items, rejected = attach_annotations(items, labels=labels)
        dead += rejected
    return SourceListing(tuple(items), tuple(dead), (), label_map_of(items))


def read_table(path: str) -> pa.Table:
    """A manifest (CSV or Parquet) with every column as strings.

    Raises:
        ConfigError: missing or unreadable manifest.
    """
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        with fsspec.open(path, "rb") as f:
            if path.lower().endswith(".parquet"):
                table = pq.read_table(f)
            else:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except FileNotFoundError as exc:
        raise ConfigError(f"--manifest {path!r} does not exist") from exc
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--manifest {path!r} cannot be read as CSV/Parquet: {exc}") from exc
    return pa.table({name: pc.cast(table.column(name), pa.string()) for name in table.column_names})


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str) -> str | None:
    if wanted == "":
        return None
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(
                f"--{what}_column {wanted!r} is not a manifest column; columns: {list(columns)}"
            )
        return wanted
    return next((c for c in candidates if c in columns), None)


def from_manifest(
    manifest_uri: str,
    *,
    input_uri: str,
    columns: ManifestColumns = ManifestColumns(),
    recording: RecordingConfig = DEFAULT_RECORDING,
    allow_outside_input: bool = False,
    labels: StrongLabels | None = None,
) -> SourceListing:
    """Sources for each manifest row; bad rows become dead letters, never silent drops.

    Relative paths resolve against ``input_uri``; a path not found there is looked up by file name
    anywhere under it (UrbanSound8K keeps ``fold*/`` folders out of its manifest). Start times
    come from the start-time column, else (as ``recording`` says) from recorder file names.
    A row naming a file outside ``input_uri`` (an absolute path, ``..``, another URL) is a dead
    letter (``outside_input``) unless ``allow_outside_input``: a manifest must not make a run read
    whatever it names.

    With ``labels``, each recording's annotation file is read (:func:`attach_annotations`): the
    file its row names in the labels column (resolved and bounded like audio paths: a file
    outside ``input_uri`` is an ``outside_input`` dead letter unless ``allow_outside_input``), or
    without such a column the file beside the recording. A row may then leave its label empty.

    Raises:
        ConfigError: unreadable manifest, no filename column, unknown column names.
    """
    table = read_table(manifest_uri)
    names = table.column_names
    filename_col = _pick(names, columns.filename, FILENAME_CANDIDATES, "filename")
    if filename_col is None:
        raise ConfigError(
            f"--manifest {manifest_uri!r} has no filename column (looked for {FILENAME_CANDIDATES}); "
            f"columns: {names}; set --filename-column"
        )
    label_col = _pick(names, columns.label, LABEL_CANDIDATES, "label")
    fold_col = _pick(names, columns.fold, ("fold",), "fold")
    split_col = _pick(names, columns.split, ("split",), "split")
    start_col = _pick(names, columns.start_time, START_TIME_CANDIDATES, "start_time")
    labels_col = None
    if labels is not None and labels.column != "":
        if labels.column is not None and labels.column not in names:
            raise ConfigError(
                f"--labels-column {labels.column!r} is not a manifest column; columns: {list(names)}"
            )
        labels_col = labels.column or next((c for c in LABELS_FILE_CANDIDATES if c in names), None)
    used = {filename_col, label_col, fold_col, split_col, start_col, labels_col}
    extra_columns = tuple(n for n in names if n not in used)

    root = input_uri.rstrip("/")
    listed = list_audio(root, extensions=()) if _fs_and_path(root)[0].isdir(_fs_and_path(root)[1]) else {}
    by_name: dict[str, list[str]] = {}
    for uri in listed:
        by_name.setdefault(posixpath.basename(uri), []).append(uri)

    items: list[SourceItem] = []
    label_files: list[str | None] = []
    dead: list[DeadLetter] = []
    seen: set[str] = set()
    for row_number, row in enumerate(table.to_pylist(), start=2):  # line 1 is the header
        where = f"{manifest_uri}:{row_number}"
        filename = (row[filename_col] or "").strip()

        def reject(reason: str, message: str, *, stage: Stage = Stage.MANIFEST, uri: str = where, clip=None):
            dead.append(DeadLetter(uri, clip, stage, reason, "SourceError", message))

        if not filename:
            reject("empty_filename", f"row {row_number}: column {filename_col!r} is empty")
            continue
        uri = filename if "://" in filename or posixpath.isabs(filename) else f"{root}/{filename}"
        if "://" not in uri:  # one spelling per file: 'a/../b.wav' is 'b.wav' (duplicates, bounds)
            uri = posixpath.normpath(uri)
        clip_id = clip_id_for(uri, root)
        if uri not in listed:
            matches = by_name.get(posixpath.basename(filename), [])
            if len(matches) == 1:
                uri = matches[0]
                clip_id = clip_id_for(uri, root)
            elif not _exists(uri):
                reject(
                    "missing_file",
                    f"row {row_number}: file {filename!r} not found under {root!r}",
                    stage=Stage.SOURCE,
                    uri=uri,
                    clip=clip_id,
                )
                continue
        if not allow_outside_input and not _inside(uri, root):
            reject(
                "outside_input",
                f"row {row_number}: {filename!r} lies outside --input {root!r} "
                "(--allow-outside-input reads it)",
                uri=uri,
                clip=clip_id,
            )
            continue
        if uri in seen:
            reject(
                "duplicate_row",
                f"row {row_number}: {filename!r} is listed more than once",
                uri=uri,
                clip=clip_id,
            )
            continue
        label_file = None
        if labels_col and (row[labels_col] or "").strip():
            label_file = _resolve(row[labels_col].strip(), root=root, listed=listed, by_name=by_name)
            if not allow_outside_input and not _inside(label_file, root):
                reject(
                    "outside_input",
                    f"row {row_number}: {labels_col} {row[labels_col].strip()!r} lies outside --input "
                    f"{root!r} (--allow-outside-input reads it)",
                    uri=uri,
                    clip=clip_id,
                )
                continue
            if label_file not in listed and not _exists(label_file):
                reject(
                    "missing_labels",
                    f"row {row_number}: annotation file {row[labels_col].strip()!r} ({labels_col}) "
                    f"not found under {root!r}",
                    stage=Stage.SOURCE,
                    uri=uri,
                    clip=clip_id,
                )
                continue
        label = (row[label_col] or "").strip() if label_col else None
        # Under --labels a recording's labels come from its annotations: a clip label is optional.
        if label_col and not label and labels is None:
            reject(
                "empty_label",
                f"row {row_number}: {filename!r} has an empty {label_col!r}",
                uri=uri,
                clip=clip_id,
            )
            continue
        fold = None
        if fold_col and (row[fold_col] or "").strip():
            try:
                fold = int(row[fold_col])
            except ValueError:
                fold = None
            if fold is None or fold < 0:
                reject(
                    "bad_fold",
                    f"row {row_number}: {fold_col}={row[fold_col]!r} is not a fold number (0 or more)",
                    uri=uri,
                    clip=clip_id,
                )
                continue
        split = (row[split_col] or "").strip() or None if split_col else None
        extra = tuple((c, row[c]) for c in extra_columns if row[c] is not None)
        found = listed.get(uri)
        item = SourceItem(
            uri,
            clip_id,
            label or None,
            fold,
            split,
            extra,
            found.size_bytes if found else None,
            version=found.version if found else None,
            content=found.content if found else None,
        )
        try:
            item = recordings.annotate(item, recording, start_time=row[start_col] if start_col else None)
        except ValueError as exc:
            reject("bad_start_time", f"row {row_number}: {start_col}: {exc}", uri=uri, clip=clip_id)
            continue
        seen.add(uri)
        items.append(item)
        label_files.append(label_file)
    items = unique_clip_ids(items)
    if labels is not None:
        items, rejected = attach_annotations(
            items, labels=labels, files=label_files if labels_col else None, column=labels_col
        )
        dead += rejected
    return SourceListing(tuple(items), tuple(dead), extra_columns, label_map_of(items))


def _resolve(path: str, *, root: str, listed: Mapping, by_name: Mapping[str, list[str]]) -> str:
    """A manifest path as a URI, as audio paths resolve: against ``root``, else by its file name
    when exactly one file under ``root`` has it."""
    uri = path if "://" in path or posixpath.isabs(path) else f"{root}/{path}"
    if "://" not in uri:
        uri = posixpath.normpath(uri)
    if uri not in listed:
        matches = by_name.get(posixpath.basename(path), [])
        if len(matches) == 1:
            return matches[0]
    return uri


def attach_annotations(
    items: Sequence[SourceItem],
    *,
    labels: StrongLabels,
    files: Sequence[str | None] | None = None,
    column: str | None = None,
    workers: int = ANNOTATION_READERS,
) -> tuple[list[SourceItem], list[DeadLetter]]:
    """Reads each recording's annotation file into ``SourceItem.annotations`` (on the launcher,
    ``workers`` files at a time, through fsspec).

    Outcomes per recording: its events (sorted ``(start_s, end_s, label)``; ``()`` for an empty
    file: annotated, all background); without a file, as ``labels.optional`` says (a dead letter
    ``missing_labels``, stage ``source``; or kept); a file that does not parse, or has an empty
    or reserved label, a dead letter ``bad_labels`` whose message names the file and line; a
    store that fails, ``storage_error``. Never a stop of the run.

    Args:
        items: The recordings (no archive members).
        labels: The ``--labels`` settings.
        files: Per item, the annotation file its manifest row names (``None``: none named);
            ``None`` looks for the file beside each recording
            (``transforms.annotations.find_annotation``).
        column: The manifest column ``files`` come from, for messages.
        workers: Files looked up and read at once.

    Returns:
        ``(items kept, dead letters)``, items in their order.
    """
    import concurrent.futures

    if files is not None and len(files) != len(items):
        raise ValueError(f"{len(files)} annotation files for {len(items)} items")

    def read(k: int) -> SourceItem | DeadLetter:
        item = items[k]
        try:
            path = annotations.find_annotation(item.uri) if files is None else files[k]
            if path is not None:
                events = strong_labels.events_of(annotations.read_annotations(path), source=path)
                return dataclasses.replace(item, annotations=events)
        except annotations.AnnotationError as exc:
            return DeadLetter(
                item.uri, item.clip_id, Stage.SOURCE, "bad_labels", type(exc).__name__, str(exc)
            )
        except OSError as exc:  # the store failed while looking for the file: worth a retry
            message = f"cannot look up the annotation file of {item.uri}: {exc}"
            return DeadLetter(
                item.uri, item.clip_id, Stage.SOURCE, "storage_error", type(exc).__name__, message
            )
        if labels.optional:
            return item if item.label else dataclasses.replace(item, annotations=())
        if files is None:
            stem = posixpath.splitext(posixpath.basename(item.uri.split("::", 1)[0].split("?", 1)[0]))[0]
            looked = ", ".join(stem + s for s in (*annotations.RAVEN_SUFFIXES, annotations.AUDACITY_SUFFIX))
            where = f"no annotation file beside it ({looked})"
        else:
            where = f"its manifest row names no annotation file (column {column!r} is empty)"
        return DeadLetter(
            item.uri,
            item.clip_id,
            Stage.SOURCE,
            "missing_labels",
            "SourceError",
            f"{item.uri}: {where}; --labels-optional keeps such recordings (as background, or "
            "weakly labelled by their clip label)",
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(pool.map(read, range(len(items))))
    kept = [o for o in outcomes if isinstance(o, SourceItem)]
    return kept, [o for o in outcomes if isinstance(o, DeadLetter)]


def label_map_of(items: Sequence[SourceItem]) -> dict[str, int]:
    """Label name to index, sorted by name, over the clip labels and annotation labels of
    ``items``."""
    names = [i.label for i in items]
    names += [event[2] for i in items for event in i.annotations or ()]
    return _label_map(names)


def _inside(uri: str, root: str) -> bool:
    """Whether ``uri`` names something under the folder ``root`` (``..`` resolved)."""
    if "://" in root or "://" in uri:
        (scheme, _, path), (root_scheme, _, root_path) = uri.partition("://"), root.partition("://")
        if scheme != root_scheme:
            return False
    else:
        path, root_path = os.path.abspath(uri), os.path.abspath(root)
    path, root_path = posixpath.normpath(path), posixpath.normpath(root_path)
    return path.startswith(root_path.rstrip("/") + "/")


def _exists(uri: str) -> bool:
    fs, path = _fs_and_path(uri)
    try:
        return fs.isfile(path)
    except OSError:
        return False


def _label_map(labels) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted({lab for lab in labels if lab}))}


#: Block size of the read-ahead buffer for object-store reads (libsndfile reads in small pieces).
READ_BLOCK_BYTES = 4 * 2**20
#: Largest range asked for in one request (larger reads take several), so that a request's time
#: limit stays meaningful.
_MAX_REQUEST_BYTES = 4 * READ_BLOCK_BYTES
#: Archives kept open (with their member index) per process.
_OPEN_ARCHIVES = 4
#: Environment variables that override the ``StorageRetry`` defaults: prefix + upper-case field name.
STORAGE_ENV_PREFIX = "SOUNDSHARD_STORAGE_"
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


@dataclasses.dataclass(frozen=True)
class StorageRetry:
    """How reads from object stores retry transient errors, and how many run at once.

    Every request gets at most ``attempt_timeout_s``. A request that fails with a transient error
    (connection reset or refused, timeout, HTTP 408/429/5xx) is sent again after an exponential
    backoff with jitter: ``min(max_backoff_s, backoff_s * 2**k)`` times a random factor in
    [0.5, 1] before the k-th retry. It gives up after ``attempts`` requests or when ``deadline_s``
    has passed since the first, whichever comes first; the store's error is then a ``StorageError``.
    The defaults let a short outage pass (about 1 to 2 s of backoff in all) and keep an object that
    never answers from holding a worker for more than ``deadline_s``.

    Each field can be set in the environment of the processes that read (workers):
    ``SOUNDSHARD_STORAGE_ATTEMPTS``, ``SOUNDSHARD_STORAGE_ATTEMPT_TIMEOUT_S``, ...

    Attributes:
        attempts: Requests per read, the first included (1: no retries).
        attempt_timeout_s: Limit of one request, in seconds.
        deadline_s: Limit of one read with all its retries, in seconds.
        backoff_s: Pause before the first retry (before jitter), in seconds.
        max_backoff_s: Longest pause between two attempts, in seconds.
        read_ahead: Objects whose first blocks one planner fetches at once (``1``: one after
            another). Each read waits a round trip on the store; several in flight hide it. The
            reads run together on the filesystem's event loop, so more costs little.
        cache_mb: Megabytes of small objects a worker process keeps between the header read
            and the decoding (``FETCHED``; 0: none kept, every object is fetched twice).

    Raises:
        ConfigError: a value out of range (the message names it).
    """

    attempts: int = 4
    attempt_timeout_s: float = 10.0
    deadline_s: float = 30.0
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    read_ahead: int = 8
    cache_mb: float = 128.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ConfigError(f"storage retry attempts={self.attempts} must be at least 1")
        if self.read_ahead < 1:
            raise ConfigError(f"storage read_ahead={self.read_ahead} must be at least 1")
        for name in ("attempt_timeout_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"storage retry {name}={getattr(self, name)} must be positive")
        for name in ("backoff_s", "max_backoff_s", "cache_mb"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"storage retry {name}={getattr(self, name)} must not be negative")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageRetry:
        """The defaults, overridden by ``SOUNDSHARD_STORAGE_<FIELD>`` variables.

        Raises:
            ConfigError: a variable that is not a number, or out of range; the message names it.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = STORAGE_ENV_PREFIX + field.name.upper()
            if environ.get(name, "").strip():
                kind = int if field.type in (int, "int") else float
                try:
                    values[field.name] = kind(environ[name])
                except ValueError as exc:
                    raise ConfigError(f"{name}={environ[name]!r} is not {kind.__name__}") from exc
        return cls(**values)

    def pause_s(self, retry: int) -> float:
        """Backoff before retry number ``retry`` (0 for the first), with jitter."""
        return min(self.max_backoff_s, self.backoff_s * 2**retry) * random.uniform(0.5, 1.0)


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
        limit_bytes: Most bytes held; ``None`` reads ``StorageRetry.cache_mb`` when first used.
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
                self._limit = int(StorageRetry.from_env().cache_mb * 2**20)
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


@functools.cache
def _single_attempt_class(cls: type) -> type:
    """``cls`` without its own retry loop, so that ``StorageRetry`` alone decides (and counts).

    gcsfs retries HTTP 408/429/5xx and connection errors up to 6 times per request, sleeping
    1, 2, 4, 8 and 16 s plus up to 1 s of jitter each (31 to 36 s per request); the subclass keeps
    its request method without the retry decorator. s3fs retries up to 5 times (0.1 to 0.8 s
    apart) around each botocore call, nested twice for file reads, and botocore retries up to 4
    more times itself with exponential backoff; the subclass sets ``retries`` to 1 and
    ``_single_attempt`` turns botocore's retries off and its timeouts down. Other
    filesystems are used as they are; a layout of gcsfs this does not know keeps its retry loop,
    and each attempt is still cut off at ``StorageRetry.attempt_timeout_s``.
    """
    import gcsfs
    import s3fs

    if issubclass(cls, gcsfs.GCSFileSystem):
        request = getattr(cls._request, "__wrapped__", None)
        if request is None or not inspect.iscoroutinefunction(request):
            return cls

        class SingleAttemptGCSFileSystem(cls):
            _request = request

        return SingleAttemptGCSFileSystem
    if issubclass(cls, s3fs.S3FileSystem):

        class SingleAttemptS3FileSystem(cls):
            retries = 1

        return SingleAttemptS3FileSystem
    return cls


def _single_attempt(fs: fsspec.AbstractFileSystem, retry: StorageRetry) -> fsspec.AbstractFileSystem:
    """A filesystem like ``fs`` (same options) whose requests are not retried inside it."""
    cls = _single_attempt_class(type(fs))
    if cls is type(fs):
        return fs
    options = dict(fs.storage_options)
    import s3fs

    if isinstance(fs, s3fs.S3FileSystem):
        options["config_kwargs"] = {
            **options.get("config_kwargs", {}),
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": retry.attempt_timeout_s,
            "read_timeout": retry.attempt_timeout_s,
        }
    return cls(*fs.storage_args, **options)


class RemoteFile(io.RawIOBase):
    """An object in a store, read by byte ranges with a read-ahead block and retried requests.

    libsndfile and tarfile read in small pieces and seek back and forth near them; the block (the
    last range fetched, at least ``READ_BLOCK_BYTES``) turns that into few range requests. Each
    request retries transient errors (``StorageRetry``). A read that gives up raises a
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
        retry: StorageRetry,
        size_bytes: int | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
    ):
        super().__init__()
        self.uri = uri
        self.retry = retry
        self.on_retry = on_retry
        self.storage_error: StorageError | None = None
        fs, self._path = fsspec.core.url_to_fs(uri)
        self._fs = _single_attempt(fs, retry)
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

    def _call(self, method: str, *args, timeout_s: float, **kwargs):
        """``fs.<method>``; on an async filesystem cancelled after ``timeout_s`` (with any retry
        loop of its own)."""
        if getattr(self._fs, "async_impl", False):
            from fsspec.asyn import sync

            return sync(self._fs.loop, getattr(self._fs, "_" + method), *args, timeout=timeout_s, **kwargs)
        return getattr(self._fs, method)(*args, **kwargs)

    def _retried(self, what: str, method: str, *args, **kwargs):
        """``fs.<method>(*args, **kwargs)``, retried as ``StorageRetry`` says."""
        if self.storage_error is not None:
            raise self.storage_error
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            timeout_s = self._attempt_timeout_s(started)
            try:
                return self._call(method, *args, timeout_s=timeout_s, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below; the cause is kept
                pause_s = self._after_failure(
                    what, exc, attempt=attempt, started=started, timeout_s=timeout_s
                )
            time.sleep(pause_s)

    async def _retried_async(self, what: str, method: str, *args, **kwargs):
        """As ``_retried``, as a coroutine on the event loop of an async filesystem."""
        if self.storage_error is not None:
            raise self.storage_error
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            timeout_s = self._attempt_timeout_s(started)
            try:
                return await asyncio.wait_for(getattr(self._fs, "_" + method)(*args, **kwargs), timeout_s)
            except Exception as exc:  # noqa: BLE001 - classified below; the cause is kept
                pause_s = self._after_failure(
                    what, exc, attempt=attempt, started=started, timeout_s=timeout_s
                )
            await asyncio.sleep(pause_s)

    def _attempt_timeout_s(self, started: float) -> float:
        deadline = started + self.retry.deadline_s
        return max(0.001, min(self.retry.attempt_timeout_s, deadline - time.monotonic()))

    def _after_failure(
        self, what: str, failed: Exception, *, attempt: int, started: float, timeout_s: float
    ) -> float:
        """The pause before the next attempt after ``failed``; or, when the error is not
        transient or the attempts or the deadline are spent, raises (and keeps) the StorageError."""
        retry = self.retry
        description = _describe(failed, timeout_s)
        pause_s = retry.pause_s(attempt - 1)
        transient = is_transient(failed)
        if transient and attempt < retry.attempts and time.monotonic() + pause_s < started + retry.deadline_s:
            _LOG.info(
                "%s: %s: attempt %d failed, retry in %.2f s: %s",
                self.uri,
                what,
                attempt,
                pause_s,
                description,
            )
            if self.on_retry is not None:
                self.on_retry(failed)
            return pause_s
        elapsed_s = time.monotonic() - started
        if transient:
            why = f"gave up after {attempt} attempt(s) in {elapsed_s:.1f} s"
        else:
            why = "failed (not retried: not a transient error)"
        reason = "missing_file" if isinstance(failed, FileNotFoundError) else "storage_error"
        error = StorageError(f"{self.uri}: {what} {why}: {description}", reason=reason)
        error.__cause__ = failed
        self.storage_error = error
        raise error

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

    def _needs_fill(self) -> bool:
        return not 0 <= self._pos - self._block_start < len(self._block) and self._pos < self.size

    def fill(self) -> None:
        """Fetches the read-ahead block at the current position now, unless it is held already.

        A decoder can then open the file from memory: soundfile opens files one at a time (a
        process-wide lock around libsndfile's open), so a first read that waits on the store
        inside the open would make every other thread's open wait too.
        """
        if self._needs_fill():
            self._fetch(READ_BLOCK_BYTES)

    async def _fill_async(self) -> None:
        if self._needs_fill():
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


def _open_remote(
    uri: str,
    *,
    size_bytes: int | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> RemoteFile:
    """Opens a URL for reading with a read-ahead buffer and retried requests (``StorageRetry``
    from the environment). Without ``size_bytes`` the object's size is asked first.

    Raises:
        StorageError: the size could not be read.
        ConfigError: a bad ``SOUNDSHARD_STORAGE_*`` variable.
    """
    return RemoteFile(uri, retry=StorageRetry.from_env(), size_bytes=size_bytes, on_retry=on_retry)


def fill_all(files: Sequence[RemoteFile], *, in_flight: int) -> None:
    """``fill()`` of every file, with up to ``in_flight`` requests at once.

    Reads on an async filesystem (gcsfs, s3fs) run together on its event loop, each with its own
    retries; others one after another. A read that gives up leaves its ``StorageError`` in the
    file's ``storage_error`` (raised by its next read) instead of raising here. Each file's
    ``on_retry`` is called on the calling thread, after all reads are done.
    """
    together = []
    for f in files:
        if getattr(f._fs, "async_impl", False) and f._needs_fill():
            together.append(f)
        else:
            with contextlib.suppress(StorageError):
                f.fill()
    if not together:
        return
    from fsspec.asyn import sync

    callbacks = {f: f.on_retry for f in together}
    failures: dict[RemoteFile, list[BaseException]] = {f: [] for f in together}
    by_loop: dict[int, list[RemoteFile]] = collections.defaultdict(list)
    for f in together:  # fsspec's async filesystems normally share one loop
        f.on_retry = failures[f].append
        by_loop[id(f._fs.loop)].append(f)

    async def fill_each(group: list[RemoteFile]):
        limit = asyncio.Semaphore(max(1, in_flight))

        async def fill_one(f: RemoteFile):
            async with limit:
                with contextlib.suppress(StorageError):
                    await f._fill_async()

        await asyncio.gather(*(fill_one(f) for f in group))

    try:
        for group in by_loop.values():
            sync(group[0]._fs.loop, fill_each, group)
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
            self.file = _open_remote(archive_uri, on_retry=on_retry)
        if protocol == "zip":
            self._archive = zipfile.ZipFile(self.file)
            infos = [(i.filename, i) for i in self._archive.infolist()]
        else:
            self._archive = _tar(self.file, stream=False, compression=options.get("compression"))
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


@functools.lru_cache(maxsize=_OPEN_ARCHIVES)
def _open_archive(archive_uri: str) -> _OpenArchive:
    return _OpenArchive(archive_uri)


def close_archives() -> None:
    """Forgets the archives this process keeps open (called when a worker's DoFns tear down)."""
    _open_archive.cache_clear()


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
    fs, path = _fs_and_path(uri)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in ("gs", "gcs", "s3", "s3a"):
        return
    bucket = path.split("/", 1)[0]
    shown = redact(f"{protocol}://{bucket}")
    single = _single_attempt(fs, StorageRetry(attempts=1, attempt_timeout_s=timeout_s))
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


def open_source(
    uri: str,
    *,
    size_bytes: int | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
):
    """Opens an input for reading: a local path as is, a URL as a ``RemoteFile``.

    Remote reads retry transient errors (``StorageRetry``); one that gives up raises a
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
            close_archives()
            if failure is exc:
                raise
            raise failure from failure.__cause__  # the store's error, not what tarfile made of it
        own = _OpenArchive(archive_uri, on_retry)
        stream = own.open(member)
        stream.archive = own  # keeps the archive's file open as long as the stream
        return stream
    return _open_remote(uri, size_bytes=size_bytes, on_retry=on_retry)
