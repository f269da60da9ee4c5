"""Log-mel features for whole recordings, computed in vectorised form (no Beam imports).

The maths equal ``librosa.feature.melspectrogram(y, center=True, pad_mode="constant")`` followed
by ``librosa.power_to_db`` (tested), but run on all frames of a work unit at once in float32 with
``scipy.fft``, and cut windows as views of one spectrogram instead of recomputing overlaps.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft
import scipy.signal

from soundshard.schemas.config import FeatureConfig

_STD_FLOOR = 1e-6


def mel_filterbank(config: FeatureConfig) -> np.ndarray:
    """Mel filterbank of ``config`` as float32 ``[n_mels, 1 + n_fft // 2]`` (librosa's)."""
    return _mel_filterbank(
        config.sample_rate_hz,
        config.n_fft,
        config.n_mels,
        float(config.fmin_hz),
        config.fmax_resolved_hz,
        config.mel_htk,
        config.mel_norm,
    )


@functools.lru_cache(maxsize=32)
def _mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm) -> np.ndarray:
    import warnings

    import librosa

    with warnings.catch_warnings():
        # Empty bands are reported by FeatureConfig with the values that cause them.
        warnings.simplefilter("ignore", UserWarning)
        bank = librosa.filters.mel(
            sr=sr,
            n_fft=n_fft,
            n_mels=n_mels,
            fmin=fmin,
            fmax=fmax,
            htk=htk,
            norm="slaney" if norm == "slaney" else None,
            dtype=np.float32,
        )
    bank.setflags(write=False)
    return bank


@functools.lru_cache(maxsize=8)
def _hann(n_fft: int) -> np.ndarray:
    window = scipy.signal.get_window("hann", n_fft, fftbins=True).astype(np.float32)
    window.setflags(write=False)
    return window


def frame_count(n_samples: int, config: FeatureConfig) -> int:
    """STFT frames of a signal of ``n_samples`` (``center=True``): ``1 + n_samples // hop``."""
    return 1 + n_samples // config.hop_length


def window_count(n_samples: int, config: FeatureConfig) -> int:
    """Number of analysis windows a recording of ``n_samples`` (at the config rate) yields.

    Full windows are those whose frames all lie within the recording's frames; with
    ``last_window="pad"`` one more window covers the remaining frames (and a recording shorter
    than one window gives one padded window); with ``"drop"`` the remainder is dropped.
    """
    frames = frame_count(n_samples, config)
    wf, wh = config.window_frames, config.window_hop_frames
    if frames < wf:
        return 1 if config.last_window == "pad" and n_samples > 0 else 0
    full = (frames - wf) // wh + 1
    if config.last_window == "pad" and (full - 1) * wh + wf < frames:
        full += 1
    return full


def power_mel_frames(y: np.ndarray, config: FeatureConfig, *, n_frames: int) -> np.ndarray:
    """Mel power spectrogram of the first ``n_frames`` frames of ``y``.

    Samples beyond ``y`` count as zeros (librosa's constant padding), so asking for more frames
    than ``frame_count(len(y))`` pads the recording with silence.

    Args:
        y: Mono float32 signal ``[n_samples]`` at ``config.sample_rate_hz``.
        config: Feature configuration.
        n_frames: Frames to compute.

    Returns:
        float32 ``[n_mels, n_frames]``.
    """
    n_fft, hop = config.n_fft, config.hop_length
    buffer = np.zeros((n_frames - 1) * hop + n_fft, dtype=np.float32)
    usable = min(len(y), len(buffer) - n_fft // 2)
    buffer[n_fft // 2 : n_fft // 2 + usable] = y[:usable]
    frames = np.lib.stride_tricks.sliding_window_view(buffer, n_fft)[::hop]
    spectrum = scipy.fft.rfft(frames * _hann(n_fft), axis=-1)
    power = spectrum.real**2 + spectrum.imag**2
    if config.power != 2.0:
        power = power ** np.float32(config.power / 2.0)
    return mel_filterbank(config) @ power.T


def compress(mel_power: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Log compression of a mel power array (elementwise; any shape)."""
    if config.log_compression == "db":
        floor = np.float32(config.amin)
        ref_db = 10.0 * np.log10(max(config.db_ref, config.amin))
        return (10.0 * np.log10(np.maximum(mel_power, floor)) - np.float32(ref_db)).astype(np.float32)
    if config.log_compression == "log":
        return np.log(mel_power + np.float32(config.amin)).astype(np.float32)
    return mel_power.astype(np.float32, copy=False)


def normalize(windows: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Applies ``config.normalization`` to ``[n_windows, n_mels, n_frames]`` in place."""
    if config.normalization == "none" or windows.size == 0:
        return windows
    axes = (1, 2) if config.normalization_scope == "window" else (0, 1, 2)
    windows -= windows.mean(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
    if config.normalization == "standardize":
        std = windows.std(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
        windows /= np.maximum(std, np.float32(_STD_FLOOR))
    return windows


def log_mel_windows(y: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Log-mel features of every analysis window of one recording.

    Args:
        y: Mono float32 signal ``[n_samples]`` at ``config.sample_rate_hz``.
        config: Feature configuration.

    Returns:
        float32 ``[n_windows, n_mels, window_frames]`` with ``n_windows = window_count(len(y))``;
        window ``k`` starts at frame ``k * window_hop_frames``.
    """
    n_windows = window_count(len(y), config)
    wf, wh = config.window_frames, config.window_hop_frames
    if n_windows == 0:
        return np.zeros((0, config.n_mels, wf), dtype=np.float32)
    n_frames = (n_windows - 1) * wh + wf
    frames = compress(power_mel_frames(y, config, n_frames=n_frames), config)
    views = np.lib.stride_tricks.sliding_window_view(frames, wf, axis=1)[:, ::wh]
    windows = np.ascontiguousarray(views.transpose(1, 0, 2))
    if config.log_compression == "db" and config.top_db is not None:
        peak = windows.max(axis=(1, 2), keepdims=True)
        np.maximum(windows, peak - np.float32(config.top_db), out=windows)
    return normalize(windows, config)


def window_bounds_s(n_windows: int, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """Start and end seconds (float64 ``[n_windows]`` each) of the first ``n_windows`` windows."""
    starts = np.arange(n_windows, dtype=np.float64) * config.window_hop_s
    return starts, starts + config.window_s
