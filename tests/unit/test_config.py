import json

import pytest

from soundshard.schemas.config import FeatureConfig, load_feature_config
from soundshard.schemas.errors import ConfigError


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"fmax_hz": 30000.0}, "fmax_hz=30000.0 is above the Nyquist frequency 11025 Hz"),
        ({"hop_length": 2048}, "hop_length=2048 is longer than n_fft=1024"),
        ({"window_hop_frames": 50}, "window_hop_frames=50 is longer than window_frames=41"),
        ({"n_mels": 400}, "n_mels=400 is too many for n_fft=1024"),
        ({"fmin_hz": 12000.0, "fmax_hz": 11000.0}, "fmin_hz=12000.0 must be below fmax_hz=11000"),
        ({"last_window": "keep"}, "last_window='keep' must be one of"),
        ({"normalization": "zscore"}, "normalization='zscore' must be one of"),
        ({"sample_rate_hz": 22050.5}, "sample_rate_hz=22050.5 must be int"),
        ({"n_mels": True}, "n_mels=True must be int"),
        ({"top_db": -3.0}, "top_db=-3.0 must be positive"),
        ({"power": float("nan")}, "power=nan must be finite"),
        ({"resample_quality": "best"}, "resample_quality='best' must be one of"),
        ({"feature_type": "cqt"}, "feature_type='cqt' must be one of ('logmel', 'mfcc')"),
        ({"feature_type": "mfcc", "n_mfcc": 61}, "n_mfcc=61 must lie in 1..n_mels=60"),
        ({"feature_type": "mfcc", "mfcc_deltas": 3}, "mfcc_deltas=3 must be 0, 1 or 2"),
        (
            {"feature_type": "mfcc", "log_compression": "log"},
            "feature_type='mfcc' needs log_compression='db'",
        ),
        (
            {"feature_type": "mfcc", "mfcc_deltas": 1, "window_frames": 5, "window_hop_frames": 5},
            "mfcc_deltas=1 needs window_frames >= 9",
        ),
        ({"n_mfcc": 13}, "n_mfcc=13 is for feature_type='mfcc'"),
    ],
)
def test_invalid_values_are_named(changes, fragment):
    with pytest.raises(ConfigError) as info:
        FeatureConfig(**changes)
    assert fragment in str(info.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"'n_mel' \(did you mean 'n_mels'\?\)"):
        FeatureConfig.from_dict({"n_mel": 40})


def test_json_round_trip_and_fingerprint():
    config = FeatureConfig(n_mels=40, fmax_hz=8000.0, normalization="standardize")
    again = FeatureConfig.from_json(config.to_json())
    assert again == config
    assert again.fingerprint == config.fingerprint
    assert len(config.fingerprint) == 16
    assert FeatureConfig().fingerprint != config.fingerprint
    assert FeatureConfig(n_mels=40).fingerprint != FeatureConfig(n_mels=41).fingerprint
    # key order of the input does not matter
    shuffled = dict(reversed(list(config.to_dict().items())))
    assert FeatureConfig.from_dict(shuffled).fingerprint == config.fingerprint


def test_fingerprint_is_stable_across_versions_of_the_code():
    # Changing the default feature maths must change this value on purpose (bump FEATURE_VERSION).
    assert FeatureConfig().fingerprint == "be6ae7ea2eb7a7e4"


def test_mfcc_fields_keep_log_mel_fingerprints_and_shape_the_windows():
    # configs written before the MFCC fields existed (no such keys) keep their fingerprint
    old = {
        k: v
        for k, v in FeatureConfig().to_dict().items()
        if k not in ("feature_type", "n_mfcc", "mfcc_deltas")
    }
    assert FeatureConfig.from_dict(old).fingerprint == "be6ae7ea2eb7a7e4"
    mfcc = FeatureConfig(feature_type="mfcc", n_mfcc=20, mfcc_deltas=2)
    assert mfcc.feature_shape == (60, 41) and mfcc.feature_rows == 60
    assert mfcc.fingerprint != FeatureConfig().fingerprint
    assert FeatureConfig(feature_type="mfcc").fingerprint != mfcc.fingerprint
    assert FeatureConfig(feature_type="mfcc", n_mfcc=13).feature_shape == (13, 41)


def test_derived_values_follow_the_literature_defaults():
    config = FeatureConfig()
    assert config.feature_shape == (60, 41)
    assert config.window_s == pytest.approx(41 * 512 / 22050)
    assert 0.9 < config.window_s < 1.0
    assert config.fmax_resolved_hz == 11025.0


def test_load_toml_with_table_and_overrides(tmp_path):
    path = tmp_path / "features.toml"
    path.write_text("[features]\nn_mels = 40\nfmin_hz = 50\nnormalization = 'mean'\n")
    config = load_feature_config(path, n_fft=2048)
    assert (config.n_mels, config.fmin_hz, config.normalization, config.n_fft) == (40, 50, "mean", 2048)


def test_load_json_and_bad_files(tmp_path):
    good = tmp_path / "f.json"
    good.write_text(json.dumps({"n_mels": 32}))
    assert load_feature_config(good).n_mels == 32
    bad = tmp_path / "bad.toml"
    bad.write_text("n_mels = [")
    with pytest.raises(ConfigError, match="bad.toml' is not valid"):
        load_feature_config(bad)
    with pytest.raises(ConfigError, match="cannot read feature config"):
        load_feature_config(tmp_path / "missing.toml")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("fmax_hz = 96000.0\n")
    with pytest.raises(ConfigError, match="fmax_hz=96000.0 is above the Nyquist"):
        load_feature_config(wrong)
