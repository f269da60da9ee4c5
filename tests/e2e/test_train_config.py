"""TrainConfig: the training recipe, validated on construction, with a JSON round trip, a
fingerprint, recipe files (train --config) and flags that override them."""

import json

import numpy as np
import pytest

from soundshard.pipelines import train
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.training import MODEL_NAMES, TrainConfig, load_train_config
from soundshard.transforms.models import architectures as models


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"model": "resnet"}, "model='resnet' is not one of"),
        ({"head": "linear"}, "head='linear' is not one of ('softmax', 'sigmoid')"),
        ({"epochs": 0}, "epochs=0 must be at least 1"),
        ({"batch_size": 8.5}, "batch_size=8.5 must be int"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0 must be positive"),
        ({"weight_average": 1.0}, "weight_average=1.0 must be in [0, 1)"),
        ({"gain_db": (6.0, -30.0)}, "gain_db=[6.0, -30.0] needs low <= high"),
        ({"gain_db": (1.0,)}, "gain_db=(1.0,) must be [low, high] in dB"),
        ({"median_filter_windows": 4}, "median_filter_windows=4 must be odd"),
        (
            {"width_multiplier": 2.0},
            "width_multiplier and depth_multiplier scale the dscnn family, not model sbcnn",
        ),
        ({"model": "mobilenetv2", "depth_multiplier": 2.0}, "depth_multiplier scales the dscnn family"),
        ({"distill_weight": 0.0}, "distill_weight=0.0 must lie in (0, 1]"),
        ({"augment": "yes"}, "augment='yes' must be bool"),
        ({"label_smoothing": 1.0}, "label_smoothing=1.0 must be in [0, 1)"),
        ({"refit": 1}, "refit=1 must be bool"),
        ({"refit": True, "refit_schedule": "half"}, "refit_schedule='half' is not one of ('same', 'full')"),
        ({"refit_schedule": "full"}, "refit_schedule='full' is for a refit"),
        ({"precision": "float16"}, "precision='float16' is not one of ('auto', 'float32', 'mixed')"),
        ({"ensemble": 0}, "ensemble=0 must be at least 1"),
    ],
)
def test_invalid_recipes_are_named(changes, fragment):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**changes)
    assert fragment in str(info.value)


def test_round_trip_fingerprint_and_model_names():
    config = TrainConfig(model="dscnn-m", width_multiplier=0.5, gain_db=(-30.0, 6.0), epochs=60)
    again = TrainConfig.from_json(config.to_json())
    assert again == config and again.fingerprint == config.fingerprint and len(config.fingerprint) == 16
    assert TrainConfig().fingerprint != config.fingerprint
    assert TrainConfig.from_dict({"gain_db": [-30, 6]}).gain_db == (-30, 6)  # JSON and TOML give lists
    # the names the schema accepts are the ones the model builder makes
    assert models.MODEL_NAMES == MODEL_NAMES and tuple(models.DSCNN_SIZES) == ("xs", "s", "m", "l")
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_dict({"epoch": 5})
    # fields added later leave the fingerprints of recipes without them as they were (the digest
    # of the recipe's JSON without those keys) and count once they differ from their default
    import hashlib

    later = ("label_smoothing", "refit", "refit_schedule", "precision", "ensemble")
    old = {k: v for k, v in config.to_dict().items() if k not in later}
    assert config.fingerprint == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert TrainConfig(refit=True).fingerprint != TrainConfig().fingerprint
    assert TrainConfig(refit=True, refit_schedule="full").fingerprint != TrainConfig(refit=True).fingerprint
    assert TrainConfig(label_smoothing=0.1).fingerprint != TrainConfig().fingerprint
    assert TrainConfig(precision="mixed").fingerprint != TrainConfig(precision="float32").fingerprint
    assert TrainConfig(ensemble=3).fingerprint != TrainConfig().fingerprint


def test_recipe_file_and_flags(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[training]\nmodel = "edgecnn"\nepochs = 7\ngain_db = [-30, 6]\n')
    assert load_train_config(recipe) == TrainConfig(model="edgecnn", epochs=7, gain_db=(-30.0, 6.0))
    parser = train.make_parser()
    base = ["--features", "d", "--output", "o", "--test-fold", "1", "--config", str(recipe)]
    # flags given win over the file; flags not given leave the file's values
    config = train.recipe(parser.parse_args([*base, "--epochs", "9", "--no-augment"]))
    assert (config.model, config.epochs, config.gain_db, config.augment) == (
        "edgecnn",
        9,
        (-30.0, 6.0),
        False,
    )
    assert train.recipe(parser.parse_args(["--features", "d", "--output", "o"])) == TrainConfig()
    # a bad value is named by its flag when a flag gave it, by the file when the file did
    with pytest.raises(ConfigError, match=r"^--weight-average=1.5 must be in \[0, 1\)"):
        train.recipe(parser.parse_args([*base, "--weight-average", "1.5"]))
    recipe.write_text("[training]\nepochs = 0\n")
    with pytest.raises(ConfigError, match=r"^training config '.*recipe.toml': epochs=0 must be at least 1"):
        train.recipe(parser.parse_args(base))
    with pytest.raises(ConfigError, match=r"--gain-db='x' is not LOW:HIGH"):
        train.recipe(parser.parse_args([*base, "--gain-db", "x"]))


def test_model_json_carries_the_recipe_that_trains_the_same_model(demo_features, tmp_path):
    out = tmp_path / "m"
    argv = ["--features", demo_features, "--arch", "linear", "--test-fold", 1, "--output", out]
    assert train.run([str(a) for a in [*argv, "--epochs", 2, "--batch-size", 16, "--quiet"]]) == 0
    training = json.loads((out / "model.json").read_text())["training"]
    config = TrainConfig.from_dict(training["recipe"])
    assert (config.model, config.epochs, config.batch_size) == ("linear", 2, 16)
    assert training["recipe_fingerprint"] == config.fingerprint
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(training["recipe"]))
    args = train.make_parser().parse_args(["--features", "d", "--output", "o", "--config", str(recipe)])
    assert train.recipe(args) == config


def test_recipe_of_a_model_folder_old_and_new():
    from soundshard.schemas.training import recipe_of

    new = {"training": {"recipe": TrainConfig(model="dscnn-s", head="sigmoid").to_dict(), "model": "x"}}
    assert recipe_of(new) == TrainConfig(model="dscnn-s", head="sigmoid")
    # a folder from before recipes were recorded: the fields its training block names
    old = {
        "training": {"model": "edgecnn", "head": "softmax", "epochs": 60, "augmentation": {}, "gain_db": "x"}
    }
    assert recipe_of(old) == TrainConfig(model="edgecnn", epochs=60)
    assert recipe_of({}) == TrainConfig()


def test_refit_schedule_decays_over_the_chosen_epochs_or_stops_in_the_first_schedule():
    """``same``: the first training's cosine schedule (over --epochs), cut at the chosen epoch;
    ``full``: the same decay, from the learning rate to 5 % of it, within the chosen epochs."""
    config = TrainConfig(epochs=100, batch_size=10, learning_rate=1e-3, refit=True)
    steps_per_epoch = 100 // 10
    same = train._learning_rate(config, 100)
    full = train._learning_rate(config, 100, epochs=20)
    end = 20 * steps_per_epoch
    assert float(same(0)) == pytest.approx(1e-3) and float(full(0)) == pytest.approx(1e-3)
    # cosine from 1 to 0.05: at a fifth of the way 0.05 + 0.95 * (1 + cos(pi / 5)) / 2 of the rate
    assert float(same(end)) == pytest.approx(1e-3 * (0.05 + 0.95 * (1 + np.cos(np.pi / 5)) / 2), rel=1e-5)
    assert float(full(end)) == pytest.approx(5e-5, rel=1e-5)
    assert float(full(end // 2)) == pytest.approx(1e-3 * 0.525, rel=1e-5)
