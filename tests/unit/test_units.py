"""Long recordings split into work units give the windows of the unsplit recording."""

import numpy as np
import pytest

from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.errors import AudioValidationError
from soundshard.schemas.records import SourceItem
from soundshard.transforms.audio import units
from soundshard.transforms.audio.decode import decode_audio
from soundshard.transforms.features import melspec
from soundshard.transforms.features.compute import plan, unit_duration_s

from ..helpers import tone, write_audio


def broadband(rate: int, duration_s: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    y = tone(sample_rate_hz=rate, duration_s=duration_s, freq_hz=700.0)
    return (y + 0.05 * rng.standard_normal(len(y))).astype(np.float32)


def unit_windows(path, unit, config):
    span = units.source_range(
        first_window=unit.first_window,
        n_windows=unit.n_windows,
        config=config,
        source_rate_hz=unit.source_sample_rate_hz,
        source_frames=unit.source_frames,
        output_samples=unit.output_samples,
    )
    audio = decode_audio(
        str(path), sample_rate_hz=config.sample_rate_hz, start_frame=span.start_frame, n_frames=span.n_frames
    )
    # the decoded range is bounded by the unit, not by the recording
    assert span.n_frames < unit.source_frames
    return melspec.log_mel_windows(
        audio.samples,
        config,
        first_window=unit.first_window,
        n_windows=unit.n_windows,
        y_offset=span.output_offset,
        total_samples=unit.output_samples,
    )


@pytest.mark.parametrize("rate", [16000, 22050, 44100, 96000])
def test_units_equal_the_whole_recording(tmp_path, rate):
    config = FeatureConfig()
    path = write_audio(tmp_path / "long.flac", broadband(rate, 12.3), rate)
    whole = melspec.log_mel_windows(decode_audio(str(path), sample_rate_hz=22050).samples, config)
    planned = plan(SourceItem(str(path), "long"), config, unit_s=2.0)
    assert len(planned) == 7 and [u.unit_index for u in planned] == list(range(7))
    assert sum(u.n_windows for u in planned) == len(whole) == planned[0].total_windows
    split = np.concatenate([unit_windows(path, u, config) for u in planned])
    assert split.shape == whole.shape
    np.testing.assert_allclose(split, whole, atol=2e-3)
    if rate == 22050:  # no resampling: the same samples, so the same values
        np.testing.assert_allclose(split, whole, atol=1e-5)
    recording_s = planned[0].output_samples / 22050
    assert sum(unit_duration_s(u, config) for u in planned) == pytest.approx(recording_s)


def test_plan_never_splits_recording_scope_normalisation_and_rejects_short_files(tmp_path):
    path = write_audio(tmp_path / "a.wav", broadband(22050, 5.0), 22050)
    config = FeatureConfig(normalization="standardize", normalization_scope="recording")
    assert len(plan(SourceItem(str(path), "a"), config, unit_s=1.0)) == 1
    assert len(plan(SourceItem(str(path), "a"), FeatureConfig(), unit_s=1.0)) == 5
    assert len(plan(SourceItem(str(path), "a"), FeatureConfig(), unit_s=None)) == 1
    short = write_audio(tmp_path / "s.wav", broadband(22050, 0.2), 22050)
    with pytest.raises(AudioValidationError, match="shorter than one window") as info:
        plan(SourceItem(str(short), "s"), FeatureConfig(last_window="drop"), unit_s=60.0)
    assert info.value.reason == "audio_too_short"


def test_resampled_length_matches_soxr():
    import soxr

    for n, rate in ((77777, 16000), (99999, 48000), (12345, 96000), (160001, 44100)):
        got = len(soxr.resample(np.zeros(n, np.float32), rate, 22050))
        assert units.resampled_length(n, rate, 22050) == got


def test_split_windows():
    assert units.split_windows(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert units.split_windows(10, None) == [(0, 10)]
    assert units.split_windows(3, 4) == [(0, 3)]
    assert units.split_windows(0, 4) == []
