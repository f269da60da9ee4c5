"""The Keras 3 OpenL3 network: architecture, front-ends, official weight layout, regression data.

The official weight files are not redistributed here: layout tests write files in that layout
from randomly initialised networks. ``test_matches_openl3_regression_outputs`` compares with
openl3's own outputs when ``SOUNDSHARD_OPENL3_WEIGHTS`` names a folder holding real weight files
(``openl3_audio_mel256_music.h5``, ``openl3_audio_linear_env.h5``).

Tolerance of that comparison: per window, relative L2 error ``|a - b| / |b|`` below 0.05 and
cosine similarity above 0.998. openl3 resamples with resampy (``kaiser_best``), soundshard with
soxr (HQ); that difference alone, measured with a randomly initialised network on the same
chirp, gives a relative error of ~0.005 per window (cosine 0.99999). The bound leaves ten times
that for the other differences: TensorFlow and Keras versions, kapre 0.1.4's convolutional DFT
against ``tf.signal.stft``, float32 summation order. openl3's own tests use
``allclose(rtol=1e-5, atol=1e-5)``, which only the same TF ops on the same versions meet.
"""

import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from soundshard.schemas.embedding import EmbeddingConfig
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.audio.framing import FrameGrid
from soundshard.transforms.features import openl3
from soundshard.transforms.features.embeddings import KerasEmbedder, embed_waveform

from ..embedding_fixtures import randomize_batchnorm
from ..helpers import SHARED_DATA

REGRESSION = SHARED_DATA / "openl3_regression"
REL_L2_TOLERANCE = 0.05
COSINE_TOLERANCE = 0.998


def test_architecture_of_every_variant():
    for input_repr in ("linear", "mel128", "mel256"):
        for size in (512, 6144):
            model = openl3.build_openl3(input_repr=input_repr, embedding_size=size)
            assert model.count_params() == openl3.N_PARAMETERS == 4_689_860
            assert model.output_shape == (None, size)
            assert model.get_layer("frontend").output.shape[1:] == openl3.spectrogram_shape(input_repr)
            kinds = [type(layer).__name__ for layer in openl3.weighted_layers(model)]
            assert kinds == ["BatchNormalization"] + ["Conv2D", "BatchNormalization"] * 7 + ["Conv2D"]
            assert model.get_layer("audio_embedding_layer").get_config()["activation"] == "linear"
            assert not model.get_layer("frontend").weights  # weights load by layer order
    assert openl3.spectrogram_shape("linear") == (257, 197, 1)
    assert openl3.spectrogram_shape("mel128") == (128, 199, 1)
    assert openl3.macs_per_window("mel256") == pytest.approx(10.2e9, rel=0.01)
    assert openl3.macs_per_window("mel128") == pytest.approx(5.1e9, rel=0.01)


def _reference_spectrogram(audio: np.ndarray, input_repr: str, frontend: str) -> np.ndarray:
    """numpy/librosa version of openl3's front-ends (kapre 0.3 and 0.1.4), ``[n_bins, n_frames]``."""
    import librosa

    n_fft = openl3.N_FFT[input_repr]
    if input_repr != "linear":
        if frontend == "0.4":
            padded = np.pad(audio, (0, 199 * 242 + n_fft - 242 - len(audio)))
        else:
            padded = np.pad(audio, (982, 982))
    else:
        padded = audio
    stft = librosa.stft(padded, n_fft=n_fft, hop_length=242, window="hann", center=False)
    if input_repr == "linear":
        spectrum = np.abs(stft)
    else:
        with warnings.catch_warnings():  # mel256 has empty bands at 2048 points (as in openl3)
            warnings.simplefilter("ignore")
            bank = librosa.filters.mel(
                sr=48000, n_fft=n_fft, n_mels=openl3.N_MELS[input_repr], htk=frontend == "0.3", norm="slaney"
            )
        spectrum = bank @ np.abs(stft) if frontend == "0.4" else np.sqrt(bank @ np.abs(stft) ** 2)
    db = 10 * np.log10(np.maximum(spectrum, 1e-10))
    return np.maximum(db - db.max(), -80.0)


@pytest.mark.parametrize("input_repr", ["linear", "mel128", "mel256"])
@pytest.mark.parametrize("frontend", ["0.4", "0.3"])
def test_frontend_matches_numpy_reference(input_repr, frontend):
    layer = openl3.frontend_layer_class()(input_repr=input_repr, frontend=frontend)
    rng = np.random.default_rng(1)
    t = np.arange(48000) / 48000
    audio = np.stack(
        [
            (0.3 * np.sin(2 * np.pi * (200 + 4000 * t) * t) + 0.01 * rng.standard_normal(48000)),
            0.5 * rng.standard_normal(48000) * np.linspace(0, 1, 48000),
        ]
    ).astype(np.float32)
    got = np.asarray(layer(audio))
    assert got.shape == (2, *openl3.spectrogram_shape(input_repr))
    for row, y in zip(got, audio, strict=True):
        expected = _reference_spectrogram(y.astype(np.float64), input_repr, frontend)
        np.testing.assert_allclose(row[..., 0], expected, atol=0.02)


def test_official_weight_layout_loads_layer_for_layer(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    source = openl3.build_openl3(input_repr="mel128", content_type="env", embedding_size=512)
    randomize_batchnorm(source, seed=3)
    path = tmp_path / "openl3_audio_mel128_env.h5"
    openl3.save_weights_official(source, path)
    # the file is laid out as the official ones: Keras 2 weights-only, 16 weighted layers in order
    with h5py.File(path, "r") as f:
        version = f.attrs["keras_version"]
        assert (
            "model_weights" not in f
            and (version.decode() if isinstance(version, bytes) else version)[:2] == "2."
        )
        assert f["conv2d_1"].attrs["weight_names"].tolist() == [b"conv2d_1/kernel:0", b"conv2d_1/bias:0"]
    summary = openl3.official_layer_summary(path)
    assert [name for name, _ in summary] == (
        ["batch_normalization_1"]
        + [n for k in range(1, 8) for n in (f"conv2d_{k}", f"batch_normalization_{k + 1}")]
        + ["audio_embedding_layer"]
    )
    assert summary[0][1] == [(1,)] * 4
    assert summary[-1][1] == [(3, 3, 512, 512), (512,)]
    config = EmbeddingConfig(input_repr="mel128", content_type="env", embedding_size=512)
    loaded = openl3.load_openl3(config, path)
    pairs = list(zip(openl3.weighted_layers(source), openl3.weighted_layers(loaded), strict=True))
    assert len(pairs) == 16
    for original, restored in pairs:
        assert original.name == restored.name
        for a, b in zip(original.get_weights(), restored.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    audio = np.random.default_rng(0).standard_normal((2, 48000)).astype(np.float32)
    np.testing.assert_array_equal(source.predict_on_batch(audio), loaded.predict_on_batch(audio))


def test_weight_file_errors_name_the_file(tmp_path):
    config = EmbeddingConfig(input_repr="linear", content_type="env")
    with pytest.raises(ConfigError, match="openl3_audio_linear_env.h5"):
        openl3.load_openl3(config, tmp_path / "missing.h5")
    import keras

    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    bad = tmp_path / "not_openl3.h5"
    openl3.save_weights_official(small, bad)
    with pytest.raises(ConfigError, match="not an OpenL3 audio weight file.*openl3_audio_linear_env.h5"):
        openl3.load_openl3(config, bad)


REGRESSION_CASES = [
    # file, weights, config, (center, hop_s)
    ("chirp_44k_kapre.npz", "mel256", "music", 6144, "0.4", True, 0.1),
    ("chirp_44k.npz", "mel256", "music", 6144, "0.3", True, 0.1),
    ("chirp_44k_kapre_linear.npz", "linear", "env", 512, "0.4", False, 0.5),
    ("chirp_44k_linear.npz", "linear", "env", 512, "0.3", False, 0.5),
]


def _regression_data(name: str):
    path = REGRESSION / name
    if not path.is_file():
        pytest.skip(f"openl3 regression data not found at {path} (../shared is absent in a fresh clone)")
    return np.load(path)


@pytest.mark.data
@pytest.mark.parametrize("case", REGRESSION_CASES, ids=[c[0] for c in REGRESSION_CASES])
def test_framing_matches_regression_timestamps(case):
    import soundfile

    name, input_repr, content, size, frontend, center, hop_s = case
    reference = _regression_data(name)
    config = EmbeddingConfig(
        input_repr=input_repr, content_type=content, embedding_size=size, center=center, hop_s=hop_s
    )
    info = soundfile.info(str(REGRESSION / "chirp_44k.wav"))
    grid = FrameGrid.from_config(config)
    _, n_windows = grid.recording_windows(source_frames=info.frames, source_rate_hz=info.samplerate)
    assert n_windows == len(reference["timestamps"]) == len(reference["embedding"])
    assert reference["embedding"].shape[1] == size
    starts, _ = grid.window_bounds_s(0, n_windows)
    np.testing.assert_allclose(starts + grid.pad_start_samples / 48000, reference["timestamps"], atol=1e-9)


@pytest.mark.data
@pytest.mark.parametrize("case", REGRESSION_CASES, ids=[c[0] for c in REGRESSION_CASES])
def test_matches_openl3_regression_outputs(case):
    name, input_repr, content, size, frontend, center, hop_s = case
    reference = _regression_data(name)
    folder = os.environ.get("SOUNDSHARD_OPENL3_WEIGHTS")
    if not folder:
        pytest.skip("set SOUNDSHARD_OPENL3_WEIGHTS to a folder with the official OpenL3 weight files")
    weights = Path(folder) / f"openl3_audio_{input_repr}_{content}.h5"
    if not weights.is_file():
        pytest.skip(f"{weights} not found (SOUNDSHARD_OPENL3_WEIGHTS)")
    import soundfile

    config = EmbeddingConfig(
        input_repr=input_repr,
        content_type=content,
        embedding_size=size,
        frontend=frontend,
        center=center,
        hop_s=hop_s,
    )
    model = KerasEmbedder(openl3.load_openl3(config, weights), size)
    y, sr = soundfile.read(str(REGRESSION / "chirp_44k.wav"), dtype="float32")
    embeddings, timestamps = embed_waveform(y, sample_rate_hz=sr, config=config, model=model)
    expected = reference["embedding"]
    np.testing.assert_allclose(timestamps, reference["timestamps"], atol=1e-9)
    rel = np.linalg.norm(embeddings - expected, axis=1) / np.linalg.norm(expected, axis=1)
    cosine = (embeddings * expected).sum(axis=1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert rel.max() < REL_L2_TOLERANCE, f"relative L2 error per window {np.round(rel, 4)}"
    assert cosine.min() > COSINE_TOLERANCE, f"cosine per window {np.round(cosine, 5)}"
