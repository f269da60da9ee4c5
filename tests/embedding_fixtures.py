"""Small embedding models the tests (and the embedding benchmark) build and export themselves.

No model file is ever downloaded: OpenL3 weight files are written in the official layout from
randomly initialised networks, and the "other model" is a tiny SavedModel / TFLite export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: The tiny model's embedding: log energy of each of EMBEDDING_SIZE equal parts of the window
#: and their mean (the last value), so values are easy to recompute in numpy.
EMBEDDING_SIZE = 5


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Gives every BatchNorm layer random gamma, beta, mean and (positive) variance, so a weight
    file holds distinct values in every slot and a mix-up between slots shows."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                    rng.normal(0, 0.1, beta.shape).astype(np.float32),
                    rng.normal(0, 0.1, mean.shape).astype(np.float32),
                    rng.uniform(0.5, 2.0, variance.shape).astype(np.float32),
                ]
            )


def make_openl3_weights(
    folder: Path, *, input_repr: str = "mel256", content_type: str = "env", seed: int = 0
) -> Path:
    """Writes ``openl3_audio_<repr>_<content>.h5`` in the official layout from a random network."""
    import keras

    from soundshard.transforms.features import openl3

    keras.utils.set_random_seed(seed)
    model = openl3.build_openl3(input_repr=input_repr, content_type=content_type, embedding_size=512)
    randomize_batchnorm(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"openl3_audio_{input_repr}_{content_type}.h5"
    openl3.save_weights_official(model, path)
    return path


def tiny_embedding(windows: np.ndarray, size: int = EMBEDDING_SIZE) -> np.ndarray:
    """numpy reference of the tiny model: ``[batch, n]`` → ``[batch, size]``."""
    parts = size - 1
    n = windows.shape[1] // parts * parts
    energy = np.log(np.mean(windows[:, :n].reshape(len(windows), parts, -1) ** 2, axis=2) + 1e-6)
    return np.concatenate([energy, energy.mean(axis=1, keepdims=True)], axis=1).astype(np.float32)


def _tiny_fn(window_samples: int, size: int):
    import tensorflow as tf

    parts = size - 1
    n = window_samples // parts * parts

    def embed(waveform):
        x = tf.reshape(waveform[:, :n], [tf.shape(waveform)[0], parts, -1])
        energy = tf.math.log(tf.reduce_mean(tf.square(x), axis=2) + 1e-6)
        return tf.concat([energy, tf.reduce_mean(energy, axis=1, keepdims=True)], axis=1)

    return embed


def make_saved_model(folder: Path, *, window_samples: int, size: int = EMBEDDING_SIZE) -> Path:
    """A SavedModel whose ``serving_default`` takes ``waveform [batch, window_samples]`` and returns
    ``{"embedding": [batch, size], "peak": [batch]}`` (two outputs: the config must choose)."""
    import tensorflow as tf

    embed = _tiny_fn(window_samples, size)

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, window_samples], tf.float32, name="waveform")])
        def serve(self, waveform):
            return {"embedding": embed(waveform), "peak": tf.reduce_max(tf.abs(waveform), axis=1)}

    module = Tiny()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder


def make_waveform_saved_model(folder: Path, *, frame_samples: int, size: int = EMBEDDING_SIZE) -> Path:
    """A YAMNet-like SavedModel: no signature; ``__call__(waveform [n])`` returns
    ``(scores [n_frames, 2], embeddings [n_frames, size])`` for frames of ``frame_samples``."""
    import tensorflow as tf

    embed = _tiny_fn(frame_samples, size)

    class Frames(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, waveform):
            n_frames = tf.shape(waveform)[0] // frame_samples
            frames = tf.reshape(waveform[: n_frames * frame_samples], [n_frames, frame_samples])
            embeddings = embed(frames)
            return tf.zeros([n_frames, 2]), embeddings

    tf.saved_model.save(Frames(), str(folder), signatures={})
    return folder


def make_tflite(
    path: Path, *, window_samples: int, size: int = EMBEDDING_SIZE, batch: int | None = None
) -> Path:
    """The tiny model as a TFLite file with one output and input ``[batch, window_samples]``:
    a dynamic batch dimension (shape signature ``[-1, window_samples]``) when ``batch`` is None,
    else a fixed batch of ``batch`` windows per call."""
    import tensorflow as tf

    embed = _tiny_fn(window_samples, size)
    fn = tf.function(embed, input_signature=[tf.TensorSpec([batch, window_samples], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    path.write_bytes(converter.convert())
    return path


def make_scoring_tflite(path: Path, *, window_samples: int, size: int = EMBEDDING_SIZE) -> Path:
    """A classifier around the tiny model: its one output is 3 class scores (a softmax of a fixed
    projection of the embedding); the embedding is the intermediate tensor ``concat``."""
    import tensorflow as tf

    embed = _tiny_fn(window_samples, size)
    weights = tf.constant(np.random.default_rng(0).standard_normal((size, 3)).astype(np.float32))

    def scores(waveform):
        return tf.nn.softmax(tf.matmul(embed(waveform), weights))

    fn = tf.function(scores, input_signature=[tf.TensorSpec([None, window_samples], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    path.write_bytes(converter.convert())
    return path


def make_waveform_tflite(path: Path, *, frame_samples: int, size: int = EMBEDDING_SIZE) -> Path:
    """A YAMNet-like TFLite model: input one waveform ``[n]`` of any length (shape signature
    ``[-1]``), output ``[n_frames, size]``, the tiny embedding of frames of ``frame_samples``."""
    import tensorflow as tf

    embed = _tiny_fn(frame_samples, size)

    def frames(waveform):
        n_frames = tf.shape(waveform)[0] // frame_samples
        return embed(tf.reshape(waveform[: n_frames * frame_samples], [n_frames, frame_samples]))

    fn = tf.function(frames, input_signature=[tf.TensorSpec([None], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    path.write_bytes(converter.convert())
    return path


def make_batch_mixing_tflite(path: Path, *, window_samples: int, size: int = EMBEDDING_SIZE) -> Path:
    """A TFLite model whose shape signature says its batch is dynamic but whose rows depend on the
    other rows of the batch (the tiny embedding plus the batch's mean of it): only batches of one
    window give :func:`tiny_embedding`, as with models traced for a batch of 1."""
    import tensorflow as tf

    embed = _tiny_fn(window_samples, size)

    def mixed(waveform):
        e = embed(waveform)
        return 2.0 * e - tf.reduce_mean(e, axis=0, keepdims=True)

    fn = tf.function(mixed, input_signature=[tf.TensorSpec([None, window_samples], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    path.write_bytes(converter.convert())
    return path


def make_keras_saved_model(folder: Path, *, window_samples: int, size: int = EMBEDDING_SIZE, seed: int = 0):
    """An ordinary Keras model (convolution, batch norm, pooling, dense) exported with
    ``model.export()``; returns ``(folder, model)`` so tests can compare with ``model.predict``."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((window_samples,)),
            layers.Reshape((window_samples, 1)),
            layers.Conv1D(8, 64, strides=32, activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling1D(2),
            layers.Conv1D(8, 3, padding="same", activation="gelu"),
            layers.GlobalAveragePooling1D(),
            layers.Dense(16, activation="tanh"),
            layers.Dropout(0.1),
            layers.Dense(size),
        ]
    )
    randomize_batchnorm(model, seed)
    model.export(str(folder), verbose=False)
    return folder, model


def make_file_touching_saved_model(
    folder: Path, *, window_samples: int, read: str | None = None, write: str | None = None
) -> Path:
    """A SavedModel (``tf.saved_model.save``) whose ``serving_default`` reads the file ``read``
    (``tf.io.read_file``) or writes the file ``write`` (``tf.io.write_file``) on every call, then
    returns the tiny embedding: what an untrusted model must never get to do. Never loaded by the
    tests; only refused."""
    import tensorflow as tf

    embed = _tiny_fn(window_samples, EMBEDDING_SIZE)

    class Snoop(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, window_samples], tf.float32, name="waveform")])
        def serve(self, waveform):
            out = embed(waveform)
            if read is not None:
                out += 0.0 * tf.cast(tf.strings.length(tf.io.read_file(read)), tf.float32)
            if write is not None:
                with tf.control_dependencies([tf.io.write_file(write, "written by a model")]):
                    out = tf.identity(out)
            return {"embedding": out}

    module = Snoop()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder
