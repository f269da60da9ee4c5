import librosa
import numpy as np
import pytest

from soundshard.schemas.config import FeatureConfig
from soundshard.transforms.features import melspec

from ..helpers import tone


def reference_windows(y: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """librosa on the whole (zero-padded) recording, windows sliced, top_db per window."""
    n = melspec.window_count(len(y), config)
    wf, wh = config.window_frames, config.window_hop_frames
    needed_frames = (n - 1) * wh + wf
    padded = np.zeros(max(len(y), (needed_frames - 1) * config.hop_length), np.float32)
    padded[: len(y)] = y
    mel = librosa.feature.melspectrogram(
        y=padded,
        sr=config.sample_rate_hz,
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
        fmin=config.fmin_hz,
        fmax=config.fmax_resolved_hz,
        power=config.power,
        htk=config.mel_htk,
        center=True,
        pad_mode="constant",
    )
    db = librosa.power_to_db(mel, ref=config.db_ref, amin=config.amin, top_db=None)
    windows = np.stack([db[:, k * wh : k * wh + wf] for k in range(n)])
    if config.top_db is not None:
        windows = np.maximum(windows, windows.max(axis=(1, 2), keepdims=True) - config.top_db)
    return windows


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"n_mels": 128, "n_fft": 2048, "hop_length": 256},
        {"power": 1.0, "mel_htk": True},
        {
            "sample_rate_hz": 16000,
            "fmin_hz": 50.0,
            "fmax_hz": 7000.0,
            "window_frames": 31,
            "window_hop_frames": 31,
        },
    ],
)
def test_log_mel_matches_librosa(changes):
    config = FeatureConfig(**changes)
    y = tone(sample_rate_hz=config.sample_rate_hz, duration_s=2.3, freq_hz=1234.0)
    ours = melspec.log_mel_windows(y, config)
    ref = reference_windows(y, config)
    assert ours.shape == ref.shape == (melspec.window_count(len(y), config), *config.feature_shape)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_filterbank_matches_librosa():
    for config in (FeatureConfig(), FeatureConfig(mel_htk=True, mel_norm="none", fmax_hz=8000.0)):
        ref = librosa.filters.mel(
            sr=config.sample_rate_hz,
            n_fft=config.n_fft,
            n_mels=config.n_mels,
            fmin=config.fmin_hz,
            fmax=config.fmax_resolved_hz,
            htk=config.mel_htk,
            norm="slaney" if config.mel_norm == "slaney" else None,
        )
        np.testing.assert_allclose(melspec.mel_filterbank(config), ref, rtol=1e-5, atol=1e-8)


def test_window_count_edges():
    config = FeatureConfig()  # 41-frame windows every 20 frames, hop 512
    hop = config.hop_length
    # exactly one window: 41 frames need 40 * 512 samples (frames = 1 + n // hop)
    assert melspec.window_count(40 * hop, config) == 1
    # one frame more than a window: padded second window, or dropped
    assert melspec.window_count(41 * hop, config) == 2
    assert melspec.window_count(41 * hop, config.replace(last_window="drop")) == 1
    # exactly two full windows (60 hops + 1 frame), nothing left to pad
    assert melspec.window_count(60 * hop, config) == 2
    # shorter than a window
    assert melspec.window_count(1000, config) == 1
    assert melspec.window_count(1000, config.replace(last_window="drop")) == 0
    assert melspec.window_count(0, config) == 0
    # 5 s at 22050 Hz: 216 frames -> 9 full windows + 1 padded
    assert melspec.window_count(110250, config) == 10


def test_windows_lie_on_one_grid():
    config = FeatureConfig()
    y = tone(duration_s=3.0)
    whole = melspec.log_mel_windows(y, config)
    # the second window equals the first window of the signal started one window hop later
    shift = config.window_hop_frames * config.hop_length
    shifted = melspec.log_mel_windows(y[shift:], config)
    np.testing.assert_allclose(whole[2], shifted[1], atol=1e-4)
    starts, ends = melspec.window_bounds_s(len(whole), config)
    assert starts[1] == pytest.approx(config.window_hop_s)
    np.testing.assert_allclose(ends - starts, config.window_s)


def test_padded_last_window_is_silence_beyond_the_end():
    config = FeatureConfig(top_db=None)
    y = tone(duration_s=1.2)
    windows = melspec.log_mel_windows(y, config)
    floor = 10 * np.log10(config.amin)
    assert windows.shape[0] == 2
    assert np.isclose(windows[-1][:, -1], floor).all()  # last frames lie past the end


def test_normalization_window_and_recording_scope():
    y = tone(duration_s=2.0)
    std = melspec.log_mel_windows(y, FeatureConfig(normalization="standardize"))
    np.testing.assert_allclose(std.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(std.std(axis=(1, 2)), 1, atol=1e-3)
    rec = melspec.log_mel_windows(y, FeatureConfig(normalization="mean", normalization_scope="recording"))
    assert abs(rec.mean()) < 1e-3
    assert not np.allclose(rec.mean(axis=(1, 2)), 0, atol=1e-3)


def test_digital_silence_gives_finite_constant_features():
    y = np.zeros(22050, np.float32)
    for norm in ("none", "standardize"):
        out = melspec.log_mel_windows(y, FeatureConfig(normalization=norm))
        assert np.isfinite(out).all()
        assert np.ptp(out) == 0


def test_single_window_recording_is_writable_and_normalised():
    out = melspec.log_mel_windows(tone(duration_s=0.3), FeatureConfig(normalization="standardize"))
    assert out.shape == (1, 60, 41) and out.flags.writeable
    assert abs(out.mean()) < 1e-4


@pytest.mark.parametrize("deltas", [0, 1, 2])
def test_mfcc_windows_match_librosa(deltas):
    """Each MFCC window is librosa.feature.mfcc of its log-mel window, its deltas
    librosa.feature.delta of those coefficients over the window's frames."""
    y = tone(freq_hz=1500.0, duration_s=2.0)
    config = FeatureConfig(feature_type="mfcc", n_mfcc=13, mfcc_deltas=deltas)
    got = melspec.log_mel_windows(y, config)
    log_mel = melspec.log_mel_windows(y, FeatureConfig())
    assert got.shape == (len(log_mel), 13 * (1 + deltas), 41)
    for window, spectrogram in zip(got, log_mel, strict=True):
        coefficients = librosa.feature.mfcc(S=spectrogram, n_mfcc=13)
        np.testing.assert_allclose(window[:13], coefficients, atol=1e-3)
        for order in range(1, deltas + 1):
            expected = librosa.feature.delta(coefficients, order=order)
            np.testing.assert_allclose(window[13 * order : 13 * (order + 1)], expected, atol=1e-4)
    # whole-recording MFCC with librosa's own pipeline, on a one-window clip without top_db
    one = FeatureConfig(feature_type="mfcc", n_mfcc=20, top_db=None)
    clip = y[: 40 * 512]
    expected = librosa.feature.mfcc(
        y=clip, sr=22050, n_mfcc=20, n_fft=1024, hop_length=512, n_mels=60, center=True, pad_mode="constant"
    )
    np.testing.assert_allclose(melspec.log_mel_windows(clip, one)[0], expected, rtol=1e-4, atol=2e-3)


def test_mfcc_window_level_is_the_mean_band_level():
    config = FeatureConfig(feature_type="mfcc", n_mfcc=13, mfcc_deltas=1)
    y = tone(freq_hz=800.0, duration_s=1.5)
    log_mel = melspec.log_mel_windows(y, FeatureConfig())
    level = melspec.window_level_db(melspec.log_mel_windows(y, config), config)
    np.testing.assert_allclose(level, log_mel.mean(axis=1).max(axis=1), atol=1e-3)
    np.testing.assert_allclose(
        melspec.window_level_db(log_mel, FeatureConfig()), log_mel.reshape(len(log_mel), -1).max(axis=1)
    )


def test_frame_span_and_the_layers_below_the_maths():
    from pathlib import Path

    from soundshard.schemas import melscale

    # frame j is centred on sample j * hop: frames 3 and 4 of a 1024/512 STFT read [1024, 2560)
    assert melscale.frame_span(first_frame=3, n_frames=2, hop_length=512, n_fft=1024) == (1024, 2560)
    assert melscale.frame_span(first_frame=0, n_frames=1, hop_length=512, n_fft=1024) == (-512, 512)
    np.testing.assert_array_equal(melscale.hann(8), np.hanning(9)[:8].astype(np.float32))
    # schemas hold definitions: they import nothing from transforms or pipelines
    for path in Path(melscale.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "soundshard.transforms" not in text and "soundshard.pipelines" not in text, path.name
