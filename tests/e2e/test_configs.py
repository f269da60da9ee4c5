"""``soundshard config``: the template of every setting reads back as the defaults; files checked."""

import dataclasses

from soundshard.pipelines import configs
from soundshard.schemas.config import FeatureConfig, load_feature_config


def test_defaults_template_reads_back_as_the_defaults(tmp_path, capsys):
    assert configs.run(["--defaults"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "features.toml"
    path.write_text(text)
    assert load_feature_config(path) == FeatureConfig()
    for field in dataclasses.fields(FeatureConfig):  # every setting is there, set or commented
        assert f"\n{field.name} = " in text or f"\n# {field.name} = ...  (unset: none)" in text, field.name
    assert "# Number of mel bands.\nn_mels = 60\n" in text
    assert f"# Default fingerprint: {FeatureConfig().fingerprint}" in text


def test_check_resolves_a_file_and_names_a_bad_value(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text('[features]\nn_mels = 40\nresample_quality = "VHQ"\n')
    assert configs.run(["--check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "n_mels               40   (changed)" in out and "n_fft                1024\n" in out
    assert out.strip().endswith(load_feature_config(good).fingerprint)
    bad = tmp_path / "bad.toml"
    bad.write_text("[features]\nn_mels = 0\n")
    assert configs.run(["--check", str(bad)]) == 2
    assert f"soundshard config: error: {bad}: n_mels=0 must be at least 1" in capsys.readouterr().err
