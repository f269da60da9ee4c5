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
- ``mlp`` / ``linear``: a small multilayer perceptron (or a linear layer) on flat inputs, for
  embeddings.

Every model starts with a ``Normalization`` layer adapted to the training windows, so the saved
model takes features exactly as the features pipeline writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from soundshard.schemas.errors import ConfigError

MODEL_NAMES = ("sbcnn", "edgecnn", "mlp", "linear")


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
):
    """A Keras model by name, ending in a softmax over ``n_classes``.

    Args:
        name: One of :data:`MODEL_NAMES`.
        input_shape: Shape of one example without the batch axis, e.g. ``[n_mels, n_frames]``
            for log-mel windows or ``[embedding_size]``.
        n_classes: Number of classes.
        normalization: ``(mean, variance)`` of the training inputs (scalars or broadcastable
            arrays) baked into the model's first layer; ``None`` leaves inputs as they are.
        dropout: Dropout rate before the dense layers.
        l2: L2 penalty of the dense layers' kernels.

    Raises:
        ConfigError: unknown name, or an input shape the model cannot take.
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
    if name in ("sbcnn", "edgecnn"):
        if len(input_shape) != 2:
            raise ConfigError(
                f"model={name!r} needs [n_mels, n_frames] inputs, got shape {list(input_shape)}"
            )
        x = layers.Reshape((*input_shape, 1))(x)
        x = _sbcnn_body(x, dropout=dropout, l2=l2) if name == "sbcnn" else _edgecnn_body(x, dropout=dropout)
    else:
        x = layers.Flatten()(x) if len(input_shape) > 1 else x
        if name == "mlp":
            x = layers.Dense(256, activation="relu", kernel_regularizer=keras.regularizers.L2(l2))(x)
            x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(n_classes, kernel_regularizer=keras.regularizers.L2(l2), name="logits")(x)
    outputs = layers.Softmax(name="probabilities")(outputs)
    return keras.Model(inputs, outputs, name=name)


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
    x = layers.Dense(64, activation="relu", kernel_regularizer=keras.regularizers.L2(l2), name="fc")(x)
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


def read_description(folder: str) -> dict:
    """``model.json`` of a model folder (local path or object-store URI).

    Raises:
        ConfigError: no model folder there, or a model.json that is not JSON.
    """
    import json

    import fsspec

    try:
        with fsspec.open(f"{folder.rstrip('/')}/model.json", "r") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"--model {folder!r} is not a model folder (no model.json)") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model {folder!r}: model.json is not valid JSON ({exc})") from exc


def load_keras_file(path: str):
    """A local Keras model file, loaded in safe mode (no code in the file is executed), not compiled."""
    return _keras().models.load_model(path, compile=False, safe_mode=True)


def model_file(description: dict) -> str:
    """Name of the Keras file in a model folder."""
    return description.get("model_file", "model.keras")


def load_classifier(folder: str):
    """A trained model folder: ``(keras model, description from model.json)``.

    Raises:
        ConfigError: the folder is not a soundshard model folder.
    """
    description = read_description(folder)
    return load_keras_file(f"{folder.rstrip('/')}/{model_file(description)}"), description


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
    from soundshard.transforms import training

    model, description = load_classifier(folder)
    dataset = training.read_dataset_json(data_dir)
    check_fingerprint(description, dataset, what=f"--data {data_dir!r}")
    if dataset["label_map"] != description["label_map"]:
        raise ConfigError(
            f"--data {data_dir!r} labels {sorted(dataset['label_map'])} differ from the model's "
            f"{description['label_names']}"
        )
    return model, description, dataset
