"""The OpenL3 audio embedding network in Keras 3, with the official weight-file layout.

OpenL3 (Cramer, Wu, Salamon & Bello, ICASSP 2019; https://github.com/marl/openl3, MIT) maps 1 s
of 48 kHz audio to an embedding of 512 or 6144 values. This is the audio network of the openl3
package rebuilt on current TensorFlow/Keras (the package needs kapre 0.3 and old TF/Keras and
downloads its weights in its setup script, so it is no dependency):

- front-end (:class:`OpenL3Frontend`, no weights): spectrogram of the 48000 samples, in dB
  relative to the window's maximum, clamped at -80 dB, shaped ``[n_bins, n_frames, 1]``:
  ``linear`` 257 x 197 (STFT 512, hop 242, no padding), ``mel128`` / ``mel256`` 128 or 256 x 199
  (STFT 2048, hop 242). ``frontend="0.4"`` follows openl3 0.4 (kapre 0.3): magnitude, Slaney
  mel filterbank, zeros padded at the end. ``frontend="0.3"`` follows openl3 0.3 (kapre 0.1.4,
  the front-end the weights were trained with): power, HTK mel filterbank (area-normalised),
  square root, 982 zeros padded on each side (TensorFlow 'same' padding).
- conv stack: BatchNorm on the input; three blocks of [Conv2D 3x3 same, BN, ReLU] x 2 then
  MaxPool 2x2 with 64, 128 and 256 filters; Conv2D 512, BN, ReLU; Conv2D 512 named
  ``audio_embedding_layer`` (linear). 4,689,860 parameters.
- embedding: MaxPool (same padding) and Flatten: pool (8, 8) for 6144 values and (32, 24) for 512
  with ``linear``/``mel256``; (4, 8) and (16, 24) with ``mel128``.

Weight files: the official ``openl3_audio_<repr>_<content>.h5`` (openl3 >= 0.4) are Keras 2
HDF5 weights-only files whose 16 weighted layers come in the order BN, (Conv2D, BN) x 7, Conv2D.
Keras 3 loads such files by the order of the weighted layers; so the front-end creates no
weights (its filterbank is a constant) and passes no complex tensors between layers.
:func:`save_weights_official` writes a network's weights in that layout (tests build such files
from randomly initialised networks, since the official files are not redistributed here).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from soundshard.schemas.embedding import (
    CONTENT_TYPES,
    FRONTENDS,
    INPUT_REPRS,
    OPENL3_EMBEDDING_SIZES,
    OPENL3_SAMPLE_RATE_HZ,
    EmbeddingConfig,
)
from soundshard.schemas.errors import ConfigError

#: Samples per window (1 s at 48 kHz).
WINDOW_SAMPLES = OPENL3_SAMPLE_RATE_HZ
HOP_LENGTH = 242
N_FFT = {"linear": 512, "mel128": 2048, "mel256": 2048}
N_MELS = {"mel128": 128, "mel256": 256}
POOL_SIZES = {
    "linear": {6144: (8, 8), 512: (32, 24)},
    "mel128": {6144: (4, 8), 512: (16, 24)},
    "mel256": {6144: (8, 8), 512: (32, 24)},
}
N_PARAMETERS = 4_689_860
#: Multiply-accumulates of one window through the conv stack (front-end not counted).
CONV_FILTERS = (64, 64, 128, 128, 256, 256, 512, 512)
_DB_FLOOR = -80.0
_AMIN = 1e-10
#: openl3 0.3 / kapre 0.1.4 pads 982 samples on each side ('same' padding of a 2048-sample
#: kernel with stride 242 over 48000 samples: 199 frames need 1964 samples more).
SAME_PAD = ((-(-WINDOW_SAMPLES // HOP_LENGTH) - 1) * HOP_LENGTH + 2048 - WINDOW_SAMPLES) // 2


def spectrogram_shape(input_repr: str) -> tuple[int, int, int]:
    """Front-end output ``(n_bins, n_frames, 1)``: (257, 197, 1), (128, 199, 1) or (256, 199, 1)."""
    if input_repr == "linear":
        return (N_FFT["linear"] // 2 + 1, 1 + (WINDOW_SAMPLES - N_FFT["linear"]) // HOP_LENGTH, 1)
    return (N_MELS[input_repr], -(-WINDOW_SAMPLES // HOP_LENGTH), 1)


def macs_per_window(input_repr: str) -> int:
    """Multiply-accumulates of the conv stack for one window (mel256 ~10.2 G, mel128 ~5.1 G)."""
    height, width, _ = spectrogram_shape(input_repr)
    total, channels = 0, 1
    for index, filters in enumerate(CONV_FILTERS):
        total += height * width * 9 * channels * filters
        channels = filters
        if index in (1, 3, 5):
            height, width = height // 2, width // 2
    return total


@functools.lru_cache(maxsize=8)
def mel_matrix(input_repr: str, frontend: str) -> np.ndarray:
    """Mel filterbank of a front-end as float32 ``[n_fft // 2 + 1, n_mels]`` (librosa's values).

    ``frontend="0.4"``: Slaney mel scale, Slaney (area) norm, 0 Hz to 24 kHz (kapre 0.3's
    defaults); ``"0.3"``: HTK mel scale with area norm (kapre 0.1.4 with ``htk=True``).
    """
    from soundshard.schemas.melscale import filterbank

    bank = filterbank(
        sample_rate_hz=OPENL3_SAMPLE_RATE_HZ,
        n_fft=N_FFT[input_repr],
        n_mels=N_MELS[input_repr],
        fmin_hz=0.0,
        fmax_hz=OPENL3_SAMPLE_RATE_HZ / 2,
        htk=frontend == "0.3",
        norm="slaney",
    )
    matrix = np.ascontiguousarray(bank.T)
    matrix.setflags(write=False)
    return matrix


def _keras():
    import keras

    return keras


def _frontend_class():
    keras = _keras()

    class OpenL3Frontend(keras.layers.Layer):
        """Audio ``[batch, 48000]`` → dB spectrogram ``[batch, n_bins, n_frames, 1]`` (no weights).

        Args:
            input_repr: ``"linear"``, ``"mel128"`` or ``"mel256"``.
            frontend: ``"0.4"`` or ``"0.3"`` (see the module docstring).
        """

        def __init__(self, *, input_repr: str = "mel256", frontend: str = "0.4", **kwargs):
            super().__init__(**kwargs)
            self.input_repr = input_repr
            self.frontend = frontend
            self._mel = None if input_repr == "linear" else mel_matrix(input_repr, frontend)

        def call(self, audio):
            import tensorflow as tf

            n_fft = N_FFT[self.input_repr]
            audio = tf.convert_to_tensor(audio, tf.float32)
            if self.frontend == "0.3" and self.input_repr != "linear":
                audio = tf.pad(audio, [[0, 0], [SAME_PAD, SAME_PAD]])
            pad_end = self.frontend == "0.4" and self.input_repr != "linear"
            stft = tf.signal.stft(
                audio,
                frame_length=n_fft,
                frame_step=HOP_LENGTH,
                fft_length=n_fft,
                window_fn=tf.signal.hann_window,  # periodic
                pad_end=pad_end,
            )  # [batch, n_frames, n_fft // 2 + 1], complex: never leaves this layer
            if self.frontend == "0.4":
                spectrum = tf.abs(stft)
                if self._mel is not None:
                    spectrum = tf.tensordot(spectrum, tf.constant(self._mel), axes=1)
            else:
                power = tf.math.square(tf.math.real(stft)) + tf.math.square(tf.math.imag(stft))
                if self._mel is not None:
                    power = tf.tensordot(power, tf.constant(self._mel), axes=1)
                spectrum = tf.sqrt(power)
            db = 10.0 * (tf.math.log(tf.maximum(spectrum, _AMIN)) / np.float32(np.log(10.0)))
            db = tf.maximum(db - tf.reduce_max(db, axis=[1, 2], keepdims=True), _DB_FLOOR)
            return tf.transpose(db, [0, 2, 1])[..., tf.newaxis]  # [batch, n_bins, n_frames, 1]

        def compute_output_shape(self, input_shape):
            return (input_shape[0], *spectrogram_shape(self.input_repr))

        def get_config(self):
            return {**super().get_config(), "input_repr": self.input_repr, "frontend": self.frontend}

    return OpenL3Frontend


@functools.cache
def frontend_layer_class():
    """The :class:`OpenL3Frontend` Keras layer class (built on first use: Keras imports lazily)."""
    return _frontend_class()


def build_openl3(
    *,
    input_repr: str = "mel256",
    content_type: str = "music",
    embedding_size: int = 6144,
    frontend: str = "0.4",
    include_frontend: bool = True,
):
    """The OpenL3 audio embedding network, randomly initialised.

    Args:
        input_repr: ``"linear"``, ``"mel128"`` or ``"mel256"``.
        content_type: ``"env"`` or ``"music"`` (same architecture; only the weights differ).
        embedding_size: 512 or 6144.
        frontend: ``"0.4"`` or ``"0.3"``.
        include_frontend: Without it the model takes spectrograms ``[batch, n_bins, n_frames, 1]``.

    Returns:
        A ``keras.Model`` from audio float32 ``[batch, 48000]`` (or spectrograms) to embeddings
        float32 ``[batch, embedding_size]``. Its weighted layers are, in order, BN, (Conv2D,
        BN) x 7, Conv2D, as in the official weight files.

    Raises:
        ConfigError: an unknown variant.
    """
    for name, value, allowed in (
        ("input_repr", input_repr, INPUT_REPRS),
        ("content_type", content_type, CONTENT_TYPES),
        ("embedding_size", embedding_size, OPENL3_EMBEDDING_SIZES),
        ("frontend", frontend, FRONTENDS),
    ):
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} must be one of {allowed}")
    keras = _keras()
    layers = keras.layers
    if include_frontend:
        audio = keras.Input(shape=(WINDOW_SAMPLES,), dtype="float32", name="audio")
        x = frontend_layer_class()(input_repr=input_repr, frontend=frontend, name="frontend")(audio)
    else:
        audio = x = keras.Input(shape=spectrogram_shape(input_repr), dtype="float32", name="spectrogram")
    x = layers.BatchNormalization(name="batch_normalization_1")(x)
    n_bn, n_conv = 1, 0
    for block, filters in enumerate((64, 128, 256, 512)):
        for repeat in range(2):
            n_conv += 1
            last = block == 3 and repeat == 1
            name = "audio_embedding_layer" if last else f"conv2d_{n_conv}"
            x = layers.Conv2D(filters, (3, 3), padding="same", kernel_initializer="he_normal", name=name)(x)
            if last:
                break
            n_bn += 1
            x = layers.BatchNormalization(name=f"batch_normalization_{n_bn}")(x)
            x = layers.Activation("relu", name=f"activation_{n_conv}")(x)
        if block < 3:
            x = layers.MaxPooling2D((2, 2), strides=2, name=f"max_pooling2d_{block + 1}")(x)
    pool = POOL_SIZES[input_repr][embedding_size]
    x = layers.MaxPooling2D(pool_size=pool, padding="same", name="embedding_pool")(x)
    embedding = layers.Flatten(name="embedding")(x)
    name = f"openl3_audio_{input_repr}_{content_type}_{embedding_size}"
    return keras.Model(audio, embedding, name=name)


def weighted_layers(model) -> list:
    """The layers of ``model`` that hold weights, in order (16 for OpenL3)."""
    return [layer for layer in model.layers if layer.weights]


def save_weights_official(model, path: str | os.PathLike) -> None:
    """Writes ``model``'s weights as a Keras 2 HDF5 weights-only file, as the official files are.

    Root attributes ``layer_names`` (every layer, weighted or not), ``backend`` and
    ``keras_version``; one group per layer with the attribute ``weight_names``
    (``conv2d_1/kernel:0`` ...) and one dataset per weight under that name. BatchNorm weights
    are gamma, beta, moving mean, moving variance; Conv2D weights kernel ``[3, 3, in, out]``,
    bias.
    """
    import h5py

    names = [layer.name for layer in model.layers]
    with h5py.File(os.fspath(path), "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            weights = list(layer.trainable_weights) + list(layer.non_trainable_weights)
            weight_names = [f"{layer.name}/{_weight_suffix(w)}:0".encode() for w in weights]
            group.attrs["weight_names"] = np.array(weight_names, dtype="S")
            for name, weight in zip(weight_names, weights, strict=True):
                group.create_dataset(name.decode(), data=np.asarray(weight.numpy()))


def _weight_suffix(weight) -> str:
    return weight.path.rsplit("/", 1)[-1]


def official_layer_summary(path: str | os.PathLike) -> list[tuple[str, list[tuple[int, ...]]]]:
    """``(layer name, [weight shapes])`` of the weighted layers in a weight file, in file order."""
    import h5py

    with h5py.File(os.fspath(path), "r") as f:
        group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        summary = []
        for raw in group.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            weight_names = group[name].attrs.get("weight_names", [])
            shapes = [
                tuple(group[name][w.decode() if isinstance(w, bytes) else w].shape) for w in weight_names
            ]
            if shapes:
                summary.append((name, shapes))
    return summary


def load_openl3(config: EmbeddingConfig, weights_path: str | os.PathLike):
    """The OpenL3 network of ``config`` with the weights of a local official-layout file.

    Raises:
        ConfigError: a missing file, or one whose layers or shapes do not fit the network.
    """
    path = os.fspath(weights_path)
    expected = config.expected_weights_name
    if not os.path.isfile(path):
        raise ConfigError(
            f"OpenL3 weight file not found: {path!r} (expected {expected}, published by the openl3 "
            "project; soundshard never downloads it)"
        )
    model = build_openl3(
        input_repr=config.input_repr,
        content_type=config.content_type,
        embedding_size=config.embedding_size,
        frontend=config.frontend,
    )
    # Keras picks the legacy (order-based) loader by the file name's extension.
    link = None
    if not path.endswith((".h5", ".hdf5")):
        import tempfile

        link = os.path.join(tempfile.mkdtemp(prefix="soundshard-openl3-"), expected)
        os.symlink(os.path.abspath(path), link)
    try:
        model.load_weights(link or path)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(
            f"{path!r} is not an OpenL3 audio weight file in the official layout (expected {expected}: "
            f"16 weighted layers BN, (Conv2D, BN) x 7, Conv2D): {exc}"
        ) from exc
    finally:
        if link is not None:
            os.unlink(link)
            os.rmdir(os.path.dirname(link))
    return model
