"""Sound levels against IEC 61672-1 / IEC 61260-1 and against themselves split into units."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from soundshard.transforms.levels import meter as levels

RATES_HZ = (16000, 22050, 44100, 48000)


def _sine(frequency_hz: float, *, amplitude: float, seconds: float, rate_hz: int) -> np.ndarray:
    t = np.arange(round(seconds * rate_hz)) / rate_hz
    return amplitude * np.sin(2 * np.pi * frequency_hz * t)


@pytest.mark.parametrize("rate_hz", RATES_HZ)
@pytest.mark.parametrize("weighting", ["A", "C"])
def test_weighting_within_class_1_of_the_standard_table(rate_hz, weighting):
    f = levels.iec_frequencies_hz()
    table = np.array(levels.IEC_A_DB if weighting == "A" else levels.IEC_C_DB)
    response = levels.weighting_response_db(weighting, rate_hz, f)
    deviation = response - table
    measurable = f < levels.passband_hz(rate_hz)
    upper, lower = np.array(levels.CLASS1_UPPER_DB), np.array(levels.CLASS1_LOWER_DB)
    inside = (deviation <= upper) & (deviation >= -lower)
    assert inside[measurable].all(), dict(
        zip(f[~inside & measurable].round(), deviation[~inside & measurable], strict=True)
    )
    # and close to the analogue design itself, not only within the (wide) tolerances
    exact = levels.analogue_weighting_db(weighting, f)
    assert np.max(np.abs(response - exact)[measurable]) < 0.1
    assert response[f == 1000.0][0] == pytest.approx(0.0, abs=1e-9)
    # measurable reaches 5 kHz at 16 kHz, 10 kHz at 22.05 kHz (9.9 kHz is its limit: not 10 kHz)
    assert f[measurable].max() >= {16000: 6300, 22050: 8000, 44100: 16000, 48000: 20000}[rate_hz] * 0.99


def test_plain_bilinear_a_weighting_would_fail_at_16_khz():
    # Why the 12.2 kHz pole pair is fitted: the textbook bilinear design is 5 dB low at 6.3 kHz.
    from scipy import signal

    w = 2 * np.pi * np.array([20.598997, 20.598997, 107.65265, 737.86223, 12194.217, 12194.217])
    z, p, k = signal.bilinear_zpk([0.0] * 4, -w, 1.0, 16000)
    _, h = signal.freqz_zpk(z, p, k, worN=[1000.0, 6309.6], fs=16000)
    bilinear_db = 20 * np.log10(np.abs(h[1]) / np.abs(h[0]))
    assert bilinear_db < -0.1 - 2.6  # outside class 1 (table -0.1 dB, lower limit 2.6 dB)
    ours = levels.weighting_response_db("A", 16000, [6309.6])[0]
    assert abs(ours - (-0.1)) < 0.2


@pytest.mark.parametrize("rate_hz", RATES_HZ)
def test_1_khz_sine_reads_its_level_in_every_weighting(rate_hz):
    x = _sine(1000, amplitude=0.5, seconds=3, rate_hz=rate_hz)
    blocks = levels.recording_blocks(x, sample_rate_hz=rate_hz)
    out = levels.span_levels(blocks, span_s=3, sample_rate_hz=rate_hz, offset_db=100.0)
    expected = 10 * math.log10(0.5**2 / 2) + 100.0  # 0.5 FS sine: -9.03 dBFS, +100 dB offset
    for name in ("laeq", "lceq", "lzeq"):
        assert out[name][0] == pytest.approx(expected, abs=0.1), name
    assert out["lafmax"][0] == pytest.approx(expected, abs=0.1)
    assert out["lae"][0] == pytest.approx(expected + 10 * math.log10(3), abs=0.1)


def test_100_hz_sine_is_a_weighted_by_the_table_value():
    x = _sine(100, amplitude=0.1, seconds=2, rate_hz=16000)
    out = levels.span_levels(levels.recording_blocks(x, sample_rate_hz=16000), span_s=2, sample_rate_hz=16000)
    assert out["laeq"][0] - out["lzeq"][0] == pytest.approx(-19.1, abs=0.2)
    assert out["lceq"][0] - out["lzeq"][0] == pytest.approx(-0.3, abs=0.2)


@pytest.mark.parametrize(("burst_s", "expected_db"), [(1.0, 0.0), (0.2, -1.0), (0.05, -4.8), (0.01, -11.1)])
def test_fast_time_weighting_tone_bursts(burst_s, expected_db):
    # IEC 61672-1 Table 4: LAFmax of a 4 kHz tone burst relative to the steady tone's level.
    rate = 48000
    steady = _sine(4000, amplitude=0.3, seconds=2, rate_hz=rate)
    x = np.zeros(3 * rate)
    x[rate : rate + round(burst_s * rate)] = steady[: round(burst_s * rate)]
    out = levels.span_levels(levels.recording_blocks(x, sample_rate_hz=rate), span_s=3, sample_rate_hz=rate)
    steady_db = 10 * math.log10(0.3**2 / 2) + levels.weighting_response_db("A", rate, [4000])[0]
    assert out["lafmax"][0] - steady_db == pytest.approx(expected_db, abs=0.3)


def _pink(seconds: float, rate_hz: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(seconds * rate_hz)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / rate_hz)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[f < 10] = 0  # from 10 Hz: the random power of the few lowest bins would dominate
    x = np.fft.irfft(spectrum, n)
    return 0.1 * x / np.std(x)


@pytest.mark.parametrize("bands", ["octave", "third"])
def test_pink_noise_has_equal_band_levels(bands):
    rate = 16000
    blocks = levels.recording_blocks(_pink(30, rate), sample_rate_hz=rate, bands=bands)
    out = levels.span_levels(blocks, span_s=30, sample_rate_hz=rate)
    centres = levels.band_centres_hz(bands, rate)
    band_db = out["band_lzeq"][0]
    assert len(band_db) == len(centres)
    assert centres.max() < 7200 and centres.min() < 32
    middle = (centres > 60) & (centres < 5000)
    assert np.ptp(band_db[middle]) < 0.6, dict(
        zip(centres[middle].round(), band_db[middle].round(2), strict=True)
    )
    # a pink band's share of the energy is its share of the log-frequency range (the spectrum's
    # bins k at k/30 Hz, from 10 Hz to Nyquist, each carry 1/k of the power)
    k = np.arange(300, 30 * rate // 2 + 1)
    share = np.log(10 ** (0.3 / {"octave": 1, "third": 3}[bands])) / np.sum(1 / k)
    assert np.mean(band_db[middle]) == pytest.approx(out["lzeq"][0] + 10 * np.log10(share), abs=0.3)


def test_nominal_band_names():
    names = [levels.nominal_hz(c) for c in levels.band_centres_hz("third", 48000)]
    assert names[:4] == ["25", "31.5", "40", "50"] and "1000" in names and names[-1] == "16000"


def _split_like_units(x, rate, cuts):
    """Blocks of ``x`` computed unit by unit (each decoded with a second of pre-roll)."""
    parts = []
    bounds = [0, *cuts, len(x)]
    for own_start, own_end in zip(bounds[:-1], bounds[1:], strict=True):
        offset = max(0, own_start - round(levels.PREROLL_S * rate))
        parts.append(
            levels.unit_blocks(
                x[offset : own_end + 500],
                sample_rate_hz=rate,
                offset=offset,
                own_start=own_start,
                own_end=own_end,
                bands="octave",
            )
        )
    return levels.merge_blocks(reversed(parts))


@pytest.mark.parametrize("rate_hz", [16000, 22050])
def test_units_give_the_levels_of_the_whole_recording(rate_hz):
    rng = np.random.default_rng(3)
    seconds = 25
    x = 0.01 * rng.standard_normal(seconds * rate_hz)
    for start in (3.03, 9.5, 17.77):  # loud bursts, one across a unit boundary
        a = round(start * rate_hz)
        x[a : a + rate_hz // 2] += _sine(440, amplitude=0.5, seconds=0.5, rate_hz=rate_hz)
    whole = levels.recording_blocks(x, sample_rate_hz=rate_hz, bands="octave")
    split = _split_like_units(x, rate_hz, [round(3.2 * rate_hz), 9 * rate_hz + 1234, round(17.8 * rate_hz)])
    assert split.first_block == whole.first_block == 0 and split.n_blocks == whole.n_blocks == 250
    np.testing.assert_array_equal(split.n_samples, whole.n_samples)
    np.testing.assert_allclose(split.sum_sq, whole.sum_sq, rtol=1e-6)
    np.testing.assert_allclose(split.band_sq, whole.band_sq, rtol=1e-6)
    np.testing.assert_allclose(levels.db(split.fast_max), levels.db(whole.fast_max), atol=0.01)
    for span_s in (1, 60):
        a = levels.span_levels(whole, span_s=span_s, sample_rate_hz=rate_hz)
        b = levels.span_levels(split, span_s=span_s, sample_rate_hz=rate_hz)
        for name in ("laeq", "lceq", "lzeq", "lafmax", "la10", "la90"):
            np.testing.assert_allclose(a[name], b[name], atol=0.01, err_msg=name)


def test_statistical_levels_of_a_stepped_signal():
    # 10 s: 8 s at one level, 2 s 20 dB louder: L90 and L50 read the quiet part, L10 the loud one
    rate = 16000
    quiet_s = _sine(1000, amplitude=0.01, seconds=8, rate_hz=rate)
    x = np.concatenate([quiet_s, _sine(1000, amplitude=0.1, seconds=2, rate_hz=rate)])
    out = levels.span_levels(levels.recording_blocks(x, sample_rate_hz=rate), span_s=10, sample_rate_hz=rate)
    quiet = 10 * math.log10(0.01**2 / 2)
    assert out["la90"][0] == pytest.approx(quiet, abs=0.1)
    assert out["la50"][0] == pytest.approx(quiet, abs=0.1)
    assert out["la10"][0] == pytest.approx(quiet + 20, abs=0.1)
    energy = (8 * 0.01**2 / 2 + 2 * 0.1**2 / 2) / 10
    assert out["laeq"][0] == pytest.approx(10 * math.log10(energy), abs=0.05)
    per_second = levels.span_levels(
        levels.recording_blocks(x, sample_rate_hz=rate), span_s=1, sample_rate_hz=rate
    )
    assert len(per_second["laeq"]) == 10 and per_second["start_s"][-1] == 9.0
    np.testing.assert_allclose(per_second["laeq"][:7], quiet, atol=0.05)


def test_event_levels_and_energy_shares():
    rate = 16000
    x = np.concatenate([np.zeros(rate), _sine(1000, amplitude=0.2, seconds=2, rate_hz=rate), np.zeros(rate)])
    blocks = levels.recording_blocks(x, sample_rate_hz=rate)
    laeq, lafmax, lae = levels.interval_levels(blocks, start_s=1.0, end_s=3.0, sample_rate_hz=rate)
    expected = 10 * math.log10(0.2**2 / 2)
    assert laeq == pytest.approx(expected, abs=0.05)
    assert lafmax == pytest.approx(expected, abs=0.1)
    assert lae == pytest.approx(expected + 10 * math.log10(2), abs=0.05)
    total = blocks.sum_sq[:, 0].sum()
    assert levels.energy_inside(blocks, [(1.0, 2.0)]) / total == pytest.approx(0.5, abs=0.01)
    # overlapping events of one label are not counted twice
    assert levels.energy_inside(blocks, [(0.5, 2.5), (1.5, 3.5)]) / total == pytest.approx(1.0, abs=0.01)
    assert levels.union([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]


def test_lden_weights_evening_and_night():
    assert levels.lden(60.0, 60.0, 60.0) == pytest.approx(
        10 * math.log10((12 + 4 * 10**0.5 + 8 * 10) / 24) + 60
    )
    assert levels.lden(60.0, None, 50.0) is None


def test_digital_silence_has_a_floor():
    out = levels.span_levels(
        levels.recording_blocks(np.zeros(16000), sample_rate_hz=16000), span_s=1, sample_rate_hz=16000
    )
    assert out["laeq"][0] == levels.SILENCE_DB and out["lafmin"][0] == levels.SILENCE_DB


def test_calibrator_offset_from_a_steady_tone():
    rate = 48000
    rng = np.random.default_rng(5)
    noise = 0.002 * rng.standard_normal(2 * rate)
    x = np.concatenate([noise, _sine(1000, amplitude=0.25, seconds=6, rate_hz=rate), noise])
    found = levels.calibrator_offset(x, sample_rate_hz=rate, reference_db=114.0)
    assert found["offset_db"] == pytest.approx(114.0 - 20 * math.log10(0.25 / math.sqrt(2)), abs=0.02)
    assert 2.0 <= found["start_s"] and found["end_s"] <= 8.0 and found["tone_share"] > 0.99
    with pytest.raises(ValueError, match="not a 1000 Hz tone"):
        levels.calibrator_offset(
            np.concatenate([noise, _sine(500, amplitude=0.25, seconds=6, rate_hz=rate)]), sample_rate_hz=rate
        )
    with pytest.raises(ValueError, match="holds within 0.5 dB"):
        levels.calibrator_offset(
            np.concatenate([noise, 0.2 * rng.standard_normal(rate)]), sample_rate_hz=rate
        )


def test_a_stream_measured_second_by_second_gives_the_levels_of_the_whole_recording():
    from soundshard.transforms.tagging.streaming import StreamingLevels

    rate = 16000
    rng = np.random.default_rng(5)
    x = 0.01 * rng.standard_normal(rate * 12 + rate // 3)  # 12.33 s: a partial last second
    for start in (2.5, 6.9):
        a = round(start * rate)
        x[a : a + rate // 2] += _sine(1000, amplitude=0.3, seconds=0.5, rate_hz=rate)
    whole = levels.span_levels(levels.recording_blocks(x, sample_rate_hz=rate), span_s=1, sample_rate_hz=rate)
    stream = StreamingLevels(sample_rate_hz=rate, offset_db=94.0)
    parts, k = [], 0
    for size in itertools.cycle((1237, 160, 9000)):  # blocks of odd sizes, across second boundaries
        if k >= len(x):
            break
        got = stream.push(x[k : k + size])
        assert all(d == 1.0 for d in got["duration_s"])  # only whole seconds before the end
        parts.append(got)
        k += size
    parts.append(stream.finish())
    streamed = {name: np.concatenate([p[name] for p in parts]) for name in StreamingLevels.COLUMNS}
    assert len(streamed["start_s"]) == 13 and streamed["duration_s"][-1] == pytest.approx(1 / 3, abs=1e-4)
    for name in ("start_s", "duration_s"):
        np.testing.assert_allclose(streamed[name], whole[name], atol=1e-9)
    for name in ("laeq", "lceq", "lzeq", "lafmax", "lafmin"):
        np.testing.assert_allclose(streamed[name] - 94.0, whole[name], atol=0.01, err_msg=name)
    energy = levels.db(np.mean(levels.weighted(x, weighting="A", sample_rate_hz=rate) ** 2)) + 94.0
    assert stream.laeq_db == pytest.approx(energy, abs=0.01) and stream.unit == "dB SPL"


@pytest.mark.parametrize("rate_hz", (8000, *RATES_HZ, 96000))
def test_the_weighting_design_is_scipys_without_importing_it(rate_hz):
    # bilinear_sections builds with numpy what scipy.signal's bilinear_zpk + zpk2sos give
    from scipy import signal

    w = 2 * np.pi
    for poles in (
        [-w * 20.598997] * 2,
        [-w * 107.65265, -w * 737.86223],
        [-w * 20.598997] * 2 + [-w * 107.65265] * 2,
    ):
        z, p, k = signal.bilinear_zpk([0.0] * len(poles), poles, 1.0, rate_hz)
        np.testing.assert_allclose(
            levels.bilinear_sections(len(poles), poles, rate_hz), signal.zpk2sos(z, p, k), rtol=0, atol=1e-12
        )
    sos = levels.weighting_sos("A", rate_hz)
    f = np.geomspace(10, 0.45 * rate_hz, 50)
    _, h = signal.sosfreqz(sos, worN=f, fs=rate_hz)
    np.testing.assert_allclose(
        20 * np.log10(np.abs(levels.response(sos, f, rate_hz))), 20 * np.log10(np.abs(h)), atol=1e-7
    )


@pytest.mark.parametrize("rate_hz", (16000, 48000))
def test_the_compiled_meter_equals_scipy_filtering(rate_hz):
    # the one-pass kernel: C and A signals equal scipy's sosfilt, and every block's sums of squares
    # (A, C, Z) and every 1 ms step's A mean square equal those of the filtered signals
    from scipy import signal

    rng = np.random.default_rng(5)
    x = 0.05 * rng.standard_normal(3 * rate_hz)
    x[rate_hz : rate_hz + 4000] += _sine(250, amplitude=0.5, seconds=4000 / rate_hz, rate_hz=rate_hz)
    c = signal.sosfilt(levels.weighting_sos("C", rate_hz), x)
    a = signal.sosfilt(levels.c_to_a_sos(rate_hz), c)
    a_direct = signal.sosfilt(levels.weighting_sos("A", rate_hz), x)
    np.testing.assert_allclose(
        levels.weighted(x, weighting="C", sample_rate_hz=rate_hz), c, rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        levels.weighted(x, weighting="A", sample_rate_hz=rate_hz), a, rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(a, a_direct, rtol=0, atol=1e-9)
    offset, own_start, own_end = 777, 777 + rate_hz // 3, 777 + 2 * rate_hz + 123
    blocks = levels.unit_blocks(
        x, sample_rate_hz=rate_hz, offset=offset, own_start=own_start, own_end=own_end
    )
    starts = (
        np.clip(
            levels.block_start(
                np.arange(blocks.first_block, blocks.first_block + blocks.n_blocks + 1), rate_hz
            ),
            own_start,
            own_end,
        )
        - offset
    )
    assert starts[0] == own_start - offset and starts[-1] == own_end - offset
    for k, y in enumerate((a, c, x)):
        expected = [np.sum(y[lo:hi] ** 2) for lo, hi in itertools.pairwise(starts)]
        np.testing.assert_allclose(blocks.sum_sq[:, k], expected, rtol=1e-10)
    np.testing.assert_array_equal(blocks.n_samples, np.diff(starts))
    # F weighting on 1 ms means aligned to the recording's sample 0, then the extremes per block
    step = rate_hz // 1000
    first = (-offset) % step
    n = (len(x) - first) // step
    means = (a[first : first + n * step].reshape(n, step) ** 2).mean(axis=1)
    alpha = -math.expm1(-1.0 / (levels.FAST_S * rate_hz / step))
    fast = signal.lfilter(
        [alpha],
        [1.0, alpha - 1.0],
        means,
        zi=[(1 - alpha) * means[: round(levels.FAST_S * rate_hz / step)].mean()],
    )[0]
    ends = first + np.arange(1, n + 1) * step - 1
    for b, (lo, hi) in enumerate(itertools.pairwise(starts)):
        inside = fast[(ends >= lo) & (ends < hi)]
        assert blocks.fast_max[b] == pytest.approx(inside.max(), rel=1e-9)
        assert blocks.fast_min[b] == pytest.approx(inside.min(), rel=1e-9)


def test_measuring_levels_does_not_import_scipy_signal():
    # scipy.signal costs about a second to import in every worker that measures levels
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from soundshard.transforms.levels import meter\n"
        "x = np.random.default_rng(0).standard_normal(48000) * 0.1\n"
        "b = meter.recording_blocks(x, sample_rate_hz=16000)\n"
        "assert b.n_blocks == 30 and np.all(b.sum_sq > 0), b\n"
        "print('scipy.signal' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_the_meter_kernels_compile_where_no_cache_can_be_written():
    # numba refuses cache=True for a function with no writable cache location; the meter's
    # kernels then compile per process instead of failing every unit's levels
    import numba

    from soundshard.transforms.levels import kernels

    namespace: dict = {}
    exec("def plus_one(x):\n    return x + 1\n", namespace)
    with pytest.raises(RuntimeError, match="no locator"):
        numba.njit(cache=True)(namespace["plus_one"])
    assert kernels._compiled(namespace["plus_one"])(41) == 42
