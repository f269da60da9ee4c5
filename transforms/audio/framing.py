"""The window grid of embedding models: framing like openl3, split into work units (no Beam).

Window ``k`` of a recording covers samples ``[k * hop - pad, k * hop - pad + window)`` at the
model's rate, where ``pad`` is half a window when centred (openl3's ``center=True``) and 0
otherwise; samples outside the recording are zeros. A recording of ``n`` samples has
``1 + ceil((n + pad - window) / hop)`` windows (one when ``n + pad <= window``), so the last
window is the first that reaches the recording's end, as openl3 pads its input. A work unit is a
range of windows; it decodes only the source samples its windows need plus a resampling margin
(see ``transforms/audio/units.py``), so its windows equal those of the whole recording.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from soundshard.schemas.embedding import EmbeddingConfig
from soundshard.schemas.records import WorkUnit
from soundshard.transforms.audio import units


@dataclasses.dataclass(frozen=True)
class FrameGrid:
    """Windows of one embedding model on a recording.

    Attributes:
        sample_rate_hz: The model's rate.
        window_samples: Samples per window.
        hop_samples: Samples between window starts.
        pad_start_samples: Silence before the recording's first sample (half a window when
            centred).
        channel: Channel to keep, or ``None`` for the mean of all (decoding).
        resample_quality: soxr preset (decoding).
    """

    sample_rate_hz: int
    window_samples: int
    hop_samples: int
    pad_start_samples: int = 0
    channel: int | None = None
    resample_quality: str = "HQ"

    @classmethod
    def from_config(cls, config: EmbeddingConfig) -> FrameGrid:
        """The grid of ``config``."""
        return cls(
            sample_rate_hz=config.sample_rate_hz,
            window_samples=config.window_samples,
            hop_samples=config.hop_samples,
            pad_start_samples=config.pad_start_samples,
            channel=config.channel,
            resample_quality=config.resample_quality,
        )

    @property
    def window_s(self) -> float:
        """Seconds per window."""
        return self.window_samples / self.sample_rate_hz

    @property
    def window_hop_samples(self) -> int:
        """Samples between window starts (as ``hop_samples``; the name work units ask for)."""
        return self.hop_samples

    @property
    def hop_s(self) -> float:
        """Seconds between window starts."""
        return self.hop_samples / self.sample_rate_hz

    def window_count(self, n_samples: int) -> int:
        """Windows of a recording of ``n_samples`` (0 for an empty one)."""
        if n_samples <= 0:
            return 0
        padded = n_samples + self.pad_start_samples
        if padded <= self.window_samples:
            return 1
        return 1 + -(-(padded - self.window_samples) // self.hop_samples)

    # -- the protocol PlanUnits and the decode stage use (see transforms/features/compute.py) ---------

    def recording_windows(self, *, source_frames: int, source_rate_hz: int) -> tuple[int, int]:
        """``(output_samples, total_windows)`` of a recording from its header."""
        output_samples = units.resampled_length(source_frames, source_rate_hz, self.sample_rate_hz)
        return output_samples, self.window_count(output_samples)

    def windows_per_unit(self, unit_s: float) -> int:
        """Windows in a work unit of about ``unit_s`` seconds (at least one)."""
        return max(1, int(unit_s * self.sample_rate_hz) // self.hop_samples)

    def sample_range(self, first_window: int, n_windows: int, total_samples: int) -> tuple[int, int]:
        """Recording samples ``[start, end)`` that windows ``first_window ..`` cover (clipped)."""
        start = first_window * self.hop_samples - self.pad_start_samples
        end = (first_window + n_windows - 1) * self.hop_samples - self.pad_start_samples + self.window_samples
        return max(0, start), max(0, min(total_samples, end))

    def source_range(self, unit: WorkUnit) -> units.SourceRange:
        """Source frames to decode for ``unit``: its windows' samples plus a resampling margin."""
        out_start, out_end = self.sample_range(unit.first_window, unit.n_windows, unit.output_samples)
        return aligned_source_range(
            out_start=out_start,
            out_end=out_end,
            source_rate_hz=unit.source_sample_rate_hz,
            rate_hz=self.sample_rate_hz,
            source_frames=unit.source_frames,
        )

    # -- windows and their times --------------------------------------------------------------

    def frames(
        self,
        y: np.ndarray,
        *,
        first_window: int = 0,
        n_windows: int | None = None,
        y_offset: int = 0,
        total_samples: int | None = None,
    ) -> np.ndarray:
        """Windows ``[first_window, first_window + n_windows)`` of a recording.

        ``y`` holds the recording's samples from index ``y_offset`` on (all of it by default);
        samples outside the recording, ``[0, total_samples)``, are zeros.

        Args:
            y: Mono float32 samples at ``sample_rate_hz``.
            first_window: Index of the first window on the recording's grid.
            n_windows: Windows to cut (default: all from ``first_window``).
            y_offset: Recording sample index of ``y[0]``.
            total_samples: Length of the recording (default: ``y_offset + len(y)``).

        Returns:
            float32 ``[n_windows, window_samples]``: read-only views into one buffer that holds
            the range once (never a copy per window).
        """
        total = y_offset + len(y) if total_samples is None else total_samples
        if n_windows is None:
            n_windows = self.window_count(total) - first_window
        if n_windows <= 0:
            return np.zeros((0, self.window_samples), np.float32)
        start = first_window * self.hop_samples - self.pad_start_samples  # recording index of buffer[0]
        length = (n_windows - 1) * self.hop_samples + self.window_samples
        buffer = np.zeros(length, dtype=np.float32)
        lo = max(start, y_offset, 0)
        hi = min(start + length, y_offset + len(y), total)
        if hi > lo:
            buffer[lo - start : hi - start] = y[lo - y_offset : hi - y_offset]
        return np.lib.stride_tricks.sliding_window_view(buffer, self.window_samples)[:: self.hop_samples]

    def window_bounds_s(self, first_window: int, n_windows: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and end seconds (float64 ``[n_windows]`` each) of the audio each window holds.

        Centred windows start half a window before their centre, so the first one starts at a
        negative time (its first half is padding); openl3's timestamp of window ``k`` is its
        centre, ``k * hop_s``, which is ``start_s + window_s / 2`` here.
        """
        k = np.arange(n_windows, dtype=np.float64) + first_window
        starts = (k * self.hop_samples - self.pad_start_samples) / self.sample_rate_hz
        return starts, starts + self.window_s

    def share_s(self, first_window: int, n_windows: int, *, total_windows: int, total_samples: int) -> float:
        """Seconds of the recording that windows ``first_window ..`` account for.

        Window ``k`` accounts for ``[k * hop, (k + 1) * hop)`` clipped to the recording, and the
        last window for everything from its share's start to the end, so the shares of all
        windows (and of all work units) add up to the recording's duration.
        """
        duration_s = total_samples / self.sample_rate_hz
        hop_s = self.hop_s
        start = min(duration_s, first_window * hop_s)
        end_window = first_window + n_windows
        end = duration_s if end_window >= total_windows else min(duration_s, end_window * hop_s)
        return max(0.0, end - start)


def aligned_source_range(
    *, out_start: int, out_end: int, source_rate_hz: int, rate_hz: int, source_frames: int
) -> units.SourceRange:
    """Source frames that resample to output samples ``[out_start, out_end)``, with a margin.

    The range starts at a multiple of the rate ratio's source period, so its resampled samples
    line up with those of a whole-file resampling (as ``units.source_range`` does for log-mel
    windows); the margin keeps the resampler's edge effects outside the wanted samples.
    """
    g = math.gcd(source_rate_hz, rate_hz)
    period_in, period_out = source_rate_hz // g, rate_hz // g
    if source_rate_hz == rate_hz:
        margin = 0
    else:
        margin = -(-max(units.MARGIN_SOURCE_SAMPLES, source_rate_hz // 20) // period_in) * period_in
    start = max(0, (out_start // period_out) * period_in - margin)
    end = min(source_frames, -(-max(out_end, out_start) // period_out) * period_in + margin)
    return units.SourceRange(start, max(0, end - start), start // period_in * period_out)
