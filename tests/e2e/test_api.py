"""The Python API (``import soundshard``): the commands as functions, same checks, same outputs."""

import importlib.metadata
import json

import numpy as np
import pandas as pd
import pytest

import soundshard
from soundshard.schemas.errors import ConfigError


def test_version_is_the_installed_one():
    assert soundshard.__version__ == importlib.metadata.version("soundshard")


def test_features_and_load_windows(demo_features, tmp_path):
    root = demo_features.parent
    out = tmp_path / "f"
    dataset = soundshard.features(
        str(root / "audio"), str(out), manifest=str(root / "manifest.csv"), format="parquet", n_mels=40
    )
    assert dataset["feature_config"]["n_mels"] == 40
    assert dataset["counts"]["clips_by_label"] == {"chirp": 8, "click_train": 8, "hum": 8, "noise_burst": 8}
    meta, windows = soundshard.load_windows(str(out))  # the output folder itself
    assert isinstance(meta, pd.DataFrame) and len(meta) == dataset["figures"]["windows"]
    assert windows.shape == (len(meta), 40, 41) and windows.dtype == np.float32
    assert {"clip_id", "label", "fold", "start_s"} <= set(meta.columns) and "log_mel" not in meta.columns
    with pytest.raises(ConfigError, match="no dataset.json"):
        soundshard.load_windows(str(tmp_path))


def test_a_configuration_error_raises_with_the_commands_message(demo_features, tmp_path):
    with pytest.raises(soundshard.CommandError) as info:
        soundshard.features(str(demo_features.parent / "audio"), str(tmp_path / "f"), n_mels=0)
    assert info.value.code == 2
    assert info.value.message.startswith("soundshard features: error:") and "n_mels" in info.value.message
    assert not (tmp_path / "f").exists()  # nothing written


@pytest.mark.slow
def test_train_then_tag_into_a_data_frame(demo_features, tmp_path):
    metrics = soundshard.train(
        str(demo_features),
        str(tmp_path / "m"),
        arch="edgecnn",
        test_fold=1,
        epochs=3,
        batch_size=16,
        quiet=True,
    )
    assert metrics["clip_mean"]["n"] == 8 and metrics["split"]["test_fold"] == 1
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == metrics
    audio = demo_features.parent / "audio"
    events = soundshard.tag(str(audio), str(tmp_path / "m"))
    assert {"clip_id", "label", "start_s", "end_s", "confidence"} <= set(events.columns)
    kept = tmp_path / "tags"
    again = soundshard.tag(str(audio), str(tmp_path / "m"), output=str(kept), audacity=True)
    pd.testing.assert_frame_equal(events, again)
    assert json.loads((kept / "run.json").read_text())["figures"]["events"] == len(events)
    assert len(list((kept / "audacity").glob("*.txt"))) == 32
