"""Elements that flow between pipeline stages (frozen dataclasses)."""

from __future__ import annotations

import dataclasses

import numpy as np

from soundshard.schemas.uris import redact


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One input recording and what the source listing or manifest says about it.

    Attributes:
        uri: Local path or fsspec URL of the audio file.
        clip_id: Stable identifier, unique within a run (path relative to the input root, without
            extension).
        label: Class name, or ``None`` when unlabelled.
        fold: Predefined cross-validation fold, or ``None``.
        split: Predefined split name (``train``/``test``/...), or ``None``.
        extra: Other manifest columns as ``(name, value)`` string pairs, in manifest order.
        size_bytes: File size from the listing, when known.
        archive_member: Path of the member inside a tar/zip archive (``uri`` is then an fsspec
            chained URL such as ``zip://dog/a.wav::gs://bucket/batch.zip``), else ``None``.
        version: What identifies this content of ``uri`` in the store (object generation,
            ETag or modification time), for incremental runs; ``None`` when unknown.
        recording_start_us: Start of the recording, microseconds since the Unix epoch (UTC),
            when known (manifest column or recorder file name).
        site: Site the recording comes from (from a path pattern), or ``None``.
        deployment: Deployment (recorder placement) within the site, or ``None``.
        augmentation: For an offline-augmented copy, what was done (``pitch_shift=+2``); the
            clip id is then the original's plus ``~<augmentation>``. ``None`` for originals.
        content: A digest of the file's content (the store's MD5/CRC32C/ETag, or the SHA-256 of a
            local file in incremental runs), so that a file touched but not changed is not taken
            on again; ``None`` when unknown.
        annotations: Strong labels (``--labels``): the events of the recording's annotation file
            as ``(start_s, end_s, label)``, seconds from the recording start, sorted; ``()`` for
            a recording annotated as all background; ``None`` when it has no annotation file
            (weakly labelled by ``label``, or unlabelled). The units of a split recording carry
            only the events that can meet their windows.
    """

    uri: str
    clip_id: str
    label: str | None = None
    fold: int | None = None
    split: str | None = None
    extra: tuple[tuple[str, str], ...] = ()
    size_bytes: int | None = None
    archive_member: str | None = None
    version: str | None = None
    recording_start_us: int | None = None
    site: str | None = None
    deployment: str | None = None
    augmentation: str | None = None
    content: str | None = None
    annotations: tuple[tuple[float, float, str], ...] | None = None

    @property
    def strong(self) -> bool:
        """True when the recording's windows are labelled from its annotations."""
        return self.annotations is not None

    @property
    def public_uri(self) -> str:
        """``uri`` as it may be recorded: without credentials (see ``schemas/uris.py``)."""
        return redact(self.uri)


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """A range of analysis windows of one recording, planned from its header.

    Long recordings are split into several units that decode independently (only their source
    range plus a resampling margin is read); a short one is a single unit.

    Attributes:
        source: The recording.
        source_sample_rate_hz: Rate in the file header.
        source_frames: Frames in the file header.
        output_samples: Samples of the whole recording at the analysis rate.
        total_windows: Windows of the whole recording.
        first_window: Index of the unit's first window on the recording's window grid.
        n_windows: Windows in this unit.
        unit_index: Index of the unit within the recording.
        n_units: Units of the recording.
    """

    source: SourceItem
    source_sample_rate_hz: int
    source_frames: int
    output_samples: int
    total_windows: int
    first_window: int
    n_windows: int
    unit_index: int = 0
    n_units: int = 1


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """An input that could not be processed, and why.

    Attributes:
        source_uri: The input (file path or URL; manifest location for bad manifest rows).
        clip_id: Its clip id when known.
        stage: Pipeline stage that failed (``source``, ``manifest``, ``decode``, ``features``).
        reason: snake_case reason, also the name of the Beam counter that counts it.
        error_type: Exception class name.
        message: Human-readable message naming the offending value.
        augmentation: Set when the failure is that of an offline-augmented copy (the original
            is accounted for separately).
    """

    source_uri: str
    clip_id: str | None
    stage: str
    reason: str
    error_type: str
    message: str
    augmentation: str | None = None

    def __post_init__(self):
        # Dead letters are written out: no credentials in them (messages quote URIs too).
        object.__setattr__(self, "source_uri", redact(self.source_uri))
        object.__setattr__(self, "message", redact(self.message))
        object.__setattr__(self, "stage", str(self.stage))  # a Stage (schemas/outcomes.py) as its name


@dataclasses.dataclass(frozen=True, eq=False)
class WindowBatch:
    """All analysis windows of one work unit, as arrays.

    Attributes:
        source: The recording the windows come from.
        features: float32 ``[n_windows, n_mels, n_frames]``.
        start_s: float64 ``[n_windows]`` window starts, seconds from the recording start.
        end_s: float64 ``[n_windows]`` window ends.
        first_window_index: Index of the first window within the recording.
        labels: For a strongly labelled source (``source.annotations`` set): per window, the
            sorted labels of the events it overlaps (``()``: background), set by
            ``transforms.features.AssignWindowLabels``; ``None`` otherwise.
    """

    source: SourceItem
    features: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray
    first_window_index: int = 0
    labels: tuple[tuple[str, ...], ...] | None = None

    @property
    def n_windows(self) -> int:
        """Number of windows in the batch."""
        return int(self.features.shape[0])


@dataclasses.dataclass(frozen=True)
class FileSummary:
    """What one successfully processed work unit contributed (for the run's figures).

    One summary per work unit; a recording's figures are the sum over its units.

    Attributes:
        clip_id: Clip id.
        source_uri: The recording.
        label: Label or ``None``.
        fold: Fold or ``None``.
        split: Split or ``None``.
        n_windows: Windows written for the unit.
        duration_s: Seconds of the recording the unit accounts for (its share of the duration).
        silent: True when every decoded sample of the unit is exactly zero (digital silence).
        unit_index: Index of the unit within the recording.
        n_units: Units of the recording.
        augmented: True for an offline-augmented copy (not an input of its own).
    """

    clip_id: str
    source_uri: str
    label: str | None
    fold: int | None
    split: str | None
    n_windows: int
    duration_s: float
    silent: bool
    unit_index: int = 0
    n_units: int = 1
    augmented: bool = False

    @classmethod
    def of_unit(cls, unit: WorkUnit, *, n_windows: int, duration_s: float, silent: bool) -> FileSummary:
        """The summary of (part of) a work unit's output, from its source's labels."""
        item = unit.source
        return cls(
            item.clip_id,
            item.public_uri,
            item.label,
            item.fold,
            item.split,
            n_windows,
            duration_s,
            silent,
            unit.unit_index,
            unit.n_units,
            augmented=item.augmentation is not None,
        )


@dataclasses.dataclass(frozen=True)
class LabelCount:
    """Strong labels of one batch of windows (for the counts in ``dataset.json``).

    Attributes:
        clip_id: Clip id of the recording.
        augmented: True for an offline-augmented copy.
        n_windows: Windows of the batch.
        by_label: ``(label, windows)`` pairs, sorted by label; a window with several labels
            counts for each; ``<background>`` counts the windows without any.
        multi_label: Windows with more than one label.
    """

    clip_id: str
    augmented: bool
    n_windows: int
    by_label: tuple[tuple[str, int], ...]
    multi_label: int


@dataclasses.dataclass(frozen=True, eq=False)
class LevelBlocks:
    """Energies of consecutive 100 ms blocks of a recording, or of the part of it a unit owns
    (the levels stage, ``transforms/levels/meter.py``).

    Block ``b`` holds the recording's samples ``[b * rate // 10, (b + 1) * rate // 10)``.

    Attributes:
        first_block: Index of the first block.
        sum_sq: float64 ``[n_blocks, 3]`` sums of squared A-, C- and Z-weighted samples (digital
            full scale 1).
        n_samples: int64 ``[n_blocks]`` samples summed (a unit's first and last blocks may be
            partial; the parts of two units add up to the whole block).
        fast_max: float64 ``[n_blocks]`` largest F-time-weighted A mean square in the block.
        fast_min: float64 ``[n_blocks]`` smallest.
        band_sq: float64 ``[n_blocks, n_bands]`` sums of squared band-filtered samples, or ``None``.
    """

    first_block: int
    sum_sq: np.ndarray
    n_samples: np.ndarray
    fast_max: np.ndarray
    fast_min: np.ndarray
    band_sq: np.ndarray | None = None

    @property
    def n_blocks(self) -> int:
        """Blocks held."""
        return int(len(self.n_samples))


@dataclasses.dataclass(frozen=True, eq=False)
class UnitLevels:
    """What one work unit contributes to its recording's levels.

    Attributes:
        source: The recording.
        sample_rate_hz: Rate of the signal measured (the analysis rate).
        blocks: Its blocks.
        unit_index: Index of the unit within the recording.
        n_units: Units of the recording.
    """

    source: SourceItem
    sample_rate_hz: int
    blocks: LevelBlocks
    unit_index: int = 0
    n_units: int = 1
