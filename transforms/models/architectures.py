"""Classifier architectures: log-mel windows (or embeddings) → class probabilities (Keras 3).

- ``sbcnn``: SB-CNN (Salamon & Bello, "Deep Convolutional Neural Networks and Data Augmentation
  for Environmental Sound Classification", 2017): three 5×5 convolutions (24, 48, 48 filters),
  max-pooling after the first two, a 64-unit dense layer with dropout 0.5 and L2 0.001. The
  paper's (4, 2) pooling fits its 128×128 input; for the 60×41 windows of the default features
  the pooling is (3, 3), as in the ESC-CNN-microcontroller variants.
- ``edgecnn``: an edge-sized CNN in the spirit of ESC-CNN-microcontroller's strided
  depthwise-separable models: a strided 3×3 stem and strided depthwise-separable blocks, global
  average pooling, one dense layer: tens of thousands of parameters and a few hundred thousand
  MACs per window, within a Cortex-M4's budget.
- ``dscnn-xs`` / ``dscnn-s`` / ``dscnn-m`` / ``dscnn-l``: a scalable family of
  depthwise-separable CNNs (MobileNet-style: a 3×3 stem, four stages of depthwise 3×3 + pointwise
  1×1 blocks, each stage halving both axes in its first block, residual connections between the
  repeated blocks of a stage, global average pooling). Named sizes differ in width, depth and the
  stem's stride; ``width`` and ``depth`` multipliers scale any of them. ``dscnn-xs`` and
  ``dscnn-s`` fit a Cortex-M4 with 256 KB of RAM as int8; ``dscnn-l`` is the largest that trains
  in reasonable time on a laptop CPU. Every op (convolution, depthwise convolution, add, mean,
  fully connected, softmax) runs in TFLite Micro as int8.
- ``mobilenetv2`` / ``mobilenetv3-small`` / ``mobilenetv3-large``: image backbones of Keras
  Applications on the log-mel image (transfer learning): the window resized to at least 64×64,
  its one channel repeated to the three an ImageNet model takes, the backbone without its top
  (global average pooling), dropout and a dense layer. Pretrained weights come only from a file
  the user names (``backbone_weights``; nothing is downloaded); the width multiplier is the
  backbone's ``alpha``.
- ``mlp`` / ``linear``: a small multilayer perceptron (or a linear layer) on flat inputs, for
  embeddings.

Every model starts with a ``Normalization`` layer adapted to the training windows, so the saved
model takes features exactly as the features pipeline writes them.

Model folders (``soundshard train`` output) are read here only: ``model.json`` carries an integrity
digest over all its fields and the model file's bytes, and every loader (:func:`read_description`,
:func:`load_classifier`, tagging's ``load_classifier_from``) verifies it before any use and refuses
a folder that was edited, names a model file outside itself, or holds a file that Keras' safe mode
will not load. The digest is not a signature: it keeps a folder self-consistent, it does not prove
who wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import warnings
from collections.abc import Sequence

import numpy as np

from soundshard.schemas.errors import ConfigError
from soundshard.schemas.training import BACKBONES, CNN_NAMES, DSCNN_SIZE_NAMES, MODEL_NAMES  # noqa: F401


@dataclasses.dataclass(frozen=True)
class DscnnSize:
    """One named size of the ``dscnn`` family.

    Attributes:
        stem: Filters of the 3×3 stem convolution.
        stem_stride: Its stride on both axes (2 halves the input at once: less memory and MACs).
        stages: Filters of the four stages' pointwise convolutions.
        blocks: Blocks per stage (the first strided, the others residual).
    """

    stem: int
    stem_stride: int
    stages: tuple[int, ...]
    blocks: int


#: Named sizes of the depthwise-separable family, smallest first.
DSCNN_SIZES = {
    "xs": DscnnSize(stem=16, stem_stride=2, stages=(24, 32, 48, 64), blocks=1),
    "s": DscnnSize(stem=24, stem_stride=2, stages=(32, 64, 96, 128), blocks=1),
    "m": DscnnSize(stem=32, stem_stride=1, stages=(48, 64, 128, 192), blocks=2),
    "l": DscnnSize(stem=48, stem_stride=1, stages=(64, 128, 192, 256), blocks=3),
}
#: Smallest side of the image a backbone is given (the log-mel window is resized up to it).
BACKBONE_MIN_SIDE = 64
#: Names of the layers before and after an image backbone inside a classifier.
BACKBONE_INPUT, BACKBONE_OUTPUT = "rgb", "backbone_dropout"


def scaled_filters(filters: int, width: float) -> int:
    """``filters × width`` rounded to a multiple of 8 (4 below 16), at least 8: channel counts that
    int8 kernels vectorise well."""
    step = 8 if filters * width >= 16 else 4
    return max(8, int(round(filters * width / step)) * step)


def dscnn_layout(size: str, *, width: float = 1.0, depth: float = 1.0) -> DscnnSize:
    """The layers of ``dscnn-<size>`` scaled by the ``width`` and ``depth`` multipliers.

    Raises:
        ConfigError: unknown size, or a multiplier that is not positive.
    """
    if size not in DSCNN_SIZES:
        raise ConfigError(f"dscnn size {size!r} is not one of {tuple(DSCNN_SIZES)}")
    if not width > 0 or not depth > 0:
        raise ConfigError(f"width={width} and depth={depth} multipliers must be positive")
    base = DSCNN_SIZES[size]
    return DscnnSize(
        stem=scaled_filters(base.stem, width),
        stem_stride=base.stem_stride,
        stages=tuple(scaled_filters(f, width) for f in base.stages),
        blocks=max(1, int(round(base.blocks * depth))),
    )


def _keras():
    import keras

    return keras


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    n_classes: int,
    normalization: tuple[np.ndarray, np.ndarray] | None = None,
    dropout: float = 0.5,
    l2: float = 0.001,
    head: str = "softmax",
    background_output: bool = False,
    width: float = 1.0,
    depth: float = 1.0,
    backbone_weights: str | None = None,
):
    """A Keras model by name, ending in a softmax over ``n_classes`` (or a sigmoid per class).

    Args:
        name: One of :data:`MODEL_NAMES`.
        input_shape: Shape of one example without the batch axis, e.g. ``[n_mels, n_frames]``
            for log-mel windows or ``[embedding_size]``.
        n_classes: Number of classes.
        normalization: ``(mean, variance)`` of the training inputs (scalars or broadcastable
            arrays) baked into the model's first layer; ``None`` leaves inputs as they are.
        dropout: Dropout rate before the dense layers.
        l2: L2 penalty of the dense layers' kernels.
        head: ``softmax`` (the classes exclude each other) or ``sigmoid`` (a probability per
            class, several may be present; ``probabilities`` then holds the sigmoids).
        background_output: With a softmax head, one more output, the background (last): trained
            on windows of none of the classes; :func:`without_background` leaves it out.
        width: Width multiplier of the ``dscnn`` family (filters of every layer).
        depth: Depth multiplier of the ``dscnn`` family (blocks per stage).
        backbone_weights: An image backbone's pretrained weights (a Keras weights file of the
            backbone without its top, e.g. ``..._no_top.h5``), or ``None`` (random initial weights).

    Raises:
        ConfigError: unknown name, an input shape the model cannot take, multipliers given to a
            model they do not scale, or backbone weights that do not fit the backbone.
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"model={name!r} is not one of {MODEL_NAMES}")
    if n_classes < 2:
        raise ConfigError(f"n_classes={n_classes}: a classifier needs at least 2 classes")
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(shape=tuple(input_shape), name="features")
    x = inputs
    if normalization is not None:
        mean, variance = normalization
        x = layers.Normalization(axis=None, mean=float(np.mean(mean)), variance=float(np.mean(variance)))(x)
    family = name.partition("-")[0]
    if name in BACKBONES:
        if depth != 1.0:
            raise ConfigError(f"the depth multiplier scales the dscnn family, not model={name!r}")
    elif family != "dscnn" and (width != 1.0 or depth != 1.0):
        raise ConfigError(f"width and depth multipliers scale the dscnn family, not model={name!r}")
    if backbone_weights is not None and name not in BACKBONES:
        raise ConfigError(f"backbone weights are for the image backbones {BACKBONES}, not model={name!r}")
    if name in CNN_NAMES:
        if len(input_shape) != 2:
            raise ConfigError(
                f"model={name!r} needs [n_features, n_frames] inputs, got shape {list(input_shape)}"
            )
        x = layers.Reshape((*input_shape, 1))(x)
        if name == "sbcnn":
            x = _sbcnn_body(x, dropout=dropout, l2=l2)
        elif name == "edgecnn":
            x = _edgecnn_body(x, dropout=dropout)
        elif name in BACKBONES:
            x = _backbone_body(x, name=name, alpha=width, weights=backbone_weights, dropout=dropout)
        else:
            layout = dscnn_layout(name.partition("-")[2], width=width, depth=depth)
            x = _dscnn_body(x, layout=layout, dropout=dropout)
    else:
        x = layers.Flatten()(x) if len(input_shape) > 1 else x
        if name == "mlp":
            x = layers.Dense(256, activation="relu", kernel_regularizer=keras.regularizers.L2(l2))(x)
            x = layers.Dropout(dropout)(x)
    if head not in ("softmax", "sigmoid"):
        raise ConfigError(f"head={head!r} is not softmax or sigmoid")
    width = n_classes + (1 if background_output and head == "softmax" else 0)
    # the head computes in float32 under any policy: a softmax in float16 loses small probabilities
    # (mixed precision, :func:`as_float32`)
    outputs = layers.Dense(
        width, kernel_regularizer=keras.regularizers.L2(l2), name="logits", dtype="float32"
    )(x)
    if head == "softmax":
        outputs = layers.Softmax(name="probabilities", dtype="float32")(outputs)
    else:
        outputs = layers.Activation("sigmoid", name="probabilities", dtype="float32")(outputs)
    return keras.Model(inputs, outputs, name=name)


def as_float32(model):
    """``model`` as a float32 model with the same weights: every layer (nested models' too) made
    again with the float32 policy. A model trained under mixed precision computes in float16 and
    keeps float32 weights; it is saved as float32, so that tagging, evaluation and the int8
    conversion see one kind of model whatever trained it."""
    keras = _keras()
    if all(layer.dtype_policy.name == "float32" for layer in _all_layers(model)):
        return model

    def made_float32(layer):
        config = layer.get_config()
        if "dtype" in config:  # a layer; plain operations (ops.add, say) have no policy
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=made_float32, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def _all_layers(model) -> list:
    """Every layer of ``model``, those of nested models included."""
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if hasattr(layer, "layers"):
            layers.extend(_all_layers(layer))
    return layers


def without_background(model, n_classes: int):
    """``model`` (softmax with a last background output) as a model of the ``n_classes`` classes'
    probabilities only: a fixed selection layer (a Dense layer with an identity kernel, so the
    model stays loadable in safe mode and fully int8-convertible). The probabilities no longer sum
    to one: what is missing is the background's."""
    keras = _keras()
    width = int(model.output_shape[-1])
    select = keras.layers.Dense(n_classes, use_bias=False, trainable=False, name="classes")
    outputs = select(model.output)
    select.set_weights([np.eye(width, n_classes, dtype=np.float32)])
    return keras.Model(model.input, outputs, name=model.name)


def average_of(members: Sequence, *, name: str = "ensemble"):
    """One model whose output is the mean of ``members``' outputs (models of one input and output
    shape): each member's layers copied with their weights, renamed ``member<i>_<layer>``, into
    one flat graph on a shared input. Flat, it loads in safe mode and converts to TFLite as any
    single model does (a model nested in another would not round-trip through a .keras file)."""
    keras = _keras()
    first = members[0]
    shapes = {(tuple(m.input_shape[1:]), tuple(m.output_shape[1:])) for m in members}
    if len(shapes) != 1:
        raise ConfigError(f"ensemble members differ in input or output shape: {sorted(shapes)}")
    inputs = keras.Input(shape=first.input_shape[1:], name=first.inputs[0].name.split(":")[0])
    outputs = []
    for index, member in enumerate(members):

        def renamed(layer, index=index):
            config = layer.get_config()
            config["name"] = f"member{index}_{layer.name}"
            return layer.__class__.from_config(config)

        copy = keras.models.clone_model(member, input_tensors=inputs, clone_function=renamed)
        copy.set_weights(member.get_weights())
        outputs.append(copy.output)
    if len(outputs) == 1:
        return keras.Model(inputs, outputs[0], name=name)
    return keras.Model(inputs, keras.layers.Average(name="mean_of_members")(outputs), name=name)


def _sbcnn_body(x, *, dropout: float, l2: float, pool: tuple[int, int] = (3, 3)):
    keras = _keras()
    layers = keras.layers
    for index, filters in enumerate((24, 48, 48)):
        x = layers.Conv2D(filters, (5, 5), padding="same", name=f"conv{index}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"conv{index}_bn")(x)
        if index < 2:
            x = layers.MaxPooling2D(pool_size=pool, padding="same", name=f"pool{index}")(x)
        x = layers.ReLU(name=f"conv{index}_relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(dropout)(x)
    # a leaky ReLU on the dense layer: with a plain one, on data dominated by one group (the
    # background of annotated recordings) nearly all its units could die in the first epochs and
    # the model never learn (its output constant whatever the input)
    x = layers.Dense(64, kernel_regularizer=keras.regularizers.L2(l2), name="fc")(x)
    x = layers.LeakyReLU(negative_slope=0.1, name="fc_relu")(x)
    return layers.Dropout(dropout)(x)


def _edgecnn_body(x, *, dropout: float, filters: Sequence[int] = (24, 48, 64, 96)):
    layers = _keras().layers
    x = layers.Conv2D(filters[0], (3, 3), strides=(2, 2), padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for index, width in enumerate(filters[1:]):
        x = layers.DepthwiseConv2D((3, 3), strides=(2, 2), padding="same", use_bias=False, name=f"dw{index}")(
            x
        )
        x = layers.BatchNormalization(momentum=0.9, name=f"dw{index}_bn")(x)
        x = layers.ReLU(name=f"dw{index}_relu")(x)
        x = layers.Conv2D(width, (1, 1), use_bias=False, name=f"pw{index}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"pw{index}_bn")(x)
        x = layers.ReLU(name=f"pw{index}_relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dropout(dropout)(x)


def _backbone_body(x, *, name: str, alpha: float, weights: str | None, dropout: float):
    keras = _keras()
    layers = keras.layers
    height, width = int(x.shape[1]), int(x.shape[2])
    size = (max(height, BACKBONE_MIN_SIDE), max(width, BACKBONE_MIN_SIDE))
    if size != (height, width):
        x = layers.Resizing(*size, interpolation="bilinear", name="to_image")(x)
    x = layers.Concatenate(name=BACKBONE_INPUT)([x, x, x])  # the ImageNet filters take three channels
    if name == "mobilenetv2":
        make = functools.partial(keras.applications.MobileNetV2, alpha=alpha)
    else:
        make = functools.partial(
            keras.applications.MobileNetV3Small
            if name.endswith("small")
            else keras.applications.MobileNetV3Large,
            alpha=alpha,
            minimalistic=False,
            include_preprocessing=False,  # inputs are normalised log-mels, not 0-255 pixels
        )
    # Built on this model's tensor (input_tensor), so its layers are this model's own: a nested
    # model would not round-trip through a .keras file with its weights.
    try:
        backbone = make(input_tensor=x, include_top=False, weights=None, pooling="avg")
    except ValueError as exc:
        raise ConfigError(f"model={name!r} with width multiplier {alpha}: {exc}") from exc
    if weights is not None:
        try:
            with _no_container_walk_warning():
                backbone.load_weights(weights)
        except (ValueError, OSError) as exc:
            raise ConfigError(
                f"--backbone-weights {weights!r} do not fit {name} (width multiplier {alpha}, input "
                f"{[*size, 3]}, no top): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
    return layers.Dropout(dropout, name=BACKBONE_OUTPUT)(backbone.output)


def backbone_layers(model) -> list:
    """The layers of a classifier's image backbone (between the three-channel image and the
    dropout after its pooling), or ``[]`` for other models: what is frozen before fine-tuning."""
    names = [layer.name for layer in model.layers]
    if BACKBONE_INPUT not in names or BACKBONE_OUTPUT not in names:
        return []
    return model.layers[names.index(BACKBONE_INPUT) + 1 : names.index(BACKBONE_OUTPUT)]


def _dscnn_body(x, *, layout: DscnnSize, dropout: float):
    layers = _keras().layers

    def bn_relu(y, name):
        y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(y)
        return layers.ReLU(name=f"{name}_relu")(y)

    stride = (layout.stem_stride, layout.stem_stride)
    x = layers.Conv2D(layout.stem, (3, 3), strides=stride, padding="same", use_bias=False, name="stem")(x)
    x = bn_relu(x, "stem")
    for stage, filters in enumerate(layout.stages):
        for block in range(layout.blocks):
            name = f"s{stage}b{block}"
            strides = (2, 2) if block == 0 else (1, 1)
            y = layers.DepthwiseConv2D(
                (3, 3), strides=strides, padding="same", use_bias=False, name=f"{name}_dw"
            )(x)
            y = bn_relu(y, f"{name}_dw")
            y = layers.Conv2D(filters, (1, 1), use_bias=False, name=f"{name}_pw")(y)
            y = layers.BatchNormalization(momentum=0.9, name=f"{name}_pw_bn")(y)
            if block > 0:  # same shape as the block's input: a residual connection
                y = layers.Add(name=f"{name}_add")([x, y])
            x = layers.ReLU(name=f"{name}_relu")(y)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dropout(dropout)(x)


def count_macs(model) -> int:
    """Multiply-accumulates of one forward pass of one example (convolutions and dense layers;
    normalisation, pooling and activations are not counted)."""
    keras = _keras()
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += int(layer.input.shape[-1]) * layer.units
    return int(total)


# -- model folders --------------------------------------------------------------------------------

MODEL_JSON = "model.json"
#: model.json's key for the digest that binds it and the model file together.
INTEGRITY = "integrity"
INTEGRITY_VERSION = 1
#: What ``model_file`` may be: a plain ``.keras`` file name, so a model folder can only name a file
#: inside itself (never ``../x.keras``, an absolute path or a URL) and only the format that Keras
#: loads in safe mode.
_MODEL_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.keras")


def canonical_json(value) -> bytes:
    """``value`` as canonical JSON bytes (sorted keys, no whitespace): the form that is hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _covered(description: dict) -> dict:
    # Everything model.json says except the integrity block itself. Each field is acted on by some
    # command (labels, label map and thresholds name and gate the events; the feature config,
    # fingerprint and input decide the features; split and training.model drive compile-edge and
    # the run records; model_file names what is loaded), and one that no command reads today may be
    # read tomorrow: covering all of it leaves nothing editable without notice.
    return {key: value for key, value in description.items() if key != INTEGRITY}


def integrity_of(description: dict, *, model_file_sha256: str) -> dict:
    """The integrity block of a model folder (model.json → ``integrity``).

    Args:
        description: model.json's content (its ``integrity`` key, if any, is left out).
        model_file_sha256: SHA-256 (hex) of the model file's bytes.

    Returns:
        ``{"version", "model_file_sha256", "fields", "digest"}``: ``digest`` is the SHA-256 of the
        canonical JSON of the model file's hash and every other field of model.json; ``fields``
        holds a short hash per field, only to name what was edited.
    """
    covered = _covered(description)
    return {
        "version": INTEGRITY_VERSION,
        "model_file_sha256": model_file_sha256,
        "fields": {key: _sha256(canonical_json(value))[:16] for key, value in sorted(covered.items())},
        "digest": _sha256(canonical_json({"model_file_sha256": model_file_sha256, "model_json": covered})),
    }


def file_sha256(uri: str) -> str:
    """SHA-256 (hex) of a local or object-store file's bytes, read through fsspec."""
    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        for block in iter(lambda: f.read(4 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_file(description: dict, *, folder: str = "") -> str:
    """Name of the Keras file in a model folder (a plain ``.keras`` file name inside it).

    Raises:
        ConfigError: ``model_file`` is not a plain ``.keras`` file name (a path, a URL, ``..``).
    """
    name = description.get("model_file", "model.keras")
    if not isinstance(name, str) or not _MODEL_FILE_NAME.fullmatch(name):
        raise ConfigError(
            f"--model-dir {folder!r}: model.json names model_file {name!r}; it must be a plain .keras file "
            "name inside the model folder (no path, no URL)"
        )
    return name


def verify_description(folder: str, description: dict) -> None:
    """Checks that model.json and the model file are as ``soundshard train`` wrote them.

    Raises:
        ConfigError: a ``model_file`` that is not a plain file name in the folder, a missing model
            file, no integrity digest (a folder from before soundshard checked them), a model file
            whose bytes changed, or edited model.json fields (named when they can be told).
    """
    if not isinstance(description, dict):
        raise ConfigError(f"--model-dir {folder!r}: model.json is not a JSON object")
    name = model_file(description, folder=folder)
    sealed = description.get(INTEGRITY)
    if not isinstance(sealed, dict) or not isinstance(sealed.get("digest"), str):
        # Refused rather than trusted: a folder without a digest cannot be told apart from an
        # edited one whose digest was deleted, so accepting it would make the check optional.
        raise ConfigError(
            f"--model-dir {folder!r}: model.json has no integrity digest (written before soundshard "
            "checked model folders, or stripped); retrain it with `soundshard train`"
        )
    path = f"{folder.rstrip('/')}/{name}"
    try:
        actual_sha = file_sha256(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"--model-dir {folder!r}: the model file {name!r} is missing") from exc
    expected = integrity_of(description, model_file_sha256=actual_sha)
    if expected["digest"] == sealed["digest"]:
        return
    problems = []
    if actual_sha != sealed.get("model_file_sha256"):
        problems.append(
            f"{name} has SHA-256 {actual_sha}, not the {sealed.get('model_file_sha256')} it had when trained"
        )
    recorded = sealed.get("fields")
    if isinstance(recorded, dict):
        now = expected["fields"]
        changed = sorted(k for k in set(now) & set(recorded) if now[k] != recorded[k])
        added, removed = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
        parts = [f"fields {', '.join(changed)} changed"] if changed else []
        parts += [f"fields {', '.join(added)} added"] if added else []
        parts += [f"fields {', '.join(removed)} removed"] if removed else []
        if parts:
            problems.append(f"model.json edited: {'; '.join(parts)} since training")
    if not problems:
        problems.append("model.json's integrity digest does not match its content (edited)")
    raise ConfigError(f"--model-dir {folder!r}: {'; '.join(problems)}; refusing the model folder")


def read_description(folder: str) -> dict:
    """``model.json`` of a model folder (local path or object-store URI), verified against its
    integrity digest and the model file's bytes (:func:`verify_description`) before any use.

    Raises:
        ConfigError: no model folder there, a model.json that is not JSON, or a folder that is not
            as ``soundshard train`` wrote it.
    """
    import fsspec

    try:
        with fsspec.open(f"{folder.rstrip('/')}/{MODEL_JSON}", "r") as f:
            description = json.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"--model-dir {folder!r} is not a model folder (no model.json)") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-dir {folder!r}: model.json is not valid JSON ({exc})") from exc
    verify_description(folder, description)
    return description


def load_keras_file(path: str):
    """A local Keras model file, loaded in safe mode (no code in the file is executed), not compiled."""
    with _no_container_walk_warning():
        return _keras().models.load_model(path, compile=False, safe_mode=True)


@contextlib.contextmanager
def _no_container_walk_warning():
    # Keras 3.13 walks a functional model's layers once more through its per-depth operation
    # lists; where a depth holds several layers (branches: residual adds, the backbones' blocks)
    # it warns that the list has no group in the file, though every layer was loaded through the
    # model's layer list already (tests compare the loaded weights with the saved ones).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping nested container at '_operations_by_depth")
        yield


def load_verified_model(folder: str, description: dict):
    """The Keras model of a verified model folder (remote files copied locally), in safe mode.

    The local copy's bytes are checked against the digest again, so what is loaded is what was
    verified, and the model must give one score per label of model.json.

    Raises:
        ConfigError: the file changed since it was verified, cannot be loaded in Keras safe mode
            (corrupt, or unsafe such as a Lambda layer), or does not fit model.json.
    """
    from soundshard.transforms.features.embeddings import local_model

    name = model_file(description, folder=folder)
    with local_model(f"{folder.rstrip('/')}/{name}") as path:
        if file_sha256(path) != description[INTEGRITY]["model_file_sha256"]:
            raise ConfigError(f"--model-dir {folder!r}: {name} changed while it was being loaded")
        try:
            model = load_keras_file(path)
        except Exception as exc:  # noqa: BLE001 (Keras raises many types for a bad file)
            raise ConfigError(
                f"--model-dir {folder!r}: {name} cannot be loaded in Keras safe mode "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
    labels = description.get("label_names") or []
    outputs = model.output_shape[-1] if isinstance(model.output_shape, tuple) else None
    if outputs != len(labels):
        raise ConfigError(
            f"--model-dir {folder!r}: {name} gives {outputs} scores per window for {len(labels)} labels"
        )
    shape = description.get("input", {}).get("shape")
    if shape is not None and list(model.input_shape[1:]) != list(shape):
        raise ConfigError(
            f"--model-dir {folder!r}: {name} takes inputs of shape {list(model.input_shape[1:])}, "
            f"model.json says {shape}"
        )
    return model


def verify_model_folder(folder: str) -> dict:
    """Verifies a model folder completely on the launcher and returns its description: the digest,
    and a trial load of the model in Keras safe mode, so that a corrupt or unsafe model file
    stops the run before any audio is read instead of failing in every worker's RunInference.

    Raises:
        ConfigError: as :func:`read_description` and :func:`load_verified_model`.
    """
    description = read_description(folder)
    load_verified_model(folder, description)
    return description


def load_classifier(folder: str):
    """A trained model folder: ``(keras model, description from model.json)``, verified.

    Raises:
        ConfigError: the folder is not a soundshard model folder, or not as training wrote it.
    """
    description = read_description(folder)
    return load_verified_model(folder, description), description


def check_fingerprint(description: dict, dataset: dict, *, what: str) -> None:
    """Refuses data whose feature config differs from the model's (same config, same numbers).

    Raises:
        ConfigError: naming both fingerprints and the fields that differ.
    """
    want, got = description["feature_fingerprint"], dataset["feature_fingerprint"]
    if want == got:
        return
    a, b = description.get("feature_config", {}), dataset.get("feature_config", {})
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    detail = ", ".join(f"{k}: model {a.get(k)!r} vs {what} {b.get(k)!r}" for k in differ)
    raise ConfigError(
        f"the model was trained on features {want}, but {what} has features {got} "
        f"({detail or 'unknown fields'})"
    )


def load_with_data(folder: str, data_dir: str):
    """A model folder and the dataset it is to run on: ``(model, description, dataset)``, with the
    dataset's features and labels checked against the model's.

    Raises:
        ConfigError: not a model folder, no dataset, other features or other labels.
    """
    from soundshard.transforms.models import training

    model, description = load_classifier(folder)
    dataset = training.read_dataset_json(data_dir)
    check_fingerprint(description, dataset, what=f"--features {data_dir!r}")
    if dataset["label_map"] != description["label_map"]:
        raise ConfigError(
            f"--features {data_dir!r} labels {sorted(dataset['label_map'])} differ from the model's "
            f"{description['label_names']}"
        )
    return model, description, dataset
