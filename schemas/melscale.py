"""The mel scale and the STFT frame grid: definitions the feature config is validated with and the
feature maths is built on, as keyword-only functions of plain values (numpy only; librosa's
conventions, tested against librosa in tests/unit/test_melspec.py).

- :func:`hz_to_mel` / :func:`mel_to_hz`: Slaney's scale (linear below 1 kHz, logarithmic above)
  or HTK's.
- :func:`band_edges_hz`, :func:`filterbank`, :func:`empty_bands`: ``librosa.filters.mel``.
- :func:`hann`: the periodic Hann window of ``scipy.signal.get_window("hann", n, fftbins=True)``.
- :func:`frame_span`: which samples a run of STFT frames reads (``center=True``).
"""

from __future__ import annotations

import functools

import numpy as np


def hz_to_mel(hz, *, htk: bool = False) -> np.ndarray:
    """Hz to mels: HTK formula, or Slaney's (linear below 1 kHz, logarithmic above), as librosa."""
    hz = np.asanyarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mels = hz / f_sp
    return np.where(
        hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-12) / min_log_hz) / logstep, mels
    )


def mel_to_hz(mels, *, htk: bool = False) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mels = np.asanyarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def band_edges_hz(*, n_mels: int, fmin_hz: float, fmax_hz: float, htk: bool = False) -> np.ndarray:
    """The ``n_mels + 2`` band edge frequencies in Hz (``librosa.mel_frequencies``)."""
    low, high = hz_to_mel(np.array([fmin_hz, fmax_hz]), htk=htk)
    return mel_to_hz(np.linspace(low, high, n_mels + 2), htk=htk)


@functools.lru_cache(maxsize=32)
def filterbank(
    *,
    sample_rate_hz: int,
    n_fft: int,
    n_mels: int,
    fmin_hz: float,
    fmax_hz: float,
    htk: bool = False,
    norm: str = "slaney",
) -> np.ndarray:
    """Mel filterbank, float32 ``[n_mels, 1 + n_fft // 2]`` (read-only), as ``librosa.filters.mel``:
    triangular filters between consecutive band edges, optionally Slaney's area normalisation."""
    edges = band_edges_hz(n_mels=n_mels, fmin_hz=fmin_hz, fmax_hz=fmax_hz, htk=htk)
    fft_hz = np.linspace(0.0, sample_rate_hz / 2.0, 1 + n_fft // 2)
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, fft_hz)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]
    bank = weights.astype(np.float32)
    bank.setflags(write=False)
    return bank


def empty_bands(
    *, sample_rate_hz: int, n_fft: int, n_mels: int, fmin_hz: float, fmax_hz: float, htk: bool, norm: str
) -> list[int]:
    """Mel bands that no FFT bin falls into (librosa's "empty filters" condition)."""
    bank = filterbank(
        sample_rate_hz=sample_rate_hz,
        n_fft=n_fft,
        n_mels=n_mels,
        fmin_hz=fmin_hz,
        fmax_hz=fmax_hz,
        htk=htk,
        norm=norm,
    )
    edges = band_edges_hz(n_mels=n_mels, fmin_hz=fmin_hz, fmax_hz=fmax_hz, htk=htk)
    empty = (bank.max(axis=1) <= 0) & (edges[:-2] != 0)
    return [int(i) for i in empty.nonzero()[0]]


@functools.lru_cache(maxsize=8)
def hann(n: int) -> np.ndarray:
    """Periodic Hann window, float32 ``[n]`` (read-only): ``0.5 - 0.5 cos(2 pi k / n)``."""
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)
    window.setflags(write=False)
    return window


def frame_span(*, first_frame: int, n_frames: int, hop_length: int, n_fft: int) -> tuple[int, int]:
    """``(start, stop)``: the recording samples that STFT frames ``[first_frame, first_frame +
    n_frames)`` read, frame ``j`` centred on sample ``j * hop_length`` (``center=True``); ``start``
    may be negative and ``stop`` past the end (those samples are the zero padding)."""
    start = first_frame * hop_length - n_fft // 2
    return start, start + (n_frames - 1) * hop_length + n_fft
