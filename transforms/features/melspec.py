"""Log-mel (and MFCC) features for whole recordings, computed in vectorised form (no Beam imports).

The maths equal ``librosa.feature.melspectrogram(y, center=True, pad_mode="constant")`` followed
by ``librosa.power_to_db`` (tested), but run on all frames of a work unit at once in float32 with
``scipy.fft``, and cut windows as views of one spectrogram instead of recomputing overlaps. MFCC
windows are ``librosa.feature.mfcc`` of each log-mel window, with ``librosa.feature.delta`` deltas
over the window's frames (tested).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft

from soundshard.schemas import melscale
from soundshard.schemas.config import DELTA_WIDTH, FeatureConfig
from soundshard.schemas.melscale import hz_to_mel, mel_to_hz  # noqa: F401 - named here for callers

_STD_FLOOR = 1e-6


def mel_filterbank(config: FeatureConfig) -> np.ndarray:
    """Mel filterbank of ``config`` as float32 ``[n_mels, 1 + n_fft // 2]`` (librosa's)."""
    return melscale.filterbank(**config.filterbank_args)


def mel_band_edges_hz(config: FeatureConfig) -> np.ndarray:
    """The ``n_mels + 2`` band edge frequencies in Hz (``librosa.mel_frequencies``)."""
    return melscale.band_edges_hz(
        n_mels=config.n_mels, fmin_hz=config.fmin_hz, fmax_hz=config.fmax_resolved_hz, htk=config.mel_htk
    )


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


def power_mel_frames(
    y: np.ndarray,
    config: FeatureConfig,
    *,
    n_frames: int,
    first_frame: int = 0,
    y_offset: int = 0,
    total_samples: int | None = None,
) -> np.ndarray:
    """Mel power spectrogram of frames ``[first_frame, first_frame + n_frames)`` of a recording.

    Frame ``j`` is centred on sample ``j * hop_length`` of the recording. ``y`` holds the
    recording's samples from index ``y_offset`` on (all of it by default); samples outside the
    recording, ``[0, total_samples)``, count as zeros (librosa's constant padding), so asking for
    frames past the end pads the recording with silence.

    Args:
        y: Mono float32 samples at ``config.sample_rate_hz``.
        config: Feature configuration.
        n_frames: Frames to compute.
        first_frame: Index of the first frame on the recording's frame grid.
        y_offset: Recording sample index of ``y[0]``.
        total_samples: Length of the recording (default: ``y_offset + len(y)``).

    Returns:
        float32 ``[n_mels, n_frames]``.
    """
    n_fft, hop = config.n_fft, config.hop_length
    total = y_offset + len(y) if total_samples is None else total_samples
    start, stop = melscale.frame_span(first_frame=first_frame, n_frames=n_frames, hop_length=hop, n_fft=n_fft)
    buffer = np.zeros(stop - start, dtype=np.float32)
    lo = max(start, y_offset, 0)
    hi = min(start + len(buffer), y_offset + len(y), total)
    if hi > lo:
        buffer[lo - start : hi - start] = y[lo - y_offset : hi - y_offset]
    frames = np.lib.stride_tricks.sliding_window_view(buffer, n_fft)[::hop]
    spectrum = scipy.fft.rfft(frames * melscale.hann(n_fft), axis=-1)
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


@functools.lru_cache(maxsize=8)
def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
    """float32 ``[n_mfcc, n_mels]``: the first ``n_mfcc`` rows of the orthonormal DCT-II
    (``scipy.fft.dct(x, type=2, norm="ortho")``, as ``librosa.feature.mfcc``)."""
    k = np.arange(n_mfcc)[:, None]
    n = np.arange(n_mels)[None, :]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels)) * np.sqrt(2.0 / n_mels)
    basis[0] /= np.sqrt(2.0)
    matrix = basis.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=4)
def delta_coefficients(order: int) -> np.ndarray:
    """float64 ``[DELTA_WIDTH]``: the Savitzky-Golay filter of ``librosa.feature.delta`` (polynomial
    of degree ``order`` fitted by least squares over ``DELTA_WIDTH`` frames, its ``order``-th
    derivative at the centre), applied as ``d[t] = sum_j c[j] * x[t + j - DELTA_WIDTH // 2]``."""
    half = DELTA_WIDTH // 2
    k = np.arange(-half, half + 1, dtype=np.float64)
    if order == 1:
        return k / np.sum(k**2)
    if order == 2:
        centred = k**2 - np.mean(k**2)
        return 2.0 * centred / np.sum(centred**2)
    raise ValueError(f"order={order} must be 1 or 2")


def deltas(x: np.ndarray, order: int) -> np.ndarray:
    """``order``-th deltas of ``[..., n_frames]`` along the last axis (``librosa.feature.delta``
    with ``mode="interp"``: the first and last ``DELTA_WIDTH // 2`` frames take the value of the
    nearest frame with a full window, the derivative of the same fitted polynomial)."""
    half = DELTA_WIDTH // 2
    coefficients = delta_coefficients(order).astype(np.float32)
    views = np.lib.stride_tricks.sliding_window_view(x, DELTA_WIDTH, axis=-1)
    inner = views @ coefficients
    return np.concatenate(
        [np.repeat(inner[..., :1], half, axis=-1), inner, np.repeat(inner[..., -1:], half, axis=-1)], axis=-1
    ).astype(np.float32)


def mfcc_windows(log_mel: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """MFCC windows ``[n, n_mfcc * (1 + mfcc_deltas), window_frames]`` of log-mel windows
    ``[n, n_mels, window_frames]`` (dB, after ``top_db``): the coefficients, then their deltas."""
    coefficients = np.einsum("km,nmt->nkt", dct_matrix(config.n_mfcc, config.n_mels), log_mel)
    rows = [coefficients] + [deltas(coefficients, order) for order in range(1, config.mfcc_deltas + 1)]
    return np.concatenate(rows, axis=1).astype(np.float32)


def window_level_db(features: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """float32 ``[n]``: each window's level in dB for the activity and floor gates: the loudest
    log-mel value, or for MFCC the loudest frame's mean band level (``c0 / sqrt(n_mels)``)."""
    n = len(features)
    if config.feature_type == "mfcc":
        return (features[:, 0, :].max(axis=1) / np.float32(np.sqrt(config.n_mels))).astype(np.float32)
    return features.reshape(n, -1).max(axis=1) if n else np.zeros(0, np.float32)


def frame_levels_db(features: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """float32 ``[n, window_frames]``: the broadband level of each window's frames in dB, for
    placing event onsets: the power sum of a log-mel frame's bands, or for MFCC the frame's mean
    band level (``c0 / sqrt(n_mels)``)."""
    if config.feature_type == "mfcc":
        return (features[:, 0, :] / np.float32(np.sqrt(config.n_mels))).astype(np.float32)
    peak = features.max(axis=1, keepdims=True)  # log-sum-exp in dB, without overflow
    power = np.sum(10.0 ** ((features - peak) / np.float32(10.0)), axis=1)
    return (peak[:, 0, :] + 10.0 * np.log10(power)).astype(np.float32)


def log_mel_windows(
    y: np.ndarray,
    config: FeatureConfig,
    *,
    first_window: int = 0,
    n_windows: int | None = None,
    y_offset: int = 0,
    total_samples: int | None = None,
) -> np.ndarray:
    """Features (log-mel, or MFCC as ``config`` says) of analysis windows of one recording.

    By default all windows of ``y`` (a whole recording); with ``first_window``/``n_windows`` and
    ``y_offset``/``total_samples`` the windows of a work unit, from the part of the recording
    that ``y`` holds (see :func:`power_mel_frames`). Values equal those of the whole recording.

    Args:
        y: Mono float32 samples at ``config.sample_rate_hz``.
        config: Feature configuration.
        first_window: Index of the first window on the recording's window grid.
        n_windows: Windows to compute (default: all, ``window_count(total_samples)``).
        y_offset: Recording sample index of ``y[0]``.
        total_samples: Length of the recording (default: ``y_offset + len(y)``).

    Returns:
        float32 ``[n_windows, *config.feature_shape]`` (log-mel ``[n_mels, window_frames]``, or
        MFCC with ``feature_type="mfcc"``); window ``k`` starts at frame ``k * window_hop_frames``.
    """
    total = y_offset + len(y) if total_samples is None else total_samples
    if n_windows is None:
        n_windows = window_count(total, config) - first_window
    wf, wh = config.window_frames, config.window_hop_frames
    if n_windows <= 0:
        return np.zeros((0, *config.feature_shape), dtype=np.float32)
    n_frames = (n_windows - 1) * wh + wf
    power = power_mel_frames(
        y, config, n_frames=n_frames, first_frame=first_window * wh, y_offset=y_offset, total_samples=total
    )
    frames = compress(power, config)
    views = np.lib.stride_tricks.sliding_window_view(frames, wf, axis=1)[:, ::wh]
    windows = views.transpose(1, 0, 2).copy()  # owns its memory (a view would be read-only)
    if config.log_compression == "db" and config.top_db is not None:
        peak = windows.max(axis=(1, 2), keepdims=True)
        np.maximum(windows, peak - np.float32(config.top_db), out=windows)
    if config.feature_type == "mfcc":
        windows = mfcc_windows(windows, config)
    return normalize(windows, config)


def window_bounds_s(
    n_windows: int, config: FeatureConfig, first_window: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Start and end seconds (float64 ``[n_windows]`` each) of windows ``first_window`` on."""
    starts = (np.arange(n_windows, dtype=np.float64) + first_window) * config.window_hop_s
    return starts, starts + config.window_s
