"""Procedurally synthesised labelled sounds for the demo and tests (fixed seed, no downloads)."""

from __future__ import annotations

import numpy as np

CLASSES = ("chirp", "click_train", "hum", "noise_burst")


def synth_clip(label: str, *, rng: np.random.Generator, sample_rate_hz: int, duration_s: float) -> np.ndarray:
    """One clip of class ``label`` as float32 ``[n_samples]`` in [-1, 1].

    Classes: ``chirp`` (rising sweeps), ``click_train`` (clock-like impulse trains), ``hum``
    (harmonic tone with vibrato), ``noise_burst`` (band-limited noise bursts).
    """
    n = int(round(duration_s * sample_rate_hz))
    t = np.arange(n) / sample_rate_hz
    y = np.zeros(n)
    if label == "chirp":
        period = rng.uniform(0.4, 0.8)
        f0, f1 = rng.uniform(400, 800), rng.uniform(2500, 5000)
        phase_t = np.mod(t, period) / period
        freq = f0 * (f1 / f0) ** phase_t
        y = np.sin(2 * np.pi * np.cumsum(freq) / sample_rate_hz) * np.hanning(64).max()
    elif label == "click_train":
        interval = int(sample_rate_hz * rng.uniform(0.15, 0.3))
        click = np.exp(-np.arange(200) / 25.0) * np.sin(
            2 * np.pi * rng.uniform(2000, 4000) * np.arange(200) / sample_rate_hz
        )
        for start in range(int(rng.integers(0, interval)), n - 200, interval):
            y[start : start + 200] += click
    elif label == "hum":
        f0 = rng.uniform(90, 180) * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate_hz
        y = sum(np.sin(k * phase) / k for k in range(1, 6))
    elif label == "noise_burst":
        noise = rng.standard_normal(n)
        spectrum = np.fft.rfft(noise)
        freqs = np.fft.rfftfreq(n, 1 / sample_rate_hz)
        centre = rng.uniform(800, 3000)
        spectrum *= np.exp(-0.5 * ((freqs - centre) / 300.0) ** 2)
        band = np.fft.irfft(spectrum, n)
        envelope = (np.sin(2 * np.pi * rng.uniform(1, 2.5) * t + rng.uniform(0, 6)) > 0.2).astype(float)
        y = band * np.convolve(envelope, np.hanning(441) / np.hanning(441).sum(), mode="same")
    else:
        raise ValueError(f"unknown synthetic class {label!r}; known: {CLASSES}")
    y = y + 0.01 * rng.standard_normal(n)
    y = 0.5 * y / max(np.abs(y).max(), 1e-9)
    return y.astype(np.float32)
