"""Helpers for tests: shared data locations and synthetic audio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
ESC10 = SHARED_DATA / "esc10"


def require_esc10() -> Path:
    """Skips the calling test when ../shared/data/esc10 is absent (a fresh clone)."""
    if not (ESC10 / "meta.csv").is_file():
        pytest.skip(f"ESC-10 data not found at {ESC10} (../shared is absent in a fresh clone)")
    return ESC10


def tone(
    *,
    sample_rate_hz: int = 22050,
    duration_s: float = 1.0,
    freq_hz: float = 440.0,
    channels: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """A sine plus a little noise, float32 ``[n]`` or ``[n, channels]``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(sample_rate_hz * duration_s))) / sample_rate_hz
    y = 0.5 * np.sin(2 * np.pi * freq_hz * t) + 0.01 * rng.standard_normal(len(t))
    if channels > 1:
        y = np.stack([y * (c + 1) / channels for c in range(channels)], axis=1)
    return y.astype(np.float32)


def write_audio(path: Path, y: np.ndarray, sample_rate_hz: int, subtype: str | None = None) -> Path:
    """Writes ``y`` with soundfile (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), y, sample_rate_hz, subtype=subtype)
    return path
