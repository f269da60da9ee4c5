"""Work units: long recordings split into window ranges that decode independently (no Beam).

A unit is a range of windows ``[first_window, first_window + n_windows)`` on the recording's
window grid. It is decoded from a source sample range that covers its frames plus a resampling
margin, starting at a multiple of the rate ratio's source period, so the resampled samples line up
with those of a whole-file resampling (to float rounding) and a unit's windows equal the windows
of the unsplit recording.
"""

from __future__ import annotations

import dataclasses
import math

from soundshard.schemas import melscale
from soundshard.schemas.config import FeatureConfig
from soundshard.transforms.features import melspec

#: Source samples decoded on each side of a unit so resampling edges fall outside it.
MARGIN_SOURCE_SAMPLES = 4096


def resampled_length(n_source: int, source_rate_hz: int, rate_hz: int) -> int:
    """Samples soxr produces for ``n_source`` input samples (round half up, as soxr does)."""
    return (2 * n_source * rate_hz + source_rate_hz) // (2 * source_rate_hz)


def windows_per_unit(unit_s: float, config: FeatureConfig) -> int:
    """Windows in a unit of about ``unit_s`` seconds (at least one)."""
    return max(1, int(unit_s / config.window_hop_s))


def split_windows(total_windows: int, per_unit: int | None) -> list[tuple[int, int]]:
    """``(first_window, n_windows)`` ranges covering ``total_windows``; one range if ``per_unit`` is None."""
    if total_windows <= 0:
        return []
    if not per_unit or per_unit >= total_windows:
        return [(0, total_windows)]
    return [(k, min(per_unit, total_windows - k)) for k in range(0, total_windows, per_unit)]


@dataclasses.dataclass(frozen=True)
class SourceRange:
    """What to decode for a unit.

    Attributes:
        start_frame: First source frame to read.
        n_frames: Source frames to read.
        output_offset: Index, on the resampled whole-recording signal, of the first resampled
            sample of the decoded range.
    """

    start_frame: int
    n_frames: int
    output_offset: int


def source_range(
    *,
    first_window: int,
    n_windows: int,
    config: FeatureConfig,
    source_rate_hz: int,
    source_frames: int,
    output_samples: int,
) -> SourceRange:
    """The source frames a unit needs (its frames' samples plus a margin, aligned for soxr)."""
    wf, wh = config.window_frames, config.window_hop_frames
    first_frame = first_window * wh
    end_frame = (first_window + n_windows - 1) * wh + wf
    start_sample, stop_sample = melscale.frame_span(
        first_frame=first_frame,
        n_frames=end_frame - first_frame,
        hop_length=config.hop_length,
        n_fft=config.n_fft,
    )
    out_start, out_end = max(0, start_sample), min(output_samples, stop_sample)
    g = math.gcd(source_rate_hz, config.sample_rate_hz)
    period_in, period_out = source_rate_hz // g, config.sample_rate_hz // g
    if source_rate_hz == config.sample_rate_hz:
        margin = 0
    else:
        margin = -(-max(MARGIN_SOURCE_SAMPLES, source_rate_hz // 20) // period_in) * period_in
    start = max(0, (out_start // period_out) * period_in - margin)
    end = min(source_frames, -(-max(out_end, out_start) // period_out) * period_in + margin)
    return SourceRange(start, max(0, end - start), start // period_in * period_out)


def recording_windows(*, source_frames: int, source_rate_hz: int, config: FeatureConfig) -> tuple[int, int]:
    """``(output_samples, total_windows)`` of a recording from its header."""
    output_samples = resampled_length(source_frames, source_rate_hz, config.sample_rate_hz)
    return output_samples, melspec.window_count(output_samples, config)


def widen(
    span: SourceRange,
    *,
    before_frames: int,
    to_end: bool,
    source_frames: int,
    source_rate_hz: int,
    rate_hz: int,
) -> SourceRange:
    """``span`` with at least ``before_frames`` more source frames before it (and, with
    ``to_end``, everything after it), still starting on the rate ratio's source period so its
    resampled samples line up with the whole recording's."""
    g = math.gcd(source_rate_hz, rate_hz)
    period_in, period_out = source_rate_hz // g, rate_hz // g
    start = max(0, span.start_frame - (-(-before_frames // period_in) * period_in))
    end = source_frames if to_end else span.start_frame + span.n_frames
    return SourceRange(start, max(0, end - start), start // period_in * period_out)
