"""Background and negatives in training: targets, weights, splits, heads, mixing, thresholds."""

import dataclasses
import functools
import json

import numpy as np
import pytest

from soundshard.pipelines import features, train
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.models import architectures as models
from soundshard.transforms.models import training
from soundshard.transforms.tagging import events

from ..helpers import write_audio


def window_set(labels, *, folds=None, clips=None, targets=None, strong=None) -> training.WindowSet:
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    return training.WindowSet(
        features=np.random.default_rng(0).normal(-40, 5, (n, 4, 3)).astype(np.float32),
        labels=labels,
        clip_ids=np.asarray(clips if clips is not None else [f"c{i}" for i in range(n)], dtype=object),
        folds=np.asarray(folds if folds is not None else [1] * n, np.int32),
        splits=np.asarray([""] * n, dtype=object),
        targets=None if targets is None else np.asarray(targets, np.float32),
        strong=None if strong is None else np.asarray(strong, bool),
    )


def test_targets_of_each_head():
    # two weak windows (classes 0 and 2), one background, one strong window of classes 1 and 2
    windows = window_set(
        [0, 2, -1, -1],
        targets=[[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 1]],
        strong=[False, False, True, True],
    )
    sigmoid = training.training_targets(windows, n_classes=3, head="sigmoid", background=False)
    np.testing.assert_array_equal(sigmoid, [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]])
    softmax = training.training_targets(windows, n_classes=3, head="softmax", background=True)
    np.testing.assert_array_equal(
        softmax,
        [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.5, 0.5, 0]],  # shares sum to one
    )
    with pytest.raises(ConfigError, match="need the background output"):
        training.training_targets(windows, n_classes=3, head="softmax", background=False)


def test_every_group_weighs_alike():
    truth = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 0], [1, 1]], np.float32)
    weights = training.balanced_sample_weights(truth)
    # groups: class 0 (3 windows), class 1 (1), background (1), several (1): 6 / (4 * count)
    np.testing.assert_allclose(weights, [0.5, 0.5, 0.5, 1.5, 1.5, 1.5])
    np.testing.assert_allclose(training.balanced_sample_weights(np.array([0, 0, -1])), [0.75, 0.75, 1.5])
    for group in ([0, 1, 2], [3], [4], [5]):
        assert weights[group].sum() == pytest.approx(1.5)


def test_background_follows_the_folds_else_a_stable_hash():
    background = window_set([-1] * 10, folds=[1, 2, 3, 4, 5] * 2)
    parts = training.split_background(background, {"by": "fold", "test_fold": 4, "validation_fold": 5})
    assert sorted(parts.train.folds.tolist()) == [1, 1, 2, 2, 3, 3]
    assert parts.validation.folds.tolist() == [5, 5] and parts.test.folds.tolist() == [4, 4]
    unfolded = window_set([-1] * 200, folds=[-1] * 200)
    by_hash = training.split_background(unfolded, {"by": "fold", "test_fold": 4, "validation_fold": 5})
    again = training.split_background(unfolded, {"by": "fold", "test_fold": 4, "validation_fold": 5})
    assert 20 <= len(by_hash.validation) <= 60 and len(by_hash.test) == 0
    assert len(by_hash.train) + len(by_hash.validation) == 200
    assert by_hash.validation.clip_ids.tolist() == again.validation.clip_ids.tolist()


def test_mixing_adds_powers():
    import tensorflow as tf

    x = np.full((4, 3), -20.0, np.float32)
    mixed = training.mix_background(tf.constant(x), tf.constant(x - 30.0), snr_db=0.0).numpy()
    np.testing.assert_allclose(mixed, -20.0 + 10 * np.log10(2.0), atol=1e-4)  # equal powers: +3 dB
    quieter = training.mix_background(tf.constant(x), tf.constant(x), snr_db=10.0).numpy()
    np.testing.assert_allclose(quieter, -20.0 + 10 * np.log10(1.1), atol=1e-4)
    batch = np.stack([x, x - 10.0])  # a batch, each pair at its own ratio
    snr = tf.constant([0.0, 10.0])[:, None, None]
    mixed = training.mix_background(tf.constant(batch), tf.constant(batch - 30.0), snr_db=snr).numpy()
    np.testing.assert_allclose(mixed[0], -20.0 + 10 * np.log10(2.0), atol=1e-4)
    np.testing.assert_allclose(mixed[1], -30.0 + 10 * np.log10(1.1), atol=1e-4)


def test_saved_model_leaves_the_background_output_out():
    model = models.build_model("linear", input_shape=(6,), n_classes=3, background_output=True)
    assert model.output_shape == (None, 4)
    classes = models.without_background(model, 3)
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    full, kept = np.asarray(model.predict_on_batch(x)), np.asarray(classes.predict_on_batch(x))
    np.testing.assert_allclose(kept, full[:, :3], rtol=1e-6)
    assert np.all(kept.sum(axis=1) < 1.0)
    sigmoid = models.build_model("linear", input_shape=(6,), n_classes=3, head="sigmoid")
    values = np.asarray(sigmoid.predict_on_batch(x))
    assert values.shape == (5, 3) and not np.allclose(values.sum(axis=1), 1.0)


def test_thresholds_and_window_scores_with_multi_hot_truth():
    scores = np.array([[0.9, 0.1], [0.6, 0.75], [0.2, 0.8], [0.55, 0.7]])
    truth = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    # a is separated by any threshold in (0.55, 0.6], b by (0.7, 0.75]
    assert events.best_thresholds(scores, truth) == [0.6, 0.75]
    report = events.window_f1(scores, truth, [0.5, 0.5], ["a", "b"])
    # at 0.5: a predicts rows 0, 1, 3 (true 0, 1): P 2/3, R 1; b rows 1, 2, 3 (true 1, 2): P 2/3, R 1
    assert report["micro"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8}
    assert report["per_class"]["a"]["f1"] == 0.8 and report["per_class"]["a"]["average_precision"] == 1.0
    ranked = events.mean_average_precision(np.array([[0.1], [0.9], [0.5]]), np.array([[1], [0], [1]]))
    assert ranked == pytest.approx((1 / 2 + 2 / 3) / 2)


@pytest.fixture(scope="module")
def background_features(tmp_path_factory):
    """Brown-noise clips (none of the demo classes), folds 1-4, as a features output."""
    root = tmp_path_factory.mktemp("background")
    rng = np.random.default_rng(3)
    rows = ["filename,fold"]
    for i in range(8):
        y = np.cumsum(rng.standard_normal(22050 * 2)).astype(np.float32)
        y = 0.05 * (y - y.mean()) / (np.abs(y).max() + 1e-9)
        write_audio(root / "audio" / f"noise-{i}.wav", y, 22050)
        rows.append(f"noise-{i}.wav,{i % 4 + 1}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    out = root / "features"
    argv = ["--input", str(root / "audio"), "--manifest", str(root / "meta.csv"), "--output", str(out)]
    assert features.run([*argv, "--format", "parquet"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_train_with_background(demo_features, background_features, tmp_path, head):
    folder = tmp_path / head
    argv = ["--features", demo_features, "--background", background_features, "--arch", "edgecnn"]
    argv += ["--test-fold", "1", "--head", head, "--output", folder, "--epochs", "4", "--batch-size", "16"]
    assert train.run([str(a) for a in [*argv, "--quiet", "--gain-db=-20:0"]]) == 0
    description = json.loads((folder / "model.json").read_text())
    assert description["training"]["head"] == head
    assert description["training"]["background"]["windows"]["train"] > 0
    assert description["training"]["augmentation"]["gain_db"] == [-20.0, 0.0]
    assert description["postprocessing"] == {
        "median_filter_windows": 3,
        "min_duration_s": 0.0,
        "min_level_above_floor_db": 6.0,
        "from": "defaults (no annotated validation recordings)",
    }
    assert "other levels" in description["thresholds"]["from"]
    assert len(description["thresholds"]["window"]) == len(description["label_names"]) == 4
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["background_test"]["windows"] > 0  # fold 1's noise clips, as negatives
    assert 0.0 <= metrics["background_test"]["false_alarm_rate"] <= 1.0
    model, _ = models.load_classifier(str(folder))
    assert model.output_shape == (None, 4)  # the background output is not part of the saved model


def test_background_with_other_features_is_refused(demo_features, tmp_path, capsys):
    other = tmp_path / "other"
    write_audio(tmp_path / "a" / "n.wav", np.zeros(22050, np.float32) + 0.01, 22050)
    assert features.run(["--input", str(tmp_path / "a"), "--output", str(other), "--n_mels", "40"]) == 0
    argv = ["--features", str(demo_features), "--background", str(other), "--test-fold", "1"]
    assert train.run([*argv, "--output", str(tmp_path / "m"), "--quiet"]) == 2
    assert "compute both with the same feature config" in capsys.readouterr().err
    assert train.run([*argv[:2], "--test-fold", "1", "--output", str(tmp_path / "m"), "--gain-db=3:1"]) == 2


def test_several_feature_outputs_train_together(demo_features, tmp_path):
    strong = tmp_path / "strong"
    write_audio(strong / "site" / "rec.wav", np.zeros(22050 * 3, np.float32) + 0.01, 22050)
    (strong / "site" / "rec.txt").write_text("0.5\t1.5\tfrog\n")
    argv = [
        "--input",
        str(strong / "site"),
        "--output",
        str(tmp_path / "f"),
        "--labels",
        "--format",
        "parquet",
        "--num_shards",
        "3",  # each output is read by its own shard list, whatever the other's
    ]
    assert features.run(argv) == 0
    dataset, windows = training.load_datasets([str(demo_features), str(tmp_path / "f")])
    n_first = len(training.load_windows(str(demo_features), training.read_dataset_json(str(demo_features))))
    assert len(windows) == n_first + 6  # the 3 s recording's windows (0.95 s, hop 0.46 s)
    assert dataset["label_map"] == {"chirp": 0, "click_train": 1, "frog": 2, "hum": 3, "noise_burst": 4}
    assert dataset["data"] == [str(demo_features), str(tmp_path / "f")]
    frog = windows.truth(5)[windows.strongly_labelled]
    assert frog.shape[0] > 0 and set(frog[:, 2].tolist()) == {0.0, 1.0} and frog[:, [0, 1, 3, 4]].sum() == 0
    assert (windows.truth(5)[~windows.strongly_labelled].sum(axis=1) == 1).all()  # clips: one-hot
    background = training.load_background([str(tmp_path / "f")], dataset=dataset)  # its labels unused
    assert (background.labels == -1).all() and background.targets is None and background.strong is None
    _, twice = training.load_datasets([str(demo_features), str(demo_features)])
    assert {str(c).split("/", 1)[0] for c in twice.clip_ids} == {"0", "1"}  # shared ids kept apart
    assert len(set(twice.clip_ids.tolist())) == 2 * len(set(windows.clip_ids[~windows.strongly_labelled]))


def test_conditioned_copies_change_level_and_add_background():
    windows = window_set([0, 1, 0])
    aug = training.Augmentation(gain_db=(-10.0, -10.0), background_snr_db=(0.0, 0.0))
    quieter = training.conditioned_copies(windows, None, aug=aug, seed=0)
    np.testing.assert_allclose(quieter, windows.features - 10.0, atol=1e-4)
    bed = np.full((2, 4, 3), -60.0, np.float32)
    level = dataclasses.replace(aug, gain_db=(0.0, 0.0))
    mixed = training.conditioned_copies(windows, bed, aug=level, seed=0)
    # at 0 dB the bed is scaled to the window's mean power: the mixture's mean power doubles
    power = (10 ** (windows.features / 10)).mean(axis=(1, 2))
    np.testing.assert_allclose((10 ** (mixed / 10)).mean(axis=(1, 2)), 2 * power, rtol=1e-4)
    again = training.conditioned_copies(windows, bed, aug=level, seed=0)
    np.testing.assert_array_equal(mixed, again)


def test_what_early_stopping_judges():
    # two weak clips of two windows each (classes 0 and 1) and a strongly labelled recording of
    # four windows: one of class 0, one of class 1, two background
    windows = window_set(
        [0, 0, 1, 1, -1, -1, -1, -1],
        clips=["a", "a", "b", "b", "r", "r", "r", "r"],
        targets=[[0, 0]] * 4 + [[1, 0], [0, 0], [0, 1], [0, 0]],
        strong=[False] * 4 + [True] * 4,
    )
    probabilities = np.array(
        [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]  # clip b is called class 0: accuracy 1/2
        + [[0.6, 0.1], [0.7, 0.2], [0.2, 0.8], [0.1, 0.1]],  # class 0: a background window ranks first
        np.float32,
    )
    score = functools.partial(training.selection_score, probabilities, windows, aggregation="mean")
    assert score(select_on="clips") == 0.5
    # class 0: the true window ranks second of four (AP 1/2); class 1: first (AP 1)
    assert score(select_on="recordings") == pytest.approx(0.75)
    assert score(select_on="auto") == pytest.approx(0.75)
    clips_only = windows.take(~windows.strongly_labelled)
    assert (
        training.selection_score(probabilities[:4], clips_only, aggregation="mean", select_on="auto") == 0.5
    )
    with pytest.raises(ValueError, match="strongly labelled validation recordings"):
        training.selection_score(probabilities[:4], clips_only, aggregation="mean", select_on="recordings")
    # what the default judges depends on the data (and so do the epoch line and metrics.json)
    assert training.judged("auto", windows) == "recordings"
    assert training.judged("auto", clips_only) == "clips"
    assert training.judged("clips", windows) == "clips"
    recordings_only = windows.take(windows.strongly_labelled)
    assert training.judged("clips", recordings_only) == "windows"


def test_selecting_on_recordings_needs_validation_recordings(demo_features, tmp_path, capsys):
    argv = ["--features", str(demo_features), "--test-fold", "1", "--output", str(tmp_path / "m")]
    assert train.run([*argv, "--select-on", "recordings", "--epochs", "1", "--quiet"]) == 2
    assert "--select-on recordings: the validation data has no strongly labelled recording" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as stopped:  # not a choice
        train.run([*argv, "--select-on", "windows"])
    assert stopped.value.code == 2 and "invalid choice: 'windows'" in capsys.readouterr().err
