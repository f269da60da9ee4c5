"""Edge compilation: int8 quantisation, TFLite Micro runs, arena measurement, feature tables.

Pure functions (no Beam) behind ``soundshard compile-edge``:

- :func:`representative_set` draws the calibration windows from the model's training split only.
- :func:`convert_int8` converts a Keras classifier to a full-integer int8 TFLite flatbuffer (int8
  input and output, batch 1) and refuses, naming the ops, a model with any float tensor left.
- :func:`describe_tflite` lists a flatbuffer's ops, tensor types and input/output quantisation.
- :func:`tflm_invoke` runs it with TensorFlow Lite Micro's kernels (the ``tflite-micro``
  package's interpreter), :func:`litert_invoke` with LiteRT's (builtin kernels, or XNNPACK);
  :func:`measure_arena` bisects the
  smallest tensor arena with which TFLite Micro allocates and runs the model.
- :func:`compare_predictions` sets float and int8 predictions side by side (clip accuracy,
  per-class recall, window top-class agreement, interpreter agreement).
- :func:`feature_tables` gives what a device needs to compute the features: periodic Hann window
  table and the mel filterbank in sparse form (first bin, bin count and weights per band).
- :func:`window_samples` cuts the audio a device frames to make one analysis window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Sequence

import numpy as np

from soundshard.schemas import melscale
from soundshard.schemas.config import DELTA_WIDTH, FeatureConfig
from soundshard.schemas.edge import TargetProfile
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.features import melspec
from soundshard.transforms.models import training

#: Tensor types allowed in a full-integer model: int8 activations and weights, int32 biases/shapes.
INTEGER_TYPES = ("INT8", "INT32")
#: Arena margin over the measured minimum: a fraction, and at least a fixed number of bytes for the
#: scratch buffers that optimised kernels (CMSIS-NN) request and the reference kernels do not.
ARENA_MARGIN_FRACTION = 0.10
ARENA_MARGIN_MIN_BYTES = 2048
#: Calibration windows: all of the training split's, or a seeded draw of this many. A small draw
#: makes the int8 model depend on the seed (ESC-10 edgecnn fold 1, 300 windows: int8 clip accuracy
#: 0 to -1.25 points from float, window top-class agreement 0.87 to 0.985 over seeds).
REPRESENTATIVE_WINDOWS = 5000
#: Largest arena tried when measuring.
_ARENA_LIMIT_BYTES = 64 * 1024 * 1024


# -- representative set ---------------------------------------------------------------------


def representative_set(
    windows: training.WindowSet,
    *,
    split: dict,
    n_windows: int = REPRESENTATIVE_WINDOWS,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Calibration windows for quantisation, drawn from the training split of the model only.

    Args:
        windows: Every window of the dataset.
        split: The model's split description (``model.json`` → ``split``): ``{"by": "fold",
            "train_folds": [...], "test_fold": ..., "validation_fold": ...}`` or ``{"by":
            "split", "train": "train", ...}``.
        n_windows: Windows to draw (all of them when no more are available). Augmented copies
            are left out: the device sees original recordings.
        seed: Seed of the draw.

    Returns:
        ``(features, info)``: float32 ``[n, ...]`` and a JSON-able description (split, count,
        seed, digest of the chosen windows).

    Raises:
        ConfigError: unknown split kind, or no training windows.
    """
    if n_windows < 1:
        raise ConfigError(f"--representative-windows={n_windows} must be at least 1")
    labelled = windows.labels >= 0
    originals = windows.originals
    if split.get("by") == "fold":
        train_folds = [int(f) for f in split.get("train_folds", [])]
        held_out = {split.get("test_fold"), split.get("validation_fold")} - {None}
        if not train_folds or held_out & set(train_folds):
            raise ConfigError(f"model split {split} does not name training folds apart from held-out ones")
        mask = labelled & originals & np.isin(windows.folds, train_folds)
        source = {"by": "fold", "folds": train_folds}
    elif split.get("by") == "split":
        name = split.get("train", "train")
        mask = labelled & originals & (windows.splits == name)
        source = {"by": "split", "split": name}
    else:
        raise ConfigError(f"model split {split!r} is neither by fold nor by split name")
    available = np.flatnonzero(mask)
    if not len(available):
        raise ConfigError(f"the data has no windows of the model's training split {source}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(available, size=min(n_windows, len(available)), replace=False))
    features = np.ascontiguousarray(windows.features[chosen], dtype=np.float32)
    info = {
        **source,
        "n_windows": len(chosen),
        "n_available": len(available),
        "n_clips": len(set(windows.clip_ids[chosen].tolist())),
        "seed": seed,
        "sha256": hashlib.sha256(features.tobytes()).hexdigest(),
    }
    return features, info


# -- conversion -----------------------------------------------------------------------------


def convert_int8(model, *, representative: np.ndarray) -> bytes:
    """A full-integer int8 TFLite flatbuffer of a Keras classifier (batch 1).

    The model is exported with a fixed batch of one (so reshapes are static), converted with
    ``TFLITE_BUILTINS_INT8`` only, int8 input and output, calibrated on ``representative``.

    Args:
        model: Keras model taking ``[batch, *input_shape]`` float32.
        representative: float32 ``[n, *input_shape]`` calibration inputs.

    Returns:
        The flatbuffer bytes.

    Raises:
        ConfigError: the converter fails, or the result still holds float tensors (naming the
            ops that compute in float).
    """
    import keras
    import tensorflow as tf

    input_shape = tuple(int(d) for d in model.input_shape[1:])
    if tuple(representative.shape[1:]) != input_shape:
        raise ConfigError(
            f"representative windows have shape {list(representative.shape[1:])}, the model takes "
            f"{list(input_shape)}"
        )
    with tempfile.TemporaryDirectory(prefix="soundshard-edge-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serve",
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec([1, *input_shape], tf.float32, name="features")],
        )
        archive.write_out(os.path.join(tmp, "saved_model"), verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(os.path.join(tmp, "saved_model"))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8

        def batches():
            for x in representative:
                yield [x[None].astype(np.float32)]

        converter.representative_dataset = batches
        # the converter's native code logs its progress on stderr: kept out of the CLI's output
        with _captured_stderr():
            try:
                flatbuffer, error = converter.convert(), None
            except Exception as exc:  # the converter raises ConverterError, RuntimeError, ValueError ...
                flatbuffer, error = None, exc
        if error is not None:
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            raise ConfigError(
                f"model {model.name!r} cannot be converted to full-integer int8 TFLite: "
                f"{type(error).__name__}: {lines[-1] if lines else error}"
            ) from error
    check_fully_int8(describe_tflite(flatbuffer), what=f"model {model.name!r}")
    return flatbuffer


def describe_tflite(flatbuffer: bytes) -> dict:
    """Ops, tensor types and input/output quantisation of a TFLite flatbuffer.

    Returns:
        ``{"ops": [name...] (first use order), "op_counts": {name: n}, "tensor_types": [...],
        "float_ops": [(op, tensor types)...], "input": {...}, "output": {...}}``; input and
        output give ``shape``, ``dtype``, ``scale`` and ``zero_point``.
    """
    from tflite_micro.python.tflite_micro import runtime

    schema = runtime.schema_fb
    model = runtime.convert_bytearray_to_object(bytearray(flatbuffer))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    if len(model.subgraphs) != 1:
        raise ConfigError(f"the TFLite model has {len(model.subgraphs)} subgraphs; expected 1")
    graph = model.subgraphs[0]
    ops: list[str] = []
    counts: dict[str, int] = {}
    float_ops: list[list] = []
    for op in graph.operators or []:
        code = runtime.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
        name = op_names.get(code, f"BUILTIN_{code}")
        if name not in counts:
            ops.append(name)
        counts[name] = counts.get(name, 0) + 1
        tensors = [i for i in [*(op.inputs if op.inputs is not None else []), *op.outputs] if i >= 0]
        types = sorted({type_names[graph.tensors[i].type] for i in tensors})
        if set(types) - set(INTEGER_TYPES):
            float_ops.append([name, types])

    def io(index: int) -> dict:
        tensor = graph.tensors[index]
        quant = tensor.quantization
        scale = quant.scale if quant is not None and quant.scale is not None else []
        zero = quant.zeroPoint if quant is not None and quant.zeroPoint is not None else []
        return {
            "name": tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name),
            "shape": [int(d) for d in tensor.shape],
            "dtype": type_names[tensor.type].lower(),
            "scale": float(scale[0]) if len(scale) else None,
            "zero_point": int(zero[0]) if len(zero) else None,
        }

    return {
        "ops": ops,
        "op_counts": counts,
        "n_operators": sum(counts.values()),
        "n_tensors": len(graph.tensors),
        "tensor_types": sorted({type_names[t.type] for t in graph.tensors}),
        "float_ops": float_ops,
        "input": io(graph.inputs[0]),
        "output": io(graph.outputs[0]),
    }


def check_fully_int8(description: dict, *, what: str) -> None:
    """Refuses a flatbuffer that is not full-integer int8.

    Raises:
        ConfigError: naming the ops that compute in float and the tensor types found.
    """
    problems = []
    for key in ("input", "output"):
        if description[key]["dtype"] != "int8":
            problems.append(f"{key} is {description[key]['dtype']}")
    if description["float_ops"]:
        seen = sorted({f"{op} ({'/'.join(types)})" for op, types in description["float_ops"]})
        problems.append(f"ops left in float: {', '.join(seen)}")
    if problems:
        raise ConfigError(
            f"{what} cannot be fully int8-quantised: {'; '.join(problems)} (tensor types "
            f"{description['tensor_types']}; a microcontroller build needs int8 throughout: replace "
            "those layers, e.g. compute spectrograms outside the model)"
        )


def quantize(x: np.ndarray, *, scale: float, zero_point: int) -> np.ndarray:
    """float → int8 as TFLite does: ``clip(round(x / scale) + zero_point, -128, 127)``."""
    q = np.round(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, *, scale: float, zero_point: int) -> np.ndarray:
    """int8 → float32: ``(q - zero_point) * scale``."""
    return ((q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


# -- interpreters ---------------------------------------------------------------------------


@contextlib.contextmanager
def _captured_stderr():
    """Collects what native code writes to file descriptor 2 (TFLite Micro reports there)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        box: list[str] = []
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            box.append(sink.read().decode(errors="replace"))


def tflm_interpreter(flatbuffer: bytes, *, arena_size_bytes: int):
    """A TensorFlow Lite Micro interpreter (reference kernels) with an arena of the given size.

    Raises:
        RuntimeError: the arena is too small or an op is not supported by TFLite Micro.
    """
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(bytes(flatbuffer), arena_size=int(arena_size_bytes))


def tflm_invoke(flatbuffer: bytes, inputs: np.ndarray, *, arena_size_bytes: int) -> np.ndarray:
    """Runs each input through TensorFlow Lite Micro.

    Args:
        flatbuffer: int8 TFLite model with input ``[1, *shape]``.
        inputs: int8 ``[n, *shape]``.
        arena_size_bytes: Tensor arena size.

    Returns:
        int8 ``[n, n_outputs]``.

    Raises:
        ConfigError: TFLite Micro cannot allocate or run the model (message from TFLite Micro).
    """
    with _captured_stderr() as log:
        try:
            interpreter = tflm_interpreter(flatbuffer, arena_size_bytes=arena_size_bytes)
            outputs = []
            for x in inputs:
                interpreter.set_input(x[None], 0)
                interpreter.invoke()
                outputs.append(np.array(interpreter.get_output(0)).reshape(-1))
        except RuntimeError as exc:
            error = exc
        else:
            error = None
    if error is not None:
        detail = " ".join(line.strip() for line in log[0].splitlines() if line.strip())[:600]
        raise ConfigError(f"TensorFlow Lite Micro cannot run the model: {error} ({detail})") from error
    return np.stack(outputs).astype(np.int8) if outputs else np.zeros((0, 0), np.int8)


#: LiteRT kernel sets: its builtin int8 kernels (the same arithmetic as TensorFlow Lite Micro's,
#: expected bit-exact), or with the XNNPACK delegate (LiteRT's default on a desktop CPU, which
#: rounds some intermediates differently).
LITERT_KERNELS = ("builtin", "xnnpack")


def litert_invoke(flatbuffer: bytes, inputs: np.ndarray, *, kernels: str = "builtin") -> np.ndarray:
    """Runs each input through LiteRT (``ai-edge-litert``).

    Args:
        flatbuffer: int8 TFLite model with input ``[1, *shape]``.
        inputs: int8 ``[n, *shape]``.
        kernels: One of :data:`LITERT_KERNELS`.

    Returns:
        int8 ``[n, n_outputs]``.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if kernels not in LITERT_KERNELS:
        raise ConfigError(f"kernels={kernels!r} is not one of {LITERT_KERNELS}")
    resolver = (
        OpResolverType.AUTO if kernels == "xnnpack" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    interpreter = Interpreter(
        model_content=bytes(flatbuffer), num_threads=1, experimental_op_resolver_type=resolver
    )
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    for x in inputs:
        interpreter.set_tensor(input_index, x[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index).reshape(-1).copy())
    return np.stack(outputs).astype(np.int8) if outputs else np.zeros((0, 0), np.int8)


_TOTAL_RE = re.compile(r"Arena allocation total (\d+) bytes")
_HEAD_RE = re.compile(r"Arena allocation head (\d+) bytes")
_TAIL_RE = re.compile(r"Arena allocation tail (\d+) bytes")


def measure_arena(flatbuffer: bytes, *, sample_input: np.ndarray) -> dict:
    """The smallest tensor arena with which TensorFlow Lite Micro allocates and runs the model.

    Bisects the arena size (to 16 bytes) over "allocate, set the input, invoke", and reads the
    recording allocator's report of that run (head: activations; tail: persistent data).
    Measured on this host, where TFLite Micro's persistent structures hold 64-bit pointers: on a
    32-bit microcontroller they are smaller, so the figure is an upper bound for the reference
    kernels.

    Args:
        flatbuffer: int8 TFLite model.
        sample_input: int8 ``[*input_shape]`` (or with a batch axis of 1).

    Returns:
        ``{"measured_bytes", "allocation_total_bytes", "allocation_head_bytes",
        "allocation_tail_bytes", "method", "steps"}``.

    Raises:
        ConfigError: the model does not run even with a 64 MiB arena (message from TFLite Micro).
    """
    x = np.asarray(sample_input, dtype=np.int8)
    x = x if x.ndim and x.shape[0] == 1 else x[None]
    steps = 0

    def runs(size: int) -> bool:
        nonlocal steps
        steps += 1
        try:
            interpreter = tflm_interpreter(flatbuffer, arena_size_bytes=size)
            interpreter.set_input(x, 0)
            interpreter.invoke()
        except RuntimeError:
            return False
        return True

    with _captured_stderr() as log:
        high = max(4096, 4 * len(flatbuffer))
        while not runs(high) and high < _ARENA_LIMIT_BYTES:
            high *= 2
        fits = runs(high)
    if not fits:
        detail = " ".join(line.strip() for line in log[0].splitlines()[-6:] if line.strip())
        raise ConfigError(
            f"TensorFlow Lite Micro cannot run the model (arenas up to {high} bytes tried): {detail[:600]}"
        )
    low = 0  # invariant: runs(high), not runs(low)
    with _captured_stderr():
        while high - low > 16:
            middle = (low + high) // 2
            if runs(middle):
                high = middle
            else:
                low = middle
    with _captured_stderr() as report:
        interpreter = tflm_interpreter(flatbuffer, arena_size_bytes=high)
        interpreter.set_input(x, 0)
        interpreter.invoke()
        interpreter.print_allocations()
    text = report[0]

    def grab(pattern: re.Pattern) -> int | None:
        found = pattern.search(text)
        return int(found.group(1)) if found else None

    return {
        "measured_bytes": int(high),
        "allocation_total_bytes": grab(_TOTAL_RE),
        "allocation_head_bytes": grab(_HEAD_RE),
        "allocation_tail_bytes": grab(_TAIL_RE),
        "method": "bisection to 16 bytes over allocate+invoke with the tflite-micro Python interpreter "
        "(reference kernels, 64-bit host)",
        "steps": steps,
    }


def arena_with_margin(measured_bytes: int) -> tuple[int, int]:
    """``(arena_bytes, margin_bytes)``: measured plus ``max(10 %, 2 KiB)``, rounded up to 16."""
    margin = max(ARENA_MARGIN_MIN_BYTES, math.ceil(ARENA_MARGIN_FRACTION * measured_bytes))
    arena = -(-(measured_bytes + margin) // 16) * 16
    return arena, arena - measured_bytes


# -- verification ---------------------------------------------------------------------------


def compare_predictions(
    *,
    float_probabilities: np.ndarray,
    int8_outputs: np.ndarray,
    litert_outputs: dict[str, np.ndarray],
    output_scale: float,
    output_zero_point: int,
    windows: training.WindowSet,
    label_names: Sequence[str],
) -> dict:
    """Float against int8 predictions on held-out windows, and the two int8 interpreters.

    Args:
        float_probabilities: float ``[n_windows, n_classes]`` of the float model.
        int8_outputs: int8 ``[n_windows, n_classes]`` from TensorFlow Lite Micro.
        litert_outputs: int8 ``[n_windows, n_classes]`` from LiteRT, by kernel set
            (:data:`LITERT_KERNELS`).
        output_scale: Output quantisation scale.
        output_zero_point: Output quantisation zero point.
        windows: The held-out windows (labels and clip ids).
        label_names: Class names by index.

    Returns:
        JSON-able figures: window and clip (mean aggregation) accuracy of both, the delta in
        percentage points, per-class clip recall of both, window top-class agreement, and
        ``interpreters``: per LiteRT kernel set, the max absolute difference from TFLite Micro in
        int8 steps, the share of identical outputs and the top-class agreement.
    """
    int8_probabilities = dequantize(int8_outputs, scale=output_scale, zero_point=output_zero_point)
    float_metrics = training.evaluate_predictions(float_probabilities, windows, label_names)
    int8_metrics = training.evaluate_predictions(int8_probabilities, windows, label_names)
    per_class = {}
    for name in label_names:
        f = float_metrics["clip_mean"]["per_class"][name]["recall"]
        q = int8_metrics["clip_mean"]["per_class"][name]["recall"]
        per_class[name] = {
            "float_recall": f,
            "int8_recall": q,
            "delta_pp": round(100 * (q - f), 2),
            "support": float_metrics["clip_mean"]["per_class"][name]["support"],
        }
    float_top = float_probabilities.argmax(axis=1)
    int8_top = int8_outputs.argmax(axis=1)
    clip_f, clip_q = float_metrics["clip_mean"]["accuracy"], int8_metrics["clip_mean"]["accuracy"]
    return {
        "n_windows": len(windows),
        "n_clips": float_metrics["clip_mean"]["n"],
        "window_accuracy": {
            "float": float_metrics["window"]["accuracy"],
            "int8": int8_metrics["window"]["accuracy"],
        },
        "clip_accuracy": {"float": clip_f, "int8": clip_q, "delta_pp": round(100 * (clip_q - clip_f), 2)},
        "clip_macro_f1": {
            "float": float_metrics["clip_mean"]["macro_f1"],
            "int8": int8_metrics["clip_mean"]["macro_f1"],
        },
        "per_class": per_class,
        "window_top_class_agreement": round(float((float_top == int8_top).mean()), 4),
        "max_abs_probability_error": round(float(np.abs(int8_probabilities - float_probabilities).max()), 4),
        "interpreters": {
            f"tflite-micro vs litert-{kernels}": interpreter_agreement(int8_outputs, outputs)
            for kernels, outputs in litert_outputs.items()
        },
        "confusion_matrix": {
            "float": float_metrics["clip_mean"]["confusion_matrix"],
            "int8": int8_metrics["clip_mean"]["confusion_matrix"],
        },
    }


def interpreter_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Max absolute difference (int8 steps), share of identical rows and top-class agreement of
    two int8 output arrays ``[n, n_classes]``."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "max_abs_diff_steps": int(diff.max()) if diff.size else 0,
        "share_identical": round(float((diff == 0).all(axis=1).mean()), 4) if diff.size else 1.0,
        "top_class_agreement": round(float((a.argmax(axis=1) == b.argmax(axis=1)).mean()), 4)
        if diff.size
        else 1.0,
    }


# -- features on a device -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """What a device needs to compute the log-mel features of a config.

    Attributes:
        config: The feature configuration.
        window: float32 ``[n_fft]`` periodic Hann window.
        band_first_bin: uint16 ``[n_mels]`` first FFT bin with a non-zero weight, per mel band.
        band_n_bins: uint16 ``[n_mels]`` number of consecutive bins of each band.
        band_offset: uint16 ``[n_mels]`` index of each band's first weight in ``weights``.
        weights: float32 ``[sum(band_n_bins)]`` the non-zero filterbank weights, band after band.
        dct: float32 ``[n_mfcc, n_mels]`` the DCT-II rows of MFCC features (empty for log-mels).
        delta: float32 ``[mfcc_deltas, DELTA_WIDTH]`` the delta filters of orders 1.. (empty: none).
    """

    config: FeatureConfig
    window: np.ndarray
    band_first_bin: np.ndarray
    band_n_bins: np.ndarray
    band_offset: np.ndarray
    weights: np.ndarray
    dct: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))
    delta: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def window_samples(self) -> int:
        """Samples a device frames to make one analysis window: ``(frames - 1) * hop + n_fft``."""
        c = self.config
        start, stop = melscale.frame_span(
            first_frame=0, n_frames=c.window_frames, hop_length=c.hop_length, n_fft=c.n_fft
        )
        return stop - start

    @property
    def flash_bytes(self) -> int:
        """Bytes of the tables in flash."""
        floats = self.window.size + self.weights.size + self.dct.size + self.delta.size
        return 4 * floats + 2 * 3 * self.band_first_bin.size

    @property
    def ram_bytes(self) -> int:
        """Working RAM of the feature computation: an ``n_fft`` frame, the ``n_fft`` float FFT
        output (power computed in place) and one window of float log-mels ``[n_mels,
        window_frames]`` (``top_db`` needs the window's peak before the values are final); for MFCC
        also the ``[feature_rows, window_frames]`` window the DCT and deltas write."""
        c = self.config
        mfcc = c.feature_rows * c.window_frames if c.feature_type == "mfcc" else 0
        return 4 * (2 * c.n_fft + c.n_mels * c.window_frames + mfcc)

    def dense_filterbank(self) -> np.ndarray:
        """float32 ``[n_mels, 1 + n_fft // 2]`` rebuilt from the sparse form."""
        bank = np.zeros((self.config.n_mels, 1 + self.config.n_fft // 2), np.float32)
        for band in range(self.config.n_mels):
            first, count, offset = (
                int(a[band]) for a in (self.band_first_bin, self.band_n_bins, self.band_offset)
            )
            bank[band, first : first + count] = self.weights[offset : offset + count]
        return bank


def check_device_features(config: FeatureConfig) -> None:
    """Refuses feature configs a device cannot compute window by window.

    Raises:
        ConfigError: recording-scope normalisation (needs the whole recording first).
    """
    if config.normalization != "none" and config.normalization_scope == "recording":
        raise ConfigError(
            f"normalization={config.normalization!r} with normalization_scope='recording' needs whole "
            "recordings: a device computes features window by window (use normalization_scope='window')"
        )


def feature_tables(config: FeatureConfig) -> FeatureTables:
    """The window table and the sparse mel filterbank of ``config`` (equal to ``melspec``'s).

    Raises:
        ConfigError: see :func:`check_device_features`; a mel band whose non-zero weights are
            not contiguous (cannot happen for triangular filters).
    """
    check_device_features(config)
    bank = melspec.mel_filterbank(config)
    window = np.array(melscale.hann(config.n_fft))
    first, counts, offsets, weights = [], [], [], []
    for band, row in enumerate(bank):
        nonzero = np.flatnonzero(row > 0)
        start = int(nonzero[0]) if len(nonzero) else 0
        count = int(nonzero[-1] - start + 1) if len(nonzero) else 0
        if count and not (row[start : start + count] > 0).all():
            raise ConfigError(f"mel band {band} of features {config.fingerprint} has non-contiguous weights")
        first.append(start)
        counts.append(count)
        offsets.append(sum(len(w) for w in weights))
        weights.append(row[start : start + count])
    total = sum(counts)
    if total >= 2**16 or config.n_fft // 2 >= 2**16:
        raise ConfigError(f"n_fft={config.n_fft} is too large for the 16-bit filterbank index tables")
    mfcc = config.feature_type == "mfcc"
    return FeatureTables(
        config=config,
        window=window,
        band_first_bin=np.asarray(first, np.uint16),
        band_n_bins=np.asarray(counts, np.uint16),
        band_offset=np.asarray(offsets, np.uint16),
        weights=np.concatenate(weights).astype(np.float32) if weights else np.zeros(0, np.float32),
        dct=np.array(melspec.dct_matrix(config.n_mfcc, config.n_mels))
        if mfcc
        else np.zeros((0, 0), np.float32),
        delta=np.array(
            [melspec.delta_coefficients(order) for order in range(1, config.mfcc_deltas + 1)], np.float32
        ).reshape(config.mfcc_deltas, DELTA_WIDTH),
    )


def window_samples(y: np.ndarray, config: FeatureConfig, *, window_index: int) -> np.ndarray:
    """The samples a device frames to make window ``window_index`` of a recording.

    Frame ``j`` is centred on sample ``j * hop_length`` (zero padding outside the recording), so
    window ``k`` needs samples ``[k * window_hop_frames * hop_length - n_fft // 2, ... +
    (window_frames - 1) * hop_length + n_fft)``.

    Args:
        y: Mono float32 recording at ``config.sample_rate_hz``.
        config: Feature configuration.
        window_index: Window on the recording's grid.

    Returns:
        float32 ``[(window_frames - 1) * hop_length + n_fft]``.
    """
    start, stop = melscale.frame_span(
        first_frame=window_index * config.window_hop_frames,
        n_frames=config.window_frames,
        hop_length=config.hop_length,
        n_fft=config.n_fft,
    )
    n = stop - start
    out = np.zeros(n, np.float32)
    lo, hi = max(start, 0), min(start + n, len(y))
    if hi > lo:
        out[lo - start : hi - start] = y[lo:hi]
    return out


def golden_candidates(windows: training.WindowSet, window_index: np.ndarray, *, n_clips: int) -> list[int]:
    """Rows of ``windows`` to use as golden vectors: for classes in label order, the middle
    window of the class's first clip (sorted by clip id), cycling until ``n_clips`` rows.

    Args:
        windows: Held-out windows.
        window_index: int ``[n_windows]`` each window's index within its recording.
        n_clips: Rows wanted.
    """
    by_class: dict[int, list[str]] = {}
    for label, clip in sorted(set(zip(windows.labels.tolist(), windows.clip_ids.tolist(), strict=True))):
        by_class.setdefault(label, []).append(clip)
    rows: list[int] = []
    depth = 0
    while len(rows) < n_clips and any(depth < len(clips) for clips in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(rows) < n_clips:
                members = np.flatnonzero(windows.clip_ids == by_class[label][depth])
                members = members[np.argsort(window_index[members])]
                rows.append(int(members[len(members) // 2]))
        depth += 1
    return rows


# -- budget ---------------------------------------------------------------------------------


def budget(
    target: TargetProfile,
    *,
    model_bytes: int,
    feature_flash_bytes: int,
    arena_bytes: int,
    feature_ram_bytes: int,
) -> dict:
    """Flash and RAM needed against a target's budget.

    Returns:
        ``{"target", "flash": {...}, "ram": {...}, "fits"}``; each of flash and RAM lists its
        parts, ``needed_bytes``, ``budget_bytes`` and ``headroom_bytes`` (negative when over).
    """
    flash_needed = model_bytes + feature_flash_bytes + target.reserved_flash_bytes
    ram_needed = arena_bytes + feature_ram_bytes + target.reserved_ram_bytes
    flash = {
        "model_bytes": model_bytes,
        "feature_tables_bytes": feature_flash_bytes,
        "reserved_bytes": target.reserved_flash_bytes,
        "needed_bytes": flash_needed,
        "budget_bytes": target.flash_bytes,
        "headroom_bytes": target.flash_bytes - flash_needed,
    }
    ram = {
        "tensor_arena_bytes": arena_bytes,
        "feature_buffers_bytes": feature_ram_bytes,
        "reserved_bytes": target.reserved_ram_bytes,
        "needed_bytes": ram_needed,
        "budget_bytes": target.ram_bytes,
        "headroom_bytes": target.ram_bytes - ram_needed,
    }
    return {
        "target": target.to_dict(),
        "flash": flash,
        "ram": ram,
        "fits": flash["headroom_bytes"] >= 0 and ram["headroom_bytes"] >= 0,
    }


def budget_lines(report: dict) -> list[str]:
    """Human-readable lines of a :func:`budget` result (one for flash, one for RAM)."""
    flash, ram, name = report["flash"], report["ram"], report["target"]["name"]
    return [
        f"flash {_kib(flash['needed_bytes'])} of {_kib(flash['budget_bytes'])} on {name} "
        f"(model {_kib(flash['model_bytes'])} + feature tables {_kib(flash['feature_tables_bytes'])} "
        f"+ reserved {_kib(flash['reserved_bytes'])}): "
        + ("fits" if flash["headroom_bytes"] >= 0 else f"OVER by {_kib(-flash['headroom_bytes'])}"),
        f"RAM {_kib(ram['needed_bytes'])} of {_kib(ram['budget_bytes'])} on {name} "
        f"(tensor arena {_kib(ram['tensor_arena_bytes'])} + feature buffers "
        f"{_kib(ram['feature_buffers_bytes'])} + reserved {_kib(ram['reserved_bytes'])}): "
        + ("fits" if ram["headroom_bytes"] >= 0 else f"OVER by {_kib(-ram['headroom_bytes'])}"),
    ]


def _kib(n_bytes: int) -> str:
    return f"{n_bytes / 1024:.1f} KiB"


def tool_versions() -> dict:
    """Versions of the converter, the interpreters and the libraries behind them."""
    from importlib import metadata

    versions = {}
    for package in ("tensorflow", "keras", "tflite-micro", "ai-edge-litert", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["converter"] = f"tf.lite.TFLiteConverter (tensorflow {versions['tensorflow']}), MLIR"
    return versions


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
