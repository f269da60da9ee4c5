"""Training: model builders, fold splits, augmentation, aggregation, metrics, train/evaluate CLI."""

import dataclasses
import json

import numpy as np
import pytest

from soundshard.pipelines import info, train
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.models import architectures as models
from soundshard.transforms.models import training


def test_sbcnn_architecture_and_size():
    model = models.build_model("sbcnn", input_shape=(60, 41), n_classes=10)
    convs = [layer for layer in model.layers if layer.name.startswith("conv") and layer.name[-1].isdigit()]
    assert [(c.filters, c.kernel_size) for c in convs] == [(24, (5, 5)), (48, (5, 5)), (48, (5, 5))]
    assert model.output_shape == (None, 10)
    # 60×41 → pool (3, 3) 'same' → 20×14 → 7×5. conv 624 + 28,848 + 57,648; BN 4×(24+48+48);
    # dense 7·5·48·64+64 = 107,584; output 650
    assert model.count_params() == 624 + 28848 + 57648 + 4 * 120 + 107584 + 650
    # the dense layer's ReLU leaks: its units cannot all die (they did on background-heavy data)
    assert model.get_layer("fc_relu").negative_slope == pytest.approx(0.1)
    assert models.count_macs(model) == 60 * 41 * 24 * 25 + 20 * 14 * 48 * 24 * 25 + 7 * 5 * 48 * 48 * 25 + (
        7 * 5 * 48 * 64 + 64 * 10
    )


def test_edgecnn_fits_a_microcontroller_budget():
    model = models.build_model("edgecnn", input_shape=(60, 41), n_classes=10)
    assert 10_000 <= model.count_params() <= 60_000
    assert 100_000 <= models.count_macs(model) <= 1_000_000


def test_dscnn_family_layout_sizes_and_multipliers():
    sizes = {}
    for name in ("dscnn-xs", "dscnn-s", "dscnn-m", "dscnn-l"):
        model = models.build_model(name, input_shape=(60, 41), n_classes=10)
        sizes[name] = (model.count_params(), models.count_macs(model))
        assert model.output_shape == (None, 10)
    # named sizes grow in parameters and MACs; the smallest two are edge-sized
    assert [p for p, _ in sizes.values()] == sorted(p for p, _ in sizes.values())
    assert [m for _, m in sizes.values()] == sorted(m for _, m in sizes.values())
    assert sizes["dscnn-s"][0] < 40_000 and sizes["dscnn-s"][1] < 1_000_000
    assert (
        sizes["dscnn-l"][0] > models.build_model("sbcnn", input_shape=(60, 41), n_classes=10).count_params()
    )
    # dscnn-xs by hand: stem 3x3x16 on 30x21, then stages 24/32/48/64 at 15x11, 8x6, 4x3, 2x2
    xs = models.build_model("dscnn-xs", input_shape=(60, 41), n_classes=10)
    shapes = [(30, 21, 16), (15, 11, 16), (8, 6, 24), (4, 3, 32), (2, 2, 48)]
    dw = sum(h * w * c * 9 for h, w, c in shapes[1:])
    pw = 15 * 11 * 16 * 24 + 8 * 6 * 24 * 32 + 4 * 3 * 32 * 48 + 2 * 2 * 48 * 64
    assert models.count_macs(xs) == 30 * 21 * 16 * 9 + dw + pw + 64 * 10
    # residual blocks from a depth of two blocks per stage on
    m = models.build_model("dscnn-m", input_shape=(60, 41), n_classes=10)
    assert sum(layer.name.endswith("_add") for layer in m.layers) == 4
    # multipliers: filters rounded to multiples of 8 (4 below 16), blocks rounded, at least one
    wide = models.dscnn_layout("s", width=1.5, depth=2.0)
    assert wide.stem == 32 and wide.stages == (48, 96, 144, 192) and wide.blocks == 2
    narrow = models.dscnn_layout("xs", width=0.5)
    assert narrow.stem == 8 and narrow.stages == (12, 16, 24, 32) and narrow.blocks == 1
    half = models.build_model("dscnn-m", input_shape=(60, 41), n_classes=10, width=0.5, depth=0.5)
    assert half.count_params() < sizes["dscnn-m"][0] / 3
    with pytest.raises(ConfigError, match="multipliers scale the dscnn family, not model='sbcnn'"):
        models.build_model("sbcnn", input_shape=(60, 41), n_classes=10, width=2.0)
    with pytest.raises(ConfigError, match="must be positive"):
        models.dscnn_layout("m", width=0.0)


def test_mlp_and_linear_on_embeddings_and_bad_names():
    mlp = models.build_model("mlp", input_shape=(512,), n_classes=5)
    assert mlp.output_shape == (None, 5) and mlp.count_params() == 512 * 256 + 256 + 256 * 5 + 5
    linear = models.build_model("linear", input_shape=(512,), n_classes=5, normalization=(0.0, 1.0))
    assert linear.count_params() == 512 * 5 + 5
    with pytest.raises(ConfigError, match="model='resnet' is not one of"):
        models.build_model("resnet", input_shape=(60, 41), n_classes=5)
    with pytest.raises(ConfigError, match=r"needs \[n_features, n_frames\] inputs, got shape \[512\]"):
        models.build_model("sbcnn", input_shape=(512,), n_classes=5)


def test_predict_pads_the_last_slice_and_traces_once():
    model = models.build_model("mlp", input_shape=(6,), n_classes=3, normalization=(0.0, 1.0))
    features = np.random.default_rng(0).standard_normal((23, 6)).astype(np.float32)
    # 23 windows in slices of 8: the last slice of 7 is padded, its padding's outputs dropped
    got = training.predict(model, features, batch_size=8)
    np.testing.assert_allclose(got, np.asarray(model(features)), rtol=1e-5, atol=1e-6)
    assert training.predict(model, features[:0]).shape == (0, 3)
    for n in (1, 5, 17):  # other counts of windows: the same input shape, no new trace
        np.testing.assert_allclose(
            training.predict(model, features[:n], batch_size=8), got[:n], rtol=1e-5, atol=1e-6
        )
    assert len(model.predict_function._list_all_concrete_functions()) == 1


def test_aggregation_mean_max_majority():
    probs = np.array([[0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]])
    clips = ["b", "b", "b", "a"]
    names, mean = training.aggregate(probs, clips, method="mean")
    assert list(names) == ["a", "b"]
    np.testing.assert_allclose(mean, [[0.9, 0.1], [1.1 / 3, 1.9 / 3]])
    _, majority = training.aggregate(probs, clips, method="majority")
    np.testing.assert_allclose(majority, [[1, 0], [1 / 3, 2 / 3]])
    _, peak = training.aggregate(probs, clips, method="max")
    np.testing.assert_allclose(peak, [[0.9, 0.1], [0.6 / 1.4, 0.8 / 1.4]])
    with pytest.raises(ConfigError, match="aggregation='median'"):
        training.aggregate(probs, clips, method="median")


def test_silent_windows_are_left_out_of_their_clips():
    features = np.random.default_rng(1).normal(-40, 5, (5, 4, 3)).astype(np.float32)
    features[[1, 4]] = -100.0  # digital silence: a constant log-mel window
    silent = training.silent_windows(features)
    assert silent.tolist() == [False, True, False, False, True]
    assert not training.silent_windows(features.reshape(5, 12)).any()  # vectors: never silent
    probs = np.array([[0.6, 0.4], [0.0, 1.0], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7]])
    clips = ["a", "a", "a", "b", "c"]  # c has only a silent window: it keeps it
    _, mean = training.aggregate(probs, clips, method="mean", silent=silent)
    np.testing.assert_allclose(mean, [[0.7, 0.3], [0.1, 0.9], [0.3, 0.7]])
    _, majority = training.aggregate(probs, clips, method="majority", silent=silent)
    np.testing.assert_allclose(majority, [[1, 0], [0, 1], [0, 1]])
    _, with_silence = training.aggregate(probs, clips, method="mean")
    np.testing.assert_allclose(with_silence[0], [1.4 / 3, 1.6 / 3])  # the silent window flips clip a


def test_weight_average_per_epoch():
    average = training.WeightAverage(0.8)
    first = average.update([np.array([2.0, 4.0], np.float32), np.array([1], np.int64)])
    assert first[0].dtype == np.float32 and first[0].tolist() == [2.0, 4.0]
    second = average.update([np.array([5.0, -2.0], np.float32), np.array([7], np.int64)])
    # second update: decay min(0.8, 2 / 3), so the first epochs fade quickly
    np.testing.assert_allclose(second[0], [2 * 2 / 3 + 5 / 3, 4 * 2 / 3 - 2 / 3], rtol=1e-6)
    assert second[1].dtype == np.int64 and second[1].tolist() == [3]  # integer weights: rounded
    for _ in range(5):  # from the fourth update on, the decay is the one asked for
        average.update([np.array([1.0, 1.0], np.float32), np.array([1], np.int64)])
    last = average.update(
        [np.array([6.0, 11.0], np.float32), np.array([1], np.int64)], averaged=[True, False]
    )
    held = 1 + (second[0] - 1) * (3 / 4) * 0.8**4  # what is left of the second update
    np.testing.assert_allclose(last[0], 0.8 * held + 0.2 * np.array([6.0, 11.0]), rtol=1e-5)
    assert last[1].tolist() == [1]  # not averaged: as given (batch-norm statistics)
    with pytest.raises(ConfigError, match="decay=1.0"):
        training.WeightAverage(1.0)


def test_trainable_mask_marks_batch_norm_statistics_out():
    model = models.build_model("edgecnn", input_shape=(60, 41), n_classes=4, normalization=(-50.0, 400.0))
    mask = training.trainable_mask(model)
    names = [v.path for v in model.weights]
    assert len(mask) == len(model.get_weights()) and sum(mask) == len(model.trainable_weights)
    assert not any(m for m, n in zip(mask, names, strict=True) if "moving_" in n)
    assert all(m for m, n in zip(mask, names, strict=True) if n.endswith("kernel"))


def test_classification_metrics_by_hand():
    got = training.classification_metrics(
        np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"]
    )
    assert got["accuracy"] == 0.6
    assert got["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert got["per_class"]["b"] == {"precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2}
    assert got["per_class"]["c"]["f1"] == 0.0
    assert got["macro_f1"] == round((0.5 + 0.8 + 0.0) / 3, 4)


def window_set(folds, windows_per_clip=3, n_classes=3):
    rng = np.random.default_rng(0)
    clip_folds = np.repeat(np.asarray(folds), windows_per_clip)
    n = len(clip_folds)
    clip_ids = np.repeat([f"clip{i}" for i in range(len(folds))], windows_per_clip).astype(object)
    labels = np.repeat(np.arange(len(folds)) % n_classes, windows_per_clip).astype(np.int32)
    return training.WindowSet(
        rng.standard_normal((n, 6, 5)).astype(np.float32),
        labels,
        clip_ids,
        clip_folds.astype(np.int32),
        np.full(n, "", dtype=object),
    )


def test_fold_split_keeps_clips_apart_and_names_bad_folds():
    windows = window_set([1, 2, 3, 4, 5] * 3)
    split = training.split_by_fold(windows, test_fold=5)
    assert split.description == {"by": "fold", "test_fold": 5, "validation_fold": 1, "train_folds": [2, 3, 4]}
    assert set(split.test.folds) == {5} and set(split.validation.folds) == {1}
    assert not set(split.train.clip_ids) & set(split.test.clip_ids)
    assert len(split.train) + len(split.validation) + len(split.test) == len(windows)
    with pytest.raises(
        ConfigError, match=r"--test-fold 7 is not a fold of the dataset; folds: \[1, 2, 3, 4, 5\]"
    ):
        training.split_by_fold(windows, test_fold=7)
    with pytest.raises(ConfigError, match="--validation-fold 5 must be a fold"):
        training.split_by_fold(windows, test_fold=5, validation_fold=5)
    with pytest.raises(ConfigError, match="the dataset has no folds"):
        training.split_by_fold(window_set([-1, -1, -1]), test_fold=1)
    with pytest.raises(ConfigError, match=r"split 'train' is not in the dataset; splits: \[\]"):
        training.split_by_name(windows)


def augmented(x, aug, seed=(1, 2)):
    import tensorflow as tf

    return training.augment_batch(tf.constant(x), aug=aug, seed=tf.constant(seed, tf.int64)).numpy()


def test_batch_augmentation_is_seeded_and_draws_per_window():
    off = training.Augmentation.none()
    ramp = np.broadcast_to(np.arange(41, dtype=np.float32), (512, 6, 41)).copy()
    shifted = augmented(ramp, dataclasses.replace(off, time_shift_frames=4))
    shifts = ramp[:, 0, 20] - shifted[:, 0, 20]  # frame 20 shows frame 20 - shift
    assert set(shifts.tolist()) == set(range(-4, 5))  # every shift, drawn per window
    for row, shift in zip(shifted, shifts.astype(int), strict=True):
        np.testing.assert_array_equal(row, np.broadcast_to(np.clip(np.arange(41) - shift, 0, 40), (6, 41)))

    x = np.linspace(-80, 0, 60 * 41, dtype=np.float32).reshape(60, 41)
    batch = np.broadcast_to(x, (1000, 60, 41)).copy()
    noisy = augmented(batch, dataclasses.replace(off, noise_prob=0.3))
    changed = np.any(noisy != x, axis=(1, 2))
    assert 0.25 < changed.mean() < 0.35  # binomial(1000, 0.3): 0.30 +- 0.015
    assert (noisy >= x - 1e-4).all()  # noise adds power
    quiet = noisy[changed].reshape(changed.sum(), -1)
    # 10-40 dB under the peak: the peak bin gains little, the quietest (-80 dB) bins a lot
    assert np.median(quiet[:, -1]) < 0.5 and np.median(quiet[:, 0]) > -50.0

    masked = augmented(
        batch[:200], dataclasses.replace(off, spec_augment_masks=1, freq_mask_bands=8, time_mask_frames=6)
    )
    fill = np.float32(x.mean())
    bands = np.all(np.isclose(masked, fill), axis=2).sum(axis=1)  # whole bands set to the mean
    frames = np.all(np.isclose(masked, fill), axis=1).sum(axis=1)
    assert bands.max() <= 8 and frames.max() <= 6 and len(set(bands.tolist())) > 3
    outside = ~np.isclose(masked, fill)
    np.testing.assert_array_equal(masked[outside], batch[:200][outside])

    full = training.Augmentation(noise_prob=1.0)
    a, b, c = augmented(batch[:8], full), augmented(batch[:8], full), augmented(batch[:8], full, seed=(3, 4))
    assert a.shape == (8, 60, 41) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # windows of one batch draw apart
    assert np.array_equal(augmented(batch[:8], off), batch[:8])


def test_training_dataset_mixup_and_weights():
    windows = window_set([1, 2, 3, 4] * 2)
    weights = training.balanced_class_weights(windows.labels, 3)
    np.testing.assert_allclose(weights, [24 / (3 * 9), 24 / (3 * 9), 24 / (3 * 6)])
    data = training.training_dataset(
        windows, n_classes=3, batch_size=8, seed=0, aug=training.Augmentation(), class_weights=weights
    )
    x, y, w = next(iter(data))
    assert x.shape == (8, 6, 5) and y.shape == (8, 3) and w.shape == (8,)
    np.testing.assert_allclose(y.numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert ((y.numpy() > 0) & (y.numpy() < 1)).any()  # mixed labels


@pytest.mark.slow
def test_train_and_evaluate_on_the_demo_set(demo_features, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["--features", demo_features, "--arch", "edgecnn", "--test-fold", 1, "--output", out]
    assert (
        train.run([str(a) for a in [*argv, "--epochs", 25, "--patience", 25, "--batch-size", 16, "--quiet"]])
        == 0
    )
    for name in ("model.keras", "model.json", "metrics.json", "history.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert (out / "learning_curves.png").stat().st_size > 1000 and (
        out / "saved_model" / "saved_model.pb"
    ).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == {"by": "fold", "test_fold": 1, "validation_fold": 2, "train_folds": [3, 4]}
    assert metrics["clip_mean"]["n"] == 8  # fold 1: two clips of each of the 4 classes
    assert metrics["clip_mean"]["accuracy"] >= 0.75  # chance is 0.25
    description = json.loads((out / "model.json").read_text())
    dataset = json.loads((demo_features / "dataset.json").read_text())
    assert description["feature_fingerprint"] == dataset["feature_fingerprint"]
    assert description["training"]["parameters"] == metrics["parameters"] == 14_250 - 6 * 96 - 6
    assert description["training"]["macs_per_window"] == metrics["macs_per_window"] > 500_000
    assert description["label_names"] == sorted(dataset["label_map"])

    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert (
        train.run_evaluate(
            [
                "--model-dir",
                str(out),
                "--features",
                str(demo_features),
                "--test-fold",
                "1",
                "--output",
                str(report),
            ]
        )
        == 0
    )
    written = json.loads(report.read_text())
    assert written["clip_mean"] == metrics["clip_mean"]
    assert written["evaluated"]["on"] == "fold 1" and written["evaluated"]["seen_in_training"] is None
    assert (tmp_path / "eval-confusion.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "clip_mean" in printed and "per class (clips, mean of their windows)" in printed
    hum = metrics["clip_mean"]["per_class"]["hum"]
    assert f"{'hum':<20} {hum['support']:>6} {hum['precision']:>10.3f}" in printed
    evaluate = ["--model-dir", str(out), "--features", str(demo_features)]
    # folds the model learnt from or was validated on are refused, unless allowed (with a warning)
    assert train.run_evaluate([*evaluate, "--test-fold", "3"]) == 2
    assert "fold 3 is one of the folds the model was trained on [3, 4]" in capsys.readouterr().err
    assert train.run_evaluate([*evaluate, "--test-fold", "2"]) == 2
    assert "fold 2 chose the model's epoch and thresholds" in capsys.readouterr().err
    assert train.run_evaluate([*evaluate, "--test-fold", "3", "--allow-training-data"]) == 0
    assert "warning: fold 3 is one of the folds the model was trained on" in capsys.readouterr().err
    assert train.run_evaluate([*evaluate, "--test-fold", "1", "--output", str(tmp_path / "e.txt")]) == 2
    assert "must name a .json file" in capsys.readouterr().err


def test_train_refuses_bad_requests(demo_features, tmp_path, capsys):
    base = ["--features", str(demo_features), "--output", str(tmp_path / "m")]
    assert train.run([*base, "--test-fold", "9"]) == 2
    assert "--test-fold 9 is not a fold of the dataset; folds: [1, 2, 3, 4]" in capsys.readouterr().err
    assert train.run([*base, "--test-fold", "1", "--cv"]) == 2
    assert "give exactly one of --test-fold N, --cv or --splits" in capsys.readouterr().err
    assert train.run([*base, "--test-fold", "1", "--weight-average", "1.5"]) == 2
    assert "--weight-average=1.5 must be in [0, 1)" in capsys.readouterr().err
    assert train.run([*base, "--splits"]) == 2
    assert "split 'train' is not in the dataset" in capsys.readouterr().err
    assert train.run(["--features", str(tmp_path), "--output", str(tmp_path / "m"), "--cv"]) == 2
    assert "has no dataset.json" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_evaluate_refuses_other_features(demo_features, tmp_path, capsys):
    model = models.build_model("linear", input_shape=(60, 41), n_classes=4)
    dataset = json.loads((demo_features / "dataset.json").read_text())
    other = dict(
        dataset,
        feature_fingerprint="0000000000000000",
        feature_config=dict(dataset["feature_config"], n_mels=40),
    )
    folder = tmp_path / "m"
    train.write_model_folder(
        str(folder),
        model=model,
        dataset=other,
        data_dir="x",
        label_names=sorted(dataset["label_map"]),
        training_config={},
        split={},
        metrics={"clip_mean": {"confusion_matrix": [[1]]}},
        history={"loss": [1.0]},
    )
    assert (
        train.run_evaluate(["--model-dir", str(folder), "--features", str(demo_features), "--test-fold", "1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "trained on features 0000000000000000" in err and "n_mels: model 40 vs" in err


def test_one_line_per_epoch_with_the_best_so_far(monkeypatch):
    from soundshard.transforms.models import callbacks

    clock = iter([100.0, 130.0, 160.0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    stopper = callbacks.ClipEarlyStopping(
        None, patience=10, aggregation="mean", select_on="clips", epochs=60, report=True
    )
    stopper.best, stopper.best_epoch = 0.825, 9
    line = stopper.epoch_line(11, {"loss": 1.39, "val_loss": 1.4491}, 0.8125, improved=False)
    # 12 epochs in 30 s: 2.5 s each; 48 epochs more at most (early stopping may end it sooner)
    assert line == (
        "epoch 12/60  loss 1.390  val loss 1.449  val clip 0.812 (best 0.825, epoch 10)  "
        "2 s per epoch, at most 2 min left"
    )
    line = stopper.epoch_line(59, {"loss": 1.0}, 0.9, improved=True)
    assert line == "epoch 60/60  loss 1.000  val clip 0.900 (new best)  1 s per epoch"


def test_early_stopping_leaves_the_best_epochs_weights_in_the_model():
    """After fit the model holds the weights of the epoch with the best validation clip accuracy
    (what is saved and tested), not the last epoch's."""
    from soundshard.transforms.models.callbacks import ClipEarlyStopping

    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    validation = training.WindowSet(
        features,
        np.array([0, 0, 1, 1], np.int32),
        np.array(["a", "a", "b", "b"], dtype=object),
        np.full(4, 2, np.int32),
        np.full(4, "", dtype=object),
    )
    model = models.build_model("linear", input_shape=(2,), n_classes=2)
    stopper = ClipEarlyStopping(validation, patience=5, aggregation="mean", n_classes=2)
    stopper.set_model(model)
    right = [np.eye(2, dtype=np.float32) * 5, np.zeros(2, np.float32)]
    wrong = [right[0][:, ::-1].copy(), right[1]]
    for epoch, weights in enumerate([wrong, right, wrong, wrong]):
        model.set_weights(weights)
        stopper.on_epoch_end(epoch, {})
    assert (stopper.best, stopper.best_epoch) == (1.0, 1)
    stopper.on_train_end()
    np.testing.assert_array_equal(model.get_weights()[0], right[0])


def test_averaged_weights_leave_the_average_of_the_epochs_in_the_model(capsys):
    """A refit's callback: the model ends with the moving average of its epochs' trainable weights,
    the same average early stopping judges (WeightAverage), and prints a line per epoch."""
    from soundshard.transforms.models.callbacks import AveragedWeights

    model = models.build_model("linear", input_shape=(2,), n_classes=2)
    callback = AveragedWeights(training.WeightAverage(0.8), epochs=3, report=True)
    callback.set_model(model)
    expected = training.WeightAverage(0.8)
    for epoch in range(3):
        weights = [np.full(w.shape, epoch + 1.0, np.float32) for w in model.get_weights()]
        model.set_weights(weights)
        callback.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1)})
        want = expected.update(weights)
        np.testing.assert_array_equal(model.get_weights()[0], weights[0])  # training goes on raw
    callback.on_train_end()
    # 1, then 1·(2/3) + 2·(1/3) = 4/3, then (4/3)·(3/4) + 3·(1/4) = 1.75 (decay min(0.8, (1+t)/(2+t)))
    np.testing.assert_allclose(model.get_weights()[0], np.full((2, 2), 1.75), rtol=1e-6)
    np.testing.assert_allclose(model.get_weights()[0], want[0], rtol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "refit epoch 1/3",
        "refit epoch 2/3",
        "refit epoch 3/3",
    ]
    assert "loss 0.500" in lines[1]


@pytest.mark.slow
def test_refit_trains_on_training_and_validation_folds_for_the_chosen_epochs(demo_features, tmp_path, capsys):
    out = tmp_path / "refit"
    argv = ["--features", demo_features, "--arch", "edgecnn", "--test-fold", 1, "--output", out]
    argv += ["--epochs", 8, "--patience", 8, "--batch-size", 16, "--refit", "--quiet"]
    assert train.run([str(a) for a in argv]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    refit = metrics["refit"]
    assert refit["epochs"] == metrics["best_epoch"] >= 1
    # folds 2 (validation), 3 and 4 (training): 24 clips; every sounding window of them
    _, windows = training.load_datasets([str(demo_features)])
    folds = np.isin(windows.folds, [2, 3, 4])
    assert refit["windows"] == int((folds & windows.sounding).sum()) > 0
    assert set(refit["first_model_test"]) >= {"window_accuracy", "clip_accuracy_mean"}
    description = json.loads((out / "model.json").read_text())
    assert description["training"]["recipe"]["refit"] is True
    assert description["training"]["normalization"] == refit["normalization"]
    # the folder holds the refit model: evaluating it gives the figures metrics.json reports
    report = tmp_path / "eval.json"
    evaluate = ["--model-dir", str(out), "--features", str(demo_features), "--test-fold", "1"]
    assert train.run_evaluate([*evaluate, "--output", str(report)]) == 0
    assert json.loads(report.read_text())["clip_mean"] == metrics["clip_mean"]
    # with a teacher the refit learns from its soft targets of the refit's windows too (and its
    # learning rate decays fully within the chosen epochs)
    distilled = tmp_path / "distilled"
    argv = [str(a) for a in argv]
    argv[argv.index(str(out))] = str(distilled)
    assert train.run([*argv, "--teacher", str(out), "--epochs", "4", "--refit-schedule", "full"]) == 0
    refit = json.loads((distilled / "metrics.json").read_text())["refit"]
    assert refit["distillation"]["teacher"] == str(out)
    assert refit["distillation"]["windows_with_teacher_targets"] == refit["windows"]
    description = json.loads((distilled / "model.json").read_text())
    assert description["training"]["distillation"]["windows_with_teacher_targets"] < refit["windows"]
    assert description["training"]["recipe"]["refit_schedule"] == "full"


def test_image_backbone_loads_pretrained_weights_freezes_then_fine_tunes(demo_features, tmp_path, capsys):
    """MobileNetV2 (alpha 0.35) on the log-mel image with weights from a file made here: frozen
    for --freeze-epochs (the saved backbone is then exactly the file's), fine-tuned after."""
    import keras

    backbone = keras.applications.MobileNetV2(
        input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None, pooling="avg"
    )
    for layer in backbone.layers:  # weights no fresh initialisation would give
        layer.set_weights(
            [w + 0.01 * np.random.default_rng(1).standard_normal(w.shape) for w in layer.get_weights()]
        )
    weights = tmp_path / "mobilenet_v2_0.35_no_top.weights.h5"
    backbone.save_weights(str(weights))
    base = ["--features", str(demo_features), "--arch", "mobilenetv2", "--width-multiplier", "0.35"]
    base += ["--test-fold", "1", "--batch-size", "16", "--quiet", "--backbone-weights", str(weights)]
    frozen = tmp_path / "frozen"
    assert train.run([*base, "--output", str(frozen), "--epochs", "2", "--freeze-epochs", "2"]) == 0
    model, description = models.load_classifier(str(frozen))
    saved = [w for layer in models.backbone_layers(model) for w in layer.get_weights()]
    assert len(saved) == len(backbone.get_weights())
    for got, want in zip(saved, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    training_config = description["training"]
    assert training_config["backbone_weights"]["file"] == str(weights)
    assert len(training_config["backbone_weights"]["sha256"]) == 64 and training_config["freeze_epochs"] == 2
    tuned = tmp_path / "tuned"
    assert train.run([*base, "--output", str(tuned), "--epochs", "3", "--freeze-epochs", "1"]) == 0
    history = json.loads((tuned / "history.json").read_text())
    assert len(history["loss"]) == 3
    head, tuning = json.loads((tuned / "metrics.json").read_text())["transfer_phases"]
    assert (head["epochs"], tuning["epochs"]) == ([1, 1], [2, 3])
    model, _ = models.load_classifier(str(tuned))
    everything = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    assert head["trainable_parameters"] < everything / 10 and tuning["trainable_parameters"] == everything
    assert tuning["learning_rate"] == pytest.approx(head["learning_rate"] / 10)
    # weights of another width, and flags that do not apply, stop the run before training
    capsys.readouterr()
    other = [a if a != "0.35" else "0.5" for a in base]
    assert train.run([*other, "--output", str(tmp_path / "x"), "--epochs", "1"]) == 2
    assert "do not fit mobilenetv2 (width multiplier 0.5" in capsys.readouterr().err
    edge = [
        "--features",
        str(demo_features),
        "--arch",
        "edgecnn",
        "--test-fold",
        "1",
        "--output",
        str(tmp_path / "y"),
    ]
    assert train.run([*edge, "--backbone-weights", str(weights)]) == 2
    assert "--backbone-weights are for the image backbones" in capsys.readouterr().err


def test_precision_resolves_by_machine():
    assert training.resolve_precision("auto", gpus=1) == "mixed_float16"
    assert training.resolve_precision("auto", gpus=0) == "float32"
    assert training.resolve_precision("auto", gpus=2, distributed=True) == "float32"
    assert training.resolve_precision("mixed", gpus=0) == "mixed_float16"
    assert training.resolve_precision("float32", gpus=4) == "float32"
    with pytest.raises(ConfigError, match="--precision mixed is for training on one worker"):
        training.resolve_precision("mixed", gpus=1, distributed=True)


def test_a_mixed_precision_model_is_kept_as_float32():
    import keras

    x = np.random.default_rng(3).normal(-50, 15, size=(16, 60, 41)).astype(np.float32)
    for name in ("sbcnn", "mobilenetv3-small"):
        keras.utils.set_random_seed(0)
        with training.dtype_policy("mixed_float16"):
            mixed = models.build_model(name, input_shape=(60, 41), n_classes=4, normalization=(-50.0, 225.0))
        assert keras.config.dtype_policy().name == "float32"  # restored
        # the head computes in float32 whatever the policy; the body in float16
        assert mixed.get_layer("logits").compute_dtype == "float32" and mixed.output.dtype == "float32"
        assert any(layer.compute_dtype == "float16" for layer in mixed.layers)
        kept = models.as_float32(mixed)
        assert {layer.dtype_policy.name for layer in models._all_layers(kept)} == {"float32"}
        for a, b in zip(kept.get_weights(), mixed.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        # the same function, computed in float32 instead of float16
        np.testing.assert_allclose(kept.predict_on_batch(x), mixed.predict_on_batch(x), atol=5e-3)
        assert models.as_float32(kept) is kept


@pytest.mark.slow
def test_train_in_mixed_precision_saves_a_float32_model(demo_features, tmp_path):
    import keras

    out = tmp_path / "mixed"
    argv = ["--features", demo_features, "--arch", "edgecnn", "--test-fold", 1, "--output", out, "--quiet"]
    argv += ["--epochs", 3, "--batch-size", 16, "--precision", "mixed"]
    assert train.run([str(a) for a in argv]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == {"policy": "mixed_float16", "xla": False}  # no GPU here: no XLA
    description = json.loads((out / "model.json").read_text())
    assert description["training"]["recipe"]["precision"] == "mixed"
    assert description["training"]["precision"] == metrics["precision"]
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    # the saved float32 model is the model that was evaluated
    report = tmp_path / "eval.json"
    argv = ["--model-dir", out, "--features", demo_features, "--test-fold", 1, "--output", report]
    assert train.run_evaluate([str(a) for a in argv]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["clip_mean"]["accuracy"] == metrics["clip_mean"]["accuracy"]
    assert evaluated["window"]["accuracy"] == pytest.approx(metrics["window"]["accuracy"])


def test_an_ensemble_keeps_the_mean_of_its_members(demo_features, tmp_path, capsys):
    """--ensemble 2 trains two seeds, each a model folder of its own, and keeps one flat model whose
    output is the mean of theirs, evaluated as one model. With --refit the members keep their
    refits (the ensemble's outputs) and their early-stopped first models, whose mean sets the
    thresholds (it never saw the validation fold). --ensemble-members combines folders trained
    before into the same model, and refuses members of another recipe or data."""
    out = tmp_path / "ensemble"
    argv = ["--features", demo_features, "--arch", "edgecnn", "--test-fold", 1, "--refit"]
    argv = [str(a) for a in [*argv, "--epochs", 3, "--patience", 3, "--batch-size", 16, "--quiet"]]
    assert train.run([*argv, "--ensemble", "2", "--output", str(out)]) == 0
    assert "2 members: 3 (best" in capsys.readouterr().out
    folders = [out / "members" / f"seed-{seed}" for seed in (0, 1)]
    members = [models.load_classifier(str(folder))[0] for folder in folders]
    firsts = [models.load_keras_file(str(folder / train.FIRST_MODEL_FILE)) for folder in folders]
    ensemble, description = models.load_classifier(str(out))
    _, windows = training.load_datasets([str(demo_features)])
    x = windows.features[:40]
    mean = np.mean([member.predict(x, verbose=0) for member in members], axis=0)
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), mean, atol=1e-6)
    assert not np.allclose(members[0].predict(x, verbose=0), members[1].predict(x, verbose=0), atol=1e-3)
    assert not np.allclose(firsts[0].predict(x, verbose=0), members[0].predict(x, verbose=0), atol=1e-3)
    # the thresholds are those the first models' mean sets on the validation fold
    dataset = json.loads((demo_features / "dataset.json").read_text())
    thresholds, _, _ = train.calibrate(
        models.average_of(firsts),
        training.split_by_fold(windows, test_fold=1),
        None,
        config=train.recipe_of(description),
        dataset=dataset,
        label_names=description["label_names"],
    )
    assert description["thresholds"] == json.loads(json.dumps(thresholds))
    metrics = json.loads((out / "metrics.json").read_text())
    member_metrics = [json.loads((folder / "metrics.json").read_text()) for folder in folders]
    assert [m["seed"] for m in metrics["ensemble"]["members"]] == [0, 1]
    assert metrics["epochs_run"] == [m["epochs_run"] for m in member_metrics]
    assert metrics["parameters"] == 2 * member_metrics[0]["parameters"]
    assert metrics["macs_per_window"] == 2 * member_metrics[0]["macs_per_window"]
    assert description["training"]["recipe"]["ensemble"] == 2
    assert description["training"]["ensemble"]["seeds"] == [0, 1]
    assert "first models' mean" in metrics["refit"]["thresholds_and_event_rules"]
    assert set(metrics["refit"]["first_model_test"]) >= {"window_accuracy", "clip_accuracy_mean"}
    # evaluated as one model, it gives the figures training wrote
    report = tmp_path / "eval.json"
    evaluate = ["--model-dir", str(out), "--features", str(demo_features), "--test-fold", "1"]
    assert train.run_evaluate([*evaluate, "--output", str(report)]) == 0
    assert json.loads(report.read_text())["clip_mean"] == metrics["clip_mean"]
    capsys.readouterr()
    assert info.run([str(out)]) == 0
    described = capsys.readouterr().out
    assert "architecture     mean of 2 edgecnn models (softmax head)" in described
    assert "ensemble         seeds 0, 1" in described

    combined = tmp_path / "combined"
    given = [f"--ensemble-members={folder}" for folder in folders]
    assert train.run([*argv, *given, "--output", str(combined)]) == 0
    again, again_description = models.load_classifier(str(combined))
    np.testing.assert_allclose(again.predict(x, verbose=0), mean, atol=1e-6)
    assert again_description["thresholds"] == description["thresholds"]
    assert json.loads((combined / "metrics.json").read_text())["clip_mean"] == metrics["clip_mean"]
    capsys.readouterr()
    # members of another recipe, a lone member, or members with a flag that would train: exit 2
    assert train.run([*argv, *given, "--epochs", "4", "--output", str(tmp_path / "x")]) == 2
    assert "another recipe (epochs=3; this run: epochs=4)" in capsys.readouterr().err
    assert train.run([*argv, given[0], "--output", str(tmp_path / "x")]) == 2
    assert "needs two or more model folders" in capsys.readouterr().err
    assert train.run([*argv, *given, "--ensemble", "2", "--output", str(tmp_path / "x")]) == 2
    assert "--ensemble would train" in capsys.readouterr().err
    plain = [a for a in argv if a != "--refit"]
    assert train.run([*plain, *given, "--output", str(tmp_path / "x")]) == 2
    assert "another recipe (refit=True; this run: refit=False)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a member that learnt from other data (its model.json says so) is refused, naming it
    member = json.loads((folders[0] / "model.json").read_text())
    check = dict(config=train.recipe_of(member), dataset=dataset, data=[f"{demo_features}/"], background=[])
    assert train.check_member("m", member, member["split"], **check).seed == 0
    with pytest.raises(ConfigError, match=r"trained on --background \[\], this run gives \['/negatives'\]"):
        train.check_member("m", member, member["split"], **{**check, "background": ["/negatives"]})
    with pytest.raises(ConfigError, match="members share the split"):
        train.check_member("m", member, dict(member["split"], test_fold=2), **check)


def test_average_of_copies_members_into_one_flat_model(tmp_path):
    """Members with residual branches (dscnn) copied side by side: the mean of their outputs, one
    level of layers, saved and loaded back in safe mode with the same outputs."""
    import keras

    members = []
    for seed in (0, 1, 2):
        keras.utils.set_random_seed(seed)
        members.append(models.build_model("dscnn-xs", input_shape=(60, 41), n_classes=5))
    ensemble = models.average_of(members)
    x = np.random.default_rng(0).normal(size=(6, 60, 41)).astype(np.float32)
    mean = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), mean, atol=1e-6)
    assert not any(hasattr(layer, "layers") for layer in ensemble.layers)
    assert ensemble.count_params() == 3 * members[0].count_params()
    assert models.count_macs(ensemble) == 3 * models.count_macs(members[0])
    path = tmp_path / "ensemble.keras"
    ensemble.save(path)
    np.testing.assert_allclose(models.load_keras_file(str(path)).predict(x, verbose=0), mean, atol=1e-6)
    other = models.build_model("dscnn-xs", input_shape=(60, 41), n_classes=4)
    with pytest.raises(ConfigError, match="differ in input or output shape"):
        models.average_of([members[0], other])
