"""Knowledge distillation: soft targets, temperature, the loss on hand-made values, time alignment
of a teacher's windows, and `train --teacher` on the demo set."""

import json

import numpy as np
import pytest

from soundshard.pipelines import features, train
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.models import training


def test_tempered_targets_by_hand():
    p = np.array([[0.7, 0.2, 0.1]])
    # softmax of log(p) / 2 = sqrt(p) normalised
    expected = np.sqrt(p) / np.sqrt(p).sum()
    np.testing.assert_allclose(training.tempered(p, temperature=2.0, head="softmax"), expected, rtol=1e-6)
    np.testing.assert_allclose(training.tempered(p, temperature=1.0, head="softmax"), p, rtol=1e-6)
    # sigmoid of logit(p) / 2, per class
    q = np.array([[0.9, 0.5, 0.2]])
    logit = np.log(q / (1 - q)) / 2
    np.testing.assert_allclose(
        training.tempered(q, temperature=2.0, head="sigmoid"), 1 / (1 + np.exp(-logit)), rtol=1e-6
    )


def test_teacher_targets_give_the_background_the_missing_share():
    saved = np.array([[0.5, 0.3], [0.1, 0.1]])  # a teacher with its background output left out
    np.testing.assert_allclose(
        training.teacher_targets(saved, head="softmax", background=True), [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]
    )
    np.testing.assert_allclose(
        training.teacher_targets(saved, head="softmax", background=False), [[0.625, 0.375], [0.5, 0.5]]
    )
    np.testing.assert_allclose(training.teacher_targets(saved, head="sigmoid", background=False), saved)


def test_distillation_loss_on_hand_made_outputs():
    import keras

    width, weight, temperature = 3, 0.25, 2.0
    labels = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    soft = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)
    student = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    student_t = np.array([[0.5, 0.3, 0.2], [0.25, 0.35, 0.4]], np.float32)
    loss = training.distillation_loss(width, weight=weight, temperature=temperature, head="softmax")
    got = keras.ops.convert_to_numpy(
        loss(np.concatenate([labels, soft], axis=1), np.concatenate([student, student_t], axis=1))
    )
    hard = -np.log([0.7, 0.6])
    soft_ce = -(soft * np.log(student_t)).sum(axis=1)
    np.testing.assert_allclose(got, (1 - weight) * hard + weight * temperature**2 * soft_ce, rtol=1e-5)
    sigmoid = training.distillation_loss(2, weight=1.0, temperature=1.0, head="sigmoid")
    value = keras.ops.convert_to_numpy(
        sigmoid(np.array([[1.0, 0.0, 0.8, 0.4]], np.float32), np.array([[0.9, 0.2, 0.7, 0.5]], np.float32))
    )
    by_hand = -np.mean([0.8 * np.log(0.7) + 0.2 * np.log(0.3), 0.4 * np.log(0.5) + 0.6 * np.log(0.5)])
    np.testing.assert_allclose(value, [by_hand], rtol=1e-5)
    # label smoothing smooths the hard part only: labels (1, 0, 0) become (0.9, 0.05, 0.05) at 0.15
    smoothed = training.distillation_loss(
        width, weight=weight, temperature=temperature, head="softmax", label_smoothing=0.15
    )
    got = keras.ops.convert_to_numpy(
        smoothed(np.concatenate([labels, soft], axis=1), np.concatenate([student, student_t], axis=1))
    )
    targets = labels * 0.85 + 0.05
    hard = -(targets * np.log(student)).sum(axis=1)
    np.testing.assert_allclose(got, (1 - weight) * hard + weight * temperature**2 * soft_ce, rtol=1e-5)


def test_label_smoothing_reaches_the_training_loss():
    import keras

    loss, _ = train._loss_and_accuracy("softmax", 0.2)
    value = keras.ops.convert_to_numpy(
        loss(np.array([[0.0, 1.0]], np.float32), np.array([[0.25, 0.75]], np.float32))
    )
    np.testing.assert_allclose(value, -(0.1 * np.log(0.25) + 0.9 * np.log(0.75)), rtol=1e-5)
    binary, _ = train._loss_and_accuracy("sigmoid", 0.2)
    value = keras.ops.convert_to_numpy(binary(np.array([[1.0]], np.float32), np.array([[0.8]], np.float32)))
    np.testing.assert_allclose(value, -(0.9 * np.log(0.8) + 0.1 * np.log(0.2)), rtol=1e-5)


def _windows(clips, starts, ends):
    n = len(clips)
    return training.WindowSet(
        np.zeros((n, 2), np.float32),
        np.zeros(n, np.int32),
        np.asarray(clips, dtype=object),
        np.ones(n, np.int32),
        np.full(n, "", dtype=object),
        times=np.stack([np.arange(n), starts, ends], axis=1).astype(np.float64),
    )


def test_teacher_windows_carried_to_student_windows_by_overlap():
    # teacher: 3 s windows every 1 s on clip a; student: 1 s windows
    teacher = _windows(["a", "a", "a"], [0.0, 1.0, 2.0], [3.0, 4.0, 5.0])
    values = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
    student = _windows(["a", "a", "b", "a"], [0.0, 1.5, 0.0, 9.0], [1.0, 2.5, 1.0, 10.0])
    got, matched = training.align_by_time(student, teacher, values)
    np.testing.assert_array_equal(matched, [True, True, False, True])
    np.testing.assert_allclose(got[0], [1.0, 0.0])  # only the first teacher window overlaps
    np.testing.assert_allclose(got[1], (values[0] + values[1]) / 2)  # 0.5 s with each of the first two
    np.testing.assert_allclose(got[2], [0.0, 0.0])  # a clip the teacher never heard
    np.testing.assert_allclose(got[3], values[2])  # past the teacher's windows: the nearest


@pytest.fixture(scope="module")
def teacher_model(demo_features, tmp_path_factory):
    """An SB-CNN trained on demo folds 3-4 (fold 1 tests, fold 2 validates)."""
    folder = tmp_path_factory.mktemp("teacher") / "sbcnn"
    argv = ["--features", demo_features, "--arch", "sbcnn", "--test-fold", 1, "--output", folder]
    assert train.run([str(a) for a in [*argv, "--epochs", 12, "--batch-size", 16, "--quiet"]]) == 0
    return folder


def test_train_with_a_teacher_of_the_same_features(demo_features, teacher_model, tmp_path, capsys):
    out = tmp_path / "student"
    argv = ["--features", demo_features, "--arch", "edgecnn", "--test-fold", 1, "--output", out]
    argv += ["--teacher", teacher_model, "--distill-weight", 0.7, "--temperature", 3]
    assert train.run([str(a) for a in [*argv, "--epochs", 20, "--batch-size", 16, "--quiet"]]) == 0
    info = json.loads((out / "model.json").read_text())["training"]["distillation"]
    assert info["teacher"] == str(teacher_model) and info["teacher_model"] == "sbcnn"
    assert (info["weight"], info["temperature"]) == (0.7, 3.0)
    assert info["soft_targets_from"] == "the training windows"
    assert info["windows_with_teacher_targets"] == 96 and info["windows_with_labels_only"] == 0
    assert info["teacher_agrees_with_labels"] > 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clip_mean"]["accuracy"] >= 0.75  # chance is 0.25
    # the saved model is the student alone: the probabilities of the 4 labels
    from soundshard.transforms.models import architectures as models

    model, _ = models.load_classifier(str(out))
    assert model.output_shape == (None, 4) and not any(layer.name == "distillation" for layer in model.layers)

    # a teacher that learnt from the test fold is refused before any training
    capsys.readouterr()
    leak = [
        "--features",
        str(demo_features),
        "--arch",
        "edgecnn",
        "--test-fold",
        "3",
        "--output",
        str(tmp_path / "x"),
    ]
    assert train.run([*leak, "--teacher", str(teacher_model)]) == 2
    err = capsys.readouterr().err
    assert "was trained or validated on folds [2, 3, 4], which hold this model's test fold 3" in err
    assert not (tmp_path / "x").exists()
    assert train.run([*leak[:-2], "--output", str(tmp_path / "y"), "--teacher-features", "d"]) == 2
    assert "--teacher-features names the inputs of a --teacher" in capsys.readouterr().err
    assert train.run([str(a) for a in [*argv[:-4], "--teacher", teacher_model, "--distill-weight", 0]]) == 2
    assert "--distill-weight=0.0 must lie in (0, 1]" in capsys.readouterr().err


def test_teacher_of_other_features_reads_its_own_windows(demo_features, tmp_path, capsys):
    """A teacher on other windows (half as long, twice as often) than the student's: its outputs
    reach the student's windows through --teacher-features, by clip and time."""
    root = demo_features.parent
    other = tmp_path / "short-windows"
    argv = ["--input", root / "audio", "--manifest", root / "manifest.csv", "--output", other]
    argv += ["--format", "parquet", "--window-frames", 20, "--window-hop-frames", 10]
    assert features.run([str(a) for a in argv]) == 0
    teacher = tmp_path / "teacher"
    argv = ["--features", other, "--arch", "edgecnn", "--test-fold", 1, "--output", teacher]
    assert train.run([str(a) for a in [*argv, "--epochs", 10, "--batch-size", 16, "--quiet"]]) == 0
    student = tmp_path / "student"
    argv = ["--features", demo_features, "--arch", "edgecnn", "--test-fold", 1, "--output", student]
    argv += ["--teacher", teacher, "--epochs", 3, "--batch-size", 16, "--quiet"]
    assert train.run([str(a) for a in argv]) == 2  # its features differ: --teacher-features needed
    assert "name the teacher's inputs with --teacher-features" in capsys.readouterr().err
    assert train.run([str(a) for a in [*argv, "--teacher-features", other]]) == 0
    info = json.loads((student / "model.json").read_text())["training"]["distillation"]
    assert info["soft_targets_from"] == f"--teacher-features {other}, matched by clip and time"
    assert info["windows_with_teacher_targets"] == 96


def test_a_cross_validation_teacher_gives_each_test_fold_its_own_model(tmp_path):
    (tmp_path / "fold-3").mkdir()
    (tmp_path / "fold-3" / "model.json").write_text("{}")
    assert train.teacher_folder(str(tmp_path), {"by": "fold", "test_fold": 3}) == str(tmp_path / "fold-3")
    with pytest.raises(ConfigError, match="nor a cross-validation output with fold-4/"):
        train.teacher_folder(str(tmp_path), {"by": "fold", "test_fold": 4})
    # fold 3's teacher trained on 1, 2 (4 validated, 3 tested): a student tested on fold 3 may use it
    split = {"by": "fold", "test_fold": 3, "validation_fold": 4, "train_folds": [1, 2]}
    train.check_teacher_split("t", split, {"by": "fold", "test_fold": 3})
    with pytest.raises(ConfigError, match="test fold 4"):
        train.check_teacher_split("t", split, {"by": "fold", "test_fold": 4})
