"""Train and evaluate classifiers on feature shards, by the dataset's predefined folds.

Examples::

    soundshard train --features out/esc10 --arch sbcnn --test-fold 1 --output models/esc10-f1
    soundshard train --features out/esc10 --arch sbcnn --cv --output models/esc10-cv
    soundshard evaluate --model-dir models/esc10-f1 --features out/esc10 --test-fold 1

A model folder holds ``model.keras`` (Keras 3 format; loads in safe mode), ``saved_model/`` (a TF
SavedModel for serving), ``model.json`` (labels, feature config and fingerprint, training config,
split, and an integrity digest over all of it and the bytes of ``model.keras``: commands that load
the folder refuse it once either was edited), ``metrics.json`` (window and clip metrics on the test
fold), ``history.json``, and the plots ``confusion_matrix.png`` and ``learning_curves.png``; with
``--refit`` also ``first-model.keras``, the early-stopped model that set the thresholds. With
``--ensemble N`` the folder holds the mean of N models, each a folder of its own in ``members/``. With
``--cv`` there is one such folder per fold (``fold-1/``...) and a ``metrics.json`` with the mean and
standard deviation over folds.

Multi-worker training (``tf.distribute.MultiWorkerMirroredStrategy``; see
``soundshard.transforms.models.distributed``): run the same command on every worker with
``--workers host0:port,host1:port --worker-index i`` (or with ``TF_CONFIG`` set and no such flags).
Each worker trains on every k-th training window from its index; worker 0 writes the model folder,
the others their ``metrics.json`` to ``<output>-worker-<i>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) is noise for a CLI user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

import numpy as np  # noqa: E402

from soundshard.pipelines import arguments
from soundshard.schemas.config import FeatureConfig  # noqa: E402
from soundshard.schemas.errors import ConfigError  # noqa: E402
from soundshard.schemas.tagging import EVENT_RULES, TagConfig  # noqa: E402
from soundshard.schemas.training import (  # noqa: E402
    PRECISIONS,
    REFIT_SCHEDULES,
    SELECT_ON,
    TrainConfig,
    load_train_config,
    recipe_of,
)
from soundshard.transforms.features import melspec
from soundshard.transforms.models import architectures as models
from soundshard.transforms.models import distributed, training
from soundshard.transforms.tagging import calibration, events  # noqa: E402

MODEL_FILE = "model.keras"
#: With ``--refit``: the early-stopped model whose outputs set the thresholds and event rules
#: (an ensemble of refits sets its own on the mean of its members' first models).
FIRST_MODEL_FILE = "first-model.keras"
MODEL_JSON = "model.json"
#: Event rules a model folder carries (``model.json`` → ``postprocessing``) when its validation data
#: holds no annotated recordings to set them on (transforms/tagging/calibration.py), chosen on development
#: data (docs/benchmarks.md, "Tagging in soundscapes"): a running median over three windows (1.4 s
#: at the default hop) removes one-window blips; windows less than 6 dB above the recording's floor
#: (its background level) take no part in events.
POSTPROCESSING = {"median_filter_windows": 3, "min_duration_s": 0.0, "min_level_above_floor_db": 6.0}


def _default(name: str) -> str:
    """A TrainConfig field's default as help text shows it."""
    value = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)
    return "none" if value is None else str(value)


def make_parser(prog: str = "soundshard train") -> argparse.ArgumentParser:
    """Argument parser of ``soundshard train``."""
    parser = arguments.Parser(prog=prog, description=__doc__.split("\n\n")[0])
    arguments.add_features(
        parser,
        append=True,
        help="Output folder of `soundshard features` (or `embed`); repeat it to train on several "
        "together (e.g. clip-labelled clips and annotated recordings; same feature config).",
    )
    arch = parser.add_argument(
        "--arch",
        dest="model",
        default=None,
        choices=models.MODEL_NAMES,
        help="Architecture: sbcnn (SB-CNN), edgecnn, the depthwise-separable family dscnn-xs/s/m/l "
        "(xs and s fit cortex-m4-256k as int8), an image backbone (mobilenetv2, mobilenetv3-small, "
        "mobilenetv3-large; with --backbone-weights for transfer learning), or mlp/linear for "
        f"embeddings. Default: {_default('model')}.",
    )
    parser.add_renamed("--model", arch)
    parser.add_argument(
        "--width-multiplier",
        "--width_multiplier",
        dest="width_multiplier",
        type=float,
        default=None,
        help="dscnn family: scale every layer's filters; image backbones: their alpha. "
        f"Default: {_default('width_multiplier')}.",
    )
    parser.add_argument(
        "--depth-multiplier",
        "--depth_multiplier",
        dest="depth_multiplier",
        type=float,
        default=None,
        help=f"dscnn family: scale the blocks per stage. Default: {_default('depth_multiplier')}.",
    )
    parser.add_argument("--output", required=True, help="Model folder to write.")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="Training recipe (TOML or JSON; keys of TrainConfig at the top level or under "
        "[training], e.g. epochs = 60 or gain_db = [-30, 6]); flags given override it. Default: none "
        "(TrainConfig's defaults).",
    )
    parser.add_argument(
        "--test-fold", "--test_fold", dest="test_fold", type=int, help="Fold held out for testing."
    )
    parser.add_argument(
        "--validation-fold",
        "--validation_fold",
        dest="validation_fold",
        type=int,
        help="Fold for early stopping (default: the fold after the test fold).",
    )
    parser.add_argument(
        "--cv", action="store_true", help="Cross-validate: each predefined fold is the test fold once."
    )
    parser.add_argument(
        "--splits",
        action="store_true",
        help="Use the dataset's split column (train/validation/test) instead of folds.",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"Most epochs. Default: {_default('epochs')}."
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=None,
        help="Early stopping: stop after this many epochs without a better validation clip accuracy. "
        f"Default: {_default('patience')}.",
    )
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=None,
        help=f"Windows per training step. Default: {_default('batch_size')}.",
    )
    parser.add_argument(
        "--learning-rate",
        "--learning_rate",
        dest="learning_rate",
        type=float,
        default=None,
        help=f"Adam's learning rate at the start of the schedule. Default: {_default('learning_rate')}.",
    )
    parser.add_argument(
        "--lr-schedule",
        "--lr_schedule",
        dest="lr_schedule",
        default=None,
        choices=("cosine", "constant"),
        help=f"Learning-rate schedule over --epochs. Default: {_default('lr_schedule')}.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed of initial weights, shuffling and augmentation (runs with one seed repeat). "
        f"Default: {_default('seed')}.",
    )
    parser.add_argument(
        "--aggregation",
        default=None,
        choices=training.AGGREGATIONS,
        help=f"Clip aggregation for early stopping. Default: {_default('aggregation')}.",
    )
    parser.add_argument(
        "--select-on",
        dest="select_on",
        default=None,
        choices=SELECT_ON,
        help="What early stopping judges each epoch: the validation clips' accuracy (clips), the "
        "mean average precision of the windows of the strongly labelled validation recordings "
        "(recordings), or recordings when there are any (auto). "
        f"Default: {_default('select_on')}.",
    )
    parser.add_argument(
        "--weight-average",
        "--weight_average",
        dest="weight_average",
        type=float,
        default=None,
        help="Decay of the per-epoch moving average of the weights that early stopping judges and "
        f"keeps (0: the raw weights). Default: {_default('weight_average')}.",
    )
    parser.add_argument(
        "--label-smoothing",
        "--label_smoothing",
        dest="label_smoothing",
        type=float,
        default=None,
        help="Share of each training target spread over the classes in the loss (0 is off). "
        f"Default: {_default('label_smoothing')}.",
    )
    parser.add_argument(
        "--refit",
        action="store_const",
        const=True,
        default=None,
        help="After early stopping has chosen its epoch on the validation data, train a new model "
        "on the training and validation data together for that many epochs and keep it (the "
        "thresholds and event rules stay those set on the validation data). Off by default.",
    )
    parser.add_argument(
        "--refit-schedule",
        "--refit_schedule",
        dest="refit_schedule",
        default=None,
        choices=REFIT_SCHEDULES,
        help="The refit's learning rate: same: the first training's schedule, stopped at the chosen "
        "epoch; full: the schedule's whole decay within the chosen epochs. "
        f"Default: {_default('refit_schedule')}.",
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        default=None,
        metavar="N",
        help="Train N models of the recipe (seeds --seed, --seed + 1, ...; each kept in "
        "OUTPUT/members/) and keep the model that outputs the mean of theirs; its thresholds and "
        f"event rules are set on the validation data as one model's are. Default: {_default('ensemble')}.",
    )
    parser.add_argument(
        "--ensemble-members",
        "--ensemble_members",
        dest="ensemble_members",
        action="append",
        default=[],
        metavar="MODEL_DIR",
        help="Instead of training, combine models already trained (e.g. in parallel, one seed each) "
        "into one that outputs the mean of theirs: model folders (or --cv outputs, fold-N/ for each "
        "test fold) of the same --features, split and recipe as this run; repeatable.",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="Numeric precision of training: mixed (float16 computations, float32 weights) on a "
        "GPU and float32 elsewhere (auto), or either; the saved model is float32. XLA compiles "
        f"the training step where a GPU trains (Keras' choice). Default: {_default('precision')}.",
    )
    parser.add_argument(
        "--background",
        action="append",
        default=[],
        metavar="DIR",
        help="Features output of recordings or clips with none of the classes (site ambience, other "
        "sounds); repeatable. Their windows train as negatives, are mixed under training windows "
        "and set the thresholds; split by the data's folds when they have folds.",
    )
    parser.add_argument(
        "--head",
        default=None,
        choices=training.HEADS,
        help="softmax: one class per window (with --background, plus a background output that is "
        "never reported); sigmoid: a probability per class, background windows all zeros. "
        f"Default: {_default('head')}.",
    )
    parser.add_argument(
        "--background-mix-prob",
        "--background_mix_prob",
        dest="background_mix_prob",
        type=float,
        default=None,
        help="With --background: probability of mixing a background window under a training "
        f"window, at 0-25 dB below it. Default: {_default('background_mix_prob')}.",
    )
    parser.add_argument(
        "--gain-db",
        "--gain_db",
        dest="gain_db",
        default=None,
        help="Random gain of training windows, LOW:HIGH dB (e.g. --gain-db=-30:6). Default: "
        f"{training.Augmentation().gain_db[0]:g}:{training.Augmentation().gain_db[1]:g}.",
    )
    backbone_group = parser.add_argument_group("transfer learning from an image backbone")
    backbone_group.add_argument(
        "--backbone-weights",
        "--backbone_weights",
        dest="backbone_weights",
        metavar="PATH",
        help="Pretrained weights of the backbone without its top (a Keras weights file, e.g. "
        "ImageNet's mobilenet_v2_..._no_top.h5, of the same width multiplier); never downloaded. "
        "Default: none (random initial weights).",
    )
    backbone_group.add_argument(
        "--freeze-epochs",
        "--freeze_epochs",
        dest="freeze_epochs",
        type=int,
        default=None,
        help="With --backbone-weights: epochs that train the new head alone, the backbone frozen, "
        "before all layers are fine-tuned at a tenth of the learning rate (0: fine-tune from the "
        f"start). Default: {_default('freeze_epochs')}.",
    )
    teacher_group = parser.add_argument_group("knowledge distillation")
    teacher_group.add_argument(
        "--teacher",
        metavar="MODEL_DIR",
        help="A trained model folder (or a --cv output: fold-N/ for each test fold) whose outputs the "
        "model also learns from: the loss mixes the labels with the teacher's soft targets. The "
        "teacher must not have trained on the test fold.",
    )
    teacher_features = teacher_group.add_argument(
        "--teacher-features",
        "--teacher_features",
        dest="teacher_data",
        action="append",
        default=[],
        metavar="DIR",
        help="Features or embeddings output the teacher reads, when its inputs are not --features' "
        "(an embedding + MLP teacher); repeatable. Its windows are matched to the training windows "
        "by clip and time.",
    )
    parser.add_renamed("--teacher-data", teacher_features, append=True)
    teacher_group.add_argument(
        "--distill-weight",
        "--distill_weight",
        dest="distill_weight",
        type=float,
        default=None,
        help="Share of the loss from the teacher's soft targets (0..1). "
        f"Default: {_default('distill_weight')}.",
    )
    teacher_group.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="Softening of teacher and student outputs in the distillation loss. "
        f"Default: {_default('temperature')}.",
    )
    events_group = parser.add_argument_group(
        "event rules written into model.json (soundshard tag uses them unless its flags say otherwise)"
    )
    events_group.add_argument(
        "--median-filter-windows",
        "--median_filter_windows",
        dest="median_filter_windows",
        type=int,
        default=None,
        help="Running median of each class's scores over this many windows (odd; 1: off). Default: "
        "the length whose events score best on the validation data's annotated recordings (with "
        "hysteresis, merging gap and floor gate), else "
        f"{POSTPROCESSING['median_filter_windows']}.",
    )
    events_group.add_argument(
        "--min-duration-s",
        "--min_duration_s",
        dest="min_duration_s",
        type=float,
        default=None,
        help=f"Shortest event, seconds. Default: {_default('min_duration_s')}.",
    )
    parser.add_argument(
        "--no-augment",
        "--no_augment",
        dest="augment",
        action="store_const",
        const=False,
        default=None,
        help="Train on the windows as they are: no time shift, SpecAugment masks, gain, background "
        "mixing or mixup (on by default).",
    )
    parser.add_argument(
        "--mixup-alpha",
        "--mixup_alpha",
        dest="mixup_alpha",
        type=float,
        default=None,
        help="Mixup of pairs of windows and their labels, Beta(alpha, alpha); 0 is off. Default: "
        f"{training.Augmentation().mixup_alpha} (with augmentation on).",
    )
    parser.add_argument(
        "--no-class-weights",
        "--no_class_weights",
        dest="class_weights",
        action="store_const",
        const=False,
        default=None,
        help="Do not weight classes (and background) by inverse frequency (weighted by default).",
    )
    parser.add_argument("--quiet", action="store_true", help="No per-epoch progress.")
    parser.add_argument(
        "--workers",
        help="Multi-worker training: host:port of every worker, comma-separated, worker 0 (the chief) "
        "first. Default: TF_CONFIG when it is set, else one worker.",
    )
    parser.add_argument(
        "--worker-index",
        "--worker_index",
        dest="worker_index",
        type=int,
        help="This process's position in --workers.",
    )
    return parser


def _augmentation(config: TrainConfig) -> training.Augmentation:
    if not config.augment:
        aug = training.Augmentation.none()
    else:
        aug = dataclasses.replace(
            training.Augmentation(), background_mix_prob=config.background_mix_prob, gain_db=config.gain_db
        )
    if config.mixup_alpha is not None:
        aug = dataclasses.replace(aug, mixup_alpha=config.mixup_alpha)
    return aug


def _learning_rate(
    config: TrainConfig, n_train: int, *, scale: float = 1.0, start: int = 0, epochs: int | None = None
):
    """Constant, or cosine decay from the learning rate (times ``scale``) to 5 % of it over the
    epochs from ``start`` to the last (to ``epochs`` when given)."""
    if config.lr_schedule == "constant":
        return config.learning_rate * scale
    last = config.epochs if epochs is None else epochs
    steps = max(1, (last - start) * max(1, n_train // config.batch_size))
    import keras

    return keras.optimizers.schedules.CosineDecay(config.learning_rate * scale, decay_steps=steps, alpha=0.05)


def _phase(what: str, first: int, last: int, model, learning_rate: float) -> dict:
    return {
        "phase": what,
        "epochs": [first, last],
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "learning_rate": learning_rate,
    }


def _stopped(stopper) -> bool:
    """Early stopping ended the run already (no better epoch for ``patience`` epochs)."""
    return bool(getattr(stopper.model, "stop_training", False))


def _weight_average(config: TrainConfig) -> training.WeightAverage | None:
    return training.WeightAverage(config.weight_average) if config.weight_average > 0 else None


def recipe(args: argparse.Namespace) -> TrainConfig:
    """The training recipe: ``--config``'s values (if any), replaced by the flags given.

    Raises:
        ConfigError: an invalid value, named by its flag when a flag gave it.
    """
    given = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            given[field.name] = value
    if isinstance(given.get("gain_db"), str):
        text = given["gain_db"]
        try:
            low, high = (float(v) for v in text.split(":"))
        except ValueError:
            raise ConfigError(f"--gain-db={text!r} is not LOW:HIGH in dB, e.g. -30:6") from None
        given["gain_db"] = (low, high)
    try:
        if args.config:
            return load_train_config(args.config, **given)
        return TrainConfig.from_dict(given)
    except ConfigError as exc:
        message = str(exc)
        name = re.match(r"(\w+)=", message)
        if name and name.group(1) in given:  # the flag's spelling for a value a flag gave
            message = f"--{name.group(1).replace('_', '-')}{message[len(name.group(1)) :]}"
        elif args.config and not message.startswith(("cannot read", "training config")):
            message = f"training config {args.config!r}: {message}"
        raise ConfigError(message) from exc


def _check_args(args: argparse.Namespace, config: TrainConfig) -> None:
    """Checks the inputs and the run's shape against the recipe (the recipe checks itself)."""
    chosen = [
        name
        for name, on in (
            ("--test-fold", args.test_fold is not None),
            ("--cv", args.cv),
            ("--splits", args.splits),
        )
        if on
    ]
    if len(chosen) != 1:
        raise ConfigError(f"give exactly one of --test-fold N, --cv or --splits (got {chosen or 'none'})")
    if args.backbone_weights is not None:
        if config.model not in models.BACKBONES:
            raise ConfigError(
                f"--backbone-weights are for the image backbones {models.BACKBONES}, not {config.model}"
            )
        if not os.path.isfile(args.backbone_weights):
            raise ConfigError(f"--backbone-weights {args.backbone_weights!r} is not a file")
    if config.family == "dscnn":
        models.dscnn_layout(
            config.model.partition("-")[2], width=config.width_multiplier, depth=config.depth_multiplier
        )
    multi_worker = args.workers or os.environ.get("TF_CONFIG")
    if config.model in models.BACKBONES and multi_worker:
        raise ConfigError("image backbones train on one worker (no --workers/TF_CONFIG)")
    if (args.background or config.head != "softmax" or args.teacher) and multi_worker:
        raise ConfigError(
            "--background, --teacher and --head sigmoid train on one worker (no --workers/TF_CONFIG)"
        )
    if config.refit and (multi_worker or args.backbone_weights):
        raise ConfigError("--refit trains on one worker, without --backbone-weights")
    if multi_worker:
        training.resolve_precision(config.precision, gpus=0, distributed=True)  # refuses mixed
    if (config.ensemble > 1 or args.ensemble_members) and multi_worker:
        raise ConfigError("--ensemble and --ensemble-members train on one worker (no --workers/TF_CONFIG)")
    if args.ensemble_members:
        given = [
            flag
            for flag, on in (
                ("--ensemble", config.ensemble > 1),
                ("--teacher", bool(args.teacher)),
                ("--backbone-weights", bool(args.backbone_weights)),
            )
            if on
        ]
        if given:
            raise ConfigError(
                f"--ensemble-members combines models already trained; {', '.join(given)} would train"
            )
        if len(args.ensemble_members) < 2:
            raise ConfigError("--ensemble-members needs two or more model folders")
    if args.teacher_data and not args.teacher:
        raise ConfigError("--teacher-features names the inputs of a --teacher; give the teacher too")


def train_split(
    split: training.Split,
    *,
    dataset: dict,
    config: TrainConfig,
    args: argparse.Namespace,
    output: str,
    cluster: distributed.ClusterConfig | None = None,
    strategy=None,
    background_data: training.WindowSet | None = None,
) -> dict:
    """Trains one model on ``split`` and writes its folder; returns its test metrics.

    With ``strategy`` (a ``MultiWorkerMirroredStrategy`` for ``cluster``) this worker trains on
    its share of the training windows in step with the other workers; the chief writes the model
    folder at ``output``, any other worker only its ``metrics.json`` and ``history.json``.
    """
    import keras
    import tensorflow as tf

    from soundshard.transforms.models.callbacks import ClipEarlyStopping

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    label_names = _label_names(dataset)
    n_classes = len(label_names)
    # digitally silent windows (zero padding of short clips) carry their clip's label but no sound
    train = split.train.take(split.train.sounding)
    head = config.head
    background = None
    if background_data is not None:
        background = training.split_background(background_data, split.description)
        background_train = background.train.take(background.train.sounding)
        train = training.concatenate([train, background_train])
    negatives, with_background_output = _negatives(train, n_classes=n_classes, head=head)
    width = n_classes + int(with_background_output)
    distill = (
        teacher_soft_targets(
            args, config, split, train, dataset=dataset, label_names=label_names, head=head, width=width
        )
        if args.teacher
        else None
    )
    policy = training.resolve_precision(config.precision, gpus=_gpus(), distributed=strategy is not None)
    # under a multi-worker strategy, variables are mirrored on every worker and kept in step
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope, training.dtype_policy(policy):
        model, (mean, variance) = _new_model(
            config,
            train,
            n_classes=n_classes,
            background_output=with_background_output,
            backbone_weights=args.backbone_weights,
        )
        fitted, loss, fitted_metrics = _fitted(model, config, width=width, distilled=distill is not None)
        # transfer learning: the new head learns on the pretrained features first (the backbone
        # frozen for --freeze-epochs), then every layer is fine-tuned at a tenth of the rate
        frozen = models.backbone_layers(model) if args.backbone_weights and config.freeze_epochs > 0 else []
        for layer in frozen:
            layer.trainable = False
        fitted.compile(
            optimizer=keras.optimizers.Adam(learning_rate=_learning_rate(config, len(train))),
            loss=loss,
            metrics=fitted_metrics,
        )
    aug = training.for_features(_augmentation(config), training.spectral_config(dataset))
    # the multi-worker loop weighs by class; the single-worker one by group (classes, background)
    weights = (
        training.balanced_class_weights(train.labels, n_classes)
        if config.class_weights and not negatives.any() and train.strong is None
        else None
    )
    validation = split.validation
    # thresholds are set on everything held out for validation: the classes and the background
    calibration = (
        validation if background is None else training.concatenate([validation, background.validation])
    )
    started = time.process_time(), time.monotonic()
    if strategy is None:

        def targets_of(windows, soft=None):
            hard = training.training_targets(
                windows, n_classes=n_classes, head=head, background=with_background_output
            )
            if distill is None:
                return hard
            # the validation loss of a distilled model weighs the labels on both parts
            return np.concatenate([hard, hard if soft is None else soft], axis=1)

        data = _training_data(
            train,
            config=config,
            aug=aug,
            n_classes=n_classes,
            negatives=negatives,
            targets=targets_of(train, None if distill is None else distill.targets),
        )
        stopper = ClipEarlyStopping(
            validation,
            patience=config.patience,
            aggregation=config.aggregation,
            select_on=config.select_on,
            average=_weight_average(config),
            n_classes=n_classes,
            epochs=config.epochs,
            report=not args.quiet,
        )
        fit = functools.partial(
            fitted.fit,
            data,
            epochs=config.epochs,
            # a dataset, not arrays: Keras' array adapter maps in parallel (see training.predict)
            validation_data=tf.data.Dataset.from_tensor_slices(
                (calibration.features, targets_of(calibration))
            ).batch(256),
            callbacks=[stopper],
            shuffle=False,  # the dataset shuffles itself, seeded
            verbose=0,  # the stopper prints one line per epoch
        )
        phases = []
        if frozen:
            history = fit(epochs=min(config.freeze_epochs, config.epochs)).history
            phases.append(
                _phase("head alone, backbone frozen", 1, len(history["loss"]), model, config.learning_rate)
            )
            for layer in frozen:
                layer.trainable = True
            fitted.compile(
                optimizer=keras.optimizers.Adam(
                    learning_rate=_learning_rate(config, len(train), scale=0.1, start=config.freeze_epochs)
                ),
                loss=loss,
                metrics=fitted_metrics,
            )
            if config.epochs > config.freeze_epochs and not _stopped(stopper):
                more = fit(initial_epoch=config.freeze_epochs).history
                phases.append(
                    _phase(
                        "every layer fine-tuned",
                        config.freeze_epochs + 1,
                        config.freeze_epochs + len(more["loss"]),
                        model,
                        config.learning_rate * 0.1,
                    )
                )
                history = {k: list(history.get(k, [])) + list(more.get(k, [])) for k in {*history, *more}}
        else:
            history = fit().history
        best_epoch, best = stopper.best_epoch, stopper.best
        model = models.as_float32(model)
        if with_background_output:
            model = models.without_background(model, n_classes)
        share = distributed.share_summary(train, np.arange(len(train)), worker_index=0, n_workers=1)
    else:
        # Keras 3's fit() does not run under MultiWorkerMirroredStrategy: a custom loop, same model
        result = distributed.fit(
            model,
            strategy=strategy,
            cluster=cluster,
            train=train,
            validation=validation,
            n_classes=n_classes,
            batch_size=config.batch_size,
            seed=config.seed,
            aug=aug,
            class_weights=weights,
            epochs=config.epochs,
            patience=config.patience,
            aggregation=config.aggregation,
            select_on=config.select_on,
            average=_weight_average(config),
            verbose=not args.quiet,
        )
        history, best_epoch, best, share = result.history, result.best_epoch, result.best, result.share
        model = distributed.local_copy(model)
    thresholds, postprocessing, calibrated = calibrate(
        model, split, background, config=config, dataset=dataset, label_names=label_names
    )
    refit = first_model = None
    if config.refit:
        first = _clip_figures(model, split, label_names)
        first_model = model
        parts = [split.train, validation] + (
            [] if background is None else [background.train, background.validation]
        )
        model, refitted = refit_model(
            parts,
            config=config,
            dataset=dataset,
            n_classes=n_classes,
            epochs=best_epoch + 1,
            policy=policy,
            quiet=args.quiet,
            teacher=functools.partial(
                teacher_soft_targets, args, config, split, dataset=dataset, label_names=label_names, head=head
            )
            if args.teacher
            else None,
        )
        refit = {
            "epochs": best_epoch + 1,
            **refitted,
            "data": "the training and validation windows (sounding ones; background too)",
            "thresholds_and_event_rules": "set on the validation data by the first model",
            "first_model_test": _accuracies(first),
        }
    cpu_s, wall_s = time.process_time() - started[0], time.monotonic() - started[1]
    metrics = held_out_metrics(
        model,
        split,
        background,
        thresholds=thresholds,
        postprocessing=postprocessing,
        label_names=label_names,
        dataset=dataset,
    )
    if calibrated is not None:
        metrics["event_rules"] = calibrated
    if refit is not None:
        metrics["refit"] = refit
    metrics["split"] = split.description
    if strategy is None and phases:
        metrics["transfer_phases"] = phases
    metrics["epochs_run"] = len(history["loss"])
    metrics["best_epoch"] = best_epoch + 1
    # what early stopping judged (TrainConfig.select_on, resolved on the data) and its best value
    metrics["selected_on"] = training.judged(config.select_on, split.validation)
    metrics["best_validation_score"] = round(best, 4)
    if metrics["selected_on"] == "clips":
        metrics["best_validation_clip_accuracy"] = round(best, 4)
    metrics["training_share"] = share
    if strategy is not None:
        metrics["distributed"] = {
            "strategy": "MultiWorkerMirroredStrategy",
            "training_loop": "custom (strategy.run per step)",
            "cluster": cluster.to_dict(),
            "global_batch_size": config.batch_size,
            "per_worker_batch_size": result.per_worker_batch_size,
            "steps_per_epoch": result.steps_per_epoch,
            "shares": result.shares,
            "validation_clip_accuracy_spread": result.validation_spread,
        }
    metrics["train_cpu_s"] = round(cpu_s, 1)
    metrics["train_wall_s"] = round(wall_s, 1)
    # what trained: the precision policy (TrainConfig.precision, resolved) and whether XLA compiled
    metrics["precision"] = {"policy": policy, "xla": bool(fitted.jit_compile)}
    metrics["parameters"] = int(model.count_params())
    metrics["macs_per_window"] = models.count_macs(model)
    training_config = {
        "model": config.model,
        **architecture(config),
        **transfer(config, args.backbone_weights),
        "head": head,
        "background": None
        if background is None
        else {
            "data": list(args.background),
            "split": background.description,
            "windows": {"train": len(background_train), "validation": len(background.validation)},
            "output": "background output, left out of the saved model" if with_background_output else None,
        },
        "distillation": None if distill is None else distill.info,
        "epochs": config.epochs,
        "patience": config.patience,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "lr_schedule": config.lr_schedule,
        "seed": config.seed,
        "aggregation": config.aggregation,
        "weight_average": config.weight_average,
        # the whole recipe as given (train --config takes it back) and its fingerprint
        "recipe": config.to_dict(),
        "recipe_fingerprint": config.fingerprint,
        "precision": metrics["precision"],
        "parameters": metrics["parameters"],
        "macs_per_window": metrics["macs_per_window"],
        "silent_training_windows_left_out": int((~split.train.sounding).sum()) if len(split.train) else 0,
        "class_weights": (
            weights.tolist()
            if weights is not None
            else "balanced: classes and background"
            if config.class_weights
            else None
        ),
        "augmentation": dataclasses.asdict(aug),
        "normalization": {"mean": mean, "variance": variance} if refit is None else refit["normalization"],
    }
    history = {k: [float(v) for v in vs] for k, vs in history.items()}
    if strategy is not None:
        training_config["workers"] = cluster.n_workers
        if not cluster.is_chief:
            os.makedirs(output, exist_ok=True)
            _write_json(os.path.join(output, "metrics.json"), metrics)
            _write_json(os.path.join(output, "history.json"), history)
            return metrics
    write_model_folder(
        output,
        model=model,
        dataset=dataset,
        data_dir=args.data[0] if len(args.data) == 1 else args.data,
        label_names=label_names,
        training_config=training_config,
        split=split.description,
        metrics=metrics,
        history=history,
        thresholds=thresholds,
        postprocessing=postprocessing,
    )
    if first_model is not None:
        first_model.save(os.path.join(output, FIRST_MODEL_FILE))
    return metrics


def _label_names(dataset: dict) -> list[str]:
    """The dataset's labels in the order of their indices (the models' outputs)."""
    return sorted(dataset["label_map"], key=dataset["label_map"].get)


def _accuracies(metrics: dict) -> dict:
    """The window and clip accuracies of :func:`training.evaluate_predictions`' figures."""
    return {
        "window_accuracy": metrics["window"]["accuracy"],
        **{f"clip_accuracy_{m}": metrics[f"clip_{m}"]["accuracy"] for m in training.AGGREGATIONS},
    }


def _clip_figures(model, split: training.Split, label_names: Sequence[str]) -> dict:
    """``model``'s window and clip metrics on the test clips: the weakly labelled test windows when
    there are any (strongly labelled recordings are scored as recordings)."""
    test = split.test.take(split.test.weak) if split.test.weak.any() else split.test
    return training.evaluate_predictions(training.predict(model, test.features), test, label_names)


def calibrate(
    model,
    split: training.Split,
    background: training.Split | None,
    *,
    config: TrainConfig,
    dataset: dict,
    label_names: Sequence[str],
) -> tuple[dict, dict, dict | None]:
    """``(thresholds, postprocessing, calibrated)``: the window thresholds and event rules of
    ``model``, set on the validation data (and the background's validation windows), which it
    never trained on, and what choosing the rules measured (``None`` without annotated validation
    recordings)."""
    aug = training.for_features(_augmentation(config), training.spectral_config(dataset))
    held_out = (
        split.validation
        if background is None
        else training.concatenate([split.validation, background.validation])
    )
    thresholds = validation_thresholds(
        model, held_out, aggregation=config.aggregation, n_classes=len(label_names), aug=aug, seed=config.seed
    )
    postprocessing, calibrated = event_rules(
        model,
        split.validation,
        thresholds=thresholds,
        label_names=label_names,
        config=config,
        level_config=training.spectral_config(dataset),
    )
    return thresholds, postprocessing, calibrated


def held_out_metrics(
    model,
    split: training.Split,
    background: training.Split | None,
    *,
    thresholds: dict,
    postprocessing: dict,
    label_names: Sequence[str],
    dataset: dict,
) -> dict:
    """``model``'s figures on the test data: window and clip metrics of the clips; with annotated
    test recordings their window F1 and event scores under ``postprocessing``; with background
    data its false alarms on the test background windows."""
    metrics = _clip_figures(model, split, label_names)
    if split.test.strongly_labelled.any():
        strong = split.test.take(split.test.strongly_labelled)
        metrics["strong_test"] = events.window_f1(
            training.predict(model, strong.features),
            strong.truth(len(label_names)),
            thresholds["window"],
            label_names,
        )
        metrics["strong_test_events"] = recording_scores(
            model,
            strong,
            thresholds=thresholds,
            label_names=label_names,
            rules=postprocessing,
            level_config=training.spectral_config(dataset),
        )
    if background is not None and len(background.test):
        metrics["background_test"] = background_false_alarms(
            training.predict(model, background.test.features),
            background.test,
            thresholds=thresholds["window"],
        )
    return metrics


def ensemble_split(
    split: training.Split,
    *,
    dataset: dict,
    config: TrainConfig,
    args: argparse.Namespace,
    output: str,
    background_data: training.WindowSet | None = None,
) -> dict:
    """An ensemble on ``split``: trains ``config.ensemble`` models of the recipe with seeds
    ``config.seed`` onwards (each a model folder of its own, ``output/members/seed-<seed>/``), or
    takes ``--ensemble-members``' models of the same data, split and recipe, and writes at
    ``output`` the model that outputs the mean of theirs. Its thresholds and event rules are set
    on the validation data by that mean, as a single model's are by it. Returns its test metrics.
    """
    label_names = _label_names(dataset)
    started = time.process_time(), time.monotonic()
    if args.ensemble_members:
        folders = [member_folder(path, split.description) for path in args.ensemble_members]
    else:
        folders = []
        for index in range(config.ensemble):
            member = dataclasses.replace(config, seed=config.seed + index, ensemble=1)
            folder = os.path.join(output, "members", f"seed-{member.seed}")
            if not args.quiet:
                print(
                    f"[train] ensemble member {index + 1} of {config.ensemble}, seed {member.seed}: {folder}",
                    flush=True,
                )
            done = train_split(
                split,
                dataset=dataset,
                config=member,
                args=args,
                output=folder,
                background_data=background_data,
            )
            if not args.quiet:
                accuracy = done["clip_mean"]["accuracy"]
                print(
                    f"[train] member seed {member.seed}: clip accuracy (mean) {accuracy:.3f}, "
                    f"{done['epochs_run']} epochs (best {done['best_epoch']})",
                    flush=True,
                )
            folders.append(folder)
    # --ensemble-members were checked (check_member) before any work; members trained here are
    # of the recipe by construction
    members, seeds, member_metrics = [], [], []
    for folder in folders:
        model, description = models.load_classifier(folder)
        seeds.append(recipe_of(description).seed)
        members.append(model)
        with open(os.path.join(folder, "metrics.json")) as f:
            member_metrics.append(json.load(f))
    model = models.average_of(members)
    background = (
        training.split_background(background_data, split.description) if background_data is not None else None
    )
    # refits have seen the validation data: the mean of the members' first models sets the rules
    first = models.average_of([_first_model(folder) for folder in folders]) if config.refit else model
    thresholds, postprocessing, calibrated = calibrate(
        first, split, background, config=config, dataset=dataset, label_names=label_names
    )
    metrics = held_out_metrics(
        model,
        split,
        background,
        thresholds=thresholds,
        postprocessing=postprocessing,
        label_names=label_names,
        dataset=dataset,
    )
    if calibrated is not None:
        metrics["event_rules"] = calibrated
    if config.refit:
        metrics["refit"] = {
            "thresholds_and_event_rules": "set on the validation data by the members' first models' mean",
            "first_model_test": _accuracies(_clip_figures(first, split, label_names)),
        }
    metrics["split"] = split.description
    metrics["ensemble"] = {
        "members": [
            {
                "folder": folder,
                "seed": seed,
                "clip_accuracy_mean": member["clip_mean"]["accuracy"],
                "window_accuracy": member["window"]["accuracy"],
                "best_epoch": member.get("best_epoch"),
                **(
                    {"strong_test_events": member["strong_test_events"]}
                    if "strong_test_events" in member
                    else {}
                ),
            }
            for folder, seed, member in zip(folders, seeds, member_metrics, strict=True)
        ],
        "output": "the mean of the members' outputs",
    }
    metrics["epochs_run"] = [member.get("epochs_run") for member in member_metrics]
    metrics["best_epoch"] = [member.get("best_epoch") for member in member_metrics]
    # the members' training (trained here or earlier) and the ensemble's own calibration
    cpu_s, wall_s = time.process_time() - started[0], time.monotonic() - started[1]
    trained_here = not args.ensemble_members
    metrics["train_cpu_s"] = round(
        cpu_s if trained_here else cpu_s + sum(m.get("train_cpu_s", 0.0) for m in member_metrics), 1
    )
    metrics["train_wall_s"] = round(
        wall_s if trained_here else wall_s + sum(m.get("train_wall_s", 0.0) for m in member_metrics), 1
    )
    metrics["parameters"] = int(model.count_params())
    metrics["macs_per_window"] = models.count_macs(model)
    config = dataclasses.replace(config, ensemble=len(members))
    training_config = {
        "model": config.model,
        **architecture(config),
        "head": config.head,
        "ensemble": {
            "members": len(members),
            "seeds": seeds,
            "folders": folders,
            "output": "the mean of the members' outputs",
        },
        "background": None
        if background is None
        else {"data": list(args.background), "split": background.description},
        "seed": config.seed,
        "aggregation": config.aggregation,
        "recipe": config.to_dict(),
        "recipe_fingerprint": config.fingerprint,
        "parameters": metrics["parameters"],
        "macs_per_window": metrics["macs_per_window"],
    }
    write_model_folder(
        output,
        model=model,
        dataset=dataset,
        data_dir=args.data[0] if len(args.data) == 1 else args.data,
        label_names=label_names,
        training_config=training_config,
        split=split.description,
        metrics=metrics,
        history={},
        thresholds=thresholds,
        postprocessing=postprocessing,
    )
    return metrics


def _first_model(folder: str):
    """A refit member's first (early-stopped) model, loaded in safe mode.

    Raises:
        ConfigError: the member folder has none (not trained with ``--refit``).
    """
    path = os.path.join(folder, FIRST_MODEL_FILE)
    if not os.path.isfile(path):
        raise ConfigError(
            f"--ensemble-members {folder!r} has no {FIRST_MODEL_FILE} (trained without --refit)"
        )
    return models.load_keras_file(path)


def member_folder(path: str, split_description: dict) -> str:
    """The ensemble member's model folder for a split: ``path`` itself, or for a ``--cv`` output its
    ``fold-<test fold>/``."""
    return teacher_folder(path, split_description, flag="--ensemble-members")


def _paths(value) -> list[str]:
    """Data folders as recorded (one path or a list), local ones made absolute, for comparison."""
    values = [value] if isinstance(value, str) else list(value or [])
    return [v.rstrip("/") if "://" in v else os.path.normpath(os.path.abspath(v)) for v in values]


def check_member(
    folder: str,
    description: dict,
    split_description: dict,
    *,
    config: TrainConfig,
    dataset: dict,
    data: Sequence[str],
    background: Sequence[str],
) -> TrainConfig:
    """Refuses an ensemble member of other features, labels, data (``--features`` and
    ``--background`` folders) or split (it could have seen this split's validation or test data),
    or of another recipe than ``config`` (its seed aside). Returns the member's recipe.

    Raises:
        ConfigError: naming what differs.
    """
    where = f"--ensemble-members {folder!r}"
    if description["feature_fingerprint"] != dataset["feature_fingerprint"]:
        raise ConfigError(
            f"{where} reads features {description['feature_fingerprint']}, --features has "
            f"{dataset['feature_fingerprint']}"
        )
    labels = _label_names(dataset)
    if list(description["label_names"]) != labels:
        raise ConfigError(f"{where} has labels {description['label_names']}, the data {labels}")
    if (description.get("split") or {}) != split_description:
        raise ConfigError(
            f"{where} was trained on split {description.get('split')}, this ensemble on "
            f"{split_description}: members share the split, so that none saw its validation or test data"
        )
    trained_on = {
        "--features": _paths((description.get("data") or {}).get("path")),
        "--background": _paths(((description.get("training") or {}).get("background") or {}).get("data")),
    }
    for flag, given in (("--features", _paths(data)), ("--background", _paths(background))):
        if trained_on[flag] != given:
            raise ConfigError(f"{where} was trained on {flag} {trained_on[flag]}, this run gives {given}")
    member = recipe_of(description)
    expected = dataclasses.replace(config, seed=member.seed, ensemble=1)
    differing = [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if getattr(member, field.name) != getattr(expected, field.name)
    ]
    if differing:
        theirs = ", ".join(f"{name}={getattr(member, name)!r}" for name in differing)
        ours = ", ".join(f"{name}={getattr(expected, name)!r}" for name in differing)
        raise ConfigError(
            f"{where} was trained with another recipe ({theirs}; this run: {ours}): give the members' "
            "training flags"
        )
    return member


def refit_model(
    parts: Sequence[training.WindowSet],
    *,
    config: TrainConfig,
    dataset: dict,
    n_classes: int,
    epochs: int,
    policy: str = "float32",
    quiet: bool = False,
    teacher: Callable[..., Distillation] | None = None,
):
    """A new model of ``config``'s recipe trained on the sounding windows of ``parts`` together
    (the training and validation windows, background ones too) for ``epochs``: the same seed,
    augmentation, class balance and learning-rate schedule as the first training, which chose
    ``epochs``, and the same moving average of the weights, kept at the end. With ``teacher``
    (``teacher(windows, width=...)`` gives a :class:`Distillation`), it learns from the teacher's
    soft targets of those windows as the first training did. ``policy`` is the Keras dtype policy
    the first training resolved (``training.resolve_precision``); the model kept is float32.

    Returns:
        ``(model, info)``: the model (without a background output), and the windows it trained
        on, its input normalisation and, with a teacher, what the distillation used
        (``{"windows", "normalization", "distillation"}``).
    """
    import keras

    from soundshard.transforms.models.callbacks import AveragedWeights

    keras.utils.set_random_seed(config.seed)
    windows = training.concatenate([part.take(part.sounding) for part in parts])
    negatives, with_background_output = _negatives(windows, n_classes=n_classes, head=config.head)
    width = n_classes + int(with_background_output)
    with training.dtype_policy(policy):
        model, (mean, variance) = _new_model(
            config, windows, n_classes=n_classes, background_output=with_background_output
        )
        fitted, loss, metrics = _fitted(model, config, width=width, distilled=teacher is not None)
    targets = training.training_targets(
        windows, n_classes=n_classes, head=config.head, background=with_background_output
    )
    if teacher is not None:
        distilled = teacher(windows, width=width)
        targets = np.concatenate([targets, distilled.targets], axis=1)
    fitted.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate=_learning_rate(
                config, len(windows), epochs=epochs if config.refit_schedule == "full" else None
            )
        ),
        loss=loss,
        metrics=metrics,
    )
    data = _training_data(
        windows,
        config=config,
        aug=training.for_features(_augmentation(config), training.spectral_config(dataset)),
        n_classes=n_classes,
        negatives=negatives,
        targets=targets,
    )
    # the average is of the model's weights, which the distillation model shares
    averaged = AveragedWeights(_weight_average(config), epochs=epochs, report=not quiet)
    fitted.fit(data, epochs=epochs, callbacks=[averaged], shuffle=False, verbose=0)
    model = models.as_float32(model)
    if with_background_output:
        model = models.without_background(model, n_classes)
    info = {"windows": len(windows), "normalization": {"mean": mean, "variance": variance}}
    if teacher is not None:
        info["distillation"] = distilled.info
    return model, info


def _gpus() -> int:
    """GPUs TensorFlow sees on this machine."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def _negatives(windows: training.WindowSet, *, n_classes: int, head: str) -> tuple[np.ndarray, bool]:
    """The training windows of none of the classes (background data, and the background of strong
    labels: a split keeps only windows with a truth, so every window without a class is one of
    them), and whether a softmax model gets a background output for them."""
    negatives = windows.truth(n_classes).sum(axis=1) == 0
    return negatives, head == "softmax" and bool(negatives.any())


def _new_model(
    config: TrainConfig,
    windows: training.WindowSet,
    *,
    n_classes: int,
    background_output: bool,
    backbone_weights: str | None = None,
):
    """``(model, (mean, variance))``: a new model of the recipe's architecture whose input
    normalisation is fitted to the training ``windows``."""
    normalization = float(windows.features.mean()), float(windows.features.var())
    model = models.build_model(
        config.model,
        input_shape=windows.features.shape[1:],
        n_classes=n_classes,
        normalization=normalization,
        head=config.head,
        background_output=background_output,
        width=config.width_multiplier,
        depth=config.depth_multiplier,
        backbone_weights=backbone_weights,
    )
    return model, normalization


def _training_data(
    windows: training.WindowSet,
    *,
    config: TrainConfig,
    aug: training.Augmentation,
    n_classes: int,
    negatives: np.ndarray,
    targets: np.ndarray,
):
    """The shuffled, augmented batches of one training (class-balanced as the recipe says, the
    negatives also mixed under other windows)."""
    return training.training_dataset(
        windows,
        n_classes=n_classes,
        batch_size=config.batch_size,
        seed=config.seed,
        aug=aug,
        targets=targets,
        sample_weights=training.balanced_sample_weights(windows.truth(n_classes))
        if config.class_weights
        else None,
        background=windows.features[negatives] if negatives.any() else None,
    )


def _fitted(model, config: TrainConfig, *, width: int, distilled: bool):
    """``(fitted, loss, metrics)`` for ``compile``: ``model`` with its head's loss and accuracy, or
    with a teacher the distillation model (sharing ``model``'s weights) and the distillation loss
    over ``width`` outputs, without a metric (accuracy of the joined labels and soft targets would
    mean nothing)."""
    loss, accuracy = _loss_and_accuracy(config.head, config.label_smoothing)
    if not distilled:
        return model, loss, [accuracy]
    fitted = training.distillation_model(model, temperature=config.temperature, head=config.head)
    loss = training.distillation_loss(
        width,
        weight=config.distill_weight,
        temperature=config.temperature,
        head=config.head,
        label_smoothing=config.label_smoothing,
    )
    return fitted, loss, []


def _loss_and_accuracy(head: str, label_smoothing: float = 0.0):
    """The loss and accuracy metric of a head (binary for sigmoid, categorical for softmax)."""
    import keras

    if head == "sigmoid":
        return (
            keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
            keras.metrics.BinaryAccuracy(name="accuracy"),
        )
    return (
        keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        keras.metrics.CategoricalAccuracy(name="accuracy"),
    )


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A teacher's tempered soft targets for the training windows, and what model.json records."""

    targets: np.ndarray
    info: dict


def teacher_folder(teacher: str, split_description: dict, *, flag: str = "--teacher") -> str:
    """The teacher model folder for a split: ``teacher`` itself, or for a ``--cv`` output its
    ``fold-<test fold>/`` (``flag`` names the option in the error).

    Raises:
        ConfigError: no model folder there.
    """
    if os.path.isfile(os.path.join(teacher, models.MODEL_JSON)):
        return teacher
    fold = split_description.get("test_fold")
    candidate = os.path.join(teacher, f"fold-{fold}")
    if fold is not None and os.path.isfile(os.path.join(candidate, models.MODEL_JSON)):
        return candidate
    raise ConfigError(
        f"{flag} {teacher!r} is neither a model folder nor a cross-validation output with "
        f"fold-{fold}/ for test fold {fold}"
    )


def check_teacher_split(folder: str, teacher_split: dict, split_description: dict) -> None:
    """Refuses a teacher that learnt from, or was validated on, the student's test data.

    Raises:
        ConfigError: naming the folds (or splits) that would leak.
    """
    if split_description.get("by") == "fold":
        test = split_description["test_fold"]
        seen = list(teacher_split.get("train_folds", [])) + [teacher_split.get("validation_fold")]
        seen = sorted(f for f in seen if f is not None)
        if teacher_split.get("by") != "fold" or test in seen:
            raise ConfigError(
                f"--teacher {folder!r} was trained or validated on folds {seen}"
                f", which hold this model's test fold {test}: its soft targets would leak the test data"
            )
    elif teacher_split != split_description:
        raise ConfigError(
            f"--teacher {folder!r} was trained on split {teacher_split}, this model on {split_description}: "
            "use a teacher of the same split"
        )


def check_teacher(
    folder: str,
    description: dict,
    split_description: dict,
    *,
    label_names: Sequence[str],
    head: str,
    dataset: dict,
    teacher_data: Sequence[str],
) -> None:
    """Refuses a teacher of other labels or another head, one that saw the test data, or one of
    other features than ``dataset``'s without ``--teacher-features``.

    Raises:
        ConfigError: naming what differs.
    """
    if description["feature_fingerprint"] != dataset["feature_fingerprint"] and not teacher_data:
        raise ConfigError(
            f"--teacher {folder!r} reads features {description['feature_fingerprint']}, --features has "
            f"{dataset['feature_fingerprint']}: name the teacher's inputs with --teacher-features"
        )
    check_teacher_split(folder, description.get("split") or {}, split_description)
    if list(description["label_names"]) != list(label_names):
        raise ConfigError(
            f"--teacher {folder!r} has labels {description['label_names']}, the data {list(label_names)}"
        )
    teacher_head = recipe_of(description).head
    if teacher_head != head:
        raise ConfigError(f"--teacher {folder!r} has a {teacher_head} head; this model a {head} head")


def teacher_soft_targets(
    args: argparse.Namespace,
    config: TrainConfig,
    split: training.Split,
    train: training.WindowSet,
    *,
    dataset: dict,
    label_names: Sequence[str],
    head: str,
    width: int,
) -> Distillation:
    """The teacher's tempered soft targets of the training windows (``[n, width]``).

    The teacher's outputs on the same windows (a teacher of the same features), or on the windows
    of ``--teacher-features`` carried to the training windows by clip and time
    (:func:`training.align_by_time`); training windows the teacher has no window for (e.g.
    background data it did not read) keep their labels as soft targets. Computed once from the
    windows as stored (offline distillation): augmentation changes the student's inputs, not the
    targets, and mixup mixes them with the labels.

    Raises:
        ConfigError: the teacher is not a model folder of the same labels and head, learnt from the
            test data, or reads other features than ``--features`` without matching ``--teacher-features``.
    """
    folder = teacher_folder(args.teacher, split.description)
    teacher, description = models.load_classifier(folder)
    check_teacher(
        folder,
        description,
        split.description,
        label_names=label_names,
        head=head,
        dataset=dataset,
        teacher_data=args.teacher_data,
    )
    n_classes = len(label_names)
    hard = training.training_targets(train, n_classes=n_classes, head=head, background=width > n_classes)
    if description["feature_fingerprint"] == dataset["feature_fingerprint"] and not args.teacher_data:
        probabilities = training.predict(teacher, train.features)
        matched = np.ones(len(train), bool)
        source = "the training windows"
    else:
        teacher_dataset, teacher_windows = training.load_datasets(args.teacher_data)
        models.check_fingerprint(description, teacher_dataset, what="--teacher-features")
        probabilities, matched = training.align_by_time(
            train, teacher_windows, training.predict(teacher, teacher_windows.features)
        )
        if not matched.any():
            raise ConfigError(
                f"--teacher-features {', '.join(args.teacher_data)} has no window of the training clips "
                "(clip ids differ)"
            )
        source = f"--teacher-features {', '.join(args.teacher_data)}, matched by clip and time"
    soft = training.teacher_targets(probabilities, head=head, background=width > n_classes)
    soft = np.where(matched[:, None], soft, hard)
    targets = training.tempered(soft, temperature=config.temperature, head=head)
    agreement = float(np.mean(soft[matched].argmax(axis=1) == hard[matched].argmax(axis=1)))
    return Distillation(
        targets=targets,
        info={
            "teacher": folder,
            "teacher_model": recipe_of(description).model,
            "teacher_features": description["feature_fingerprint"],
            "soft_targets_from": source,
            "weight": config.distill_weight,
            "temperature": config.temperature,
            "windows_with_teacher_targets": int(matched.sum()),
            "windows_with_labels_only": int((~matched).sum()),
            "teacher_agrees_with_labels": round(agreement, 4),
        },
    )


def architecture(config: TrainConfig) -> dict:
    """The architecture's scaling for model.json (the dscnn family only): its layers as built."""
    if not config.model.startswith("dscnn-"):
        return {}
    layout = models.dscnn_layout(
        config.model.partition("-")[2], width=config.width_multiplier, depth=config.depth_multiplier
    )
    return {
        "width_multiplier": config.width_multiplier,
        "depth_multiplier": config.depth_multiplier,
        "layers": dataclasses.asdict(layout),
    }


def transfer(config: TrainConfig, backbone_weights: str | None) -> dict:
    """Transfer learning for model.json (image backbones only)."""
    if config.model not in models.BACKBONES:
        return {}
    return {
        "width_multiplier": config.width_multiplier,
        "backbone_weights": None
        if backbone_weights is None
        else {"file": backbone_weights, "sha256": models.file_sha256(backbone_weights)},
        "freeze_epochs": config.freeze_epochs if backbone_weights else 0,
    }


def annotated_recordings(
    model, windows: training.WindowSet, *, n_classes: int, level_config: FeatureConfig | None
) -> list:
    """The model's scores of annotated recordings' windows, per recording, with their strong
    labels and levels (:class:`calibration.Recording`; levels as ``tag`` measures them for the
    gates, from dB spectral windows of ``level_config``; none for embeddings)."""
    return calibration.recordings(
        training.predict(model, windows.features),
        windows.truth(n_classes),
        clip_ids=windows.clip_ids,
        times=windows.times,
        level_db=None if level_config is None else melspec.window_level_db(windows.features, level_config),
        silent=windows.silent,
    )


def recording_scores(
    model,
    windows: training.WindowSet,
    *,
    thresholds: dict,
    label_names: Sequence[str],
    rules: dict,
    level_config: FeatureConfig | None,
) -> dict:
    """Segment and event F1 (micro) of the events the model folder's rules find in annotated
    recordings (``windows``: all their windows), against their strong labels."""
    n_classes = len(label_names)
    recs = annotated_recordings(model, windows, n_classes=n_classes, level_config=level_config)
    found = calibration.counts(recs, tag_config(label_names, thresholds, rules))
    segment_f1, event_f1 = calibration.overall(found)
    return {"recordings": len(recs), "segment_f1": round(segment_f1, 4), "event_f1": round(event_f1, 4)}


def tag_config(label_names: Sequence[str], thresholds: dict, rules: dict) -> TagConfig:
    """How ``soundshard tag`` would use a model folder with these thresholds and event rules."""
    return TagConfig(
        label_names=tuple(label_names),
        window_thresholds=tuple(thresholds["window"]),
        file_thresholds=tuple(thresholds["clip"]),
        **{k: v for k, v in rules.items() if k in EVENT_RULES},
    )


def event_rules(
    model,
    validation: training.WindowSet,
    *,
    thresholds: dict,
    label_names: Sequence[str],
    config: TrainConfig,
    level_config: FeatureConfig | None,
) -> tuple[dict, dict | None]:
    """The event rules for ``model.json`` (``postprocessing``) and, where the validation data
    holds annotated recordings, what setting them there measured (else ``None``): the rules whose
    events score best on those recordings (:func:`calibration.calibrate`), else
    :data:`POSTPROCESSING`; ``--median-filter-windows`` and ``--min-duration-s`` fix theirs."""
    fixed = {"min_duration_s": config.min_duration_s}
    if config.median_filter_windows is not None:
        fixed["median_filter_windows"] = config.median_filter_windows
    strong = validation.take(validation.strongly_labelled)
    if not len(strong) or strong.times is None:
        return {**POSTPROCESSING, **fixed, "from": "defaults (no annotated validation recordings)"}, None
    n_classes = len(label_names)
    recs = annotated_recordings(model, strong, n_classes=n_classes, level_config=level_config)
    grid = {**calibration.GRID, **{k: (v,) for k, v in fixed.items() if k in calibration.GRID}}
    result = calibration.calibrate(recs, tag_config(label_names, thresholds, fixed), grid=grid)
    rules = {**result["rules"], **fixed}
    return {
        **rules,
        "from": f"best mean of segment and event F1 on {len(recs)} annotated validation recording(s)",
    }, result


def background_false_alarms(probabilities: np.ndarray, windows: training.WindowSet, *, thresholds) -> dict:
    """How often held-out background windows (none of the classes) reach a class's threshold."""
    sounding = windows.sounding
    alarms = probabilities[sounding] >= np.asarray(thresholds, np.float32)[None, :]
    return {
        "windows": int(sounding.sum()),
        "false_alarm_windows": int(alarms.any(axis=1).sum()),
        "false_alarm_rate": round(float(alarms.any(axis=1).mean()) if sounding.any() else 0.0, 4),
    }


def validation_thresholds(
    model,
    validation: training.WindowSet,
    *,
    aggregation: str,
    n_classes: int,
    aug: training.Augmentation | None = None,
    seed: int = 0,
) -> dict:
    """Per-class score thresholds with the best one-vs-rest F1 on the validation data (the classes'
    windows, and background windows as negatives of every class), for windows (events) and for
    clips (file labels; weakly labelled clips and background clips); tagging uses them unless told
    otherwise.

    With ``aug`` giving a gain range or background mixing, the window thresholds are set on the
    validation windows together with a copy of each under those conditions
    (:func:`training.conditioned_copies`: at another level, over another validation window of no
    class), so that they hold where sounds are quieter than the curated clips and over a bed.
    """
    probabilities = training.predict(model, validation.features)
    clip_rows = ~validation.strongly_labelled
    clips, clip_probs = training.aggregate(
        probabilities[clip_rows],
        validation.clip_ids[clip_rows],
        method=aggregation,
        silent=validation.silent[clip_rows],
    )
    _, clip_truth = training.clip_labels(validation.labels[clip_rows], validation.clip_ids[clip_rows])
    sounding = validation.sounding
    window_scores, window_truth = probabilities[sounding], validation.truth(n_classes)[sounding]
    heard = validation.take(sounding)
    negatives = heard.features[heard.truth(n_classes).sum(axis=1) == 0]
    mixing = aug is not None and aug.background_mix_prob > 0 and len(negatives) > 0
    conditioned = aug is not None and (aug.gain_db != (0.0, 0.0) or mixing)
    if conditioned:
        copies = training.conditioned_copies(heard, negatives if mixing else None, aug=aug, seed=seed)
        window_scores = np.concatenate([window_scores, training.predict(model, copies)])
        window_truth = np.concatenate([window_truth, window_truth])
    return {
        "window": events.best_thresholds(window_scores, window_truth),
        "clip": events.best_thresholds(clip_probs, clip_truth),
        "from": "validation split (best F1 per class, one vs rest)"
        + (", windows also at other levels and over background" if conditioned else ""),
        "aggregation": aggregation,
        "n_windows": len(validation),
        "n_clips": len(clips),
    }


def write_model_folder(
    output: str,
    *,
    model,
    dataset,
    data_dir,
    label_names,
    training_config,
    split,
    metrics,
    history,
    thresholds=None,
    postprocessing=None,
) -> None:
    """Writes a model folder (see the module docstring)."""
    os.makedirs(output, exist_ok=True)
    model.save(os.path.join(output, MODEL_FILE))
    model.export(os.path.join(output, "saved_model"), verbose=False)
    description = {
        "format": "soundshard-model/1",
        "model_file": MODEL_FILE,
        "saved_model": "saved_model",
        "label_names": label_names,
        "label_map": dataset["label_map"],
        "input": {
            "kind": dataset.get("feature_column", "log_mel"),
            "shape": list(model.input_shape[1:]),
            "dtype": "float32",
        },
        "feature_fingerprint": dataset["feature_fingerprint"],
        "feature_config": dataset["feature_config"],
        "training": training_config,
        "split": split,
        "data": {"path": data_dir, "schema_version": dataset.get("schema_version")},
        "thresholds": thresholds,
        "postprocessing": postprocessing,
    }
    # Sealed as read back (JSON turns tuples into lists, keys into strings), so the digest that
    # loaders recompute from the file is the one written here.
    description = json.loads(json.dumps(description))
    description[models.INTEGRITY] = models.integrity_of(
        description, model_file_sha256=models.file_sha256(os.path.join(output, MODEL_FILE))
    )
    _write_json(os.path.join(output, MODEL_JSON), description)
    _write_json(os.path.join(output, "metrics.json"), metrics)
    _write_json(os.path.join(output, "history.json"), history)
    plot_confusion(
        metrics["clip_mean"]["confusion_matrix"], label_names, os.path.join(output, "confusion_matrix.png")
    )
    if not history:  # an ensemble: its members' folders hold their learning curves
        return
    plot_history(
        history,
        os.path.join(output, "learning_curves.png"),
        best_epoch=metrics.get("best_epoch"),
        title=f"{training_config.get('model')}, tested on {training.held_out_name(split)}",
    )


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def plot_confusion(matrix, label_names, path: str, *, title: str = "") -> None:
    """Clip-level confusion matrix as a PNG: counts, and each row divided by its clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = max(4.0, 0.6 * len(label_names) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size + 1.2))
    for ax, values, text, scale in (
        (axes[0], matrix, str, matrix.max()),
        (axes[1], shares, "{:.2f}".format, 1.0),
    ):
        ax.imshow(values, cmap="Blues", vmin=0, vmax=max(scale, 1e-9))
        ax.set_xticks(range(len(label_names)), label_names, rotation=60, ha="right")
        ax.set_yticks(range(len(label_names)), label_names)
        for (i, j), value in np.ndenumerate(values):
            color = "white" if value > scale / 2 else "black"
            ax.text(j, i, text(value), ha="center", va="center", color=color, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    axes[0].set_title("clips")
    axes[1].set_title("share of each true class")
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    fig.suptitle(f"{title}{': ' if title else ''}clip accuracy {accuracy:.3f} ({int(matrix.sum())} clips)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: dict, path: str, *, best_epoch: int | None = None, title: str = "") -> None:
    """Loss and accuracy per epoch (numbered from 1) as a PNG, the kept epoch (``best_epoch``,
    from 1) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, keys in (
        (left, ("loss", "val_loss")),
        (right, ("accuracy", "val_accuracy", "val_clip_accuracy")),
    ):
        for key in keys:
            if key in history:
                axes.plot(range(1, len(history[key]) + 1), history[key], label=key)
        if best_epoch is not None:
            axes.axvline(
                best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept: epoch {best_epoch}"
            )
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.lines:
            axes.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def split_text(description: dict) -> str:
    """``test fold 4, validation fold 5, training folds 1, 2, 3`` (or the split names)."""
    d = description
    if d.get("by") == "fold":
        train = ", ".join(str(f) for f in d.get("train_folds", []))
        test, validation = d.get("test_fold"), d.get("validation_fold")
        return f"test fold {test}, validation fold {validation}, training folds {train}"
    if d.get("by") == "split":
        names = (d.get(k) for k in ("train", "validation", "test"))
        return "splits train {!r}, validation {!r}, test {!r}".format(*names)
    return str(d)


def summarize_cv(per_fold: dict[int, dict]) -> dict:
    """Mean and standard deviation over folds of the headline figures."""
    keys = ("window", "clip_mean", "clip_max", "clip_majority")
    summary = {}
    for key in keys:
        accuracies = np.array([m[key]["accuracy"] for m in per_fold.values()])
        summary[key] = {
            "accuracy_mean": round(float(accuracies.mean()), 4),
            "accuracy_std": round(float(accuracies.std()), 4),
        }
    summary["train_cpu_s_per_fold"] = round(float(np.mean([m["train_cpu_s"] for m in per_fold.values()])), 1)
    summary["per_fold"] = {str(k): {key: v[key]["accuracy"] for key in keys} for k, v in per_fold.items()}
    return summary


def run(argv: Sequence[str] | None = None, *, prog: str = "soundshard train") -> int:
    """Runs ``soundshard train``; returns the exit code (2 on a configuration error)."""
    args = make_parser(prog).parse_args(argv)
    try:
        config = recipe(args)
        _check_args(args, config)
        cluster = distributed.resolve_cluster(workers=args.workers, worker_index=args.worker_index)
        dataset, windows = training.load_datasets(args.data)
        if len(dataset.get("label_map", {})) < 2:
            raise ConfigError(
                f"--features {', '.join(args.data)} has {len(dataset.get('label_map', {}))} label(s); "
                "need 2 or more"
            )
        background_data = (
            training.load_background(args.background, dataset=dataset) if args.background else None
        )
        if args.cv:
            folds = sorted(set(windows.folds.tolist()) - {-1})
            if len(folds) < 3:
                raise ConfigError(f"--cv needs at least 3 folds (test, validation, training); folds: {folds}")
            splits = {f: training.split_by_fold(windows, test_fold=f) for f in folds}
        elif args.splits:
            splits = {None: training.split_by_name(windows)}
        else:
            splits = {
                args.test_fold: training.split_by_fold(
                    windows, test_fold=args.test_fold, validation_fold=args.validation_fold
                )
            }
        if config.select_on == "recordings" and not all(
            split.validation.strongly_labelled.any() for split in splits.values()
        ):
            raise ConfigError(
                "--select-on recordings: the validation data has no strongly labelled recording "
                "(give annotated recordings of the validation fold or split with --features)"
            )
        if args.backbone_weights:  # weights that do not fit stop the run here, not after the first fold
            models.build_model(
                config.model,
                input_shape=windows.features.shape[1:],
                n_classes=2,
                width=config.width_multiplier,
                backbone_weights=args.backbone_weights,
            )
        if args.teacher:  # every split's teacher, before any training
            label_names = _label_names(dataset)
            for split in splits.values():
                folder = teacher_folder(args.teacher, split.description)
                check_teacher(
                    folder,
                    models.read_description(folder),
                    split.description,
                    label_names=label_names,
                    head=config.head,
                    dataset=dataset,
                    teacher_data=args.teacher_data,
                )
        for split in splits.values() if args.ensemble_members else ():  # every member, before any work
            for path in args.ensemble_members:
                folder = member_folder(path, split.description)
                check_member(
                    folder,
                    models.read_description(folder),
                    split.description,
                    config=config,
                    dataset=dataset,
                    data=args.data,
                    background=args.background,
                )
        strategy = None
        if cluster is not None and cluster.n_workers > 1:
            for split in splits.values():
                distributed.check_batch(
                    len(split.train), batch_size=config.batch_size, n_workers=cluster.n_workers
                )
            # before any other TensorFlow op: collective ops are configured at start-up
            strategy = distributed.make_strategy(cluster)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    root = args.output
    if strategy is not None:
        root = args.output if cluster.is_chief else distributed.side_folder(args.output, cluster)
        if not args.quiet:
            print(
                f"[train] worker {cluster.worker_index} of {cluster.n_workers} ({cluster.source}: "
                f"{','.join(cluster.workers)}), writing to {root}",
                flush=True,
            )
    per_fold = {}
    for fold, split in splits.items():
        folder = os.path.join(root, f"fold-{fold}") if args.cv else root
        if not args.quiet:
            print(
                f"[train] {config.model}, {split_text(split.description)}: "
                f"{len(split.train)} training windows",
                flush=True,
            )
        if config.ensemble > 1 or args.ensemble_members:
            metrics = ensemble_split(
                split,
                dataset=dataset,
                config=config,
                args=args,
                output=folder,
                background_data=background_data,
            )
            epochs = ", ".join(
                f"{run} (best {best})"
                for run, best in zip(metrics["epochs_run"], metrics["best_epoch"], strict=True)
            )
            epochs = f"{len(metrics['epochs_run'])} members: {epochs} epochs"
        else:
            metrics = train_split(
                split,
                dataset=dataset,
                config=config,
                args=args,
                output=folder,
                cluster=cluster,
                strategy=strategy,
                background_data=background_data,
            )
            epochs = f"{metrics['epochs_run']} epochs (best {metrics['best_epoch']})"
        per_fold[fold] = metrics
        print(
            f"[train] test {training.held_out_name(split.description)}: clip accuracy (mean) "
            f"{metrics['clip_mean']['accuracy']:.3f}, window accuracy {metrics['window']['accuracy']:.3f}, "
            f"{epochs}, "
            f"{metrics['train_wall_s']:.0f} s ({metrics['train_cpu_s']:.0f} CPU s) -> {folder}",
            flush=True,
        )
    if args.cv:
        summary = summarize_cv(per_fold)
        _write_json(os.path.join(root, "metrics.json"), summary)
        clip = summary["clip_mean"]
        print(
            f"[train] cross-validation: clip accuracy {clip['accuracy_mean']:.3f} "
            f"± {clip['accuracy_std']:.3f}"
        )
    return 0


def make_evaluate_parser(prog: str = "soundshard evaluate") -> argparse.ArgumentParser:
    """Argument parser of ``soundshard evaluate``."""
    parser = arguments.Parser(prog=prog, description="Evaluate a trained model on a fold or split.")
    arguments.add_model_dir(parser)
    arguments.add_features(parser, help="Output folder of `soundshard features` (or `embed`).")
    fold = parser.add_argument(
        "--test-fold",
        "--test_fold",
        dest="fold",
        type=int,
        help="Evaluate on this fold (held out in training).",
    )
    parser.add_renamed("--fold", fold)
    parser.add_argument("--split", help="Evaluate on this split name.")
    parser.add_argument(
        "--output",
        help="Write the metrics to this .json file, and the clip confusion matrix (counts and "
        "row-normalised) beside it as <name>-confusion.png. Default: none.",
    )
    parser.add_argument(
        "--allow-training-data",
        "--allow_training_data",
        dest="allow_training_data",
        action="store_true",
        help="Evaluate on a fold or split the model was trained or validated on (refused by "
        "default: its figures would flatter the model).",
    )
    return parser


def seen_in_training(description: dict, *, fold: int | None, split: str | None) -> str | None:
    """Why the fold or split asked for took part in training the model (``None`` if it did not)."""
    used = description.get("split") or {}
    if fold is not None and used.get("by") == "fold":
        if fold in used.get("train_folds", []):
            return f"fold {fold} is one of the folds the model was trained on {used['train_folds']}"
        if fold == used.get("validation_fold"):
            return f"fold {fold} chose the model's epoch and thresholds (its validation fold)"
    if (
        split is not None
        and used.get("by") == "split"
        and split in (used.get("train"), used.get("validation"))
    ):
        return f"split {split!r} took part in training the model (train {used.get('train')!r}, " + (
            f"validation {used.get('validation')!r})"
        )
    return None


def evaluation_text(metrics: dict, *, aggregation: str) -> str:
    """The figures of ``soundshard evaluate``: accuracy per level, then a per-class table (clips,
    ``aggregation`` of their windows)."""
    lines = [f"{'':<14} {'n':>6} {'accuracy':>9} {'macro F1':>9}"]
    for key in ("window", "clip_mean", "clip_max", "clip_majority"):
        m = metrics[key]
        lines.append(f"{key:<14} {m['n']:>6} {m['accuracy']:>9.3f} {m['macro_f1']:>9.3f}")
    clips = metrics[f"clip_{aggregation}"]
    lines += ["", f"per class (clips, {aggregation} of their windows)"]
    lines.append(f"{'class':<20} {'clips':>6} {'precision':>10} {'recall':>7} {'F1':>6}")
    for name, m in clips["per_class"].items():
        lines.append(
            f"{name:<20} {m['support']:>6} {m['precision']:>10.3f} {m['recall']:>7.3f} {m['f1']:>6.3f}"
        )
    return "\n".join(lines)


def run_evaluate(argv: Sequence[str] | None = None, *, prog: str = "soundshard evaluate") -> int:
    """Runs ``soundshard evaluate``; returns the exit code (2 on a configuration error)."""
    args = make_evaluate_parser(prog).parse_args(argv)
    try:
        if (args.fold is None) == (args.split is None):
            raise ConfigError("give exactly one of --test-fold N or --split NAME")
        if args.output and not args.output.endswith(".json"):
            raise ConfigError(f"--output {args.output!r} must name a .json file")
        model, description, dataset = models.load_with_data(args.model, args.data)
        seen = seen_in_training(description, fold=args.fold, split=args.split)
        if seen and not args.allow_training_data:
            raise ConfigError(f"{seen}; evaluate on held-out data, or give --allow-training-data")
        windows = training.load_windows(args.data, dataset)
        labelled = windows.labels >= 0
        if args.fold is not None:
            folds = sorted(set(windows.folds.tolist()) - {-1})
            if args.fold not in folds:
                raise ConfigError(f"--test-fold {args.fold} is not a fold of the dataset; folds: {folds}")
            part = windows.take(labelled & (windows.folds == args.fold))
        else:
            part = windows.take(labelled & (windows.splits == args.split))
            if not len(part):
                raise ConfigError(f"--split {args.split!r} has no labelled windows")
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if seen:
        print(f"{prog}: warning: {seen}: these figures flatter the model", file=sys.stderr)
    label_names = description["label_names"]
    probabilities = training.predict(model, part.features)
    metrics = training.evaluate_predictions(probabilities, part, label_names)
    aggregation = recipe_of(description).aggregation
    print(evaluation_text(metrics, aggregation=aggregation))
    if args.output:
        where = f"fold {args.fold}" if args.fold is not None else f"split {args.split!r}"
        metrics["evaluated"] = {"model": args.model, "data": args.data, "on": where, "seen_in_training": seen}
        _write_json(args.output, metrics)
        picture = args.output.removesuffix(".json") + "-confusion.png"
        plot_confusion(
            metrics[f"clip_{aggregation}"]["confusion_matrix"],
            label_names,
            picture,
            title=f"{os.path.basename(args.model.rstrip('/'))} on {where} of {args.data}",
        )
        print(f"-> {args.output}\n-> {picture}")
    return 0
