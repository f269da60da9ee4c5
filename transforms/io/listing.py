"""Input listing: folders, globs and manifests become SourceItems and dead letters (no Beam).

Listing runs once on the launcher (one recursive listing per input root, not one request per
file); decoding and header probing happen on the workers. Archives are listed member by member
(``archives.py``); objects are read through ``storage.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence

import fsspec
import pyarrow as pa

from soundshard.schemas.config import RecordingConfig
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.outcomes import Stage
from soundshard.schemas.records import DeadLetter, SourceItem
from soundshard.schemas.uris import redact
from soundshard.transforms.audio import recordings
from soundshard.transforms.io.archives import (
    ARCHIVES,
    archive_kind,
    list_archive,
    member_problem,
    strip_archive_suffix,
)
from soundshard.transforms.io.storage import (
    content_digest,
    fs_and_path,
    object_content,
    object_version,
    unstrip,
)
from soundshard.transforms.labels import annotations, strong_labels

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".opus")
_GLOB_CHARS = "*?["
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
    ``transforms/labels/annotations.py``) is the file named in the manifest's labels column, or else the
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


def _is_glob(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` is a pattern; in an HTTP(S) URL, ``?`` starts the query (signed URLs)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "http" in protocols or "https" in protocols:
        path = path.split("?", 1)[0]
    return any(ch in path for ch in _GLOB_CHARS)


def is_audio(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(extensions))


@dataclasses.dataclass(frozen=True)
class Listed:
    """What a listing says about one object: its size, its version and, when the store gives
    one, a digest of its content."""

    size_bytes: int | None
    version: str | None
    content: str | None = None


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
    fs, path = fs_and_path(input_uri)
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
        unstrip(fs, p): Listed(info.get("size"), object_version(info), object_content(info))
        for p, info in sorted(entries.items())
        if not extensions or is_audio(p, extensions)
    }


def input_root(input_uri: str) -> str:
    """The folder clip ids are relative to: the input folder, or a glob's fixed prefix."""
    fs, path = fs_and_path(input_uri)
    if _is_glob(fs, path):
        head = path
        while any(ch in head for ch in _GLOB_CHARS):
            head = posixpath.dirname(head)
        return unstrip(fs, head)
    if fs.isdir(path):
        return unstrip(fs, path.rstrip("/"))
    return unstrip(fs, posixpath.dirname(path))


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
    prefix = strip_archive_suffix(clip_id_for(uri, root) + posixpath.splitext(uri)[1])
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
        selected = fnmatch.fnmatch(name, member_glob) if member_glob else is_audio(name, AUDIO_EXTENSIONS)
        if not selected:
            continue
        member_uri = f"{protocol}://{member.key}::{uri}"
        problem = member_problem(name, kind)
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
    listed = list_audio(root, extensions=()) if fs_and_path(root)[0].isdir(fs_and_path(root)[1]) else {}
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
    fs, path = fs_and_path(uri)
    try:
        return fs.isfile(path)
    except OSError:
        return False


def _label_map(labels) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted({lab for lab in labels if lab}))}
