"""Sound levels as a sound-level meter reports them (no Beam imports).

Frequency weightings A, C and Z of IEC 61672-1 as IIR filters designed for any sample rate,
exponential time weighting F (125 ms) and S (1 s), equivalent continuous levels (Leq) over any
interval, maxima and minima, statistical levels (L10/L50/L90 from 100 ms Leq), sound exposure level
(SEL) and base-10 fractional-octave band levels (IEC 61260-1 Butterworth band filters).

Everything is kept as energy until the last step: a work unit of a long recording contributes the
sums of squared weighted samples of the 100 ms blocks it owns, blocks cut by a unit boundary are
completed by adding the two units' sums, and decibels are taken only of whole intervals. So a
recording split into units gives the same levels as the whole file (the unit is decoded with two
seconds of pre-roll, which settle the filters and the F time weighting before its first owned
sample).

Levels are computed on the analysis signal (mono, at the feature sample rate): the same signal the
model hears and a sensor running the compiled model measures. Its band ends at the resampler's
cut-off (about 0.45 x the rate), so at 16 kHz A-weighted levels leave out what lies above ~7 kHz.

Decibels are ``10 log10(mean square)`` re digital full scale (a full-scale square wave reads 0 dB,
a full-scale sine -3.01 dB): "dBFS". A calibration offset (dB SPL of 0 dBFS) turns them into dB
SPL. Digital silence reads ``SILENCE_DB``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from soundshard.schemas.records import LevelBlocks

#: Length of the blocks energies are kept in: the base of L10/L50/L90 and of event levels.
BLOCK_S = 0.1
BLOCKS_PER_S = 10
#: Time constants of the F (fast) and S (slow) exponential time weightings, seconds.
FAST_S = 0.125
SLOW_S = 1.0
#: What digital silence reads (a floor under the mean square of 1e-15).
SILENCE_DB = -150.0
_FLOOR = 10.0 ** (SILENCE_DB / 10.0)
#: Seconds decoded before a unit's first owned sample so its filters have settled.
PREROLL_S = 2.0
#: Weightings kept per block, in this order.
WEIGHTINGS = ("A", "C", "Z")

# IEC 61672-1:2013 Annex E: pole frequencies of the analogue A and C weightings, Hz.
_F1, _F2, _F3, _F4 = 20.598997, 107.65265, 737.86223, 12194.217

#: IEC 61672-1:2013 Table 3: nominal frequencies (the exact ones are 1000 * 10^(n/10), n=-20..13),
#: the A and C weightings (dB) and the class 1 acceptance limits (dB, +upper / -lower; ``inf``
#: where the standard sets none).
IEC_NOMINAL_HZ = (
    10, 12.5, 16, 20, 25, 31.5, 40, 50, 63, 80, 100, 125, 160, 200, 250, 315, 400, 500, 630, 800,
    1000, 1250, 1600, 2000, 2500, 3150, 4000, 5000, 6300, 8000, 10000, 12500, 16000, 20000,
)  # fmt: skip
IEC_A_DB = (
    -70.4, -63.4, -56.7, -50.5, -44.7, -39.4, -34.6, -30.2, -26.2, -22.5, -19.1, -16.1, -13.4,
    -10.9, -8.6, -6.6, -4.8, -3.2, -1.9, -0.8, 0.0, 0.6, 1.0, 1.2, 1.3, 1.2, 1.0, 0.5, -0.1, -1.1,
    -2.5, -4.3, -6.6, -9.3,
)  # fmt: skip
IEC_C_DB = (
    -14.3, -11.2, -8.5, -6.2, -4.4, -3.0, -2.0, -1.3, -0.8, -0.5, -0.3, -0.2, -0.1, 0.0, 0.0, 0.0,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.1, -0.2, -0.3, -0.5, -0.8, -1.3, -2.0, -3.0, -4.4, -6.2, -8.5,
    -11.2,
)  # fmt: skip
CLASS1_UPPER_DB = (
    3.5, 3.0, 2.5, 2.5, 2.5, 2.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.4, 1.4, 1.4, 1.4, 1.4,
    1.4, 1.1, 1.4, 1.6, 1.6, 1.6, 1.6, 1.6, 2.1, 2.1, 2.1, 2.6, 3.0, 3.5, 4.0,
)  # fmt: skip
CLASS1_LOWER_DB = (
    math.inf, math.inf, 4.5, 2.5, 2.0, 2.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.4, 1.4, 1.4,
    1.4, 1.4, 1.4, 1.1, 1.4, 1.6, 1.6, 1.6, 1.6, 1.6, 2.1, 2.6, 3.1, 3.6, 6.0, 17.0, math.inf,
)  # fmt: skip


def iec_frequencies_hz() -> np.ndarray:
    """The exact base-10 frequencies of IEC 61672-1's table: ``1000 * 10**(n/10)``, n = -20..13."""
    return 1000.0 * 10.0 ** (np.arange(-20, 14) / 10.0)


def analogue_weighting_db(weighting: str, frequency_hz) -> np.ndarray:
    """The standard's weighting function (IEC 61672-1 Annex E), 0 dB at 1 kHz."""
    f2 = np.asarray(frequency_hz, dtype=np.float64) ** 2

    def raw(f2):
        if weighting == "Z":
            return np.zeros_like(f2)
        c = _F4**2 * f2 / ((f2 + _F1**2) * (f2 + _F4**2))
        if weighting == "C":
            return 20 * np.log10(c)
        a = c * f2 / np.sqrt((f2 + _F2**2) * (f2 + _F3**2))
        return 20 * np.log10(a)

    return raw(f2) - raw(np.array(1e6))


def passband_hz(sample_rate_hz: float) -> float:
    """Top of the band levels and weighting checks can rely on: the resampler passes up to about
    0.45 x the rate (at 16 kHz, 7.2 kHz)."""
    return 0.45 * sample_rate_hz


@functools.lru_cache(maxsize=32)
def weighting_sos(weighting: str, sample_rate_hz: int) -> np.ndarray:
    """Second-order sections ``[n_sections, 6]`` of the A or C weighting at ``sample_rate_hz``.

    The poles and zeros below 1 kHz (20.6, 107.7 and 737.9 Hz) go through the bilinear transform,
    whose frequency warping is negligible there at any audio rate. The double pole at 12.2 kHz,
    which the bilinear transform folds into a steep roll-off near Nyquist at low rates (16 kHz:
    -5.5 dB wrong at 6.3 kHz), becomes one biquad fitted (least squares in dB) to the analogue
    magnitude across the pass band (:func:`passband_hz`). The whole is scaled to 0 dB at 1 kHz.
    Within the pass band the result stays within 0.1 dB of the standard's analogue weighting at
    16 to 48 kHz. Z weighting has no sections (``[0, 6]``).

    Raises:
        ValueError: for another weighting or a rate under 1 kHz.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS}")
    if sample_rate_hz < 1000:
        raise ValueError(f"sample_rate_hz={sample_rate_hz} is too low for frequency weighting")
    if weighting == "Z":
        return np.zeros((0, 6))
    w = 2 * np.pi
    poles = [-w * _F1, -w * _F1] + ([-w * _F2, -w * _F3] if weighting == "A" else [])
    sos = np.vstack([bilinear_sections(len(poles), poles, sample_rate_hz), _high_section(sample_rate_hz)])
    sos[0, :3] /= abs(response(sos, [1000.0], sample_rate_hz)[0])
    return sos


@functools.lru_cache(maxsize=32)
def c_to_a_sos(sample_rate_hz: int) -> np.ndarray:
    """The section that turns the C-weighted signal into the A-weighted one (``[1, 6]``).

    A differs from C by two more zeros at 0 Hz and the poles at 107.7 and 737.9 Hz; both designs
    share the rest, so filtering C-weighted samples through this section gives
    :func:`weighting_sos` ``("A", ...)``'s output (to rounding) at the cost of one section.
    """
    w = 2 * np.pi
    sos = bilinear_sections(2, [-w * _F2, -w * _F3], sample_rate_hz)
    c = weighting_sos("C", sample_rate_hz)
    sos[0, :3] /= abs(response(np.vstack([c, sos]), [1000.0], sample_rate_hz)[0])
    return sos


def bilinear_sections(n_zeros_at_dc: int, poles, sample_rate_hz: float) -> np.ndarray:
    """Second-order sections ``[n, 6]`` of the analogue filter with ``n_zeros_at_dc`` zeros at
    0 Hz, real ``poles`` (rad/s, as many) and gain 1, through the bilinear transform: what
    ``scipy.signal.zpk2sos(*scipy.signal.bilinear_zpk(...))`` gives (tested), with numpy alone,
    so measuring levels never imports ``scipy.signal``. Poles are paired as scipy pairs them
    (the farthest from the unit circle first) and the gain sits in the first section."""
    poles = np.asarray(poles, dtype=np.float64)
    if n_zeros_at_dc != len(poles) or len(poles) % 2:
        raise ValueError("bilinear_sections takes an even number of poles and as many zeros at 0 Hz")
    fs2 = 2.0 * sample_rate_hz
    digital = (fs2 + poles) / (fs2 - poles)
    gain = fs2**n_zeros_at_dc / np.prod(fs2 - poles)
    digital = digital[np.argsort(-np.abs(1.0 - np.abs(digital)), kind="stable")]
    sections = np.zeros((len(poles) // 2, 6))
    for i, (a, b) in enumerate(digital.reshape(-1, 2)):
        sections[i] = [1.0, -2.0, 1.0, 1.0, -(a + b), a * b]
    sections[0, :3] *= gain
    return sections


def response(sos: np.ndarray, frequency_hz, sample_rate_hz: float) -> np.ndarray:
    """Complex response of second-order sections at ``frequency_hz`` (``scipy.signal.sosfreqz``)."""
    z = np.exp(-2j * np.pi * np.atleast_1d(np.asarray(frequency_hz, dtype=np.float64)) / sample_rate_hz)
    h = np.ones_like(z)
    for b0, b1, b2, a0, a1, a2 in np.asarray(sos, dtype=np.float64):
        h *= (b0 + b1 * z + b2 * z * z) / (a0 + a1 * z + a2 * z * z)
    return h


@functools.lru_cache(maxsize=32)
def _high_section(sample_rate_hz: int) -> np.ndarray:
    """The biquad ``[b0 b1 b2 1 a1 a2]`` (unit gain at DC) closest in dB, over the pass band, to
    the analogue double pole at 12.2 kHz (``1 / (1 + (f/f4)^2)``); the bilinear design when the
    fit would not be stable."""
    from scipy import optimize

    top = min(passband_hz(sample_rate_hz), 20000.0)
    f = np.geomspace(10.0, top, 400)
    target = -20 * np.log10(1 + (f / _F4) ** 2)
    zw = np.exp(-1j * 2 * np.pi * f / sample_rate_hz)
    w4 = 2 * np.pi * _F4
    pole = (2 * sample_rate_hz - w4) / (2 * sample_rate_hz + w4)  # the bilinear design
    bilinear = np.array([1.0, 2.0, 1.0, 1.0, -2 * pole, pole * pole])
    bilinear[:3] *= (1 - pole) ** 2 / 4

    def section(x):
        b1, b2, a1, a2 = x
        gain = (1 + a1 + a2) / (1 + b1 + b2)
        return np.array([gain, gain * b1, gain * b2, 1.0, a1, a2])

    def error(x):
        b1, b2, a1, a2 = x
        h = (1 + b1 * zw + b2 * zw**2) / (1 + a1 * zw + a2 * zw**2) * (1 + a1 + a2) / (1 + b1 + b2)
        return 20 * np.log10(np.abs(h)) - target

    fit = optimize.least_squares(error, [0.4, 0.04, -2 * pole, pole * pole])
    stable = np.all(np.abs(np.roots([1.0, fit.x[2], fit.x[3]])) < 0.999)
    return section(fit.x) if fit.success and stable else bilinear


def weighting_response_db(weighting: str, sample_rate_hz: int, frequency_hz) -> np.ndarray:
    """Magnitude response (dB) of :func:`weighting_sos` at ``frequency_hz``."""
    frequency_hz = np.atleast_1d(np.asarray(frequency_hz, dtype=np.float64))
    h = response(weighting_sos(weighting, sample_rate_hz), frequency_hz, sample_rate_hz)
    return 20 * np.log10(np.maximum(np.abs(h), 1e-30))


def weighted(samples: np.ndarray, *, weighting: str, sample_rate_hz: int) -> np.ndarray:
    """``samples`` (float ``[n]``) through the weighting filter, float64 ``[n]``: the filtering the
    levels stage runs (:func:`unit_blocks`), C first and A from C."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not one of {WEIGHTINGS}")
    x = np.ascontiguousarray(samples, dtype=np.float64)
    if weighting == "Z":
        return x
    signals = np.empty((2, len(x)))
    _weigh(x, sample_rate_hz, bounds=np.zeros(1, np.int64), step=1, first=0, n_steps=0, signals=signals)
    return signals[0] if weighting == "C" else signals[1]


def _weigh(x: np.ndarray, sample_rate_hz: int, *, bounds, step, first, n_steps, signals=None):
    """:func:`kernels.weigh` with the sections of ``sample_rate_hz``."""
    from soundshard.transforms.levels import kernels

    return kernels.weigh(
        x,
        _meter_sections(sample_rate_hz),
        np.asarray(bounds, dtype=np.int64),
        int(step),
        int(first),
        int(n_steps),
        np.zeros((0, 0)) if signals is None else signals,
    )


@functools.lru_cache(maxsize=32)
def _meter_sections(sample_rate_hz: int) -> np.ndarray:
    """float64 ``[3, 6]``: the C weighting's two sections, then :func:`c_to_a_sos`'s."""
    sections = np.ascontiguousarray(
        np.vstack([weighting_sos("C", sample_rate_hz), c_to_a_sos(sample_rate_hz)])
    )
    if sections.shape != (3, 6):
        raise AssertionError(f"the meter's kernel takes three sections, the design has {len(sections)}")
    sections.setflags(write=False)
    return sections


def time_weighted(
    squared: np.ndarray, *, sample_rate_hz: int, time_constant_s: float = FAST_S, initial: float | None = None
) -> np.ndarray:
    """Exponential time weighting of a squared signal (IEC 61672-1, F or S): mean square ``[n]``.

    Args:
        squared: float64 ``[n]`` squared (weighted) samples.
        sample_rate_hz: Their rate.
        time_constant_s: 0.125 (F) or 1.0 (S).
        initial: The weighting's state before the first sample (default: the mean square of the
            first time constant, so the level does not start from silence).
    """
    from soundshard.transforms.levels import kernels

    squared = np.ascontiguousarray(squared, dtype=np.float64)
    if len(squared) == 0:
        return np.zeros(0)
    alpha = -math.expm1(-1.0 / (time_constant_s * sample_rate_hz))
    if initial is None:
        initial = float(np.mean(squared[: max(1, round(time_constant_s * sample_rate_hz))]))
    return kernels.exponential(squared, alpha, float(initial))


def db(mean_square) -> np.ndarray:
    """``10 log10(mean_square)``, digital silence floored at ``SILENCE_DB``."""
    return 10.0 * np.log10(np.maximum(np.asarray(mean_square, dtype=np.float64), _FLOOR))


# -- fractional-octave bands ----------------------------------------------------------------------


def band_centres_hz(bands: str, sample_rate_hz: int) -> np.ndarray:
    """Exact mid-band frequencies (IEC 61260-1 base-10) of ``octave`` or ``third`` bands from
    25 Hz (thirds) or 31.5 Hz (octaves) up to the last whose upper edge is in the pass band."""
    if bands == "none":
        return np.zeros(0)
    b = {"octave": 1, "third": 3}[bands]
    g = 10.0**0.3
    first = -5 if b == 1 else -16  # 31.6 Hz, 25.1 Hz
    x = np.arange(first, 20 * b if b == 1 else 14)
    centres = 1000.0 * g ** (x / b)
    upper = centres * g ** (1 / (2 * b))
    return centres[upper < passband_hz(sample_rate_hz)]


def nominal_hz(centre_hz: float) -> str:
    """Column name of a band's nominal frequency: ``31.5``, ``1000``, ``6300``."""
    for nominal in IEC_NOMINAL_HZ:
        if abs(math.log10(nominal / centre_hz)) < 0.02:
            return f"{nominal:g}"
    return f"{centre_hz:.0f}"


@functools.lru_cache(maxsize=8)
def band_sos(bands: str, sample_rate_hz: int) -> tuple[np.ndarray, ...]:
    """Order-3 Butterworth band-pass sections of each band (IEC 61260-1 class 1 shape)."""
    b = {"octave": 1, "third": 3}.get(bands)
    if b is None:
        return ()
    from scipy import signal

    g = 10.0**0.3
    out = []
    for centre in band_centres_hz(bands, sample_rate_hz):
        edges = [centre * g ** (-1 / (2 * b)), centre * g ** (1 / (2 * b))]
        out.append(signal.butter(3, edges, btype="bandpass", fs=sample_rate_hz, output="sos"))
    return tuple(out)


# -- blocks: what a work unit contributes ----------------------------------------------------------


def block_start(block: np.ndarray | int, sample_rate_hz: int):
    """First recording sample of block(s) ``block``."""
    return (np.asarray(block, dtype=np.int64) * sample_rate_hz) // BLOCKS_PER_S


def unit_blocks(
    samples: np.ndarray,
    *,
    sample_rate_hz: int,
    offset: int,
    own_start: int,
    own_end: int,
    bands: str = "none",
) -> LevelBlocks:
    """The blocks of the samples ``[own_start, own_end)`` a unit owns, from its decoded signal.

    Args:
        samples: float ``[n]`` decoded mono signal; ``samples[0]`` is recording sample ``offset``.
            Samples before ``own_start`` (pre-roll) settle the filters and are not counted.
        sample_rate_hz: Its rate.
        offset: Recording sample index of ``samples[0]``.
        own_start: First recording sample the unit owns (>= ``offset``).
        own_end: Recording sample after the last it owns (clipped to the decoded signal).
        bands: ``none``, ``octave`` or ``third``.

    Raises:
        ValueError: when ``own_start`` lies before the decoded signal.
    """
    if own_start < offset:
        raise ValueError(f"own_start={own_start} lies before the decoded signal (offset {offset})")
    x = np.ascontiguousarray(samples, dtype=np.float64)
    lo = own_start - offset
    hi = max(lo, min(own_end - offset, len(x)))
    own_end = offset + hi
    b_lo = max(0, own_start * BLOCKS_PER_S // sample_rate_hz - 1)
    b_hi = own_end * BLOCKS_PER_S // sample_rate_hz + 2
    starts = np.clip(block_start(np.arange(b_lo, b_hi), sample_rate_hz), own_start, own_end)
    counts = np.diff(starts)
    keep = np.flatnonzero(counts > 0)
    if len(keep) == 0:
        empty = np.zeros(0)
        return LevelBlocks(
            own_start * BLOCKS_PER_S // sample_rate_hz, np.zeros((0, 3)), np.zeros(0, np.int64), empty, empty
        )
    first_block = b_lo + int(keep[0])
    edges = starts[keep] - offset  # local index of each kept block's first owned sample
    # One compiled pass: C, then A from C, the squares of A, C and Z summed per block and of A per
    # F-weighting step; no weighted signal is written out.
    step, first, n_steps = _steps(lo=lo, hi=hi, offset=offset, sample_rate_hz=sample_rate_hz)
    sums, step_sums = _weigh(
        x, sample_rate_hz, bounds=np.append(edges, hi), step=step, first=first, n_steps=n_steps
    )
    fast_max, fast_min = _fast_extremes(
        step_sums / step, edges, step=step, first=first, lo=lo, hi=hi, sample_rate_hz=sample_rate_hz
    )
    band_sq = None
    sections = band_sos(bands, sample_rate_hz)
    if sections:
        from scipy import signal

        band_sq = np.stack(
            [np.add.reduceat(signal.sosfilt(sos, x)[lo:hi] ** 2, edges - lo) for sos in sections], axis=1
        )
    return LevelBlocks(
        first_block=first_block,
        sum_sq=sums,
        n_samples=counts[keep].astype(np.int64),
        fast_max=fast_max,
        fast_min=fast_min,
        band_sq=band_sq,
    )


def _steps(*, lo: int, hi: int, offset: int, sample_rate_hz: int) -> tuple[int, int, int]:
    """``(step, first, n_steps)``: the F weighting runs on 1 ms means of the squared A samples, in
    steps aligned to the recording's sample 0 (so a unit and the whole file step alike); the first
    step starts at local index ``first``. A unit too short for a step's end to fall in
    ``[lo, hi)`` steps every sample."""
    step = max(1, sample_rate_hz // 1000)
    first = (-offset) % step
    n_steps = max(0, (hi - first) // step)
    if n_steps == 0 or (first + n_steps * step) <= lo:
        step, first, n_steps = 1, 0, hi
    return step, first, n_steps


def _fast_extremes(
    means: np.ndarray, edges: np.ndarray, *, step: int, first: int, lo: int, hi: int, sample_rate_hz: int
):
    """Largest and smallest F-time-weighted A mean square within each block, from the mean
    squares of A over the steps of :func:`_steps`.

    Within a millisecond the 125 ms weighting changes by under 1 %, and a twentieth of the steps
    makes it cheap. Each step's value counts for the block holding its last sample.
    """
    fast = time_weighted(means, sample_rate_hz=sample_rate_hz / step)
    ends = first + np.arange(1, len(fast) + 1) * step - 1  # last sample of each step
    owned = (ends >= lo) & (ends < hi)
    fast_max = np.full(len(edges), -np.inf)
    fast_min = np.full(len(edges), np.inf)
    block = np.searchsorted(edges, ends[owned], side="right") - 1
    if len(block):
        values = fast[owned]
        starts = np.flatnonzero(np.diff(block, prepend=-1))  # steps are in time order
        fast_max[block[starts]] = np.maximum.reduceat(values, starts)
        fast_min[block[starts]] = np.minimum.reduceat(values, starts)
    # a block too short to hold a step's end takes the value in force at its start
    empty = ~np.isfinite(fast_max)
    if empty.any():
        at = np.clip(np.searchsorted(ends, edges[empty]) - 1, 0, len(fast) - 1)
        fast_max[empty] = fast_min[empty] = fast[at]
    return fast_max, fast_min


def merge_blocks(parts) -> LevelBlocks:
    """One recording's blocks from its units' (any order): a block cut by a unit boundary gets
    the sum of both parts' energies and samples, the larger maximum and the smaller minimum."""
    parts = [p for p in parts if p.n_blocks]
    if not parts:
        return LevelBlocks(0, np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    first = min(p.first_block for p in parts)
    n = max(p.first_block + p.n_blocks for p in parts) - first
    bands = parts[0].band_sq
    sum_sq = np.zeros((n, 3))
    n_samples = np.zeros(n, np.int64)
    fast_max = np.full(n, -np.inf)
    fast_min = np.full(n, np.inf)
    band_sq = None if bands is None else np.zeros((n, bands.shape[1]))
    for p in parts:
        s = slice(p.first_block - first, p.first_block - first + p.n_blocks)
        sum_sq[s] += p.sum_sq
        n_samples[s] += p.n_samples
        np.maximum(fast_max[s], p.fast_max, out=fast_max[s])
        np.minimum(fast_min[s], p.fast_min, out=fast_min[s])
        if band_sq is not None and p.band_sq is not None:
            band_sq[s] += p.band_sq
    return LevelBlocks(first, sum_sq, n_samples, fast_max, fast_min, band_sq)


def recording_blocks(samples: np.ndarray, *, sample_rate_hz: int, bands: str = "none") -> LevelBlocks:
    """The blocks of a whole recording (``samples`` from its first sample)."""
    return unit_blocks(
        samples, sample_rate_hz=sample_rate_hz, offset=0, own_start=0, own_end=len(samples), bands=bands
    )


# -- levels over spans -----------------------------------------------------------------------------


def span_levels(
    blocks: LevelBlocks,
    *,
    span_s: float,
    sample_rate_hz: int,
    offset_db: float = 0.0,
    statistics: bool = True,
) -> dict[str, np.ndarray]:
    """Levels of each ``span_s``-second span (aligned to the recording start) the blocks touch.

    Args:
        blocks: A recording's blocks (:func:`merge_blocks`).
        span_s: Span length, a multiple of 0.1 s (1 for the per-second table).
        sample_rate_hz: Rate of the signal the blocks were summed from.
        offset_db: Calibration offset added to every level (0: dBFS).
        statistics: Also ``la10``, ``la50``, ``la90`` (left out of the per-second table).

    Returns:
        dict of float64 ``[n_spans]`` arrays: ``start_s``, ``duration_s`` (audio in the span),
        ``laeq``, ``lceq``, ``lzeq``, ``lafmax``, ``lafmin``, ``la10``, ``la50``, ``la90``
        (A levels exceeded 10/50/90 % of the time, from the span's 100 ms LAeq), ``lae`` (SEL)
        and, with bands, ``band_lzeq`` ``[n_spans, n_bands]``; levels in dB plus ``offset_db``.
    """
    per = max(1, round(span_s * BLOCKS_PER_S))
    if blocks.n_blocks == 0:
        names = (
            "start_s",
            "duration_s",
            "laeq",
            "lceq",
            "lzeq",
            "lafmax",
            "lafmin",
            "la10",
            "la50",
            "la90",
            "lae",
        )
        return {k: np.zeros(0) for k in names}
    first_span = blocks.first_block // per
    last_span = (blocks.first_block + blocks.n_blocks - 1) // per
    spans = np.arange(first_span, last_span + 1)
    local = np.maximum(spans * per - blocks.first_block, 0)
    counts = np.add.reduceat(blocks.n_samples, local).astype(np.float64)
    ms = np.add.reduceat(blocks.sum_sq, local, axis=0) / np.maximum(counts, 1)[:, None]
    duration = counts / sample_rate_hz
    out = {
        "start_s": spans * (per / BLOCKS_PER_S),
        "duration_s": duration,
        "laeq": db(ms[:, 0]) + offset_db,
        "lceq": db(ms[:, 1]) + offset_db,
        "lzeq": db(ms[:, 2]) + offset_db,
        "lafmax": db(np.maximum.reduceat(blocks.fast_max, local)) + offset_db,
        "lafmin": db(np.minimum.reduceat(blocks.fast_min, local)) + offset_db,
    }
    if statistics:
        # the blocks of each span side by side (NaN where a span has fewer), percentiles per row
        block_la = db(blocks.sum_sq[:, 0] / np.maximum(blocks.n_samples, 1)) + offset_db
        grid = np.full((len(spans), per), np.nan)
        position = np.arange(blocks.first_block, blocks.first_block + blocks.n_blocks)
        grid[position // per - first_span, position % per] = block_la
        pct = np.nanpercentile(grid, [90, 50, 10], axis=1)
        out["la10"], out["la50"], out["la90"] = pct[0], pct[1], pct[2]
    out["lae"] = out["laeq"] + 10 * np.log10(np.maximum(duration, 1e-9))
    if blocks.band_sq is not None:
        out["band_lzeq"] = (
            db(np.add.reduceat(blocks.band_sq, local, axis=0) / np.maximum(counts, 1)[:, None]) + offset_db
        )
    return out


def _block_shares(blocks: LevelBlocks, start_s: float, end_s: float) -> np.ndarray:
    """The share ``[n_blocks]`` (0..1) of each block that lies inside ``[start_s, end_s)``."""
    edges = np.arange(blocks.first_block, blocks.first_block + blocks.n_blocks + 1) * BLOCK_S
    return np.clip(np.minimum(edges[1:], end_s) - np.maximum(edges[:-1], start_s), 0.0, None) / BLOCK_S


def interval_levels(
    blocks: LevelBlocks, *, start_s: float, end_s: float, sample_rate_hz: int, offset_db: float = 0.0
) -> tuple[float, float, float]:
    """``(laeq, lafmax, lae)`` of the time ``[start_s, end_s)`` of a recording (an event).

    Blocks cut by the interval count with the share of them inside it (energy is assumed even
    within a 100 ms block); the maximum is that of every block the interval touches.
    """
    inside = _block_shares(blocks, start_s, end_s)
    touched = inside > 0
    if not touched.any():
        return SILENCE_DB + offset_db, SILENCE_DB + offset_db, SILENCE_DB + offset_db
    energy = float(np.sum(blocks.sum_sq[:, 0] * inside))
    n = float(np.sum(blocks.n_samples * inside))
    laeq = float(db(energy / max(n, 1.0))) + offset_db
    lafmax = float(db(blocks.fast_max[touched].max())) + offset_db
    return laeq, lafmax, laeq + 10 * math.log10(max(n / sample_rate_hz, 1e-9))


def energy_inside(blocks: LevelBlocks, intervals) -> float:
    """Sum of squared A-weighted samples inside the union of ``(start_s, end_s)`` intervals."""
    share = sum(
        (_block_shares(blocks, start, end) for start, end in union(intervals)), np.zeros(blocks.n_blocks)
    )
    return float(np.sum(blocks.sum_sq[:, 0] * np.minimum(share, 1.0)))


def union(intervals) -> list[tuple[float, float]]:
    """Sorted, non-overlapping union of ``(start, end)`` intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def lden(day_db: float | None, evening_db: float | None, night_db: float | None) -> float | None:
    """Day-evening-night level (EU Directive 2002/49/EC): 12 h day, 4 h evening +5 dB, 8 h
    night +10 dB; ``None`` unless all three periods have a level."""
    if day_db is None or evening_db is None or night_db is None:
        return None
    energy = 12 * 10 ** (day_db / 10) + 4 * 10 ** ((evening_db + 5) / 10) + 8 * 10 ** ((night_db + 10) / 10)
    return 10 * math.log10(energy / 24)


# -- calibration from a calibrator's tone -----------------------------------------------------------


def calibrator_offset(
    samples: np.ndarray,
    *,
    sample_rate_hz: int,
    reference_db: float = 94.0,
    tone_hz: float = 1000.0,
    steady_s: float = 3.0,
) -> dict:
    """The calibration offset (dB SPL of 0 dBFS) from a recording of a sound calibrator.

    Finds the loudest stretch of ``steady_s`` seconds whose 100 ms levels vary by less than 0.5 dB,
    checks that at least 90 % of its energy lies within 5 % of ``tone_hz``, and returns
    ``reference_db`` minus its LZeq (at ``tone_hz`` the A, C and Z weightings agree).

    Returns:
        ``{"offset_db", "level_dbfs", "start_s", "end_s", "tone_share", "spread_db"}``.

    Raises:
        ValueError: no steady stretch, or none that is the calibrator's tone (the message gives
            what was found).
    """
    x = np.asarray(samples, dtype=np.float64)
    per = max(1, round(steady_s * BLOCKS_PER_S))
    blocks = recording_blocks(x, sample_rate_hz=sample_rate_hz)
    full = blocks.n_samples == blocks.n_samples.max()
    level = db(blocks.sum_sq[:, 2] / np.maximum(blocks.n_samples, 1))
    if full.sum() < per:
        raise ValueError(f"the recording is shorter than {steady_s:g} s of steady tone")
    windows = np.lib.stride_tricks.sliding_window_view(level[: int(np.flatnonzero(full)[-1]) + 1], per)
    spread = windows.max(axis=1) - windows.min(axis=1)
    sounding = windows.min(axis=1) > SILENCE_DB + 50  # not digital silence
    steady = np.flatnonzero((spread < 0.5) & sounding)
    if len(steady) == 0:
        steadiest = f"{spread[sounding].min():.1f} dB" if sounding.any() else "no sounding stretch"
        raise ValueError(
            f"no {steady_s:g} s stretch whose level holds within 0.5 dB (the steadiest: {steadiest}): "
            "is the calibrator on the microphone for long enough?"
        )
    first = int(steady[np.argmax(windows[steady].mean(axis=1))])
    start = int(block_start(first, sample_rate_hz))
    end = int(block_start(first + per, sample_rate_hz))
    part = x[start:end]
    power = np.abs(np.fft.rfft(part * np.hanning(len(part)))) ** 2
    frequency = np.fft.rfftfreq(len(part), 1 / sample_rate_hz)
    share = float(power[np.abs(frequency - tone_hz) <= 0.05 * tone_hz].sum() / max(power.sum(), 1e-300))
    peak_hz = float(frequency[np.argmax(power)])
    if share < 0.9:
        raise ValueError(
            f"the loudest steady stretch ({start / sample_rate_hz:.1f}-{end / sample_rate_hz:.1f} s) is "
            f"not a {tone_hz:g} Hz tone: {share:.0%} of its energy lies near it (peak at {peak_hz:.0f} Hz)"
        )
    level_dbfs = float(db(np.mean(part**2)))
    return {
        "offset_db": round(reference_db - level_dbfs, 3),
        "level_dbfs": round(level_dbfs, 3),
        "start_s": start / sample_rate_hz,
        "end_s": end / sample_rate_hz,
        "tone_share": round(share, 4),
        "spread_db": round(float(spread[first]), 3),
    }
