"""Offline augmentation: pitch-shifted and time-stretched copies of recordings (no Beam).

Pitch shifting and time stretching change the signal before the spectrogram, so unlike the
on-the-fly augmentation of training (which works on log-mel windows) they are done by the
features pipeline, which writes the copies next to the originals. Each copy is a clip of its own
(``<clip_id>~pitch_shift=+2``) with the original's label, fold and split, marked in the
``augmentation`` column; training uses copies of the training folds only and never validates or
tests on a copy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from soundshard.schemas.errors import ConfigError

#: Separates a copy's clip id from its original's.
COPY_SEPARATOR = "~"
_LIMITS = {"pitch_shift": (-12.0, 12.0), "time_stretch": (0.5, 2.0)}


@dataclasses.dataclass(frozen=True)
class OfflineAugmentation:
    """One kind of copy.

    Attributes:
        kind: ``pitch_shift`` (``amount`` in semitones) or ``time_stretch`` (``amount`` is the
            rate: above 1 faster and shorter, below 1 slower and longer).
        amount: See ``kind``.
    """

    kind: str
    amount: float

    def __post_init__(self):
        if self.kind not in _LIMITS:
            raise ConfigError(f"augmentation {self.kind!r} is not one of {sorted(_LIMITS)}")
        low, high = _LIMITS[self.kind]
        neutral = 0.0 if self.kind == "pitch_shift" else 1.0
        if not low <= self.amount <= high or self.amount == neutral:
            raise ConfigError(
                f"{self.kind}={self.amount:g} must lie in [{low:g}, {high:g}] and differ from {neutral:g}"
            )

    @property
    def name(self) -> str:
        """``pitch_shift=+2`` or ``time_stretch=0.9``: the value of the ``augmentation`` column."""
        sign = "+" if self.kind == "pitch_shift" else ""
        return f"{self.kind}={self.amount:{sign}g}"


def parse_augmentations(text: str | None) -> tuple[OfflineAugmentation, ...]:
    """``"pitch_shift=-2,pitch_shift=2,time_stretch=0.9"`` → augmentations.

    Raises:
        ConfigError: naming the item that is not ``kind=amount`` or out of range.
    """
    if not text:
        return ()
    result = []
    for part in text.split(","):
        kind, _, amount = part.strip().partition("=")
        try:
            value = float(amount)
        except ValueError:
            raise ConfigError(
                f"--augment item {part.strip()!r} is not kind=amount (e.g. pitch_shift=2, time_stretch=0.9)"
            ) from None
        result.append(OfflineAugmentation(kind.strip(), value))
    names = [a.name for a in result]
    if len(set(names)) != len(names):
        raise ConfigError(f"--augment lists a copy twice: {names}")
    return tuple(result)


def from_name(name: str) -> OfflineAugmentation:
    """Inverse of :attr:`OfflineAugmentation.name`."""
    kind, _, amount = name.partition("=")
    return OfflineAugmentation(kind, float(amount))


def copy_clip_id(clip_id: str, augmentation: OfflineAugmentation) -> str:
    """Clip id of a copy."""
    return f"{clip_id}{COPY_SEPARATOR}{augmentation.name}"


def apply(samples: np.ndarray, *, sample_rate_hz: int, augmentation: OfflineAugmentation) -> np.ndarray:
    """The augmented signal, float32 ``[n_samples']`` (time stretch changes the length).

    Uses librosa's phase-vocoder time stretch and its pitch shift (time stretch plus soxr
    resampling back to the original length).
    """
    import librosa

    y = np.asarray(samples, dtype=np.float32)
    if augmentation.kind == "pitch_shift":
        out = librosa.effects.pitch_shift(
            y, sr=sample_rate_hz, n_steps=augmentation.amount, res_type="soxr_hq"
        )
    else:
        out = librosa.effects.time_stretch(y, rate=augmentation.amount)
    return np.ascontiguousarray(out, dtype=np.float32)
