"""Beam layer of the log-mel stage: decode → window → features per work unit, with dead letters.

Planning (:class:`PlanUnits`) and decoding a work unit (:func:`decode_unit`,
:class:`DecodeUnitFn`) are shared with the embedding stage (``transforms/features/embeddings.py``): both
run on a :class:`WindowGrid`, the log-mel one (:class:`LogMelGrid`) or an embedding model's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
from typing import NamedTuple, Protocol

import apache_beam as beam
import numpy as np
import soundfile
import threadpoolctl
from apache_beam.utils import shared

from soundshard.schemas.config import SOURCE_RATES_HZ, FeatureConfig
from soundshard.schemas.embedding import EmbeddingConfig
from soundshard.schemas.errors import (
    AudioDecodeError,
    AudioValidationError,
    ConfigError,
    DataError,
    StorageError,
)
from soundshard.schemas.levels import LevelConfig
from soundshard.schemas.outcomes import Stage
from soundshard.schemas.records import (
    DeadLetter,
    FileSummary,
    LabelCount,
    SourceItem,
    UnitLevels,
    WindowBatch,
    WorkUnit,
)
from soundshard.schemas.storage import StorageConfig
from soundshard.transforms.audio import augment, units
from soundshard.transforms.audio.decode import decode_audio
from soundshard.transforms.features import melspec
from soundshard.transforms.io.archives import hold_archives, open_source, release_archives
from soundshard.transforms.io.storage import FETCHED, FetchedObjects, fill_all, storage_error
from soundshard.transforms.io.storage import active as active_storage
from soundshard.transforms.io.storage import configure as configure_storage
from soundshard.transforms.labels import strong_labels
from soundshard.transforms.levels import meter as level_maths
from soundshard.transforms.outcomes import NAMESPACE, count, dead_letter, progress  # noqa: F401 - NAMESPACE named here for callers

DEAD_LETTERS = "dead_letters"
SUMMARIES = "summaries"
LEVELS = "levels"
LABEL_COUNTS = "label_counts"
_LOG = logging.getLogger(__name__)


def unit_audio_s(unit: WorkUnit) -> float:
    """Seconds of its recording a work unit stands for (its share of the windows), for progress."""
    if unit.source_sample_rate_hz <= 0 or unit.total_windows <= 0:
        return 0.0
    return unit.source_frames / unit.source_sample_rate_hz * unit.n_windows / unit.total_windows


def _count_retry(exc: BaseException) -> None:
    count("storage_retries")


def _open_checked(item: SourceItem, stack: contextlib.ExitStack):
    """Opens an input for libsndfile; a zero-byte file is an ``empty_file`` error.

    Remote reads retry transient storage errors (each retry counted as ``storage_retries``).

    Raises:
        AudioDecodeError: an empty file.
        StorageError: the object cannot be read (retries ran out, or it is missing).
    """
    empty = AudioDecodeError(f"{item.uri} is empty (0 bytes)", reason="empty_file")
    if item.size_bytes == 0:
        raise empty
    source = open_source(item.uri, size_bytes=item.size_bytes, on_retry=_count_retry)
    if not isinstance(source, str):
        stack.enter_context(source)
        if item.size_bytes is None and getattr(source, "size", None) == 0:
            raise empty
        return _DecoderReads(source)
    if item.size_bytes is None and os.path.getsize(source) == 0:
        raise empty
    return source


class _DecoderReads:
    """``source`` as libsndfile reads it: a read that gives up returns no bytes instead of raising.

    An exception cannot cross libsndfile's read callback (cffi prints it and returns 0 bytes); the
    error stays in ``storage_error`` and ``_storage_checked`` raises it after the decoder returns.
    """

    def __init__(self, source):
        self._source = source

    @property
    def file(self):
        """The file read from (a ``RemoteFile``, or an archive member's file object)."""
        return self._source

    @property
    def storage_error(self) -> StorageError | None:
        return storage_error(self._source)

    def readinto(self, buffer) -> int:
        try:
            return self._source.readinto(buffer)
        except StorageError:
            return 0

    def read(self, size: int = -1) -> bytes:
        try:
            return self._source.read(size)
        except StorageError:
            return b""

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._source.seek(offset, whence)
        except StorageError:
            return self._source.tell()

    def tell(self) -> int:
        return self._source.tell()

    def __repr__(self) -> str:
        return repr(self._source)

    def fill(self) -> None:
        """The first read-ahead block, fetched before the decoder opens the file (see
        ``RemoteFile.fill``); a read that gives up is left for ``_storage_checked`` to raise."""
        fill = getattr(self._source, "fill", None)
        if fill is not None:
            with contextlib.suppress(StorageError):
                fill()

    def fetched_whole(self) -> bytes | None:
        """The object's bytes if one fetch already holds all of it (a small remote file)."""
        block = getattr(self._source, "whole_block", None)
        return block() if block is not None else None


@contextlib.contextmanager
def _storage_checked(source):
    """Raises the ``StorageError`` a read of ``source`` gave up with, instead of what the decoder
    made of it: libsndfile turns an exception in its read callback into a generic error or a short
    read, which would read as ``decode_error``, ``corrupt_audio`` or ``truncated_audio``."""
    try:
        yield
    except Exception:
        failure = storage_error(source)
        if failure is None:
            raise
        raise failure from failure.__cause__
    failure = storage_error(source)
    if failure is not None:
        raise failure from failure.__cause__


class WindowGrid(Protocol):
    """The window grid work units are planned and decoded on (log-mel windows, embedding windows).

    Attributes:
        sample_rate_hz: Rate the audio is resampled to.
        channel: Channel to keep, or ``None`` for the mean of all channels.
        resample_quality: soxr preset.
        window_s: Seconds per window (for messages).
    """

    sample_rate_hz: int
    channel: int | None
    resample_quality: str
    window_s: float

    def recording_windows(self, *, source_frames: int, source_rate_hz: int) -> tuple[int, int]:
        """``(output_samples, total_windows)`` of a recording from its header."""

    def windows_per_unit(self, unit_s: float) -> int | None:
        """Windows in a unit of about ``unit_s`` seconds; ``None``: never split."""

    def source_range(self, unit: WorkUnit) -> units.SourceRange:
        """Source frames a unit decodes (its samples plus a resampling margin)."""

    @property
    def window_hop_samples(self) -> int:
        """Samples between the starts of consecutive windows."""


@dataclasses.dataclass(frozen=True)
class LogMelGrid:
    """The log-mel window grid of a :class:`FeatureConfig` (see ``transforms/audio/units.py``)."""

    config: FeatureConfig

    @property
    def sample_rate_hz(self) -> int:
        """Analysis rate."""
        return self.config.sample_rate_hz

    @property
    def channel(self) -> int | None:
        """Channel to keep, or ``None`` for the mean of all."""
        return self.config.channel

    @property
    def resample_quality(self) -> str:
        """soxr preset."""
        return self.config.resample_quality

    @property
    def window_s(self) -> float:
        """Seconds a window stands for."""
        return self.config.window_s

    @property
    def window_hop_samples(self) -> int:
        """Samples between the starts of consecutive windows."""
        return self.config.window_hop_frames * self.config.hop_length

    def recording_windows(self, *, source_frames: int, source_rate_hz: int) -> tuple[int, int]:
        """``(output_samples, total_windows)`` from a header (``units.recording_windows``)."""
        return units.recording_windows(
            source_frames=source_frames, source_rate_hz=source_rate_hz, config=self.config
        )

    def window_bounds_s(self, first_window: int, n_windows: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and end seconds (float64 ``[n_windows]`` each) of windows ``first_window`` on."""
        return melspec.window_bounds_s(n_windows, self.config, first_window)

    def windows_per_unit(self, unit_s: float) -> int | None:
        """Windows per unit of about ``unit_s`` s; ``None`` with recording-scope normalisation."""
        # Recording-scope normalisation needs a whole recording: never split then.
        if self.config.normalization_scope != "window":
            return None
        return units.windows_per_unit(unit_s, self.config)

    def source_range(self, unit: WorkUnit) -> units.SourceRange:
        """Source frames a unit decodes (``units.source_range``)."""
        return units.source_range(
            first_window=unit.first_window,
            n_windows=unit.n_windows,
            config=self.config,
            source_rate_hz=unit.source_sample_rate_hz,
            source_frames=unit.source_frames,
            output_samples=unit.output_samples,
        )


def as_grid(config) -> WindowGrid:
    """The window grid of a FeatureConfig or EmbeddingConfig (a grid is returned as it is)."""
    if isinstance(config, FeatureConfig):
        return LogMelGrid(config)
    if isinstance(config, EmbeddingConfig):
        from soundshard.transforms.audio.framing import FrameGrid

        return FrameGrid.from_config(config)
    return config


#: The small objects planning fetched whole, held for their decoding in the same process: one
#: object per process through Beam's ``Shared`` (the planning and decoding DoFns acquire it; it
#: lives while a DoFn holds it), never a module global the pipeline has to clear.
FETCHED_OBJECTS = shared.Shared()
_FETCHED_TAG = "soundshard-fetched-objects"


def fetched_objects() -> FetchedObjects:
    """This process's :class:`FetchedObjects` of the pipelines (see ``FETCHED_OBJECTS``)."""
    return FETCHED_OBJECTS.acquire(FetchedObjects, tag=_FETCHED_TAG)


def plan(
    item: SourceItem,
    config,
    *,
    unit_s: float | None = None,
    keep_reads: int = 0,
    source=None,
    rates_hz: tuple[int, int] = SOURCE_RATES_HZ,
    fetched: FetchedObjects | None = None,
) -> list[WorkUnit]:
    """Reads the header of ``item`` (no samples) and splits it into work units.

    Args:
        item: The recording.
        config: Feature or embedding configuration, or a :class:`WindowGrid`.
        unit_s: Approximate unit length in seconds; ``None`` or 0 keeps every recording whole.
            Recording-scope normalisation needs a whole recording, so it is never split then.
        keep_reads: A remote object that the header read fetched whole (one read-ahead block)
            and that makes one unit is kept in this process for this many decodes
            (``fetched``; the recording and its augmented copies): one request per file
            instead of two when they run here. 0 keeps nothing.
        source: ``item`` already opened by the caller (``_open_checked``), which closes it; by
            default it is opened (and closed) here.
        rates_hz: ``(lowest, highest)`` sample rate a header may declare.
        fetched: Where kept objects go (the planning DoFn's; default ``storage.FETCHED``).

    Raises:
        AudioDecodeError: unreadable header or empty file.
        AudioValidationError: a header that declares no samples, too few for one window, or a
            sample rate outside ``rates_hz``.
        StorageError: the object cannot be read from its store.
    """
    grid = as_grid(config)
    data = None
    with contextlib.ExitStack() as stack:
        if source is None:
            source = _open_checked(item, stack)
        if isinstance(source, _DecoderReads):
            source.fill()  # outside soundfile's open lock (see RemoteFile.fill)
        try:
            with _storage_checked(source):
                info = soundfile.info(source)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, EOFError) as exc:
            raise AudioDecodeError(f"cannot decode {item.uri}: {exc}", reason="decode_error") from exc
        if keep_reads and isinstance(source, _DecoderReads):
            data = source.fetched_whole()
    if info.frames <= 0:
        raise AudioValidationError(f"{item.uri} holds no samples ({info.format})", reason="empty_audio")
    if not rates_hz[0] <= info.samplerate <= rates_hz[1]:
        raise AudioValidationError(
            f"{item.uri} declares a sample rate of {info.samplerate} Hz, outside the plausible "
            f"{rates_hz[0]}..{rates_hz[1]} Hz (a damaged header? set --source-rates-hz otherwise)",
            reason="implausible_sample_rate",
        )
    output_samples, total = grid.recording_windows(source_frames=info.frames, source_rate_hz=info.samplerate)
    if total == 0:
        raise AudioValidationError(
            f"{item.uri} lasts {info.frames / info.samplerate:.3f} s, shorter than one window "
            f"({grid.window_s:.3f} s) and last_window='drop'",
            reason="audio_too_short",
        )
    per_unit = grid.windows_per_unit(unit_s) if unit_s else None
    ranges = units.split_windows(total, per_unit)
    if data is not None and len(ranges) == 1:
        (FETCHED if fetched is None else fetched).put(fetched_key(item), data, reads=keep_reads)
    return [
        WorkUnit(
            _unit_item(item, grid, first, n, len(ranges)),
            info.samplerate,
            info.frames,
            output_samples,
            total,
            first,
            n,
            index,
            len(ranges),
        )
        for index, (first, n) in enumerate(ranges)
    ]


def _unit_item(item: SourceItem, grid: WindowGrid, first_window: int, n_windows: int, n_units: int):
    """``item`` as a unit of it carries it: a split recording's units keep only the annotation
    events that can meet their windows (a day-long recording's thousands of events would otherwise
    travel with each of its units); labels do not change (``strong_labels.trim_events``)."""
    bounds = getattr(grid, "window_bounds_s", None)
    if n_units == 1 or not item.annotations or bounds is None:
        return item
    starts, ends = bounds(first_window, n_windows)
    events = strong_labels.trim_events(item.annotations, start_s=float(starts[0]), end_s=float(ends[-1]))
    return dataclasses.replace(item, annotations=events)


def fetched_key(item: SourceItem) -> tuple:
    """What identifies ``item``'s bytes in the kept objects: its URL, size and version (so a
    replaced object never matches; augmented copies share their original's)."""
    return (item.uri, item.size_bytes, item.version)


#: Items per batch of the plan stage: the first blocks of a batch's remote objects are fetched
#: together, up to ``StorageConfig.read_ahead`` at once (an object store answers each request after
#: tens of milliseconds, so reading headers one after another waits most of the time).
PLAN_BATCH = 8


def _remote_object(item: SourceItem) -> bool:
    """A plain object in a store (not a local file, not an archive member)."""
    uri = item.uri
    return "://" in uri and not uri.startswith("file://") and "::" not in uri


class _ProbeFn(beam.DoFn):
    """Plans work units from file headers, on the workers (dead letters for unreadable files).

    Takes batches of items: the first blocks of a batch's remote objects are fetched together
    (``storage.fill_all``: on the filesystem's event loop, up to ``StorageConfig.read_ahead`` at
    once, each with its own retries), then the headers are read from memory one after another.
    """

    def __init__(
        self,
        config,
        unit_s: float | None,
        augmentations=(),
        keep_fetched: bool = False,
        rates_hz: tuple[int, int] = SOURCE_RATES_HZ,
        storage: StorageConfig | None = None,
    ):
        self._config = config
        self._unit_s = unit_s
        self._augmentations = tuple(augmentations)
        self._keep_reads = 1 + len(self._augmentations) if keep_fetched else 0
        self._rates_hz = tuple(rates_hz)
        self._storage = storage

    def setup(self):
        configure_storage(self._storage)
        hold_archives()
        self._fetched = fetched_objects() if self._keep_reads else None
        self._read_ahead = active_storage().read_ahead

    def process(self, batch: list[SourceItem]):
        batch = list(batch)
        with contextlib.ExitStack() as stack:
            opened, failed = {}, {}
            remote = [i for i, item in enumerate(batch) if _remote_object(item)]
            if self._read_ahead > 1 and len(remote) > 1:
                for i in remote:
                    try:
                        opened[i] = _open_checked(batch[i], stack)
                    except Exception as exc:  # noqa: BLE001 - every failure becomes a dead letter
                        failed[i] = exc
                fill_all(
                    [s.file for s in opened.values() if isinstance(s, _DecoderReads)],
                    in_flight=self._read_ahead,
                )
            for i, item in enumerate(batch):
                planned, error = None, failed.get(i)
                if error is None:
                    try:
                        planned = plan(
                            item,
                            self._config,
                            unit_s=self._unit_s,
                            keep_reads=self._keep_reads,
                            source=opened.get(i),
                            rates_hz=self._rates_hz,
                            fetched=self._fetched,
                        )
                    except Exception as exc:  # noqa: BLE001 - every failure becomes a dead letter
                        error = exc
                    finally:
                        if i in opened and isinstance(opened[i], _DecoderReads):
                            opened[i].file.close()  # its block is not needed any more
                yield from self._outputs(item, planned, error)

    def _outputs(self, item: SourceItem, planned: list[WorkUnit] | None, error: BaseException | None):
        if error is not None:
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(item, Stage.PLAN, error))
            progress(files=1, files_planned=1)
            return
        whole = planned[0]
        copies = [  # copies of a readable recording, each decoded whole
            dataclasses.replace(
                whole,
                source=dataclasses.replace(
                    item, clip_id=augment.copy_clip_id(item.clip_id, aug), augmentation=aug.name
                ),
                first_window=0,
                n_windows=whole.total_windows,
                unit_index=0,
                n_units=1,
            )
            for aug in self._augmentations
        ]
        progress(
            files_planned=1,
            units_planned=len(planned) + len(copies),
            audio_s_planned=sum(unit_audio_s(u) for u in [*planned, *copies]),
        )
        yield from planned
        yield from copies

    def teardown(self):
        release_archives()


class Planned(NamedTuple):
    """The outputs of :class:`PlanUnits`."""

    units: beam.PCollection[WorkUnit]
    dead_letters: beam.PCollection[DeadLetter]


class PlanUnits(beam.PTransform[beam.PCollection[SourceItem], Planned]):
    """SourceItems → WorkUnits (header probed on the workers) and dead letters (:class:`Planned`).

    Args:
        config: Feature or embedding configuration (for the window grid), or a WindowGrid.
        unit_s: Split recordings into units of about this many seconds; ``None`` never splits.
        augmentations: Offline augmentations (:mod:`transforms.augment`): each readable
            recording also gets one whole-recording unit per augmentation, for its copy.
        keep_fetched: Keep the small objects that header reads fetched whole in this process
            for their decoding (``fetched_objects()``; see :func:`plan`): for runs whose units
            are decoded in the process that planned them (the local runner's threads).
        rates_hz: ``(lowest, highest)`` sample rate a header may declare (else a dead letter).
        storage: The run's storage settings (resolved on the launcher), or ``None``: defaults.
    """

    def __init__(
        self,
        config,
        *,
        unit_s: float | None = 60.0,
        augmentations=(),
        keep_fetched: bool = False,
        rates_hz: tuple[int, int] = SOURCE_RATES_HZ,
        storage: StorageConfig | None = None,
    ):
        super().__init__()
        self._storage = storage
        self._config = config
        self._unit_s = unit_s
        self._augmentations = tuple(augmentations)
        self._keep_fetched = keep_fetched
        self._rates_hz = tuple(rates_hz)

    def expand(self, items: beam.PCollection[SourceItem]):
        planner = _ProbeFn(
            self._config,
            self._unit_s,
            self._augmentations,
            keep_fetched=self._keep_fetched,
            rates_hz=self._rates_hz,
            storage=self._storage,
        )
        batches = items | "BatchForReadAhead" >> beam.BatchElements(
            min_batch_size=PLAN_BATCH, max_batch_size=PLAN_BATCH
        )
        out = batches | "ProbeHeaders" >> beam.ParDo(planner).with_outputs(DEAD_LETTERS, main="units")
        return Planned(units=out.units, dead_letters=out[DEAD_LETTERS])


def unit_where(unit: WorkUnit) -> str:
    """How messages name a unit: the URI, plus its window range when the recording is split."""
    item = unit.source
    if unit.n_units == 1:
        return item.uri
    last = unit.first_window + unit.n_windows - 1
    return f"{item.uri} (windows {unit.first_window}..{last} of {unit.total_windows})"


def decode_unit(
    unit: WorkUnit,
    grid: WindowGrid,
    *,
    where: str | None = None,
    preroll_s: float = 0.0,
    fetched: FetchedObjects | None = None,
):
    """Decodes what a work unit needs: the whole recording, or its source range with a margin.

    Args:
        unit: The work unit.
        grid: Its window grid (rate, channel, resampler, source range).
        where: Name of the unit in messages (default :func:`unit_where`).
        preroll_s: Seconds more to decode before a split unit's range, and the whole rest of the
            recording for its last unit (the levels stage measures every sample, and its filters
            settle in the pre-roll).
        fetched: Where planning kept small objects (the decoding DoFn's; default
            ``storage.FETCHED``).

    Returns:
        ``(audio, span)``: the :class:`DecodedAudio` (mono, at ``grid.sample_rate_hz``) and the
        decoded :class:`units.SourceRange`, or ``None`` when the whole recording was decoded
        (its samples then start at recording sample 0).

    Raises:
        AudioDecodeError, AudioValidationError, StorageError: as :func:`decode_audio` and
        :func:`_open_checked`.
    """
    where = where or unit_where(unit)
    span = None if unit.n_units == 1 else grid.source_range(unit)
    if span is not None and preroll_s > 0:
        span = units.widen(
            span,
            before_frames=math.ceil(preroll_s * unit.source_sample_rate_hz),
            to_end=unit.unit_index == unit.n_units - 1,
            source_frames=unit.source_frames,
            source_rate_hz=unit.source_sample_rate_hz,
            rate_hz=grid.sample_rate_hz,
        )
    with contextlib.ExitStack() as stack:
        kept = None
        if span is None and _remote_object(unit.source):
            # fetched whole by planning, in this process
            kept = (FETCHED if fetched is None else fetched).take(fetched_key(unit.source))
        source = _in_memory(kept, stack) if kept is not None else _open_checked(unit.source, stack)
        if isinstance(source, _DecoderReads):
            source.fill()  # outside soundfile's open lock (see RemoteFile.fill)
        with _storage_checked(source):
            audio = decode_audio(
                source,
                sample_rate_hz=grid.sample_rate_hz,
                channel=grid.channel,
                resample_quality=grid.resample_quality,
                name=where,
                start_frame=0 if span is None else span.start_frame,
                n_frames=None if span is None else span.n_frames,
            )
    return audio, span


def _in_memory(data: bytes, stack: contextlib.ExitStack):
    """``data`` as libsndfile reads it best: an anonymous in-memory file's descriptor (Linux
    ``memfd``, closed when ``stack`` closes), else a ``BytesIO``.

    libsndfile reads a file object through callbacks into Python, each holding the GIL, so the
    decoding threads of a worker take turns; a descriptor it reads natively.
    """
    create = getattr(os, "memfd_create", None)
    if create is None:
        return io.BytesIO(data)
    fd = create("soundshard-fetched", getattr(os, "MFD_CLOEXEC", 0))
    stack.callback(os.close, fd)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class DecodeUnitFn(beam.DoFn):
    """Base of the DoFns that decode one work unit and turn its audio into windows.

    Decoding (open, read the unit's range with its margin, mix down, resample, validate) is the
    same for every kind of window; a failure is a ``decode`` dead letter. Subclasses implement
    :meth:`process_audio`.

    With ``levels``, each unit of an original recording (not of an augmented copy) also gives its
    :class:`UnitLevels` on the ``levels`` output, measured on the decoded signal.

    Args:
        grid: The window grid units were planned on.
        levels: What the levels stage measures, or ``None`` for no levels.
        storage: The run's storage settings (resolved on the launcher), or ``None``: defaults.
    """

    def __init__(
        self,
        grid: WindowGrid,
        levels: LevelConfig | None = None,
        storage: StorageConfig | None = None,
    ):
        self._grid = grid
        self._levels = levels
        self._storage = storage

    def setup(self):
        configure_storage(self._storage)
        self._fetched = fetched_objects()
        hold_archives()

    def teardown(self):
        release_archives()

    def process(self, unit: WorkUnit):
        where = unit_where(unit)
        measure = self._levels is not None and unit.source.augmentation is None
        try:
            audio, span = decode_unit(
                unit,
                self._grid,
                where=where,
                preroll_s=level_maths.PREROLL_S if measure else 0.0,
                fetched=self._fetched,
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes a dead letter
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTERS, dead_letter(unit.source, Stage.DECODE, exc, where=where)
            )
            progress(files=int(unit.unit_index == unit.n_units - 1))
        else:
            if measure:
                yield beam.pvalue.TaggedOutput(LEVELS, self._unit_levels(unit, audio, span))
            yield from self.process_audio(unit, audio, span, where)
        progress(units=1, audio_s=unit_audio_s(unit))

    def _unit_levels(self, unit: WorkUnit, audio, span: units.SourceRange | None) -> UnitLevels:
        """The unit's blocks: the samples from its first window's hop to the next unit's."""
        hop = self._grid.window_hop_samples
        own_start = 0 if unit.unit_index == 0 else unit.first_window * hop
        last = unit.unit_index == unit.n_units - 1
        own_end = len(audio.samples) if span is None else unit.output_samples
        if not last:
            own_end = (unit.first_window + unit.n_windows) * hop
        blocks = level_maths.unit_blocks(
            audio.samples,
            sample_rate_hz=audio.sample_rate_hz,
            offset=0 if span is None else span.output_offset,
            own_start=own_start,
            own_end=own_end,
            bands=self._levels.bands,
        )
        count("level_blocks", blocks.n_blocks)
        return UnitLevels(unit.source, audio.sample_rate_hz, blocks, unit.unit_index, unit.n_units)

    def process_audio(self, unit: WorkUnit, audio, span: units.SourceRange | None, where: str):
        """Outputs of one decoded unit (``span`` is ``None`` for a whole recording)."""
        raise NotImplementedError


class _LogMelFn(DecodeUnitFn):
    """Decodes one work unit and emits all its windows as one vectorised WindowBatch."""

    def __init__(
        self,
        config: FeatureConfig,
        levels: LevelConfig | None = None,
        storage: StorageConfig | None = None,
    ):
        super().__init__(LogMelGrid(config), levels=levels, storage=storage)
        self._config = config

    def setup(self):
        super().setup()
        melspec.mel_filterbank(self._config)  # build the filterbank once per worker
        # One BLAS thread: parallelism comes from Beam's workers, and a fixed thread count keeps
        # the mel projection's float summation order, so values are bit-identical whatever the
        # runner or worker count (a multi-threaded BLAS changed ~0.1 % of values by <1e-5 dB).
        self._blas_limits = threadpoolctl.threadpool_limits(limits=1, user_api="blas")

    def teardown(self):
        limits = getattr(self, "_blas_limits", None)
        if limits is not None:
            limits.restore_original_limits()
        super().teardown()

    def process_audio(self, unit: WorkUnit, audio, span, where: str):
        config = self._config
        item = unit.source
        last_unit = unit.unit_index == unit.n_units - 1 and item.augmentation is None
        whole = span is None
        try:
            if item.augmentation is not None:
                samples = augment.apply(
                    audio.samples,
                    sample_rate_hz=config.sample_rate_hz,
                    augmentation=augment.from_name(item.augmentation),
                )
                audio = dataclasses.replace(audio, samples=samples)
            if whole:
                features = melspec.log_mel_windows(audio.samples, config)
            else:
                features = melspec.log_mel_windows(
                    audio.samples,
                    config,
                    first_window=unit.first_window,
                    n_windows=unit.n_windows,
                    y_offset=span.output_offset,
                    total_samples=unit.output_samples,
                )
            if not np.isfinite(features).all():
                raise DataError(f"{where}: features contain non-finite values", reason="non_finite_features")
        except Exception as exc:  # noqa: BLE001
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(item, Stage.FEATURES, exc, where=where))
            progress(files=int(last_unit))
            return
        n_windows = features.shape[0]
        starts, ends = melspec.window_bounds_s(n_windows, config, first_window=unit.first_window)
        duration_s = audio.duration_s if whole else unit_duration_s(unit, config)
        silent = not audio.samples.any()
        if last_unit:
            count("files_processed")
        if item.augmentation is not None:
            count("augmented_copies")
        count("windows", n_windows)
        count("audio_ms", round(duration_s * 1000))
        if silent:
            count("digital_silence")
        progress(files=int(last_unit), windows=n_windows)
        yield WindowBatch(item, features, starts, ends, first_window_index=unit.first_window)
        yield beam.pvalue.TaggedOutput(
            SUMMARIES,
            FileSummary.of_unit(unit, n_windows=n_windows, duration_s=duration_s, silent=silent),
        )


def unit_duration_s(unit: WorkUnit, config: FeatureConfig) -> float:
    """Seconds of the recording a unit accounts for: from its first window's start to the next
    unit's (the last unit ends at the recording's end), so units add up to the duration."""
    start = unit.first_window * config.window_hop_s
    recording_s = unit.output_samples / config.sample_rate_hz
    if unit.unit_index == unit.n_units - 1:
        return recording_s - start
    return (unit.first_window + unit.n_windows) * config.window_hop_s - start


class ComputedWindows(NamedTuple):
    """The outputs of a compute stage (:class:`ComputeLogMel`, ``ComputeEmbeddings``).

    Attributes:
        windows: One WindowBatch (or EmbeddingBatch) per processed unit.
        dead_letters: DeadLetters of units that failed.
        summaries: FileSummary per processed unit.
        levels: UnitLevels per unit (empty unless the stage measures levels).
    """

    windows: beam.PCollection[WindowBatch]
    dead_letters: beam.PCollection[DeadLetter]
    summaries: beam.PCollection[FileSummary]
    levels: beam.PCollection[UnitLevels]


class ComputeLogMel(beam.PTransform[beam.PCollection[WorkUnit], ComputedWindows]):
    """WorkUnits → WindowBatches (one per unit), dead letters, per-file summaries and (with
    ``levels``) sound levels: :class:`ComputedWindows`.

    Args:
        config: Feature configuration (validated).
        levels: What the levels stage measures, or ``None`` for no levels.
        storage: The run's storage settings (resolved on the launcher), or ``None``: defaults.
    """

    def __init__(
        self,
        config: FeatureConfig,
        *,
        levels: LevelConfig | None = None,
        storage: StorageConfig | None = None,
    ):
        super().__init__()
        self._config = config
        self._levels = levels
        self._storage = storage

    def expand(self, units: beam.PCollection[WorkUnit]):
        out = units | "DecodeAndFeaturize" >> beam.ParDo(
            _LogMelFn(self._config, levels=self._levels, storage=self._storage)
        ).with_outputs(DEAD_LETTERS, SUMMARIES, LEVELS, main="windows")
        return ComputedWindows(
            windows=out.windows, dead_letters=out[DEAD_LETTERS], summaries=out[SUMMARIES], levels=out[LEVELS]
        )


class Computed(NamedTuple):
    """The outputs of :class:`DecodeAndCompute`.

    Attributes:
        units: WorkUnits as planned (one per unit of every readable recording and copy).
        windows: WindowBatches (log-mel windows, or embeddings).
        summaries: FileSummary per processed unit.
        dead_letters: DeadLetters of planning and computing.
        levels: UnitLevels per unit, or ``None`` when the compute stage measures no levels.
    """

    units: beam.PCollection[WorkUnit]
    windows: beam.PCollection[WindowBatch]
    summaries: beam.PCollection[FileSummary]
    dead_letters: beam.PCollection[DeadLetter]
    levels: beam.PCollection[UnitLevels] | None


class DecodeAndCompute(beam.PTransform[beam.PCollection[SourceItem], Computed]):
    """SourceItems → planned work units → ``compute``: the front every pipeline on audio shares
    (features, embed, tag).

    Args:
        plan: The planning stage (:class:`PlanUnits`, with the run's settings).
        compute: WorkUnits → :class:`ComputedWindows`: :class:`ComputeLogMel` or
            ``ComputeEmbeddings``.
        label: Stable step label of the compute stage.
        measures_levels: ``compute`` also gives ``levels``.
    """

    def __init__(
        self, plan: PlanUnits, *, compute: beam.PTransform, label: str, measures_levels: bool = False
    ):
        super().__init__()
        self._plan, self._compute, self._label, self._measures_levels = plan, compute, label, measures_levels

    def expand(self, items: beam.PCollection[SourceItem]):
        planned = items | "PlanUnits" >> self._plan
        # Units are redistributed after planning (a long recording becomes many units).
        units = planned.units | "DistributeUnits" >> beam.Reshuffle()
        computed = units | self._label >> self._compute
        dead_letters = (planned.dead_letters, computed.dead_letters) | "DeadLetters" >> beam.Flatten()
        return Computed(
            units=planned.units,
            windows=computed.windows,
            summaries=computed.summaries,
            dead_letters=dead_letters,
            levels=computed.levels if self._measures_levels else None,
        )


class _LabelWindowsFn(beam.DoFn):
    """Sets the strong labels of the windows of annotated recordings (``strong_labels``) and emits
    a :class:`LabelCount` per such batch; other batches pass unchanged."""

    def __init__(self, min_overlap: float):
        self._min_overlap = strong_labels.check_min_overlap(min_overlap)

    def process(self, batch: WindowBatch):
        item = batch.source
        if item.annotations is None:
            yield batch
            return
        starts, ends = batch.start_s, batch.end_s
        if item.augmentation is not None:
            copy = augment.from_name(item.augmentation)
            if copy.kind == "time_stretch":
                # A copy stretched by rate r plays the original's second t at t / r: its windows
                # are labelled by the stretch of the events, i.e. the original's events at t * r.
                starts, ends = starts * copy.amount, ends * copy.amount
        labels = strong_labels.window_labels(starts, ends, item.annotations, min_overlap=self._min_overlap)
        by_label = strong_labels.count_labels(labels)
        multi = sum(1 for names in labels if len(names) > 1)
        count("strong_label_windows", len(labels))
        count("background_windows", by_label.get(strong_labels.BACKGROUND, 0))
        yield dataclasses.replace(batch, labels=tuple(labels))
        yield beam.pvalue.TaggedOutput(
            LABEL_COUNTS,
            LabelCount(
                item.clip_id,
                augmented=item.augmentation is not None,
                n_windows=len(labels),
                by_label=tuple(by_label.items()),
                multi_label=multi,
            ),
        )


class Labelled(NamedTuple):
    """The outputs of :class:`AssignWindowLabels`."""

    windows: beam.PCollection[WindowBatch]
    label_counts: beam.PCollection[LabelCount]


class AssignWindowLabels(beam.PTransform[beam.PCollection[WindowBatch], Labelled]):
    """WindowBatches → the same batches, those of annotated recordings with their windows' strong
    labels (``WindowBatch.labels``), plus a :class:`LabelCount` per such batch (:class:`Labelled`).
    Works on log-mel and embedding batches alike (labels depend only on window times).

    Args:
        min_overlap: Share of the shorter of window and event that must overlap for a window to
            take an event's label (``--min-label-overlap``; see ``transforms/labels/strong_labels.py``).

    Raises:
        ConfigError: ``min_overlap`` outside [0, 1] (at construction).
    """

    def __init__(self, *, min_overlap: float = strong_labels.MIN_OVERLAP):
        super().__init__()
        try:
            self._min_overlap = strong_labels.check_min_overlap(min_overlap)
        except ValueError as exc:
            raise ConfigError(f"--min-label-overlap: {exc}") from None

    def expand(self, batches: beam.PCollection[WindowBatch]):
        out = batches | "LabelWindows" >> beam.ParDo(_LabelWindowsFn(self._min_overlap)).with_outputs(
            LABEL_COUNTS, main="windows"
        )
        return Labelled(windows=out.windows, label_counts=out[LABEL_COUNTS])
