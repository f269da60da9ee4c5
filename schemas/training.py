"""Training configuration: the recipe of ``soundshard train`` as a frozen, validated dataclass with
a JSON round trip and a fingerprint (as ``FeatureConfig`` is for features).

What a model learns from (the data, background and teacher folders, backbone weight files) is not
part of the recipe: those are inputs, named on the command line and recorded beside the recipe in
``model.json``. Everything here is a number or a choice, so one recipe file (``train --config``,
keys at the top level or under ``[training]``) trains any data the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from soundshard.schemas.config import ConfigSerialization, read_config_file
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.tagging import AGGREGATIONS

#: Named sizes of the depthwise-separable CNN family (``dscnn-<size>``), smallest first.
DSCNN_SIZE_NAMES = ("xs", "s", "m", "l")
#: Image backbones of Keras Applications (transfer learning).
BACKBONES = ("mobilenetv2", "mobilenetv3-small", "mobilenetv3-large")
#: CNNs on log-mel (or MFCC) windows.
CNN_NAMES = ("sbcnn", "edgecnn", *(f"dscnn-{size}" for size in DSCNN_SIZE_NAMES), *BACKBONES)
#: Every architecture: the CNNs, and a multilayer perceptron and a linear layer for embeddings.
MODEL_NAMES = (*CNN_NAMES, "mlp", "linear")
#: Heads: ``softmax`` (one class per window; with background data one more output, left out of the
#: saved model) or ``sigmoid`` (a probability per class; several may be present at once).
HEADS = ("softmax", "sigmoid")
LR_SCHEDULES = ("cosine", "constant")
#: What early stopping judges: the validation clips' accuracy, the validation recordings' windows
#: (strong labels; mean average precision over classes), or recordings when there are any.
SELECT_ON = ("clips", "recordings", "auto")
#: Fields added after recipes were first fingerprinted, with the value that leaves a recipe as it
#: was: at that value they are left out of the fingerprint.
_LATER_FIELDS = {
    "label_smoothing": 0.0,
    "refit": False,
    "refit_schedule": "same",
    "precision": "auto",
    "ensemble": 1,
}
#: A refit's learning rate: the first training's schedule, stopped at the chosen epoch (``same``),
#: or the whole schedule's decay compressed into the chosen epochs (``full``).
REFIT_SCHEDULES = ("same", "full")
#: Numeric precision of training: ``mixed`` (float16 computations, float32 weights; Keras'
#: ``mixed_float16``) where a GPU trains, else ``float32`` (``auto``), or either as asked.
PRECISIONS = ("auto", "float32", "mixed")


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigSerialization):
    """How ``soundshard train`` trains a model. Validated on construction.

    Attributes:
        model: Architecture: ``sbcnn``, ``edgecnn``, ``dscnn-xs``/``s``/``m``/``l``, an image
            backbone (``mobilenetv2``, ``mobilenetv3-small``, ``mobilenetv3-large``), or ``mlp`` /
            ``linear`` for embeddings.
        width_multiplier: dscnn family: scale every layer's filters; image backbones: their alpha.
        depth_multiplier: dscnn family: scale the blocks per stage.
        head: ``softmax`` or ``sigmoid``.
        epochs: Most epochs.
        patience: Early stopping: epochs without a better validation clip accuracy before stopping.
        batch_size: Windows per training step.
        learning_rate: Adam's learning rate at the start of the schedule.
        lr_schedule: ``cosine`` (decay to 5 % over the epochs) or ``constant``.
        seed: Seed of initial weights, shuffling and augmentation.
        aggregation: Clip aggregation for early stopping: ``mean``, ``max`` or ``majority``.
        select_on: What early stopping judges each epoch on: ``clips`` (clip accuracy of the
            validation clips; the mean average precision of all validation windows when there
            are only strongly labelled recordings), ``recordings`` (the mean average precision
            over classes of the windows of the strongly labelled validation recordings: how well
            the model ranks sounds in recordings like those it will tag) or ``auto``
            (``recordings`` when the validation data has any, else ``clips``).
        weight_average: Decay of the per-epoch moving average of the weights that early stopping
            judges and keeps (0: the raw weights).
        class_weights: Weight classes (and background) by inverse frequency.
        augment: On-the-fly augmentation (time shift, noise, SpecAugment masks, gain, background
            mixing, mixup).
        mixup_alpha: Mixup of pairs of windows, Beta(alpha, alpha); 0 is off; ``None``: the
            augmentation's default (0.2) when ``augment``.
        background_mix_prob: With background data: probability of mixing a background window under
            a training window.
        gain_db: ``[low, high]`` random gain of training windows in dB (``[0, 0]``: none).
        freeze_epochs: Image backbones with pretrained weights: epochs of the new head alone before
            every layer is fine-tuned at a tenth of the learning rate.
        distill_weight: With a teacher: share of the loss from its soft targets.
        temperature: With a teacher: softening of teacher and student outputs.
        median_filter_windows: Event rule: running median over this many windows (odd); ``None``:
            chosen on annotated validation recordings, else 3.
        min_duration_s: Event rule: shortest event, seconds.
        label_smoothing: Share of each target spread evenly over the classes (softmax) or pulled
            toward 0.5 (sigmoid) in the loss (Szegedy et al. 2016); 0 is off.
        refit: After early stopping chose its epoch, train a new model from the same start on the
            training and validation data together for that many epochs, and keep it (the
            thresholds and event rules stay those the first model set on the validation data).
        refit_schedule: The refit's learning rate (:data:`REFIT_SCHEDULES`): ``same`` follows the
            first training's schedule and stops at the chosen epoch; ``full`` decays over the chosen
            epochs as the first training's schedule does over all of them.
        precision: :data:`PRECISIONS`: ``auto`` trains in mixed precision on a GPU (its tensor
            cores run float16; the loss is scaled against underflow) and in float32 elsewhere
            (CPUs gain nothing from float16). The saved model is float32 either way.
        ensemble: Models of this recipe to train, with seeds ``seed``, ``seed + 1``, ...; the
            model kept outputs the mean of their outputs (1: one model).
    """

    model: str = "sbcnn"
    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    head: str = "softmax"
    epochs: int = 100
    patience: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    lr_schedule: str = "cosine"
    seed: int = 0
    aggregation: str = "mean"
    select_on: str = "auto"
    weight_average: float = 0.8
    class_weights: bool = True
    augment: bool = True
    mixup_alpha: float | None = None
    background_mix_prob: float = 0.5
    gain_db: tuple[float, float] = (0.0, 0.0)
    freeze_epochs: int = 10
    distill_weight: float = 0.5
    temperature: float = 2.0
    median_filter_windows: int | None = None
    min_duration_s: float = 0.0
    label_smoothing: float = 0.0
    refit: bool = False
    refit_schedule: str = "same"
    precision: str = "auto"
    ensemble: int = 1
    _WHAT = "training"

    def __post_init__(self) -> None:
        # JSON and TOML give lists: the gain range is a pair of floats
        if isinstance(self.gain_db, list):
            object.__setattr__(self, "gain_db", tuple(self.gain_db))
        _check(self)

    @property
    def family(self) -> str:
        """``dscnn``, ``backbone`` or the model's own name."""
        if self.model in BACKBONES:
            return "backbone"
        return self.model.partition("-")[0]

    @functools.cached_property
    def fingerprint(self) -> str:
        """Stable 16-hex-digit digest of every field (a field added later counts only when it
        differs from its default, so recipes written before it keep their fingerprint)."""
        values = {k: v for k, v in self.to_dict().items() if k not in _LATER_FIELDS or _LATER_FIELDS[k] != v}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _check(c: TrainConfig) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    for name, kind in (
        ("model", str),
        ("head", str),
        ("lr_schedule", str),
        ("aggregation", str),
        ("select_on", str),
        ("refit_schedule", str),
        ("precision", str),
        ("class_weights", bool),
        ("augment", bool),
        ("refit", bool),
    ):
        need(isinstance(getattr(c, name), kind), f"{name}={getattr(c, name)!r} must be {kind.__name__}")
    for name in ("epochs", "patience", "batch_size", "seed", "freeze_epochs", "ensemble"):
        value = getattr(c, name)
        need(isinstance(value, int) and not isinstance(value, bool), f"{name}={value!r} must be int")
    for name in (
        "width_multiplier",
        "depth_multiplier",
        "learning_rate",
        "weight_average",
        "background_mix_prob",
        "distill_weight",
        "temperature",
        "min_duration_s",
        "label_smoothing",
    ):
        value = getattr(c, name)
        need(
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
            f"{name}={value!r} must be a finite number",
        )
    need(c.model in MODEL_NAMES, f"model={c.model!r} is not one of {MODEL_NAMES}")
    need(c.head in HEADS, f"head={c.head!r} is not one of {HEADS}")
    need(c.lr_schedule in LR_SCHEDULES, f"lr_schedule={c.lr_schedule!r} is not one of {LR_SCHEDULES}")
    need(c.aggregation in AGGREGATIONS, f"aggregation={c.aggregation!r} is not one of {AGGREGATIONS}")
    need(c.select_on in SELECT_ON, f"select_on={c.select_on!r} is not one of {SELECT_ON}")
    need(
        c.refit_schedule in REFIT_SCHEDULES,
        f"refit_schedule={c.refit_schedule!r} is not one of {REFIT_SCHEDULES}",
    )
    need(c.precision in PRECISIONS, f"precision={c.precision!r} is not one of {PRECISIONS}")
    need(c.refit or c.refit_schedule == "same", f"refit_schedule={c.refit_schedule!r} is for a refit (refit)")
    for name in ("epochs", "batch_size", "patience", "ensemble"):
        need(getattr(c, name) >= 1, f"{name}={getattr(c, name)} must be at least 1")
    need(c.learning_rate > 0, f"learning_rate={c.learning_rate} must be positive")
    need(0.0 <= c.weight_average < 1.0, f"weight_average={c.weight_average} must be in [0, 1) (0 is off)")
    need(c.width_multiplier > 0 and c.depth_multiplier > 0, "width and depth multipliers must be positive")
    if c.family == "backbone":
        need(c.depth_multiplier == 1.0, f"depth_multiplier scales the dscnn family, not model {c.model}")
    elif c.family != "dscnn":
        need(
            (c.width_multiplier, c.depth_multiplier) == (1.0, 1.0),
            f"width_multiplier and depth_multiplier scale the dscnn family, not model {c.model}",
        )
    need(
        c.mixup_alpha is None or (isinstance(c.mixup_alpha, int | float) and c.mixup_alpha >= 0),
        f"mixup_alpha={c.mixup_alpha} must be 0 (off) or positive",
    )
    need(
        0.0 <= c.background_mix_prob <= 1.0, f"background_mix_prob={c.background_mix_prob} must lie in [0, 1]"
    )
    gain = c.gain_db
    need(
        isinstance(gain, tuple)
        and len(gain) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in gain),
        f"gain_db={gain!r} must be [low, high] in dB, e.g. [-30, 6]",
    )
    need(gain[0] <= gain[1], f"gain_db={list(gain)} needs low <= high")
    need(c.freeze_epochs >= 0, f"freeze_epochs={c.freeze_epochs} must not be negative")
    need(0.0 < c.distill_weight <= 1.0, f"distill_weight={c.distill_weight} must lie in (0, 1]")
    need(c.temperature > 0, f"temperature={c.temperature} must be positive")
    need(0.0 <= c.label_smoothing < 1.0, f"label_smoothing={c.label_smoothing} must be in [0, 1) (0 is off)")
    need(
        c.median_filter_windows is None
        or (
            isinstance(c.median_filter_windows, int)
            and c.median_filter_windows >= 1
            and c.median_filter_windows % 2 == 1
        ),
        f"median_filter_windows={c.median_filter_windows} must be odd (1: off)",
    )
    need(c.min_duration_s >= 0, f"min_duration_s={c.min_duration_s} must not be negative")


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Reads a TOML or JSON training recipe; keys may sit at the top level or under ``[training]``.

    Args:
        path: ``.toml`` or ``.json`` file.
        **overrides: Values that replace those of the file (e.g. from command-line flags).

    Raises:
        ConfigError: unreadable file, unknown key or invalid value.
    """
    values = read_config_file(path, table="training", what="training")
    return TrainConfig.from_dict({**values, **overrides})


def recipe_of(description: dict) -> TrainConfig:
    """The recipe a model folder was trained with, from its ``model.json`` (``training.recipe``; a
    folder trained before recipes were recorded gives the fields its ``training`` block names).

    Raises:
        ConfigError: a recipe that is not valid.
    """
    training = description.get("training") or {}
    if isinstance(training.get("recipe"), dict):
        return TrainConfig.from_dict(training["recipe"])
    # an older folder: the settings whose meaning has not changed, each kept only if valid (its
    # training block also holds derived values under the same names, e.g. class weights as a list)
    values: dict[str, Any] = {}
    for key in _RECORDED_BEFORE_RECIPES:
        if key in training:
            try:
                TrainConfig.from_dict({**values, key: training[key]})
            except ConfigError:
                continue
            values[key] = training[key]
    return TrainConfig.from_dict(values)


#: TrainConfig fields that model.json's ``training`` block named before it held the recipe.
_RECORDED_BEFORE_RECIPES = (
    "model",
    "head",
    "epochs",
    "patience",
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "seed",
    "aggregation",
    "weight_average",
    "width_multiplier",
    "depth_multiplier",
    "freeze_epochs",
)
