"""Input listing: folders, globs and manifests become SourceItems and dead letters (no Beam).

Listing runs once on the launcher (one recursive listing per input root, not one request per
file); decoding and header probing happen on the workers.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import posixpath
import threading
from collections.abc import Sequence

import fsspec
import pyarrow as pa

from soundshard.schemas.config import RecordingConfig
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.records import DeadLetter, SourceItem
from soundshard.transforms import recordings

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
DEFAULT_RECORDING = RecordingConfig()


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


def _is_audio(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(extensions))


@dataclasses.dataclass(frozen=True)
class Listed:
    """What a listing says about one object: its size and what identifies this content."""

    size_bytes: int | None
    version: str | None


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


def list_audio(input_uri: str, *, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> dict[str, Listed]:
    """Audio files under a folder, matching a glob (``**`` allowed), or a single file.

    Returns:
        ``{uri: Listed}`` sorted by URI.

    Raises:
        ConfigError: when the input does not exist.
    """
    fs, path = _fs_and_path(input_uri)
    if any(ch in path for ch in _GLOB_CHARS):
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
        _unstrip(fs, p): Listed(info.get("size"), object_version(info))
        for p, info in sorted(entries.items())
        if not extensions or _is_audio(p, extensions)
    }


def input_root(input_uri: str) -> str:
    """The folder clip ids are relative to: the input folder, or a glob's fixed prefix."""
    fs, path = _fs_and_path(input_uri)
    if any(ch in path for ch in _GLOB_CHARS):
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
    relative = uri[len(prefix) :] if uri.startswith(prefix) else posixpath.basename(uri)
    stem, _ = posixpath.splitext(relative)
    return stem


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


def list_archive(uri: str) -> list[tuple[str, str, int | None]]:
    """Members of a tar/zip archive as ``(name, kind, size)``; kind is file/directory/link/other.

    Reads the zip central directory, or scans the tar headers (a compressed tar is decompressed
    once for that).
    """
    import stat
    import tarfile
    import zipfile

    protocol, options = archive_kind(uri)
    members = []
    fs, path = _fs_and_path(uri)
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
                    members.append((info.filename, kind, info.file_size))
        else:
            compression = {"gzip": "gz", "bz2": "bz2", "xz": "xz"}.get(options.get("compression"), "")
            with tarfile.open(fileobj=f, mode=f"r|{compression}") as archive:
                for info in archive:
                    if info.isfile():
                        kind = "file"
                    elif info.isdir():
                        kind = "directory"
                    elif info.issym() or info.islnk():
                        kind = "link"
                    else:
                        kind = "other"
                    members.append((info.name, kind, info.size))
    return members


def expand_archive(
    uri: str,
    *,
    root: str,
    member_glob: str | None = None,
    label_from_parent: bool = False,
    version: str | None = None,
) -> tuple[list[SourceItem], list[DeadLetter]]:
    """SourceItems for the audio members of an archive; unsafe members become dead letters.

    Member names never become output paths, but names that point outside the archive
    (absolute, ``..``) and links are refused all the same, as an extractor would have to.

    Args:
        uri: The archive.
        root: Folder clip ids are relative to.
        member_glob: ``fnmatch`` pattern on member paths; default: audio extensions.
        label_from_parent: Label = the member's parent folder name.
        version: The archive's version (from its listing); members inherit it.
    """
    import fnmatch

    protocol, _ = archive_kind(uri)
    prefix = _strip_archive_suffix(clip_id_for(uri, root) + posixpath.splitext(uri)[1])
    items, dead = [], []
    try:
        members = list_archive(uri)
    except Exception as exc:  # noqa: BLE001 - a bad archive is a dead letter, not a stop
        dead.append(
            DeadLetter(
                uri, prefix, "source", "bad_archive", type(exc).__name__, f"cannot list archive {uri}: {exc}"
            )
        )
        return items, dead
    for name, kind, size in members:
        if kind == "directory":
            continue
        selected = fnmatch.fnmatch(name, member_glob) if member_glob else _is_audio(name, AUDIO_EXTENSIONS)
        if not selected:
            continue
        member_uri = f"{protocol}://{name}::{uri}"
        problem = _member_problem(name, kind)
        clip_id = f"{prefix}/{posixpath.splitext(name.lstrip('/'))[0]}"
        if problem:
            dead.append(
                DeadLetter(member_uri, clip_id, "source", "unsafe_member", "SourceError", f"{uri}: {problem}")
            )
            continue
        label = posixpath.basename(posixpath.dirname(name)) or None if label_from_parent else None
        items.append(
            SourceItem(member_uri, clip_id, label, size_bytes=size, archive_member=name, version=version)
        )
    return items, dead


def from_listing(
    input_uri: str,
    *,
    label_from_parent: bool = False,
    member_glob: str | None = None,
    recording: RecordingConfig = DEFAULT_RECORDING,
) -> SourceListing:
    """Sources for every audio file under ``input_uri`` and every audio member of its archives.

    Labels come from parent folders if asked; start times from recorder file names and sites
    from the path as ``recording`` says.
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
            )
        )
    items = [recordings.annotate(item, recording) for item in items]
    return SourceListing(tuple(items), tuple(dead), (), _label_map(i.label for i in items))


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
) -> SourceListing:
    """Sources for each manifest row; bad rows become dead letters, never silent drops.

    Relative paths resolve against ``input_uri``; a path not found there is looked up by file name
    anywhere under it (UrbanSound8K keeps ``fold*/`` folders out of its manifest). Start times
    come from the start-time column, else (as ``recording`` says) from recorder file names.

    Raises:
        ConfigError: unreadable manifest, no filename column, unknown column names.
    """
    table = read_table(manifest_uri)
    names = table.column_names
    filename_col = _pick(names, columns.filename, FILENAME_CANDIDATES, "filename")
    if filename_col is None:
        raise ConfigError(
            f"--manifest {manifest_uri!r} has no filename column (looked for {FILENAME_CANDIDATES}); "
            f"columns: {names}; set --filename_column"
        )
    label_col = _pick(names, columns.label, LABEL_CANDIDATES, "label")
    fold_col = _pick(names, columns.fold, ("fold",), "fold")
    split_col = _pick(names, columns.split, ("split",), "split")
    start_col = _pick(names, columns.start_time, START_TIME_CANDIDATES, "start_time")
    used = {filename_col, label_col, fold_col, split_col, start_col}
    extra_columns = tuple(n for n in names if n not in used)

    root = input_uri.rstrip("/")
    listed = list_audio(root, extensions=()) if _fs_and_path(root)[0].isdir(_fs_and_path(root)[1]) else {}
    by_name: dict[str, list[str]] = {}
    for uri in listed:
        by_name.setdefault(posixpath.basename(uri), []).append(uri)

    items: list[SourceItem] = []
    dead: list[DeadLetter] = []
    seen: set[str] = set()
    all_labels = []
    for row_number, row in enumerate(table.to_pylist(), start=2):  # line 1 is the header
        where = f"{manifest_uri}:{row_number}"
        filename = (row[filename_col] or "").strip()

        def reject(reason: str, message: str, *, stage: str = "manifest", uri: str = where, clip=None):
            dead.append(DeadLetter(uri, clip, stage, reason, "SourceError", message))

        if not filename:
            reject("empty_filename", f"row {row_number}: column {filename_col!r} is empty")
            continue
        uri = filename if "://" in filename or posixpath.isabs(filename) else f"{root}/{filename}"
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
                    stage="source",
                    uri=uri,
                    clip=clip_id,
                )
                continue
        if clip_id in seen:
            reject(
                "duplicate_row",
                f"row {row_number}: {filename!r} is listed more than once",
                uri=uri,
                clip=clip_id,
            )
            continue
        label = (row[label_col] or "").strip() if label_col else None
        if label_col and not label:
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
                reject(
                    "bad_fold",
                    f"row {row_number}: {fold_col}={row[fold_col]!r} is not an integer",
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
        )
        try:
            item = recordings.annotate(item, recording, start_time=row[start_col] if start_col else None)
        except ValueError as exc:
            reject("bad_start_time", f"row {row_number}: {start_col}: {exc}", uri=uri, clip=clip_id)
            continue
        seen.add(clip_id)
        all_labels.append(label)
        items.append(item)
    return SourceListing(tuple(items), tuple(dead), extra_columns, _label_map(all_labels))


def _exists(uri: str) -> bool:
    fs, path = _fs_and_path(uri)
    try:
        return fs.isfile(path)
    except OSError:
        return False


def _label_map(labels) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted({lab for lab in labels if lab}))}


#: Block size of the read-ahead cache for object-store reads (libsndfile reads in small pieces).
READ_BLOCK_BYTES = 4 * 2**20
#: Archives kept open (with their member index) per process.
_OPEN_ARCHIVES = 4


def _open_remote(uri: str):
    """Opens a URL through fsspec with a read-ahead cache of ``READ_BLOCK_BYTES``.

    libsndfile and tarfile read in small pieces; the read-ahead cache turns them into few requests
    (gcsfs's default would issue one request per 8 KB read, and its adaptive background cache has
    been seen to hang when tarfile seeks through a gzip stream).
    """
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.open(path, "rb", cache_type="readahead", block_size=READ_BLOCK_BYTES)


class _OpenArchive:
    """An archive opened once per process: its member index and a lock for reads from it."""

    def __init__(self, archive_uri: str):
        protocol, options = archive_kind(archive_uri)
        local = "://" not in archive_uri or archive_uri.startswith("file://")
        self.file = open(archive_uri.removeprefix("file://"), "rb") if local else _open_remote(archive_uri)
        self.fs = fsspec.filesystem(protocol, fo=self.file, skip_instance_cache=True, **options)
        self.lock = threading.Lock()


@functools.lru_cache(maxsize=_OPEN_ARCHIVES)
def _open_archive(archive_uri: str) -> _OpenArchive:
    return _OpenArchive(archive_uri)


def close_archives() -> None:
    """Forgets the archives this process keeps open (called when a worker's DoFns tear down)."""
    _open_archive.cache_clear()


def open_source(uri: str):
    """Opens an input for reading: a local path as is, a URL through fsspec (read-ahead cache).

    Archive members (``tar://name::archive``, ``zip://name::archive``) are read from an archive
    opened once per process, so a tar's member index is built once, not once per member. A member
    up to ``_MEMBER_IN_MEMORY_BYTES`` is returned as bytes in memory (compressed tars seek by
    re-reading, and the shared archive must not be read by two threads at once); a larger one
    streams from its own handle on the archive.
    """
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    if "::" in uri:
        member_url, archive_uri = uri.split("::", 1)
        member = member_url.split("://", 1)[1]
        archive = _open_archive(archive_uri)
        with archive.lock:
            size = archive.fs.size(member)
            if size is not None and size <= _MEMBER_IN_MEMORY_BYTES:
                with archive.fs.open(member, "rb") as f:
                    return io.BytesIO(f.read())
        own = _OpenArchive(archive_uri)
        stream = own.fs.open(member, "rb")
        stream.archive = own  # keeps the archive's file open as long as the stream
        return stream
    return _open_remote(uri)
