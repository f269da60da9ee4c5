"""Event snippets: each detected event's audio cut from its source as a FLAC file (no Beam).

A snippet is the event's stretch of the recording plus a margin on each side (clipped to the
recording), read straight from the source (a local file, an object in a store, a member of a
tar/zip archive: the decoder's own opening, with its retries) by seeking to the first frame and
copying blocks of at most ``block_frames`` frames, so a two-hour event is never held whole.

The audio is the source's own: its sample rate and channels, not the analysis rate or the mono
mixdown the model heard, because a snippet is for people to listen to and for re-annotation, and
resampling would change what the recorder captured. Integer PCM of up to 24 bits is copied
sample for sample (FLAC holds 8, 16 and 24 bit integers); 32-bit integers keep their top 24 bits;
floating-point and lossy sources (FLOAT, DOUBLE, Vorbis, Opus, MP3) become 24-bit FLAC, clipped
to [-1, 1). FLAC holds at most 8 channels and rates up to 655350 Hz: beyond that a snippet fails
(a dead letter), it is never written differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import soundfile

from soundshard.schemas.errors import ConfigError, DataError
from soundshard.schemas.records import SourceItem
from soundshard.schemas.tagging import SNIPPET_MARGIN_S
from soundshard.transforms.tagging import events as ev

#: Frames copied per read: 2**18 frames of 8 int32 channels is 8 MiB.
BLOCK_FRAMES = 1 << 18
#: FLAC's limits (libsndfile's FLAC encoder).
FLAC_MAX_CHANNELS = 8
FLAC_MAX_RATE_HZ = 655_350
_FLOAT_SUBTYPES = ("FLOAT", "DOUBLE", "VORBIS", "OPUS")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_LABEL_CHARS = 64


@dataclasses.dataclass(frozen=True)
class SnippetOptions:
    """Which events become snippets and how much around them.

    Attributes:
        margin_s: Seconds of audio kept before and after each event (clipped to the recording).
        max_per_label: Per recording and label, at most this many snippets (the most confident
            events first); ``None`` for all.
        block_frames: Frames read and written at a time (bounds memory).
    """

    margin_s: float = SNIPPET_MARGIN_S
    max_per_label: int | None = None
    block_frames: int = BLOCK_FRAMES

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin_s) and self.margin_s >= 0):
            raise ConfigError(f"--snippet-margin-s={self.margin_s} must be a finite number >= 0")
        if self.max_per_label is not None and self.max_per_label < 1:
            raise ConfigError(f"--snippet-max-per-label={self.max_per_label} must be at least 1")
        if self.block_frames < 1:
            raise ConfigError(f"block_frames={self.block_frames} must be at least 1")


def safe_label(label: str) -> str:
    """A label as a file name part: letters, digits, ``.``, ``_`` and ``-`` only (runs of other
    characters become one ``_``), no leading dot, at most 64 characters; ``unlabelled`` if empty."""
    text = _UNSAFE.sub("_", label).strip("_").lstrip(".")[:_MAX_LABEL_CHARS]
    return text or "unlabelled"


def time_token(seconds: float, *, recording_start_us: int | None) -> str:
    """A time as a file name part: seconds with 3 decimals (``12.500``), or the UTC time in compact
    ISO form (``20261124T005951.250Z``) when the recording's start is known."""
    if recording_start_us is None:
        return f"{seconds:.3f}"
    us = recording_start_us + round(seconds * 1e6)
    when = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(microseconds=us)
    return when.strftime("%Y%m%dT%H%M%S") + f".{when.microsecond // 1000:03d}Z"


def snippet_names(events: Sequence[ev.Event], *, recording_start_us: int | None) -> list[str]:
    """File names ``<start>_<end>_<label>.flac`` of a recording's snippets (event times; a name
    that two events would share, e.g. labels equal once made safe, gets ``-2``, ``-3``...)."""
    names, seen = [], {}
    for e in events:
        start = time_token(e.start_s, recording_start_us=recording_start_us)
        end = time_token(e.end_s, recording_start_us=recording_start_us)
        stem = f"{start}_{end}_{safe_label(e.label)}"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.flac" if seen[stem] == 1 else f"{stem}-{seen[stem]}.flac")
    return names


def select_events(events: Sequence[ev.Event], *, max_per_label: int | None) -> list[ev.Event]:
    """The events to cut: per label the ``max_per_label`` most confident (earlier first among
    equals), all when ``None``; in time order."""
    if max_per_label is None:
        return sorted(events, key=lambda e: (e.start_s, e.label))
    by_label: dict[str, list[ev.Event]] = {}
    for e in events:
        by_label.setdefault(e.label, []).append(e)
    kept = []
    for group in by_label.values():
        kept.extend(sorted(group, key=lambda e: (-e.confidence, e.start_s))[:max_per_label])
    return sorted(kept, key=lambda e: (e.start_s, e.label))


def frame_range(event: ev.Event, *, margin_s: float, sample_rate_hz: int, n_frames: int) -> tuple[int, int]:
    """Source frames ``[start, end)`` of an event's snippet: its times plus the margin, rounded to
    the nearest frame, clipped to the recording's ``n_frames``."""
    start = round((event.start_s - margin_s) * sample_rate_hz)
    end = round((event.end_s + margin_s) * sample_rate_hz)
    start = min(max(start, 0), n_frames)
    return start, min(max(end, start), n_frames)


def flac_format(subtype: str) -> tuple[str, str]:
    """``(FLAC subtype, dtype to read as)`` for a source subtype: integers are copied exactly up to
    24 bits (read as the integer type that holds them), floating-point and lossy codecs become
    24-bit (read as float32), companded and ADPCM codecs (decoded to 16 bits) 16-bit."""
    if subtype in ("PCM_S8", "PCM_U8"):
        return "PCM_S8", "int16"
    if subtype in _FLOAT_SUBTYPES or subtype.startswith("MPEG"):
        return "PCM_24", "float32"
    bits = re.search(r"_(\d+)$", subtype)
    if bits and int(bits.group(1)) > 16:
        return "PCM_24", "int32"
    return "PCM_16", "int16"


@dataclasses.dataclass(frozen=True)
class Snippet:
    """A snippet written, as one row of the index.

    Attributes:
        event: The event.
        relative: Path of the FLAC file under the output folder.
        start_frame: First source frame of the snippet.
        n_frames: Frames in the snippet.
        sample_rate_hz: Rate of the snippet (the source's).
        channels: Channels of the snippet (the source's).
    """

    event: ev.Event
    relative: str
    start_frame: int
    n_frames: int
    sample_rate_hz: int
    channels: int

    @property
    def start_s(self) -> float:
        """Snippet start (event start minus the margin, clipped), seconds from the recording start."""
        return self.start_frame / self.sample_rate_hz

    @property
    def end_s(self) -> float:
        """Snippet end, seconds from the recording start."""
        return (self.start_frame + self.n_frames) / self.sample_rate_hz


def _copy_frames(
    source: soundfile.SoundFile, target: soundfile.SoundFile, *, start: int, end: int, dtype: str, block: int
):
    source.seek(start)
    position = start
    while position < end:
        data = source.read(frames=min(block, end - position), dtype=dtype, always_2d=True)
        if len(data) == 0:
            raise DataError(
                f"read stopped at frame {position} of {end} (header declares {source.frames})",
                reason="snippet_short_read",
            )
        if dtype == "float32":
            np.clip(data, -1.0, np.float32(1.0 - 2.0**-23), out=data)  # libsndfile would wrap
        target.write(data)
        position += len(data)


def _upload(local: str, destination: str) -> None:
    """Streams a finished local file to an object through Beam's FileSystems (8 MiB at a time)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with (
        open(local, "rb") as f,
        FileSystems.create(destination, compression_type=CompressionTypes.UNCOMPRESSED) as out,
    ):
        shutil.copyfileobj(f, out, length=8 << 20)


def _write_one(
    audio: soundfile.SoundFile, *, start: int, end: int, destination: str, options: SnippetOptions
) -> None:
    subtype, dtype = flac_format(audio.subtype)
    if "://" not in destination or destination.startswith("file://"):
        local = destination.removeprefix("file://")
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        remote = None
    else:
        # libsndfile seeks back to finish a FLAC header, which an object-store upload cannot:
        # the file is made locally, then streamed up.
        fd, local = tempfile.mkstemp(suffix=".flac", prefix="soundshard-snippet-")
        os.close(fd)
        remote = destination
    try:
        with soundfile.SoundFile(
            local, "w", samplerate=audio.samplerate, channels=audio.channels, format="FLAC", subtype=subtype
        ) as target:
            _copy_frames(audio, target, start=start, end=end, dtype=dtype, block=options.block_frames)
        if remote is not None:
            _upload(local, remote)
    finally:
        if remote is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)


def write_snippets(
    item: SourceItem,
    events: Sequence[ev.Event],
    *,
    options: SnippetOptions,
    temp_dir: str,
    folder: str,
) -> Iterator[tuple[ev.Event, Snippet | None, BaseException | None]]:
    """Cuts the events of one recording from its source into FLAC files (source opened once).

    Args:
        item: The recording.
        events: Its events to cut (see :func:`select_events`).
        options: Margin and block size.
        temp_dir: Folder the files are written under (``<temp_dir>/<relative>``).
        folder: Folder of the recording's snippets under the output (``snippets/<clip>``).

    Yields:
        ``(event, snippet, None)`` per file written, ``(event, None, error)`` per event that could
        not be cut (a source that cannot be opened fails every event).
    """
    from soundshard.transforms.features.compute import _open_checked, _storage_checked
    from soundshard.transforms.outputs.shards import join

    if not events:
        return
    names = snippet_names(events, recording_start_us=item.recording_start_us)
    with contextlib.ExitStack() as stack:
        try:
            # The decoder's own opening: retries, an empty object is an error, and a store error
            # inside libsndfile's read callback is raised as itself afterwards.
            source = _open_checked(item, stack)
            if hasattr(source, "fill"):
                source.fill()
            with _storage_checked(source):
                audio = stack.enter_context(soundfile.SoundFile(source, closefd=False))
            if audio.channels > FLAC_MAX_CHANNELS:
                raise DataError(
                    f"{item.public_uri} has {audio.channels} channels; FLAC holds at most "
                    f"{FLAC_MAX_CHANNELS}",
                    reason="snippet_too_many_channels",
                )
            if audio.samplerate > FLAC_MAX_RATE_HZ:
                raise DataError(
                    f"{item.public_uri} is sampled at {audio.samplerate} Hz; FLAC holds at most "
                    f"{FLAC_MAX_RATE_HZ} Hz",
                    reason="snippet_rate_unsupported",
                )
        except Exception as exc:  # noqa: BLE001 - every event of the recording fails with it
            for event in events:
                yield event, None, exc
            return
        for event, name in zip(events, names, strict=True):
            start, end = frame_range(
                event, margin_s=options.margin_s, sample_rate_hz=audio.samplerate, n_frames=audio.frames
            )
            relative = f"{folder}/{name}"
            try:
                with _storage_checked(source):
                    _write_one(
                        audio, start=start, end=end, destination=join(temp_dir, relative), options=options
                    )
            except Exception as exc:  # noqa: BLE001 - one event's failure is a dead letter
                yield event, None, exc
                continue
            yield event, Snippet(event, relative, start, end - start, audio.samplerate, audio.channels), None


def snippet_error(item: SourceItem, event: ev.Event, exc: BaseException) -> DataError:
    """The error of an event whose snippet failed, naming the recording and the event."""
    reason = exc.reason if isinstance(exc, DataError) else "snippet_error"
    where = f"{item.public_uri} {event.label} {event.start_s:.3f}-{event.end_s:.3f} s"
    return DataError(f"{where}: snippet not written: {type(exc).__name__}: {exc}", reason=reason)


INDEX_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("archive_member", pa.string()),
        pa.field("site", pa.string()),
        pa.field("label", pa.string()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("confidence", pa.float32()),
        pa.field("snippet_start_s", pa.float64()),
        pa.field("snippet_end_s", pa.float64()),
        pa.field("snippet_duration_s", pa.float64()),
        pa.field("sample_rate_hz", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("snippet_start_utc", pa.timestamp("us", tz="UTC")),
        pa.field("path", pa.string()),
    ]
)


def index_table(item: SourceItem, snippets: Sequence[Snippet]) -> pa.Table:
    """Index rows of a recording's snippets (``path`` relative to the output folder)."""
    n = len(snippets)
    start_utc = (
        [item.recording_start_us + round(s.start_s * 1e6) for s in snippets]
        if item.recording_start_us is not None
        else [None] * n
    )
    return pa.table(
        {
            "clip_id": [item.clip_id] * n,
            "source_uri": [item.public_uri] * n,
            "archive_member": [item.archive_member] * n,
            "site": [item.site] * n,
            "label": [s.event.label for s in snippets],
            "start_s": [s.event.start_s for s in snippets],
            "end_s": [s.event.end_s for s in snippets],
            "confidence": [s.event.confidence for s in snippets],
            "snippet_start_s": [s.start_s for s in snippets],
            "snippet_end_s": [s.end_s for s in snippets],
            "snippet_duration_s": [s.n_frames / s.sample_rate_hz for s in snippets],
            "sample_rate_hz": [s.sample_rate_hz for s in snippets],
            "channels": [s.channels for s in snippets],
            "snippet_start_utc": start_utc,
            "path": [s.relative for s in snippets],
        },
        schema=INDEX_SCHEMA,
    )
