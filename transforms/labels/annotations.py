"""Time-stamped annotation files: Audacity label tracks and Raven selection tables.

Pure Python (no Beam, no TF): read by ``soundshard score`` as the reference to score tags
against, and meant for strong-label feature extraction. Both formats become a list of
:class:`Annotation` (seconds from the recording start, label, optional frequency band).

- **Audacity label track** (``File > Export > Export Labels``): one label per line,
  ``start<TAB>end<TAB>label``; the label may be empty or hold spaces; ``start == end`` is a point
  label. A label with a spectral selection is followed by a line ``\\<TAB>low_hz<TAB>high_hz``
  (Audacity writes ``-1`` for an undefined bound).
- **Raven selection table** (``*.Table.1.selections.txt``): tab-separated with a header row that
  holds at least ``Begin Time (s)`` and ``End Time (s)``; the label is the first present of
  :data:`LABEL_COLUMNS`; ``Low Freq (Hz)`` and ``High Freq (Hz)`` are optional. Raven writes one
  row per view (Waveform, Spectrogram) of a selection: rows sharing a ``Selection`` number are
  one annotation.

The format is told from the first non-empty line (a header naming ``Begin Time (s)`` is Raven).
A UTF-8 byte order mark and CRLF or CR line ends are accepted, blank lines are skipped. Anything
else that does not parse raises :class:`AnnotationError` naming the file, the 1-based line and
what is wrong; nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
from collections.abc import Sequence

from soundshard.schemas.errors import ConfigError

#: Raven columns the label is taken from, first present wins.
LABEL_COLUMNS = ("Annotation", "Label", "Species", "Class", "Sound Type", "Call Type")
BEGIN_COLUMN = "Begin Time (s)"
END_COLUMN = "End Time (s)"
LOW_COLUMN = "Low Freq (Hz)"
HIGH_COLUMN = "High Freq (Hz)"
#: File name endings of annotation files, most specific first (Raven's before Audacity's ``.txt``).
RAVEN_SUFFIXES = (".Table.1.selections.txt", ".selections.txt")
AUDACITY_SUFFIX = ".txt"
_RAVEN_TABLE = re.compile(r"\.Table\.\d+\.selections\.txt$", re.IGNORECASE)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Times within this of each other are the same (Raven's views of one selection repeat its times
# rounded to the same digits; only a real disagreement is an error).
_SAME_TIME_S = 1e-6


class AnnotationError(ConfigError):
    """An annotation file cannot be read or parsed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotated stretch of a recording.

    Attributes:
        start_s: Start, seconds from the recording start (>= 0).
        end_s: End, seconds from the recording start (>= ``start_s``; equal for a point label).
        label: The label text (may be empty).
        low_hz: Lower edge of the frequency band, or ``None`` when not given.
        high_hz: Upper edge of the frequency band, or ``None`` when not given.
    """

    start_s: float
    end_s: float
    label: str
    low_hz: float | None = None
    high_hz: float | None = None

    @property
    def duration_s(self) -> float:
        """Length in seconds (0 for a point label)."""
        return self.end_s - self.start_s


def _lines(text: str) -> list[str]:
    # Physical lines, so that reported line numbers are those an editor shows; str.splitlines
    # would also split on form feeds and Unicode separators inside labels.
    lines = _LINE_BREAK.split(text.removeprefix("\ufeff"))
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def detect_format(text: str) -> str | None:
    """The format of annotation text: ``raven``, ``audacity``, or ``None`` when it has no
    non-empty line.

    A first non-empty line with a ``Begin Time (s)`` or ``End Time (s)`` cell, or starting with a
    ``Selection`` cell, is Raven's header; anything else is read as an Audacity label track.
    """
    for line in _lines(text):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split("\t")]
        if BEGIN_COLUMN in cells or END_COLUMN in cells or cells[0] == "Selection":
            return "raven"
        return "audacity"
    return None


def _time(value: str, *, what: str, where: str) -> float:
    try:
        seconds = float(value.strip())
    except ValueError:
        raise AnnotationError(f"{where}: {what} {value.strip()!r} is not a number (seconds)") from None
    if not math.isfinite(seconds):
        raise AnnotationError(f"{where}: {what} {value.strip()!r} is not a finite number (seconds)")
    if seconds < 0:
        raise AnnotationError(f"{where}: {what} {seconds:g} s is negative")
    return seconds


def _frequency(value: str, *, what: str, where: str) -> float | None:
    text = value.strip()
    if not text:
        return None
    try:
        hz = float(text)
    except ValueError:
        raise AnnotationError(f"{where}: {what} {text!r} is not a number (Hz)") from None
    if not math.isfinite(hz):
        raise AnnotationError(f"{where}: {what} {text!r} is not a finite number (Hz)")
    # Audacity writes -1 for a bound the spectral selection leaves undefined.
    return None if hz < 0 else hz


def _checked(start_s: float, end_s: float, *, where: str) -> None:
    if end_s < start_s:
        raise AnnotationError(f"{where}: end {end_s:g} s is before start {start_s:g} s")


def parse_audacity(text: str, *, source: str = "<text>") -> list[Annotation]:
    """Annotations of an Audacity label track.

    Args:
        text: The file's text.
        source: Name of the file, for error messages.

    Returns:
        The labels in file order.

    Raises:
        AnnotationError: naming ``source``, the 1-based line and the problem.
    """
    out: list[Annotation] = []
    for number, line in enumerate(_lines(text), start=1):
        where = f"{source}:{number}"
        if not line.strip():
            continue
        if line.startswith("\\"):
            cells = line.split("\t")
            if cells[0].strip() != "\\" or len(cells) < 3:
                raise AnnotationError(
                    f"{where}: spectral selection line {line!r} is not '\\<TAB>low_hz<TAB>high_hz'"
                )
            if not out:
                raise AnnotationError(f"{where}: spectral selection line before any label")
            low = _frequency(cells[1], what="low frequency", where=where)
            high = _frequency(cells[2], what="high frequency", where=where)
            if low is not None and high is not None and high < low:
                raise AnnotationError(f"{where}: high frequency {high:g} Hz is below low {low:g} Hz")
            out[-1] = dataclasses.replace(out[-1], low_hz=low, high_hz=high)
            continue
        cells = line.split("\t", 2)
        if len(cells) < 2:
            raise AnnotationError(f"{where}: expected tab-separated 'start<TAB>end<TAB>label', got {line!r}")
        start_s = _time(cells[0], what="start", where=where)
        end_s = _time(cells[1], what="end", where=where)
        _checked(start_s, end_s, where=where)
        label = cells[2].strip() if len(cells) > 2 else ""
        out.append(Annotation(start_s, end_s, label))
    return out


def parse_raven(
    text: str, *, source: str = "<text>", label_columns: Sequence[str] = LABEL_COLUMNS
) -> list[Annotation]:
    """Annotations of a Raven selection table (one per selection, its views counted once).

    Args:
        text: The file's text.
        source: Name of the file, for error messages.
        label_columns: Columns the label may come from, first present wins.

    Returns:
        The selections in file order (of their first row).

    Raises:
        AnnotationError: naming ``source``, the 1-based line and the problem (missing columns,
            no label column, bad or negative times, end before start, views of a selection
            that disagree on its times).
    """
    lines = _lines(text)
    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None:
        return []
    header = [c.strip() for c in lines[header_at].split("\t")]
    where = f"{source}:{header_at + 1}"
    missing = [c for c in (BEGIN_COLUMN, END_COLUMN) if c not in header]
    if missing:
        raise AnnotationError(f"{where}: Raven header lacks column(s) {missing}; it has {header}")
    label_column = next((c for c in label_columns if c in header), None)
    if label_column is None:
        raise AnnotationError(
            f"{where}: Raven header has no label column (looked for {list(label_columns)}); it has {header}"
        )
    index = {name: header.index(name) for name in header if name}
    # (start_s, end_s, label, low_hz, high_hz, line) per selection, in order of first row
    selections: dict[str, list] = {}
    for number in range(header_at + 2, len(lines) + 1):
        line = lines[number - 1]
        where = f"{source}:{number}"
        if not line.strip():
            continue
        cells = line.split("\t")
        # Editors strip trailing tabs: missing cells at the end are empty, not an error.
        cells += [""] * (len(header) - len(cells))

        def cell(name: str, cells=cells) -> str:
            return cells[index[name]].strip() if name in index else ""

        start_s = _time(cell(BEGIN_COLUMN), what=BEGIN_COLUMN, where=where)
        end_s = _time(cell(END_COLUMN), what=END_COLUMN, where=where)
        _checked(start_s, end_s, where=where)
        low = _frequency(cell(LOW_COLUMN), what=LOW_COLUMN, where=where)
        high = _frequency(cell(HIGH_COLUMN), what=HIGH_COLUMN, where=where)
        row = [start_s, end_s, cell(label_column), low, high, number]
        key = cell("Selection") or f"#line{number}"  # without a Selection column every row counts
        first = selections.get(key)
        if first is None:
            selections[key] = row
            continue
        if abs(first[0] - start_s) > _SAME_TIME_S or abs(first[1] - end_s) > _SAME_TIME_S:
            raise AnnotationError(
                f"{where}: selection {key} spans {start_s:g}-{end_s:g} s here but "
                f"{first[0]:g}-{first[1]:g} s on line {first[5]} (rows of one selection must agree)"
            )
        # Another view of the same selection: fill in what its first row left empty.
        for k in (2, 3, 4):
            if first[k] in ("", None):
                first[k] = row[k]
    return [Annotation(s, e, label, low, high) for s, e, label, low, high, _ in selections.values()]


def parse_annotations(
    text: str, *, source: str = "<text>", label_columns: Sequence[str] = LABEL_COLUMNS
) -> list[Annotation]:
    """Annotations of an Audacity label track or a Raven selection table (told apart by the first
    non-empty line, see :func:`detect_format`).

    Args:
        text: The file's text (a leading byte order mark is dropped).
        source: Name of the file, for error messages.
        label_columns: Raven columns the label may come from, first present wins.

    Returns:
        The annotations in file order; empty for a file without non-empty lines.

    Raises:
        AnnotationError: naming ``source``, the 1-based line and the problem.
    """
    kind = detect_format(text)
    if kind == "raven":
        return parse_raven(text, source=source, label_columns=label_columns)
    if kind == "audacity":
        return parse_audacity(text, source=source)
    return []


def read_annotations(uri: str, *, label_columns: Sequence[str] = LABEL_COLUMNS) -> list[Annotation]:
    """Reads an annotation file (local path or fsspec URL: ``gs://``, ``s3://``...).

    Args:
        uri: The file.
        label_columns: Raven columns the label may come from, first present wins.

    Returns:
        Its annotations in file order.

    Raises:
        AnnotationError: the file cannot be read, is not UTF-8 text, or does not parse (the
            message names the file and line).
    """
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise AnnotationError(f"annotation file {uri!r} does not exist") from None
    except OSError as exc:
        raise AnnotationError(f"annotation file {uri!r} cannot be read: {exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AnnotationError(
            f"{uri}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file as UTF-8"
        ) from None
    return parse_annotations(text, source=uri, label_columns=label_columns)


def annotation_stem(path: str) -> str | None:
    """The recording stem an annotation file belongs to, or ``None`` if the name is no
    annotation file's (``night1.Table.1.selections.txt``, ``night1.selections.txt`` and
    ``night1.txt`` all give ``night1``)."""
    name = posixpath.basename(path.replace("\\", "/"))
    match = _RAVEN_TABLE.search(name)
    if match:
        return name[: match.start()]
    for suffix in (*RAVEN_SUFFIXES, AUDACITY_SUFFIX):
        if name.lower().endswith(suffix.lower()) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _split_uri(uri: str) -> tuple[str, str]:
    """``(folder, file name)`` of a path or URL (a chained URL's outer part, a query dropped)."""
    path = uri.split("::", 1)[0].split("?", 1)[0]
    return posixpath.dirname(path), posixpath.basename(path)


def find_annotation(recording_uri: str) -> str | None:
    """The annotation file of a recording: same folder, same stem, ending in
    ``.Table.1.selections.txt`` or ``.selections.txt`` (Raven) or ``.txt`` (Audacity).

    Args:
        recording_uri: The audio file (local path or fsspec URL).

    Returns:
        The annotation file's path or URL, or ``None`` when there is none.

    Raises:
        AnnotationError: more than one annotation file has the recording's stem (which one is
            meant cannot be told).
    """
    import fsspec

    folder, name = _split_uri(recording_uri)
    stem = posixpath.splitext(name)[0]
    fs, _ = fsspec.core.url_to_fs(recording_uri.split("::", 1)[0])
    found = []
    for suffix in (*RAVEN_SUFFIXES, AUDACITY_SUFFIX):
        candidate = posixpath.join(folder, stem + suffix) if folder else stem + suffix
        if fs.exists(candidate):
            found.append(candidate)
    if len(found) > 1:
        raise AnnotationError(f"recording {recording_uri!r} has several annotation files: {found}")
    return found[0] if found else None


def annotation_files(folder: str) -> dict[str, str]:
    """The annotation files under a folder (recursively), keyed by their path relative to the
    folder without the annotation suffix (``site1/night1``); files not ending in ``.txt`` are
    left out (audio may sit beside its labels).

    Args:
        folder: Local folder or fsspec URL.

    Returns:
        ``{relative key: path or URL}``, sorted by key.

    Raises:
        AnnotationError: two files give the same key (``x.txt`` and ``x.Table.1.selections.txt``).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    root = root.rstrip("/")
    out: dict[str, str] = {}
    for path in sorted(fs.find(root)):
        stem = annotation_stem(path)
        if stem is None:
            continue
        relative = posixpath.relpath(posixpath.dirname(path), root)
        key = stem if relative == "." else posixpath.join(relative, stem)
        uri = protocol + path if protocol and not path.startswith(protocol) else path
        if key in out:
            raise AnnotationError(
                f"annotation files {out[key]!r} and {uri!r} are both for recording {key!r}; keep one"
            )
        out[key] = uri
    return dict(sorted(out.items()))
