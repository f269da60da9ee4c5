"""Offline augmentation: pitch-shifted and time-stretched copies, marked, kept out of held-out data."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import features
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.audio import augment
from soundshard.transforms.models import training

from ..helpers import tone, write_audio


def test_parse_names_and_errors():
    got = augment.parse_augmentations("pitch_shift=-2, pitch_shift=2,time_stretch=0.9")
    assert [a.name for a in got] == ["pitch_shift=-2", "pitch_shift=+2", "time_stretch=0.9"]
    assert augment.from_name("pitch_shift=+2") == got[1]
    assert augment.parse_augmentations(None) == () and augment.parse_augmentations("") == ()
    for text, message in [
        ("reverb=3", "augmentation 'reverb' is not one of"),
        ("pitch_shift=20", "pitch_shift=20 must lie in [-12, 12] and differ from 0"),
        ("time_stretch=1", "time_stretch=1 must lie in [0.5, 2] and differ from 1"),
        ("pitch_shift", "--augment item 'pitch_shift' is not kind=amount"),
        ("pitch_shift=2,pitch_shift=+2", "--augment lists a copy twice"),
    ]:
        with pytest.raises(
            ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")
        ):
            augment.parse_augmentations(text)


def test_pitch_shift_moves_the_tone_and_stretch_changes_the_length():
    sr = 22050
    y = tone(sample_rate_hz=sr, duration_s=1.0, freq_hz=440.0)
    up = augment.apply(y, sample_rate_hz=sr, augmentation=augment.OfflineAugmentation("pitch_shift", 12))
    assert up.shape == y.shape and up.dtype == np.float32
    peak_hz = np.argmax(np.abs(np.fft.rfft(up))) * sr / len(up)
    assert abs(peak_hz - 880.0) < 5
    slow = augment.apply(y, sample_rate_hz=sr, augmentation=augment.OfflineAugmentation("time_stretch", 0.5))
    assert abs(len(slow) - 2 * len(y)) <= 512


def test_features_write_marked_copies_and_account_for_inputs(tmp_path):
    audio = tmp_path / "audio"
    for i, name in enumerate(["a.wav", "b.wav", "c.wav"]):
        write_audio(audio / name, tone(duration_s=2.0, freq_hz=300 + 100 * i), 22050)
    (audio / "broken.wav").write_bytes(b"RIFF....")
    manifest = tmp_path / "meta.csv"
    manifest.write_text("filename,label,fold\na.wav,x,1\nb.wav,y,2\nc.wav,x,3\nbroken.wav,y,1\n")
    out = tmp_path / "out"
    argv = ["--input", audio, "--manifest", manifest, "--output", out, "--format", "parquet"]
    assert features.run([str(a) for a in [*argv, "--augment", "pitch_shift=2,time_stretch=0.8"]]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    fig = dataset["figures"]
    assert (fig["inputs"], fig["files_processed"], fig["dead_letter_inputs"]) == (4, 3, 1)
    assert fig["accounted_for"] is True
    assert (fig["augmented_copies"], fig["augmented_copies_failed"]) == (6, 0)
    assert dataset["augmentations"] == ["pitch_shift=+2", "time_stretch=0.8"]
    rows = pq.read_table(out / "parquet").to_pylist()
    per_clip = {}
    for row in rows:
        per_clip.setdefault(row["clip_id"], []).append(row)
    assert sorted(per_clip) == sorted(
        f"{c}{suffix}" for c in "abc" for suffix in ("", "~pitch_shift=+2", "~time_stretch=0.8")
    )
    assert len(per_clip["a"]) == 4 and len(per_clip["a~pitch_shift=+2"]) == 4
    assert len(per_clip["a~time_stretch=0.8"]) == 5  # 2.5 s of audio: 108 frames
    copy = per_clip["b~pitch_shift=+2"][0]
    assert (copy["augmentation"], copy["label"], copy["fold"]) == ("pitch_shift=+2", "y", 2)
    assert all(r["augmentation"] is None for r in per_clip["b"])
    original = np.asarray(per_clip["b"][1]["log_mel"])
    assert not np.allclose(np.asarray(copy["log_mel"]), np.asarray(per_clip["b"][0]["log_mel"]))
    assert np.isfinite(original).all()
    # the broken file has one dead letter, and no copies were attempted for it
    dead = pq.read_table(out / "dead_letters.parquet").to_pylist()
    assert [(d["clip_id"], d["augmentation"]) for d in dead] == [("broken", None)]

    windows = training.load_windows(str(out), dataset)
    split = training.split_by_fold(windows, test_fold=1, validation_fold=2)
    assert split.test.originals.all() and split.validation.originals.all()
    assert sorted(set(split.test.clip_ids)) == ["a"] and sorted(set(split.validation.clip_ids)) == ["b"]
    assert sorted(set(split.train.clip_ids)) == ["c", "c~pitch_shift=+2", "c~time_stretch=0.8"]


def test_augment_is_a_features_option_only(tmp_path, capsys):
    write_audio(tmp_path / "a.wav", tone(duration_s=1.0), 22050)
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--augment", "pitch_shift=30"]
    assert features.run(argv) == 2
    assert "pitch_shift=30 must lie in [-12, 12]" in capsys.readouterr().err
