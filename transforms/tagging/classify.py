"""Beam layer of tagging: score windows with a trained classifier, then tables per recording.

The feature stage (log-mel or embeddings, shared with the features and embed pipelines) gives
one batch of windows per work unit; :class:`ScoreWindows` runs the model over them through Beam's
RunInference (batched by windows, model loaded once per worker process) and keeps only the
scores. :class:`TagRecordings` gathers each recording's scored units (a long recording's units
meet again here, so events spanning unit boundaries are found whole) and turns them into rows of
the window, file and event tables and, optionally, an Audacity label track and a Raven selection
table (``transforms/tagging/events.py`` does the maths). :class:`WriteTables` writes the rows as Parquet
and CSV files into the run's temporary folder; the commit (``pipelines/tag.py``) moves them into
place.

Optional outputs per recording: :class:`SpectrogramColumns` pools each unit's log-mel windows
into a few image columns, :class:`TagRecordings` puts them together with the scores and events
(``transforms/tagging/plots.py``) and :class:`DrawPlots` draws a PNG; :class:`WriteSnippets` cuts each
event's audio from the source as FLAC (``transforms/tagging/snippets.py``). Their failures are dead
letters of stage ``plots`` and ``snippets``: outputs that failed, not inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.errors import DataError
from soundshard.schemas.levels import LevelConfig
from soundshard.schemas.outcomes import Stage
from soundshard.schemas.records import DeadLetter, FileSummary, LevelBlocks, SourceItem, WindowBatch
from soundshard.schemas.tagging import TagConfig
from soundshard.transforms.features import melspec
from soundshard.transforms.features.compute import DEAD_LETTERS, count, dead_letter
from soundshard.transforms.features.embeddings import error_parts
from soundshard.transforms.levels import level_tables
from soundshard.transforms.levels import meter as levels
from soundshard.transforms.models import training
from soundshard.transforms.outputs.shards import join, write_bytes
from soundshard.transforms.outputs.tables import (  # noqa: F401 - table plumbing, named here for callers
    Move,
    TableRows,
    WriteTables,
    source_columns,
    table_files,
    utc_column,
)
from soundshard.transforms.tagging import events as ev
from soundshard.transforms.tagging import plots
from soundshard.transforms.tagging import snippets as snip

_LOG = logging.getLogger(__name__)
TABLES = ("windows", "files", "events", *level_tables.RECORDING_TABLES)
LABEL_FILES = ("audacity", "raven")
#: Per-recording output folders of ``--plot`` and ``--snippets`` (Move kinds too).
EXTRA_OUTPUTS = ("plots", "snippets")


@dataclasses.dataclass(frozen=True, eq=False)
class ScoredBatch:
    """A work unit's windows after the classifier (features dropped).

    Attributes:
        source: The recording.
        first_window_index: Index of the first window within the recording.
        start_s: float64 ``[n]`` window starts, seconds from the recording start.
        end_s: float64 ``[n]`` window ends.
        scores: float32 ``[n, n_classes]`` class probabilities.
        level_db: float32 ``[n]`` loudest log-mel value of each window (log-mel models), or ``None``.
        silent: bool ``[n]`` digitally silent windows (left out of the file scores, as of clip
            scores in training), or ``None`` for none.
        frame_db: float32 ``[n, window_frames]`` broadband level of each window's frames (where
            events start, ``TagConfig.onset_rise_db``), or ``None`` (no levels).
    """

    source: SourceItem
    first_window_index: int
    start_s: np.ndarray
    end_s: np.ndarray
    scores: np.ndarray
    level_db: np.ndarray | None = None
    silent: np.ndarray | None = None
    frame_db: np.ndarray | None = None

    @property
    def n_windows(self) -> int:
        """Windows in the batch."""
        return int(self.scores.shape[0])


# -- inference ----------------------------------------------------------------------------------


class Classifier:
    """A loaded classifier: ``[n, *input_shape]`` features → ``[n, n_classes]`` probabilities.

    Calls the Keras model through one traced function on fixed-size chunks (the last one padded),
    so varying batch sizes never trigger a new trace.
    """

    def __init__(self, model, *, chunk_windows: int = 256):
        import tensorflow as tf

        self._model = model
        self._chunk = chunk_windows
        self._call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self.n_classes = int(model.output_shape[-1])
        self.input_shape = tuple(int(d) for d in model.input_shape[1:])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        n = len(features)
        if tuple(features.shape[1:]) != self.input_shape:
            raise DataError(
                f"features of shape {list(features.shape[1:])} for a model that takes "
                f"{list(self.input_shape)}",
                reason="bad_feature_shape",
            )
        out = np.empty((n, self.n_classes), np.float32)
        for begin in range(0, n, self._chunk):
            part = features[begin : begin + self._chunk]
            m = len(part)
            if m < self._chunk:
                part = np.concatenate([part, np.zeros((self._chunk - m, *part.shape[1:]), part.dtype)])
            out[begin : begin + m] = np.asarray(self._call(part))[:m]
        return out


def load_classifier_from(uri: str) -> Classifier:
    """Loads a model folder (local or object store; Keras safe mode) as a :class:`Classifier`;
    of a remote folder only ``model.json`` and the Keras file are fetched. The folder is verified
    against its integrity digest first, as on the launcher (the files may change in between).

    Raises:
        ConfigError: the folder is not as ``soundshard train`` wrote it, or its model cannot be
            loaded in Keras safe mode.
    """
    from soundshard.transforms.models import architectures as models

    description = models.read_description(uri)
    return Classifier(models.load_verified_model(uri, description))


class ClassifierHandler(ModelHandler[WindowBatch, PredictionResult, Classifier]):
    """RunInference handler: batches of work units' windows → class probabilities.

    Beam batches whole :class:`WindowBatch` elements, sized by their windows (``min_windows`` to
    ``max_windows`` per call), so one model call covers many short clips or a good part of a
    long unit. One ``PredictionResult(batch, scores [n_windows, n_classes])`` per element.

    Args:
        model_uri: The model folder (``soundshard train`` output).
        min_windows: Smallest batch Beam forms, in windows.
        max_windows: Largest batch, in windows (a unit with more windows is one batch of its own).
        loader: Replaces :func:`load_classifier_from` (tests).
    """

    def __init__(self, model_uri: str, *, min_windows: int = 64, max_windows: int = 2048, loader=None):
        super().__init__()
        self._model_uri = model_uri
        self._min_windows = min_windows
        self._max_windows = max_windows
        self._loader = loader

    def load_model(self) -> Classifier:
        """Loads the model once per worker process (shared by its threads)."""
        return (self._loader or load_classifier_from)(self._model_uri)

    def run_inference(
        self, batch: Sequence[WindowBatch], model: Classifier, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        """Scores every window of the batch's elements in one model pass."""
        if not batch:
            return []
        features = np.concatenate([b.features for b in batch]).astype(np.float32, copy=False)
        scores = model(features)
        out, begin = [], 0
        for element in batch:
            out.append(PredictionResult(element, scores[begin : begin + element.n_windows]))
            begin += element.n_windows
        return out

    def get_num_bytes(self, batch: Sequence[WindowBatch]) -> int:
        return sum(b.features.nbytes for b in batch)

    def get_metrics_namespace(self) -> str:
        return "soundshard_tag_inference"

    def batch_elements_kwargs(self):
        return {
            "min_batch_size": self._min_windows,
            "max_batch_size": self._max_windows,
            "element_size_fn": lambda b: max(1, b.n_windows),
        }


def _scored(result: PredictionResult, *, level: FeatureConfig | None) -> ScoredBatch:
    batch: WindowBatch = result.example
    level_db = melspec.window_level_db(batch.features, level) if level is not None else None
    count("windows_scored", batch.n_windows)
    return ScoredBatch(
        batch.source,
        batch.first_window_index,
        batch.start_s,
        batch.end_s,
        np.asarray(result.inference, np.float32),
        level_db,
        training.silent_windows(batch.features, rule=training.silence_rule(level)),
        melspec.frame_levels_db(batch.features, level) if level is not None else None,
    )


def _inference_dead_letters(failure) -> Iterable:
    batch, error = failure
    error_type, message = error_parts(error)
    for element in batch:
        first = element.first_window_index
        where = f"{element.source.uri} (windows {first}..{first + element.n_windows - 1})"
        exc = DataError(f"{where}: classifier failed: {error_type}: {message}", reason="inference_error")
        yield dead_letter(element.source, Stage.TAG, exc)


class Scored(NamedTuple):
    """The outputs of :class:`ScoreWindows`."""

    scored: beam.PCollection[ScoredBatch]
    dead_letters: beam.PCollection[DeadLetter]


class ScoreWindows(beam.PTransform[beam.PCollection[WindowBatch], Scored]):
    """WindowBatches → ScoredBatches through RunInference; failures become ``tag`` dead letters
    (:class:`Scored`).

    Args:
        handler: The model handler (:class:`ClassifierHandler`).
        level: The feature config of log-mel or MFCC inputs in dB: keep each window's level
            (:func:`melspec.window_level_db`, for the activity and floor gates); ``None``: no levels.
    """

    def __init__(self, handler: ModelHandler, *, level: FeatureConfig | None = None):
        super().__init__()
        self._handler = handler
        self._level = level

    def expand(self, windows: beam.PCollection[WindowBatch]):
        inferred, failures = windows | "RunInference" >> RunInference(self._handler).with_exception_handling()
        scored = inferred | "KeepScores" >> beam.Map(_scored, level=self._level)
        dead = failures.failed_inferences | "InferenceDeadLetters" >> beam.FlatMap(_inference_dead_letters)
        return Scored(scored=scored, dead_letters=dead)


# -- per recording ------------------------------------------------------------------------------


def safe_relative(clip_id: str) -> str:
    """A clip id as a relative path that stays inside its folder (no ``..``, no absolute path)."""
    parts = [p for p in clip_id.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


def score_column(label: str) -> str:
    """Column of a class's score in the window and file tables."""
    return f"score_{label}"


def window_table(
    item: SourceItem, scored: ScoredBatch, config: TagConfig, window_index: np.ndarray
) -> pa.Table:
    """Rows of the window table for a recording's windows (every class, or the top k)."""
    n = scored.n_windows
    columns = source_columns(item, n)
    columns["label"] = pa.array([item.label] * n, pa.string())
    columns["window_index"] = pa.array(window_index, pa.int64())
    columns["start_s"] = pa.array(scored.start_s, pa.float64())
    columns["end_s"] = pa.array(scored.end_s, pa.float64())
    columns["start_utc"] = utc_column(item.recording_start_us, scored.start_s)
    names = np.asarray(config.label_names, dtype=object)
    best = scored.scores.argmax(axis=1) if n else np.zeros(0, np.int64)
    columns["top_label"] = pa.array(names[best].tolist() if n else [], pa.string())
    columns["top_score"] = pa.array(scored.scores[np.arange(n), best] if n else [], pa.float32())
    if config.top_k == 0:
        for c, label in enumerate(config.label_names):
            columns[score_column(label)] = pa.array(scored.scores[:, c], pa.float32())
    else:
        index, values = ev.top_k(scored.scores, config.top_k)
        for j in range(config.top_k):
            columns[f"label_{j + 1}"] = pa.array(names[index[:, j]].tolist(), pa.string())
            columns[f"score_{j + 1}"] = pa.array(values[:, j], pa.float32())
    if scored.level_db is not None:
        columns["level_db"] = pa.array(scored.level_db, pa.float32())
    return pa.table(columns)


def event_table(
    item: SourceItem,
    found: Sequence[ev.Event],
    *,
    blocks: LevelBlocks | None = None,
    sample_rate_hz: int = 0,
    cal: level_tables.Calibration | None = None,
) -> pa.Table:
    """Rows of the event table for a recording's events; with the recording's level ``blocks``,
    each event's LAeq, LAFmax and SEL (``lae``) and their ``level_unit``."""
    n = len(found)
    columns = source_columns(item, n)
    columns["label"] = pa.array([e.label for e in found], pa.string())
    starts = np.array([e.start_s for e in found], np.float64)
    ends = np.array([e.end_s for e in found], np.float64)
    columns["start_s"] = pa.array(starts, pa.float64())
    columns["end_s"] = pa.array(ends, pa.float64())
    columns["duration_s"] = pa.array(ends - starts, pa.float64())
    columns["confidence"] = pa.array([e.confidence for e in found], pa.float32())
    columns["peak"] = pa.array([e.peak for e in found], pa.float32())
    columns["n_windows"] = pa.array([e.n_windows for e in found], pa.int32())
    columns["start_utc"] = utc_column(item.recording_start_us, starts)
    columns["end_utc"] = utc_column(item.recording_start_us, ends)
    if blocks is not None and cal is not None:
        measured = [
            levels.interval_levels(
                blocks,
                start_s=e.start_s,
                end_s=e.end_s,
                sample_rate_hz=sample_rate_hz,
                offset_db=cal.offset_db,
            )
            for e in found
        ]
        for j, name in enumerate(("laeq", "lafmax", "lae")):
            columns[name] = pa.array([m[j] for m in measured], pa.float32())
        columns["level_unit"] = pa.array([cal.unit] * n, pa.string())
    return pa.table(columns)


def file_table(
    item: SourceItem,
    scores: np.ndarray,
    config: TagConfig,
    *,
    n_windows: int,
    duration_s: float,
    complete: bool,
    n_events: int,
) -> pa.Table:
    """The file table's row for a recording: aggregated scores, best label, labels over threshold."""
    columns = source_columns(item, 1)
    best = int(np.argmax(scores))
    columns["label"] = pa.array([item.label], pa.string())
    columns["recording_start_utc"] = utc_column(item.recording_start_us, np.zeros(1))
    columns["duration_s"] = pa.array([duration_s], pa.float64())
    columns["n_windows"] = pa.array([n_windows], pa.int64())
    columns["complete"] = pa.array([complete], pa.bool_())
    columns["predicted"] = pa.array([config.label_names[best]], pa.string())
    columns["confidence"] = pa.array([scores[best]], pa.float32())
    columns["labels"] = pa.array([";".join(ev.file_labels(scores, config))], pa.string())
    columns["aggregation"] = pa.array([config.aggregation], pa.string())
    columns["n_events"] = pa.array([n_events], pa.int32())
    for c, label in enumerate(config.label_names):
        columns[score_column(label)] = pa.array([scores[c]], pa.float32())
    return pa.table(columns)


@dataclasses.dataclass(frozen=True, eq=False)
class TaggedRecording:
    """A tagged recording's events (and picture), for the outputs made after tagging.

    Attributes:
        source: The recording.
        events: Its events, sorted by start.
        duration_s: Length of the recording, seconds.
        plot: What its picture shows (``--plot``), or ``None``.
    """

    source: SourceItem
    events: tuple[ev.Event, ...]
    duration_s: float
    plot: plots.RecordingPlot | None = None


class _TagRecordingFn(beam.DoFn):
    def __init__(
        self,
        config: TagConfig,
        *,
        temp_dir: str,
        label_files: tuple[str, ...],
        high_freq_hz: float,
        plot: plots.PlotOptions | None = None,
        tagged: bool = False,
        levels: LevelConfig | None = None,
    ):
        self._levels = levels
        self._config = config
        self._temp_dir = temp_dir
        self._label_files = label_files
        self._high_freq_hz = high_freq_hz
        self._plot = plot
        self._tagged = tagged or plot is not None

    def process(self, keyed):
        _, grouped = keyed
        batches: list[ScoredBatch] = sorted(grouped["scored"], key=lambda b: b.first_window_index)
        summaries: list[FileSummary] = list(grouped["summaries"])
        images: list[plots.UnitImage] = list(grouped.get("images", ()))
        measured = level_tables.recording_blocks(grouped.get("levels", ()))
        if batches:  # else every unit failed before scoring: their dead letters say why
            yield from self._tag(batches, summaries, images, measured)

    def _levels_outputs(self, measured, found, cal: level_tables.Calibration):
        """Level rows, hourly parts and label energies of a recording (``--levels``)."""
        item, rate, blocks = measured
        yield from level_tables.recording_rows(
            item, blocks, sample_rate_hz=rate, cal=cal, config=self._levels
        )
        for part in level_tables.hour_parts(item, blocks, sample_rate_hz=rate, cal=cal):
            yield beam.pvalue.TaggedOutput("level_hours", part)
        for part in level_tables.label_energy_parts(item, blocks, found, sample_rate_hz=rate, cal=cal):
            yield beam.pvalue.TaggedOutput("label_energy", part)

    def _tag(self, batches: list[ScoredBatch], summaries: list[FileSummary], images=(), measured=None):
        config = self._config
        item = batches[0].source
        scores = np.concatenate([b.scores for b in batches])
        start_s = np.concatenate([b.start_s for b in batches])
        end_s = np.concatenate([b.end_s for b in batches])
        window_index = np.concatenate(
            [np.arange(b.n_windows, dtype=np.int64) + b.first_window_index for b in batches]
        )
        level = None if batches[0].level_db is None else np.concatenate([b.level_db for b in batches])
        silent = None if batches[0].silent is None else np.concatenate([b.silent for b in batches])
        frames = None if batches[0].frame_db is None else np.concatenate([b.frame_db for b in batches])
        n_units = summaries[0].n_units if summaries else 1
        complete = len(summaries) == n_units and sum(s.n_windows for s in summaries) == len(scores)
        duration_s = sum(s.duration_s for s in summaries) if summaries else float(end_s[-1])
        found = ev.find_events(
            scores,
            start_s=start_s,
            end_s=end_s,
            window_index=window_index,
            config=config,
            level_db=level,
            duration_s=duration_s if complete else None,
            silent=silent,
            frame_db=frames,
        )
        merged = ScoredBatch(item, int(window_index[0]), start_s, end_s, scores, level, silent)
        yield TableRows("windows", window_table(item, merged, config, window_index))
        per_file = ev.file_scores(scores, config.aggregation, silent=silent)
        yield TableRows(
            "files",
            file_table(
                item,
                per_file,
                config,
                n_windows=len(scores),
                duration_s=duration_s,
                complete=complete,
                n_events=len(found),
            ),
        )
        if measured is not None:
            _, rate, blocks = measured
            cal = level_tables.calibration(item, self._levels)
            yield TableRows("events", event_table(item, found, blocks=blocks, sample_rate_hz=rate, cal=cal))
            yield from self._levels_outputs(measured, found, cal)
        else:
            yield TableRows("events", event_table(item, found))
        count("recordings_tagged")
        count("events", len(found))
        name = safe_relative(item.clip_id)
        for kind in self._label_files:
            if kind == "audacity":
                text, relative = ev.audacity_labels(found), f"audacity/{name}.txt"
            else:
                text = ev.raven_table(found, high_freq_hz=self._high_freq_hz)
                relative = f"raven/{name}.Table.1.selections.txt"
            temp = join(self._temp_dir, "labels", relative)
            write_bytes(temp, text.encode())
            yield beam.pvalue.TaggedOutput("moves", Move(kind, temp, relative, len(found)))
        if self._tagged:
            picture = None
            if self._plot is not None:
                picture = plots.recording_plot(
                    clip_id=item.clip_id,
                    source_uri=item.public_uri,
                    recording_start_us=item.recording_start_us,
                    start_s=start_s,
                    end_s=end_s,
                    scores=scores,
                    found=found,
                    label_names=config.label_names,
                    thresholds=config.window_thresholds,
                    duration_s=duration_s,
                    complete=complete,
                    images=images,
                    grid=self._plot.grid,
                    max_classes=self._plot.max_classes,
                )
            yield beam.pvalue.TaggedOutput("tagged", TaggedRecording(item, tuple(found), duration_s, picture))


class Tagged(NamedTuple):
    """The outputs of :class:`TagRecordings`.

    Attributes:
        rows: :class:`TableRows` of the per-recording tables (windows, files, events, levels).
        moves: :class:`Move`s of label files.
        tagged: :class:`TaggedRecording` per recording (with ``plot`` or ``tagged`` set; else empty).
        level_hours: ``((site, hour_us, level_unit), HourSums)`` parts (with levels; else empty).
        label_energy: ``((site, hour_us, label), energy)`` parts (with levels; else empty).
    """

    rows: beam.PCollection[TableRows]
    moves: beam.PCollection[Move]
    tagged: beam.PCollection[TaggedRecording]
    level_hours: beam.PCollection[tuple]
    label_energy: beam.PCollection[tuple]


class TagRecordings(beam.PTransform[dict[str, beam.PCollection], Tagged]):
    """Scored units and per-unit summaries → table rows (and label files) per recording
    (:class:`Tagged`).

    ``expand`` takes ``{"scored": ScoredBatch, "summaries": FileSummary}`` PCollections (and
    ``"images"``: :class:`plots.UnitImage`, for ``plot``; ``"levels"``: UnitLevels, for ``levels``).

    Args:
        config: Thresholds and event rules.
        temp_dir: The run's temporary folder (label files are written under it).
        label_files: Which per-recording label files to write (``audacity``, ``raven``).
        high_freq_hz: Upper frequency of Raven selections (the analysis band's top).
        plot: Build each recording's picture (``--plot``), or ``None``.
        tagged: Output every recording's events (for snippets) even without ``plot``.
        levels: With levels (an input ``"levels"`` of UnitLevels): events get their levels, and
            the outputs ``level_hours`` and ``label_energy`` carry the parts of the hourly tables.
    """

    def __init__(
        self,
        config: TagConfig,
        *,
        temp_dir: str,
        label_files: Sequence[str] = (),
        high_freq_hz: float,
        plot: plots.PlotOptions | None = None,
        tagged: bool = False,
        levels: LevelConfig | None = None,
    ):
        super().__init__()
        self._fn = _TagRecordingFn(
            config,
            temp_dir=temp_dir,
            label_files=tuple(label_files),
            high_freq_hz=high_freq_hz,
            plot=plot,
            tagged=tagged,
            levels=levels,
        )

    def expand(self, inputs: dict[str, beam.PCollection]):
        keyed_scores = inputs["scored"] | "KeyScores" >> beam.Map(lambda b: (b.source.clip_id, b))
        keyed_summaries = inputs["summaries"] | "KeySummaries" >> beam.Map(lambda s: (s.clip_id, s))
        keyed = {"scored": keyed_scores, "summaries": keyed_summaries}
        if "images" in inputs:
            keyed["images"] = inputs["images"] | "KeyImages" >> beam.Map(lambda i: (i.clip_id, i))
        if "levels" in inputs:
            keyed["levels"] = inputs["levels"] | "KeyLevels" >> beam.Map(lambda u: (u.source.clip_id, u))
        grouped = keyed | "ByRecording" >> beam.CoGroupByKey()
        out = grouped | "TagRecording" >> beam.ParDo(self._fn).with_outputs(
            "moves", "tagged", "level_hours", "label_energy", main="rows"
        )
        return Tagged(
            rows=out.rows,
            moves=out.moves,
            tagged=out.tagged,
            level_hours=out.level_hours,
            label_energy=out.label_energy,
        )


# -- plots and snippets -------------------------------------------------------------------------


def _unit_image(batch: WindowBatch, *, grid: plots.SpectrogramGrid, totals: dict) -> plots.UnitImage:
    total = totals.get(batch.source.clip_id, batch.first_window_index + batch.n_windows)
    columns, values = plots.unit_columns(
        batch.features, first_window=batch.first_window_index, total_windows=total, grid=grid
    )
    return plots.UnitImage(
        batch.source.clip_id, columns, values, grid.frames_per_column(total), grid.n_columns(total)
    )


class SpectrogramColumns(beam.PTransform[dict[str, beam.PCollection], beam.PCollection[plots.UnitImage]]):
    """Log-mel WindowBatches → each unit's spectrogram columns (:class:`plots.UnitImage`).

    The frames of a unit's windows are max-pooled over time so that the whole recording's image
    has at most ``grid.max_columns`` columns; how many frames a column takes depends on the
    recording's length, read from its planned units (a side input of one number per recording).

    ``expand`` takes ``{"windows": WindowBatch, "units": WorkUnit}``.

    Args:
        grid: The model's spectrogram grid.
    """

    def __init__(self, grid: plots.SpectrogramGrid):
        super().__init__()
        self._grid = grid

    def expand(self, inputs: dict[str, beam.PCollection]):
        totals = (
            inputs["units"]
            | "FirstUnits" >> beam.Filter(lambda u: u.unit_index == 0)
            | "WindowTotals" >> beam.Map(lambda u: (u.source.clip_id, u.total_windows))
        )
        return inputs["windows"] | "PoolSpectrogram" >> beam.Map(
            _unit_image, grid=self._grid, totals=beam.pvalue.AsDict(totals)
        )


def output_dead_letter(item: SourceItem, stage: str, exc: BaseException, *, reason: str):
    """A dead letter for an output (``plots``, ``snippets``) that failed (counted as ``reason``
    unless the error names its own)."""
    if not isinstance(exc, DataError):
        exc = DataError(f"{item.public_uri}: {stage} failed: {type(exc).__name__}: {exc}", reason=reason)
    return dead_letter(item, stage, exc)


class _DrawPlotFn(beam.DoFn):
    def __init__(self, options: plots.PlotOptions, *, temp_dir: str, partition: str):
        self._options = options
        self._temp_dir = temp_dir
        self._partition = partition

    def setup(self):
        self._references = self._options.reference_map()

    def process(self, tagged: TaggedRecording):
        if tagged.plot is None:
            return
        item = tagged.source
        relative = posixpath.join("plots", self._partition, safe_relative(item.clip_id) + ".png")
        try:
            picture = dataclasses.replace(tagged.plot, reference=self._references.get(item.clip_id))
            temp = join(self._temp_dir, "plots", relative)
            write_bytes(temp, plots.plot_png(picture))
        except Exception as exc:  # noqa: BLE001 - a picture that fails is a dead letter, not a stop
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTERS, output_dead_letter(item, Stage.PLOTS, exc, reason="plot_error")
            )
            return
        count("plots_written")
        yield Move("plots", temp, relative, len(tagged.events))


class Drawn(NamedTuple):
    """The outputs of :class:`DrawPlots`: ``moves`` (kind ``plots``) and ``dead_letters`` (stage
    ``plots``)."""

    moves: beam.PCollection[Move]
    dead_letters: beam.PCollection[DeadLetter]


class DrawPlots(beam.PTransform[beam.PCollection[TaggedRecording], Drawn]):
    """TaggedRecordings → one PNG per recording in the run's temporary folder
    (``plots/[<partition>/]<clip>.png``): :class:`Drawn`.

    Args:
        options: What to draw (reference annotations included).
        temp_dir: The run's temporary folder.
        partition: Sub-folder of this run's plots (``run_date=...`` in incremental runs) or ``""``.
    """

    def __init__(self, options: plots.PlotOptions, *, temp_dir: str, partition: str = ""):
        super().__init__()
        self._fn = _DrawPlotFn(options, temp_dir=temp_dir, partition=partition)

    def expand(self, tagged: beam.PCollection[TaggedRecording]):
        out = tagged | "DrawPlot" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTERS, main="moves")
        return Drawn(moves=out.moves, dead_letters=out[DEAD_LETTERS])


class _WriteSnippetsFn(beam.DoFn):
    def __init__(self, options: snip.SnippetOptions, *, temp_dir: str, partition: str, storage=None):
        self._options = options
        self._temp_dir = temp_dir
        self._partition = partition
        self._storage = storage

    def setup(self):
        from soundshard.transforms.io import archives, storage

        storage.configure(self._storage)
        archives.hold_archives()

    def teardown(self):
        from soundshard.transforms.io import archives

        archives.release_archives()

    def process(self, tagged: TaggedRecording):
        item = tagged.source
        chosen = snip.select_events(tagged.events, max_per_label=self._options.max_per_label)
        if len(chosen) < len(tagged.events):
            count("snippets_over_max_per_label", len(tagged.events) - len(chosen))
        folder = posixpath.join("snippets", self._partition, safe_relative(item.clip_id))
        written = []
        results = snip.write_snippets(
            item,
            chosen,
            options=self._options,
            temp_dir=join(self._temp_dir, "snippets"),
            folder=folder,
        )
        for event, snippet, error in results:
            if error is not None:
                failure = snip.snippet_error(item, event, error)
                yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(item, Stage.SNIPPETS, failure))
                continue
            count("snippets_written")
            written.append(snippet)
            yield Move("snippets", join(self._temp_dir, "snippets", snippet.relative), snippet.relative, 1)
        if written:
            yield beam.pvalue.TaggedOutput("index", snip.index_table(item, written))


class Snippets(NamedTuple):
    """The outputs of :class:`WriteSnippets`.

    Attributes:
        moves: :class:`Move`s of kind ``snippets``.
        index: A ``pa.Table`` of index rows per recording (:data:`snippets.INDEX_SCHEMA`).
        dead_letters: Stage ``snippets``, one per event whose snippet failed.
    """

    moves: beam.PCollection[Move]
    index: beam.PCollection[pa.Table]
    dead_letters: beam.PCollection[DeadLetter]


class WriteSnippets(beam.PTransform[beam.PCollection[TaggedRecording], Snippets]):
    """TaggedRecordings → each event's audio as FLAC in the run's temporary folder
    (``snippets/[<partition>/]<clip>/<start>_<end>_<label>.flac``), read from the source:
    :class:`Snippets`.

    Args:
        options: Margin, most snippets per label, block size.
        temp_dir: The run's temporary folder.
        partition: Sub-folder of this run's snippets (``run_date=...`` in incremental runs) or ``""``.
        storage: The run's storage settings (resolved on the launcher), or ``None``: defaults.
    """

    def __init__(self, options: snip.SnippetOptions, *, temp_dir: str, partition: str = "", storage=None):
        super().__init__()
        self._fn = _WriteSnippetsFn(options, temp_dir=temp_dir, partition=partition, storage=storage)

    def expand(self, tagged: beam.PCollection[TaggedRecording]):
        # A recording's events are cut in one call: its source is opened once.
        out = tagged | "CutSnippets" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTERS, "index", main="moves")
        return Snippets(moves=out.moves, index=out.index, dead_letters=out[DEAD_LETTERS])


# -- writing ------------------------------------------------------------------------------------


def hourly_keyed(rows: TableRows) -> Iterable[tuple[tuple, tuple[int, float, float]]]:
    """``((site, hour_us, label), (events, duration_s, confidence_sum))`` of an event table's rows."""
    if rows.table != "events" or rows.rows.num_rows == 0:
        return
    t = rows.rows
    start = t.column("start_utc").cast(pa.int64()).to_pylist()
    end = t.column("end_utc").cast(pa.int64()).to_pylist()
    records = [
        {"site": s, "label": lab, "confidence": c, "start_us": a, "end_us": b}
        for s, lab, c, a, b in zip(
            t.column("site").to_pylist(),
            t.column("label").to_pylist(),
            t.column("confidence").to_pylist(),
            start,
            end,
            strict=True,
        )
    ]
    for row in ev.hourly_rows(records):
        yield (
            (row["site"], row["hour_us"], row["label"]),
            (row["events"], row["duration_s"], row["confidence_sum"]),
        )


def sum_triples(values: Iterable[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Element-wise sum of ``(events, duration_s, confidence_sum)`` triples."""
    n, duration, confidence = 0, 0.0, 0.0
    for a, b, c in values:
        n, duration, confidence = n + a, duration + b, confidence + c
    return n, duration, confidence


def hourly_table(
    keyed: Iterable[tuple[tuple, tuple[int, float, float]]], *, shares: dict[tuple, float] | None = None
) -> pa.Table:
    """The hourly summary table from combined ``((site, hour_us, label), sums)`` pairs; with
    ``shares`` (levels), ``energy_share``: the share of the hour's A-weighted sound energy that
    lies inside the label's events."""
    rows = sorted(keyed, key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2]))
    extra = {}
    if shares is not None:
        extra["energy_share"] = pa.array([shares.get(k) for k, _ in rows], pa.float32())
    return pa.table(
        {
            "site": pa.array([k[0] for k, _ in rows], pa.string()),
            "hour_utc": pa.array([k[1] for k, _ in rows], pa.timestamp("us", tz="UTC")),
            "label": pa.array([k[2] for k, _ in rows], pa.string()),
            "events": pa.array([v[0] for _, v in rows], pa.int64()),
            "duration_s": pa.array([v[1] for _, v in rows], pa.float64()),
            "mean_confidence": pa.array([v[2] / v[0] if v[0] else None for _, v in rows], pa.float32()),
            **extra,
        }
    )
