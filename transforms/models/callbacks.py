"""Keras callbacks of training (imported when training starts: TensorFlow loads with them)."""

from __future__ import annotations

import sys
import time

import keras

from soundshard.transforms.models import training


class ClipEarlyStopping(keras.callbacks.Callback):
    """The validation score after each epoch (clip accuracy, or the validation recordings' mean
    average precision: ``select_on``, see :func:`training.selection_score`); stops after
    ``patience`` epochs without improvement and restores the best weights.

    With ``average`` (a :class:`training.WeightAverage`) the averaged trainable weights (with the
    batch-norm statistics of the epoch) are judged and kept; training itself goes on from the raw
    weights.
    """

    def __init__(
        self,
        validation: training.WindowSet,
        *,
        patience: int,
        aggregation: str,
        select_on: str = "auto",
        average: training.WeightAverage | None = None,
        n_classes: int | None = None,
        epochs: int | None = None,
        report: bool = False,
    ):
        super().__init__()
        self.epochs = epochs
        self.report = report  # one line per epoch on stdout
        self._started = time.monotonic()
        self.validation = validation
        self.patience = patience
        self.aggregation = aggregation
        self.select_on = select_on
        # what the epoch line calls the score: resolved on the data when there is some
        self.judged = select_on if validation is None else training.judged(select_on, validation)
        self.average = average
        self.n_classes = n_classes  # a background output after the classes is left out
        self.best = -1.0
        self.best_epoch = 0
        self.best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        raw = None
        if self.average is not None:
            raw = self.model.get_weights()
            self.model.set_weights(self.average.update(raw, averaged=training.trainable_mask(self.model)))
        probs = training.predict(self.model, self.validation.features)[:, : self.n_classes]
        accuracy = training.selection_score(
            probs, self.validation, aggregation=self.aggregation, select_on=self.select_on
        )
        if logs is not None:
            logs["val_clip_accuracy"] = accuracy
        improved = accuracy > self.best
        if improved:
            self.best, self.best_epoch = accuracy, epoch
            self.best_weights = self.model.get_weights()
        elif epoch - self.best_epoch >= self.patience:
            self.model.stop_training = True
        if raw is not None:
            self.model.set_weights(raw)
        if self.report:
            print(
                self.epoch_line(epoch, logs or {}, accuracy, improved=improved), file=sys.stdout, flush=True
            )

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def epoch_line(self, epoch: int, logs: dict, accuracy: float, *, improved: bool) -> str:
        """``epoch 12/60  loss 1.390  val loss 1.449  val clip 0.812 (best 0.825, epoch 10)  75 s
        per epoch, at most 60 min left``: the last part is the remaining epochs at the mean epoch
        time (early stopping may end sooner)."""
        done = epoch + 1
        per_epoch = (time.monotonic() - self._started) / done
        parts = [f"epoch {done}" + (f"/{self.epochs}" if self.epochs else "")]
        for key, name in (("loss", "loss"), ("val_loss", "val loss")):
            if key in logs:
                parts.append(f"{name} {float(logs[key]):.3f}")
        best = "new best" if improved else f"best {self.best:.3f}, epoch {self.best_epoch + 1}"
        judged = "val clip" if self.judged == "clips" else "val score"
        parts.append(f"{judged} {accuracy:.3f} ({best})")
        timing = f"{per_epoch:.0f} s per epoch"
        if self.epochs:
            left = self.epochs - done  # early stopping may end it sooner
            timing += f", at most {_duration(left * per_epoch)} left" if left else ""
        parts.append(timing)
        return "  ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class AveragedWeights(keras.callbacks.Callback):
    """Takes the moving average of the trainable weights once per epoch, as
    :class:`ClipEarlyStopping` does, and leaves the model with it (with the batch-norm statistics of
    the last epoch) when training ends: a fixed number of epochs, nothing judged (a refit).

    Without an ``average`` the model keeps its raw weights. ``report`` prints one line per epoch.
    """

    def __init__(self, average: training.WeightAverage | None, *, epochs: int, report: bool = False):
        super().__init__()
        self.average = average
        self.epochs = epochs
        self.report = report
        self._started = time.monotonic()
        self._weights = None

    def on_epoch_end(self, epoch, logs=None):
        if self.average is not None:
            self._weights = self.average.update(
                self.model.get_weights(), averaged=training.trainable_mask(self.model)
            )
        if self.report:
            per_epoch = (time.monotonic() - self._started) / (epoch + 1)
            loss = f"  loss {float(logs['loss']):.3f}" if logs and "loss" in logs else ""
            print(f"refit epoch {epoch + 1}/{self.epochs}{loss}  {per_epoch:.0f} s per epoch", flush=True)

    def on_train_end(self, logs=None):
        if self._weights is not None:
            self.model.set_weights(self._weights)
