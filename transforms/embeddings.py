"""Embedding stage: decode → windows → RunInference (batched) → embedded windows, with dead letters.

The stage reuses the log-mel stage's planning and decoding (``transforms/features.py``): work
units lie on the model's window grid (``transforms/framing.py``) and decode only their range plus
a resampling margin. Each unit's windows stream, one element per window, into Beam's
``RunInference`` with :class:`EmbeddingModelHandler`, which batches them (min/max batch size),
loads the model once per worker process and shares it between the process's threads. A
recording's windows are never stacked: memory is bounded by the work unit and the batch.

Models (:func:`load_embedding_model`): OpenL3 from an official-layout weight file
(``transforms/openl3.py``), a TF SavedModel folder, or a TFLite file. Model files come from a
local path or an object-store URI given by the user (copied to a local temporary folder; SHA-256
checked when given); nothing is downloaded from anywhere else, and nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from soundshard.schemas.embedding import EmbeddingBatch, EmbeddingConfig, EmbeddingInput
from soundshard.schemas.errors import ConfigError, DataError
from soundshard.schemas.records import FileSummary, WorkUnit
from soundshard.transforms.features import (
    DEAD_LETTERS,
    NAMESPACE,
    SUMMARIES,
    DecodeUnitFn,
    ProgressReporter,
    count,
    dead_letter,
)
from soundshard.transforms.framing import FrameGrid

_LOG = logging.getLogger(__name__)
#: Rows of one EmbeddingBatch at most (consecutive windows of one unit are gathered up to this).
MAX_ROWS_PER_BATCH = 1024


# -- model files ----------------------------------------------------------------------------------


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def model_exists(uri: str) -> bool:
    """Whether a model file or folder exists (local or object store)."""
    if not _is_remote(uri):
        return os.path.exists(uri.removeprefix("file://"))
    fs, path = _fs(uri)
    return fs.exists(path)


def _files_under(uri: str) -> list[tuple[str, str]]:
    """``(relative path, full path)`` of every file of a model: itself, or the files of a folder."""
    if not _is_remote(uri):
        root = uri.removeprefix("file://")
        if os.path.isfile(root):
            return [(os.path.basename(root), root)]
        found = []
        for folder, _, names in os.walk(root):
            for name in names:
                full = os.path.join(folder, name)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
        return sorted(found)
    fs, path = _fs(uri)
    if fs.isfile(path):
        return [(path.rsplit("/", 1)[-1], path)]
    found = [(p[len(path.rstrip("/")) + 1 :], p) for p in fs.find(path)]
    return sorted(found)


def _open(uri: str, full: str):
    if not _is_remote(uri):
        return open(full, "rb")
    fs, _ = _fs(uri)
    return fs.open(full, "rb")


def model_digest(uri: str) -> str:
    """SHA-256 of a model file, or of a folder's files (relative path, NUL, bytes, each in order).

    Raises:
        ConfigError: nothing at ``uri``.
    """
    files = _files_under(uri)
    if not files:
        raise ConfigError(f"model {uri!r} holds no files")
    digest = hashlib.sha256()
    single = len(files) == 1 and not _is_dir(uri)
    for relative, full in files:
        if not single:
            digest.update(relative.encode() + b"\0")
        with _open(uri, full) as f:
            for block in iter(lambda f=f: f.read(4 * 2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def _is_dir(uri: str) -> bool:
    if not _is_remote(uri):
        return os.path.isdir(uri.removeprefix("file://"))
    fs, path = _fs(uri)
    return fs.isdir(path)


def check_model(config: EmbeddingConfig) -> EmbeddingConfig:
    """Checks that the model named by ``config`` exists (and matches its SHA-256) on the launcher.

    Returns:
        ``config`` with ``model_sha256`` filled in from the file, so the fingerprint names the
        model's content.

    Raises:
        ConfigError: no ``model_uri``, nothing there, a SHA-256 mismatch, or an OpenL3 file
        named for another variant.
    """
    uri = config.model_uri
    expected = config.expected_weights_name
    if not uri:
        if config.model == "openl3":
            raise ConfigError(
                f"OpenL3 {config.input_repr}/{config.content_type} needs its weight file {expected}: "
                "pass --weights PATH_OR_URI (published by the openl3 project; never downloaded)"
            )
        raise ConfigError(f"model={config.model!r} needs model_uri (--model {config.model}:PATH_OR_URI)")
    if not model_exists(uri):
        what = f"OpenL3 weight file (expected {expected})" if expected else f"{config.model} model"
        raise ConfigError(f"{what} not found: {uri!r}")
    if expected is not None:
        _check_openl3_name(uri, config)
    digest = model_digest(uri)
    if config.model_sha256 is not None and digest != config.model_sha256:
        raise ConfigError(f"model {uri!r} has SHA-256 {digest}, not the expected {config.model_sha256}")
    return config.replace(model_sha256=digest)


def _check_openl3_name(uri: str, config: EmbeddingConfig) -> None:
    # All variants have the same layer shapes, so a file of another variant would load silently;
    # official file names say which variant they hold.
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith("openl3_audio_"):
        return
    stem = name.removesuffix(".h5")
    if stem != config.expected_weights_name.removesuffix(".h5"):
        raise ConfigError(
            f"weight file {uri!r} is named for another OpenL3 variant than "
            f"input_repr={config.input_repr!r}, content_type={config.content_type!r} "
            f"(expected {config.expected_weights_name})"
        )


@contextlib.contextmanager
def local_model(uri: str):
    """Yields a local path of the model at ``uri`` (a temporary copy of a remote one)."""
    if not _is_remote(uri):
        yield uri.removeprefix("file://")
        return
    folder = tempfile.mkdtemp(prefix="soundshard-model-")
    try:
        fs, path = _fs(uri)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        local = os.path.join(folder, name)
        if fs.isdir(path):
            for relative, full in _files_under(uri):
                target = os.path.join(local, *relative.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get_file(full, target)
        else:
            fs.get_file(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- models -----------------------------------------------------------------------------------------


class EmbeddingModel:
    """A loaded embedding model: ``embed(windows [batch, window_samples]) → [batch, embedding_size]``."""

    embedding_size: int

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """float32 ``[batch, embedding_size]`` of float32 windows ``[batch, window_samples]``."""
        raise NotImplementedError


class KerasEmbedder(EmbeddingModel):
    """A Keras model from windows to embeddings (OpenL3)."""

    def __init__(self, model, embedding_size: int):
        self.model = model
        self.embedding_size = embedding_size

    def embed(self, windows: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(windows), dtype=np.float32)


def _pick_output(outputs, selector, *, where: str):
    """One output of a call: by name or index; the only one when ``selector`` is None."""
    if isinstance(outputs, dict):
        names = sorted(outputs)
        if selector is None:
            if len(names) != 1:
                raise ConfigError(f"{where} has outputs {names}: choose one with output = NAME or INDEX")
            return outputs[names[0]]
        if isinstance(selector, int):
            if not 0 <= selector < len(names):
                raise ConfigError(f"output={selector} is out of range: {where} has outputs {names}")
            return outputs[names[selector]]
        if selector not in outputs:
            raise ConfigError(f"output={selector!r} is not an output of {where}; outputs: {names}")
        return outputs[selector]
    if isinstance(outputs, list | tuple):
        if selector is None:
            if len(outputs) != 1:
                raise ConfigError(f"{where} returns {len(outputs)} outputs: choose one with output = INDEX")
            return outputs[0]
        if not isinstance(selector, int) or not 0 <= selector < len(outputs):
            raise ConfigError(f"output={selector!r}: {where} returns {len(outputs)} outputs (use an index)")
        return outputs[selector]
    if selector not in (None, 0):
        raise ConfigError(f"output={selector!r}: {where} returns a single output")
    return outputs


def _as_embeddings(values: np.ndarray, *, n: int, size: int, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 1 and n == 1:
        values = values[None]
    if values.ndim != 2 or values.shape != (n, size):
        raise DataError(
            f"{where} returned shape {list(values.shape)} for {n} window(s); expected [{n}, {size}]",
            reason="bad_model_output",
        )
    return values


def _per_window(values: np.ndarray, *, size: int, where: str) -> np.ndarray:
    """One window's output as ``[size]``: frame-level outputs ``[n_frames, size]`` are averaged."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 2 and values.shape[-1] == size:
        return values.mean(axis=0)
    if values.size == size:
        return values.reshape(size)
    raise DataError(f"{where} returned shape {list(values.shape)} for one window; expected [{size}]")


class SavedModelEmbedder(EmbeddingModel):
    """A TF SavedModel: a signature (or the object's ``__call__``) on windows.

    A model whose input is one waveform ``[n_samples]`` (as YAMNet's) is called once per window
    and a frame-level output ``[n_frames, embedding_size]`` is averaged over its frames; a
    model whose input is batched ``[batch, n_samples]`` is called once per batch.
    """

    def __init__(self, path: str, config: EmbeddingConfig):
        import tensorflow as tf

        self._tf = tf
        self.embedding_size = int(config.embedding_size)
        self._output = config.output
        self._where = f"SavedModel {config.model_uri!r}"
        loaded = tf.saved_model.load(path)
        self._loaded = loaded  # keeps the variables alive
        signatures = getattr(loaded, "signatures", {}) or {}
        if config.signature in signatures:
            fn = signatures[config.signature]
            _, kwargs = fn.structured_input_signature
            if len(kwargs) != 1:
                raise ConfigError(
                    f"{self._where} signature {config.signature!r} takes inputs {sorted(kwargs)}"
                )
            ((self._input_name, spec),) = kwargs.items()
            self._fn = fn
        elif callable(loaded):
            self._fn, self._input_name = loaded, None
            specs = [
                s
                for c in getattr(loaded.__call__, "concrete_functions", [])
                for s in c.structured_input_signature[0]
                if hasattr(s, "shape")
            ]
            spec = specs[0] if specs else None
        else:
            raise ConfigError(
                f"{self._where} has no signature {config.signature!r} (signatures: {sorted(signatures)}) "
                "and is not callable"
            )
        self._batched = spec is None or spec.shape.rank is None or spec.shape.rank >= 2
        # Choose the output now, so a wrong or missing ``output`` fails at load, not per batch.
        concrete = [self._fn] if self._input_name else getattr(self._fn.__call__, "concrete_functions", [])
        structure = getattr(concrete[0], "structured_outputs", None) if concrete else None
        if structure is not None:
            _pick_output(structure, self._output, where=self._where)

    def _call(self, x):
        tensor = self._tf.constant(x)
        result = self._fn(**{self._input_name: tensor}) if self._input_name else self._fn(tensor)
        return _pick_output(result, self._output, where=self._where)

    def embed(self, windows: np.ndarray) -> np.ndarray:
        if self._batched:
            out = self._call(windows).numpy()
            return _as_embeddings(out, n=len(windows), size=self.embedding_size, where=self._where)
        rows = [
            _per_window(self._call(w).numpy(), size=self.embedding_size, where=self._where) for w in windows
        ]
        return np.stack(rows) if rows else np.zeros((0, self.embedding_size), np.float32)


class TFLiteEmbedder(EmbeddingModel):
    """A TFLite model on windows: batched when its input's batch dimension is dynamic (or 1 per
    call otherwise); the output chosen by name or by index into the output details."""

    def __init__(self, path: str, config: EmbeddingConfig):
        import tensorflow as tf

        self.embedding_size = int(config.embedding_size)
        self._where = f"TFLite model {config.model_uri!r}"
        with warnings.catch_warnings():  # tf.lite.Interpreter warns that it moves to LiteRT
            warnings.simplefilter("ignore")
            self._interpreter = tf.lite.Interpreter(model_path=path)
        self._interpreter.allocate_tensors()
        inputs = self._interpreter.get_input_details()
        if len(inputs) != 1:
            raise ConfigError(f"{self._where} takes {len(inputs)} inputs; one (the waveform) is needed")
        self._input = inputs[0]
        outputs = self._interpreter.get_output_details()
        by_name = {d["name"]: d for d in outputs}
        selector = config.output
        if selector is None:
            if len(outputs) != 1:
                raise ConfigError(f"{self._where} has outputs {sorted(by_name)}: choose one with output")
            self._output = outputs[0]
        elif isinstance(selector, int):
            if not 0 <= selector < len(outputs):
                raise ConfigError(
                    f"output={selector} is out of range: {self._where} has {len(outputs)} outputs"
                )
            self._output = outputs[selector]
        elif selector in by_name:
            self._output = by_name[selector]
        else:
            raise ConfigError(
                f"output={selector!r} is not an output of {self._where}; outputs: {sorted(by_name)}"
            )
        signature = list(self._input.get("shape_signature", self._input["shape"]))
        self._rank = len(signature)
        self._dynamic_batch = self._rank >= 2 and signature[0] == -1
        self._size = None

    def _run(self, x: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter
        if self._size != x.shape:
            interpreter.resize_tensor_input(self._input["index"], list(x.shape))
            interpreter.allocate_tensors()
            self._size = x.shape
        interpreter.set_tensor(self._input["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(self._output["index"]).copy()

    def embed(self, windows: np.ndarray) -> np.ndarray:
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if self._dynamic_batch:
            return _as_embeddings(
                self._run(windows), n=len(windows), size=self.embedding_size, where=self._where
            )
        if self._rank >= 2:
            rows = [self._run(w[None]) for w in windows]
        else:
            rows = [self._run(w) for w in windows]
        rows = [_per_window(r, size=self.embedding_size, where=self._where) for r in rows]
        return np.stack(rows) if rows else np.zeros((0, self.embedding_size), np.float32)


def _verify_digest(path: str, config: EmbeddingConfig) -> None:
    if config.model_sha256 is None:
        return
    digest = model_digest(path)
    if digest != config.model_sha256:
        raise ConfigError(
            f"model {config.model_uri!r} has SHA-256 {digest}, not the expected {config.model_sha256}"
        )


def load_embedding_model(config: EmbeddingConfig) -> EmbeddingModel:
    """Loads the model of ``config`` (its file copied locally first when remote).

    Raises:
        ConfigError: missing file, SHA-256 mismatch, a file that does not fit the config.
    """
    if not config.model_uri or not model_exists(config.model_uri):
        check_model(config)  # raises, naming the expected file
    with local_model(config.model_uri) as path:
        _verify_digest(path, config)
        if config.model == "openl3":
            from soundshard.transforms import openl3

            return KerasEmbedder(openl3.load_openl3(config, path), int(config.embedding_size))
        if config.model == "saved_model":
            if not os.path.isdir(path):
                raise ConfigError(f"saved_model {config.model_uri!r} is not a SavedModel folder")
            return SavedModelEmbedder(path, config)
        return TFLiteEmbedder(path, config)


def embed_waveform(
    y: np.ndarray,
    *,
    sample_rate_hz: int,
    config: EmbeddingConfig,
    model: EmbeddingModel,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of one in-memory signal, as ``openl3.get_audio_embedding`` returns them.

    Resamples (soxr, ``config.resample_quality``) to the model's rate, frames on the model's
    grid and embeds ``batch_size`` windows at a time (windows are views; only a batch is ever
    copied).

    Args:
        y: float32 ``[n_samples]`` (or ``[n_samples, n_channels]``, mixed down).
        sample_rate_hz: Rate of ``y``.
        config: Embedding configuration.
        model: A loaded model.
        batch_size: Windows per model call.

    Returns:
        ``(embeddings, timestamps_s)``: float32 ``[n_windows, embedding_size]`` and float64
        ``[n_windows]``, openl3's timestamps (``k * hop_s``: window centres when centred).
    """
    import soxr

    y = np.asarray(y, dtype=np.float32)
    if y.ndim == 2:
        y = y.mean(axis=1) if config.channel is None else y[:, config.channel]
    if sample_rate_hz != config.sample_rate_hz:
        y = soxr.resample(y, sample_rate_hz, config.sample_rate_hz, quality=config.resample_quality)
        y = y.astype(np.float32, copy=False)
    grid = FrameGrid.from_config(config)
    frames = grid.frames(y)
    rows = [
        model.embed(np.ascontiguousarray(frames[k : k + batch_size]))
        for k in range(0, len(frames), batch_size)
    ]
    embeddings = np.concatenate(rows) if rows else np.zeros((0, model.embedding_size), np.float32)
    return embeddings, np.arange(len(frames)) * grid.hop_s


# -- RunInference -------------------------------------------------------------------------------


class EmbeddingModelHandler(ModelHandler[EmbeddingInput, PredictionResult, EmbeddingModel]):
    """RunInference handler: batches of :class:`EmbeddingInput` windows → embeddings.

    Beam's TensorFlow handler imports tensorflow_hub at module level and takes tensors, not our
    windows; this one stacks a batch's windows (one copy, ``[batch, window_samples]``), calls
    the model once and returns one ``PredictionResult(window, embedding [embedding_size])`` per
    window. RunInference loads the model once per worker process (``load_model``) and shares it
    between the process's threads.

    Args:
        config: Embedding configuration (model file, window grid).
        min_batch_size: Smallest batch Beam forms (the last one of a bundle can be smaller).
        max_batch_size: Largest batch. With ``min_batch_size < max_batch_size`` Beam adapts the
            size between them to its timing.
        large_model: Load one copy of the model per machine and share it between worker
            processes (Beam's ``large_model``): for models near the memory of a machine.
        loader: Replaces :func:`load_embedding_model` (tests).
    """

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        min_batch_size: int = 16,
        max_batch_size: int = 16,
        large_model: bool = False,
        loader=None,
    ):
        if min_batch_size < 1 or max_batch_size < min_batch_size:
            raise ConfigError(f"batch sizes min={min_batch_size}, max={max_batch_size}: need 1 <= min <= max")
        super().__init__(
            min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=large_model
        )
        self._config = config
        self._loader = loader
        self._min_batch_size = min_batch_size
        self._max_batch_size = max_batch_size

    def load_model(self) -> EmbeddingModel:
        """Loads the model (once per worker process; Beam shares it between threads)."""
        return (self._loader or load_embedding_model)(self._config)

    def run_inference(
        self,
        batch: Sequence[EmbeddingInput],
        model: EmbeddingModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Embeds a batch of windows; one result per window, in order."""
        if not batch:
            return []
        windows = np.stack([e.samples for e in batch]).astype(np.float32, copy=False)
        embeddings = model.embed(windows)
        if embeddings.shape != (len(batch), model.embedding_size):
            raise DataError(
                f"model returned shape {list(embeddings.shape)} for {len(batch)} windows",
                reason="bad_model_output",
            )
        return [PredictionResult(e, embeddings[i]) for i, e in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[EmbeddingInput]) -> int:
        return sum(e.samples.nbytes for e in batch)

    def get_metrics_namespace(self) -> str:
        return f"{NAMESPACE}_inference"

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._min_batch_size, "max_batch_size": self._max_batch_size}

    def share_model_across_processes(self) -> bool:
        return self._large_model


# -- DoFns --------------------------------------------------------------------------------------------


class _WindowsFn(DecodeUnitFn):
    """Decodes one work unit and emits its windows, one :class:`EmbeddingInput` each (streamed)."""

    def __init__(self, config: EmbeddingConfig, progress_dir: str | None = None):
        super().__init__(FrameGrid.from_config(config), progress_dir, role="decode")

    def process_audio(self, unit: WorkUnit, audio, span, where: str):
        grid: FrameGrid = self._grid
        frames = grid.frames(
            audio.samples,
            first_window=unit.first_window,
            n_windows=unit.n_windows,
            y_offset=0 if span is None else span.output_offset,
            total_samples=unit.output_samples,
        )
        count("work_units_decoded")
        for offset, frame in enumerate(frames):
            yield EmbeddingInput(unit, unit.first_window + offset, frame, silent=not frame.any())


@dataclasses.dataclass
class _Run:
    """Consecutive embedded windows of one unit, gathered before they are written."""

    unit: WorkUnit
    first: int
    rows: list
    silent: list


class _CollectFn(beam.DoFn):
    """Embedded windows → EmbeddingBatches of consecutive windows of one unit, and summaries.

    A summary covers the windows of one batch (its share of the recording's duration), so the
    run's figures add up whatever the batching; a window with non-finite values is a dead letter
    (stage ``embed``).
    """

    def __init__(self, config: EmbeddingConfig, progress_dir: str | None = None):
        self._config = config
        self._grid = FrameGrid.from_config(config)
        self._progress_dir = progress_dir

    def setup(self):
        self._progress = ProgressReporter(self._progress_dir, role="embed")

    def start_bundle(self):
        self._run: _Run | None = None

    def process(self, result: PredictionResult):
        window: EmbeddingInput = result.example
        embedding = np.asarray(result.inference, dtype=np.float32)
        unit = window.unit
        run = self._run
        if run is not None and not _continues(run, window):
            yield from self._flush()
            run = None
        if not np.isfinite(embedding).all():
            yield from self._flush()
            where = f"{unit.source.uri} (window {window.index} of {unit.total_windows})"
            exc = DataError(f"{where}: embedding contains non-finite values", reason="non_finite_embedding")
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(unit.source, "embed", exc))
            return
        if run is None:
            run = self._run = _Run(unit, window.index, [], [])
        run.rows.append(embedding)
        run.silent.append(window.silent)

    def finish_bundle(self):
        for tag_value in self._flush():
            if isinstance(tag_value, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(
                    tag_value.tag, WindowedValue(tag_value.value, MIN_TIMESTAMP, [GlobalWindow()])
                )
            else:
                yield WindowedValue(tag_value, MIN_TIMESTAMP, [GlobalWindow()])
        self._progress.flush()

    def _flush(self):
        run, self._run = self._run, None
        if run is None or not run.rows:
            return
        unit, item, grid = run.unit, run.unit.source, self._grid
        n = len(run.rows)
        starts, ends = grid.window_bounds_s(run.first, n)
        duration_s = grid.share_s(
            run.first, n, total_windows=unit.total_windows, total_samples=unit.output_samples
        )
        last_of_file = run.first + n == unit.total_windows
        silent = all(run.silent)
        if last_of_file:
            count("files_processed")
        count("windows", n)
        count("audio_ms", round(duration_s * 1000))
        self._progress.add(files=int(last_of_file), windows=n)
        yield EmbeddingBatch(
            item,
            np.stack(run.rows),
            starts,
            ends,
            first_window_index=run.first,
            unit_first_window=unit.first_window,
        )
        yield beam.pvalue.TaggedOutput(
            SUMMARIES,
            FileSummary.of_unit(unit, n_windows=n, duration_s=duration_s, silent=silent),
        )


def _continues(run: _Run, window: EmbeddingInput) -> bool:
    """Whether ``window`` is the next window of ``run``'s unit (and the run has room for it)."""
    same_unit = (run.unit.source.clip_id, run.unit.unit_index) == (
        window.unit.source.clip_id,
        window.unit.unit_index,
    )
    return same_unit and window.index == run.first + len(run.rows) and len(run.rows) < MAX_ROWS_PER_BATCH


def inference_dead_letters(failure) -> Iterable:
    """Dead letters (stage ``embed``) for a batch that failed in RunInference: one per unit."""
    batch, error = failure
    error_type, message = error_parts(error)
    by_unit: dict[tuple[str, int], list[EmbeddingInput]] = {}
    for window in batch:
        by_unit.setdefault((window.unit.source.clip_id, window.unit.unit_index), []).append(window)
    for windows in by_unit.values():
        unit = windows[0].unit
        first, last = windows[0].index, windows[-1].index
        where = f"{unit.source.uri} (windows {first}..{last} of {unit.total_windows})"
        exc = DataError(f"{where}: inference failed: {error_type}: {message}", reason="inference_error")
        count("windows_failed", len(windows))
        yield dead_letter(unit.source, "embed", exc)


def error_parts(error) -> tuple[str, str]:
    """``(error type, message)`` of a RunInference failure (an exception or an exc_info-like tuple)."""
    if isinstance(error, BaseException):
        return type(error).__name__, str(error)
    if isinstance(error, tuple) and error:
        kind = error[0]
        name = kind.__name__ if isinstance(kind, type) else str(kind)
        return name, str(error[1]) if len(error) > 1 else ""
    return "Exception", str(error)


class ComputeEmbeddings(beam.PTransform):
    """WorkUnits → EmbeddingBatches, dead letters and per-unit summaries, through RunInference.

    ``expand`` returns a dict: ``windows`` (:class:`EmbeddingBatch`), ``dead_letters``
    (DeadLetter: ``decode`` and ``embed`` stages) and ``summaries`` (FileSummary).

    Args:
        config: Embedding configuration (validated; its model file checked by the launcher).
        min_batch_size, max_batch_size, large_model: See :class:`EmbeddingModelHandler`.
        model_handler: Replaces the handler built from the other arguments (tests).
        progress_dir: Local folder for progress files of local runs, or ``None``.
    """

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        min_batch_size: int = 16,
        max_batch_size: int = 16,
        large_model: bool = False,
        model_handler: ModelHandler | None = None,
        progress_dir: str | None = None,
    ):
        super().__init__()
        self._config = config
        self._handler = model_handler or EmbeddingModelHandler(
            config, min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=large_model
        )
        self._progress_dir = progress_dir

    def expand(self, units):
        framed = units | "DecodeAndFrame" >> beam.ParDo(
            _WindowsFn(self._config, self._progress_dir)
        ).with_outputs(DEAD_LETTERS, main="windows")
        inferred, failures = (
            framed.windows | "RunInference" >> RunInference(self._handler).with_exception_handling()
        )
        collected = inferred | "CollectEmbeddings" >> beam.ParDo(
            _CollectFn(self._config, self._progress_dir)
        ).with_outputs(DEAD_LETTERS, SUMMARIES, main="windows")
        failed = failures.failed_inferences | "InferenceDeadLetters" >> beam.FlatMap(inference_dead_letters)
        dead_letters = (
            framed[DEAD_LETTERS],
            collected[DEAD_LETTERS],
            failed,
        ) | "EmbeddingDeadLetters" >> beam.Flatten()
        return {"windows": collected.windows, "dead_letters": dead_letters, "summaries": collected[SUMMARIES]}
