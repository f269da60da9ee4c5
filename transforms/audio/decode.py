"""Decoding, channel mixdown, resampling and validation of audio (no Beam imports)."""

from __future__ import annotations

import dataclasses
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from soundshard.schemas.errors import AudioDecodeError, AudioValidationError


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
    """A decoded recording, mono, at the analysis rate.

    Attributes:
        samples: float32 ``[n_samples]``.
        sample_rate_hz: Rate of ``samples``.
        source_sample_rate_hz: Rate stored in the file.
        source_channels: Channels stored in the file.
        source_format: libsndfile container/subtype, e.g. ``"FLAC/PCM_16"``.
    """

    samples: np.ndarray
    sample_rate_hz: int
    source_sample_rate_hz: int
    source_channels: int
    source_format: str

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return len(self.samples) / self.sample_rate_hz


def decode_audio(
    source: str | int | BinaryIO,
    *,
    sample_rate_hz: int,
    channel: int | None = None,
    resample_quality: str = "HQ",
    name: str | None = None,
    start_frame: int = 0,
    n_frames: int | None = None,
) -> DecodedAudio:
    """Decodes a file with libsndfile, mixes down (or picks ``channel``), resamples with soxr.

    Args:
        source: Local path, open file descriptor (left open) or binary file object, positioned
            at the start.
        sample_rate_hz: Output rate.
        channel: ``None`` for the mean of all channels, else the index of the channel to keep.
        resample_quality: soxr preset.
        name: Name used in error messages (defaults to ``source`` when it is a path).
        start_frame: First frame to read (seeks; only that range is decoded and held).
        n_frames: Frames to read from ``start_frame`` (default: to the end).

    Returns:
        The mono float32 signal at ``sample_rate_hz``.

    Raises:
        AudioDecodeError: unreadable, empty (``empty_file``) or truncated (``truncated_audio``).
        AudioValidationError: no samples (``empty_audio``), NaN/Inf (``non_finite_audio``),
            missing channel (``channel_missing``).
    """
    label = name or (source if isinstance(source, str) else getattr(source, "name", "<stream>"))
    try:
        f = soundfile.SoundFile(source, closefd=not isinstance(source, int))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, EOFError) as exc:
        raise AudioDecodeError(f"cannot decode {label}: {exc}", reason="decode_error") from exc
    with f:
        declared = f.frames
        rate, channels = f.samplerate, f.channels
        fmt = f"{f.format}/{f.subtype}"
        wanted = declared - start_frame if n_frames is None else n_frames
        try:
            if start_frame:
                f.seek(start_frame)
            data = f.read(frames=wanted if n_frames is not None else -1, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, EOFError) as exc:
            raise AudioDecodeError(
                f"{label} ({fmt}, header declares {declared} frames) is truncated or corrupt: {exc}",
                reason="corrupt_audio",
            ) from exc
    if declared > 0 and len(data) < wanted:
        raise AudioDecodeError(
            f"{label} is truncated: header declares {declared} frames, decoded {start_frame + len(data)}",
            reason="truncated_audio",
        )
    if len(data) == 0:
        raise AudioValidationError(f"{label} holds no samples ({fmt})", reason="empty_audio")
    if channel is not None and channel >= channels:
        raise AudioValidationError(
            f"{label} has {channels} channel(s); channel={channel} does not exist",
            reason="channel_missing",
        )
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioValidationError(
            f"{label} contains {bad} non-finite sample value(s) (NaN or Inf)", reason="non_finite_audio"
        )
    mono = data[:, channel] if channel is not None else (data[:, 0] if channels == 1 else data.mean(axis=1))
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != sample_rate_hz:
        mono = soxr.resample(mono, rate, sample_rate_hz, quality=resample_quality).astype(
            np.float32, copy=False
        )
    return DecodedAudio(
        samples=mono,
        sample_rate_hz=sample_rate_hz,
        source_sample_rate_hz=rate,
        source_channels=channels,
        source_format=fmt,
    )
