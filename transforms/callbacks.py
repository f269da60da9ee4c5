"""Keras callbacks of training (imported when training starts: TensorFlow loads with them)."""

from __future__ import annotations

import keras

from soundshard.transforms import events, training


class ClipEarlyStopping(keras.callbacks.Callback):
    """Clip-level validation accuracy after each epoch; stops after ``patience`` epochs without
    improvement and restores the best weights.

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
        average: training.WeightAverage | None = None,
        n_classes: int | None = None,
    ):
        super().__init__()
        self.validation = validation
        self.patience = patience
        self.aggregation = aggregation
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
        if self.validation.weak.any():
            weak = self.validation.weak
            accuracy = training.clip_accuracy(
                probs[weak], self.validation.take(weak), method=self.aggregation
            )
        else:  # strong labels only: the mean over classes of the windows' average precision
            accuracy = events.mean_average_precision(probs, self.validation.truth(probs.shape[1]))
        if logs is not None:
            logs["val_clip_accuracy"] = accuracy
        if accuracy > self.best:
            self.best, self.best_epoch = accuracy, epoch
            self.best_weights = self.model.get_weights()
        elif epoch - self.best_epoch >= self.patience:
            self.model.stop_training = True
        if raw is not None:
            self.model.set_weights(raw)

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
