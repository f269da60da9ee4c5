import numpy as np
import pytest

from soundshard.schemas.errors import AudioDecodeError, AudioValidationError
from soundshard.transforms.audio.decode import decode_audio

from ..helpers import tone, write_audio


def test_multichannel_high_rate_24bit_is_mixed_down_and_resampled(tmp_path):
    y = tone(sample_rate_hz=96000, duration_s=0.5, channels=8)
    path = write_audio(tmp_path / "eight.wav", y, 96000, subtype="PCM_24")
    audio = decode_audio(str(path), sample_rate_hz=22050)
    assert audio.source_channels == 8 and audio.source_sample_rate_hz == 96000
    assert audio.source_format == "WAV/PCM_24"
    assert audio.samples.ndim == 1 and audio.samples.dtype == np.float32
    assert len(audio.samples) == pytest.approx(0.5 * 22050, abs=2)
    # mixdown is the channel mean: the channels are scaled 1/8 .. 8/8 of the same tone
    mono_ref = decode_audio(
        str(write_audio(tmp_path / "m.wav", y.mean(axis=1), 96000, "FLOAT")), sample_rate_hz=22050
    )
    np.testing.assert_allclose(audio.samples, mono_ref.samples, atol=1e-4)


def test_channel_selection_and_missing_channel(tmp_path):
    y = tone(duration_s=0.2, channels=2)
    path = str(write_audio(tmp_path / "st.flac", y, 22050))
    second = decode_audio(path, sample_rate_hz=22050, channel=1)
    np.testing.assert_allclose(second.samples, y[:, 1], atol=1e-4)
    with pytest.raises(AudioValidationError) as info:
        decode_audio(path, sample_rate_hz=22050, channel=2)
    assert info.value.reason == "channel_missing"


def test_nan_float_wav_is_rejected(tmp_path):
    y = tone(duration_s=0.2)
    y[100] = np.nan
    path = write_audio(tmp_path / "nan.wav", y, 22050, subtype="FLOAT")
    with pytest.raises(AudioValidationError, match="1 non-finite") as info:
        decode_audio(str(path), sample_rate_hz=22050)
    assert info.value.reason == "non_finite_audio"


def test_truncated_flac_and_text_file(tmp_path):
    path = write_audio(tmp_path / "full.flac", tone(duration_s=2.0), 22050)
    data = path.read_bytes()
    truncated = tmp_path / "cut.flac"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(str(truncated), sample_rate_hz=22050)
    assert info.value.reason in ("corrupt_audio", "truncated_audio")
    text = tmp_path / "notes.wav"
    text.write_text("hello, not audio")
    with pytest.raises(AudioDecodeError, match="cannot decode") as info:
        decode_audio(str(text), sample_rate_hz=22050)
    assert info.value.reason == "decode_error"


def test_header_only_wav_has_no_samples(tmp_path):
    path = write_audio(tmp_path / "empty.wav", np.zeros(0, np.float32), 22050)
    with pytest.raises(AudioValidationError) as info:
        decode_audio(str(path), sample_rate_hz=22050)
    assert info.value.reason == "empty_audio"


def test_file_object_input(tmp_path):
    path = write_audio(tmp_path / "a.ogg", tone(sample_rate_hz=16000, duration_s=0.5), 16000)
    with open(path, "rb") as f:
        audio = decode_audio(f, sample_rate_hz=16000, name="a.ogg")
    assert len(audio.samples) == 8000


def test_descriptor_input_and_fetched_bytes_decode_alike(tmp_path):
    """A file descriptor is read natively and left open; bytes kept in memory (``_in_memory``:
    a memfd on Linux) decode exactly like the file they came from."""
    import contextlib
    import os

    from soundshard.transforms.features.compute import _in_memory

    path = write_audio(tmp_path / "a.flac", tone(sample_rate_hz=44100, duration_s=0.7), 44100)
    expected = decode_audio(str(path), sample_rate_hz=16000)
    fd = os.open(path, os.O_RDONLY)
    try:
        audio = decode_audio(fd, sample_rate_hz=16000, name="a.flac")
        assert os.fstat(fd).st_size == path.stat().st_size  # still open
    finally:
        os.close(fd)
    assert np.array_equal(audio.samples, expected.samples)
    with contextlib.ExitStack() as stack:
        source = _in_memory(path.read_bytes(), stack)
        kept = decode_audio(source, sample_rate_hz=16000, name="a.flac")
    assert np.array_equal(kept.samples, expected.samples) and kept.source_sample_rate_hz == 44100
    if isinstance(source, int):  # closed with the stack
        with pytest.raises(OSError):
            os.fstat(source)
