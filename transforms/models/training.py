"""Training data, augmentation, clip aggregation and metrics (numpy and tf.data; no Beam).

Windows are the training examples and carry their clip's label (weak labels); predictions are
judged per window and per clip, a clip's probabilities being the mean (or max, or the majority
vote) of its windows'. Splits follow the dataset's predefined folds or split column, never a
random split of windows, so no clip (and no recording) is on both sides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from soundshard.schemas import fields
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.tagging import AGGREGATIONS
from soundshard.schemas.training import HEADS
from soundshard.transforms.audio import augment


@dataclasses.dataclass(frozen=True, eq=False)
class WindowSet:
    """Windows with their labels and clip identity.

    Attributes:
        features: float32 ``[n_windows, n_mels, n_frames]`` (or ``[n_windows, dim]``).
        labels: int32 ``[n_windows]`` label indices (``-1`` for unlabelled windows).
        clip_ids: ``[n_windows]`` clip id of each window.
        folds: int32 ``[n_windows]`` predefined fold (``-1`` when none).
        splits: ``[n_windows]`` predefined split name (``""`` when none).
        augmented: bool ``[n_windows]``, true for windows of offline-augmented copies (``None``:
            none are).
        targets: float32 ``[n_windows, n_classes]`` multi-hot targets where the data has strong
            labels (``features --labels``), else ``None`` (targets come from ``labels``).
        strong: bool ``[n_windows]``, true for windows of strongly labelled recordings (their
            ``labels`` is -1 for background and multi-label windows; ``targets`` holds the truth),
            or ``None``: none are.
        times: float64 ``[n_windows, 3]``: each window's index on its recording's grid, start and
            end in seconds, or ``None`` where not read (events on validation recordings need them).
        silence_rule: How digital silence shows in these features (:func:`silent_windows`).
    """

    features: np.ndarray
    labels: np.ndarray
    clip_ids: np.ndarray
    folds: np.ndarray
    splits: np.ndarray
    augmented: np.ndarray | None = None
    targets: np.ndarray | None = None
    strong: np.ndarray | None = None
    times: np.ndarray | None = None
    silence_rule: str = "window"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @functools.cached_property
    def silent(self) -> np.ndarray:
        """bool ``[n_windows]``: digitally silent windows (:func:`silent_windows`), found once."""
        return silent_windows(self.features, rule=self.silence_rule)

    @property
    def sounding(self) -> np.ndarray:
        """bool ``[n_windows]``: the windows that are not silent (all of them when every one is)."""
        return ~self.silent if (~self.silent).any() else np.ones(len(self), bool)

    @property
    def originals(self) -> np.ndarray:
        """bool ``[n_windows]``: true for windows of original recordings (not augmented copies)."""
        return np.ones(len(self), bool) if self.augmented is None else ~self.augmented

    @property
    def strongly_labelled(self) -> np.ndarray:
        """bool ``[n_windows]``: windows whose truth is in ``targets`` (strong labels)."""
        return np.zeros(len(self), bool) if self.strong is None else self.strong

    @property
    def weak(self) -> np.ndarray:
        """bool ``[n_windows]``: windows of weakly labelled clips (a label, no strong labels)."""
        return (self.labels >= 0) & ~self.strongly_labelled

    @property
    def usable(self) -> np.ndarray:
        """bool ``[n_windows]``: windows with a truth to train or test on (weak or strong)."""
        return (self.labels >= 0) | self.strongly_labelled

    def truth(self, n_classes: int) -> np.ndarray:
        """float32 ``[n_windows, n_classes]``: multi-hot truth (one-hot of ``labels`` for weak
        windows, ``targets`` for strong ones, zeros for background)."""
        out = np.zeros((len(self), n_classes), np.float32)
        rows = np.flatnonzero(self.labels >= 0)
        out[rows, self.labels[rows]] = 1.0
        if self.targets is not None and self.strong is not None:
            out[self.strong] = self.targets[self.strong][:, :n_classes]
        return out

    def take(self, mask: np.ndarray) -> WindowSet:
        """The windows where ``mask`` is true."""
        return WindowSet(
            self.features[mask],
            self.labels[mask],
            self.clip_ids[mask],
            self.folds[mask],
            self.splits[mask],
            None if self.augmented is None else self.augmented[mask],
            None if self.targets is None else self.targets[mask],
            None if self.strong is None else self.strong[mask],
            None if self.times is None else self.times[mask],
            self.silence_rule,
        )


#: Heads (``schemas.training.HEADS``): ``softmax`` (one class per window; trained with background
#: data, it has one more output, the background, that the saved model leaves out) or ``sigmoid`` (a
#: probability per class, background windows have all-zero targets; several classes at once).


def concatenate(parts: Sequence[WindowSet]) -> WindowSet:
    """One WindowSet of several (in order)."""
    augmented = (
        None if all(p.augmented is None for p in parts) else np.concatenate([~p.originals for p in parts])
    )
    n_classes = max((p.targets.shape[1] for p in parts if p.targets is not None), default=None)
    return WindowSet(
        np.concatenate([p.features for p in parts]),
        np.concatenate([p.labels for p in parts]).astype(np.int32),
        np.concatenate([p.clip_ids for p in parts]),
        np.concatenate([p.folds for p in parts]).astype(np.int32),
        np.concatenate([p.splits for p in parts]),
        augmented,
        None if n_classes is None else np.concatenate([p.truth(n_classes) for p in parts]),
        None if n_classes is None else np.concatenate([p.strongly_labelled for p in parts]),
        None if any(p.times is None for p in parts) else np.concatenate([p.times for p in parts]),
        parts[0].silence_rule if parts else "window",
    )


def load_datasets(data_dirs: Sequence[str]) -> tuple[dict, WindowSet]:
    """The description and windows of one or several features outputs trained on together
    (``train --data A --data B``: e.g. clip-labelled clips and annotated recordings).

    The first output's description, with the union of the label maps (sorted, re-indexed: labels
    are read by name) and ``data`` listing the folders. A clip id that two outputs share gets its
    output's position as prefix (``1/x``), so two clips never merge.

    Raises:
        ConfigError: an output without features, or outputs computed with other features.
    """
    descriptions = [read_dataset_json(d) for d in data_dirs]
    first = descriptions[0]
    for data_dir, description in zip(data_dirs[1:], descriptions[1:], strict=True):
        if description.get("feature_fingerprint") != first.get("feature_fingerprint"):
            raise ConfigError(
                f"--features {data_dir!r} has features {description.get('feature_fingerprint')}, "
                f"--features {data_dirs[0]!r} {first.get('feature_fingerprint')}: compute both with one "
                "config"
            )
    names = sorted({name for d in descriptions for name in d.get("label_map", {})})
    dataset = {**first, "label_map": {name: i for i, name in enumerate(names)}, "data": list(data_dirs)}
    # each output's own shards, read with the union of the labels
    parts = [
        load_windows(d, {**description, "label_map": dataset["label_map"]})
        for d, description in zip(data_dirs, descriptions, strict=True)
    ]
    if len(parts) > 1:
        seen: dict[str, int] = {}
        for part in parts:
            for clip in set(part.clip_ids.tolist()):
                seen[clip] = seen.get(clip, 0) + 1
        shared = {c for c, n in seen.items() if n > 1}
        if shared:
            parts = [
                dataclasses.replace(
                    p,
                    clip_ids=np.asarray([f"{k}/{c}" if c in shared else c for c in p.clip_ids], dtype=object),
                )
                for k, p in enumerate(parts)
            ]
    return dataset, concatenate(parts) if len(parts) > 1 else parts[0]


def load_background(data_dirs: Sequence[str], *, dataset: dict) -> WindowSet:
    """Windows of background data (``train --background``): features outputs of recordings that
    hold none of the target classes. Every window is a negative: label ``-1``, its clip id
    prefixed with ``background/<k>/`` (so it never meets a clip of the data).

    Raises:
        ConfigError: a folder without features, or with other features than ``dataset``.
    """
    parts = []
    for k, data_dir in enumerate(data_dirs):
        description = read_dataset_json(data_dir)
        if description.get("feature_fingerprint") != dataset["feature_fingerprint"]:
            raise ConfigError(
                f"--background {data_dir!r} has features {description.get('feature_fingerprint')}, "
                f"the data {dataset['feature_fingerprint']}: compute both with the same feature config"
            )
        windows = load_windows(data_dir, description, labelled=False)
        clip_ids = np.asarray([f"background/{k}/{c}" for c in windows.clip_ids], dtype=object)
        parts.append(dataclasses.replace(windows, clip_ids=clip_ids))
    return concatenate(parts)


def _hash_share(clip_ids: np.ndarray) -> np.ndarray:
    """A stable number in [0, 1) per clip id (split of background data without folds)."""
    import hashlib

    return np.asarray(
        [int.from_bytes(hashlib.sha256(str(c).encode()).digest()[:4], "big") / 2**32 for c in clip_ids]
    )


def split_background(background: WindowSet, description: dict, *, validation_share: float = 0.2) -> Split:
    """Background windows apportioned to the training, validation and test parts of a split.

    By the split's folds (or split names) when the background data has them, so a clip of a held-out
    fold is never trained on; otherwise by a stable hash of the clip id: ``validation_share`` of the
    clips validate (and set thresholds), the rest train, none test.
    """
    originals = background.originals
    if description.get("by") == "fold" and (background.folds >= 0).any():
        test, validation = description["test_fold"], description["validation_fold"]
        return Split(
            train=background.take(~np.isin(background.folds, [test, validation, -1])),
            validation=background.take(originals & (background.folds == validation)),
            test=background.take(originals & (background.folds == test)),
            description={"by": "fold"},
        )
    if description.get("by") == "split" and (background.splits != "").any():
        return Split(
            train=background.take(background.splits == description["train"]),
            validation=background.take(originals & (background.splits == description["validation"])),
            test=background.take(originals & (background.splits == description["test"])),
            description={"by": "split"},
        )
    held = _hash_share(background.clip_ids) < validation_share
    return Split(
        train=background.take(~held),
        validation=background.take(held & originals),
        test=background.take(np.zeros(len(background), bool)),
        description={"by": "clip hash", "validation_share": validation_share},
    )


def training_targets(windows: WindowSet, *, n_classes: int, head: str, background: bool) -> np.ndarray:
    """float32 training targets of ``windows``.

    ``sigmoid``: the multi-hot truth (:meth:`WindowSet.truth`; all zeros for background windows).
    ``softmax``: the truth spread evenly over a window's classes (one-hot for one class), plus a
    last background column when ``background``, 1 for windows of no class.

    Raises:
        ConfigError: an unknown head, or softmax targets for windows of no class without the
            background output.
    """
    if head not in HEADS:
        raise ConfigError(f"head={head!r} is not one of {HEADS}")
    truth = windows.truth(n_classes)
    if head == "sigmoid":
        return truth
    present = truth.sum(axis=1, keepdims=True)
    shares = np.divide(truth, present, out=np.zeros_like(truth), where=present > 0)
    if not background:
        if (present == 0).any():
            raise ConfigError("softmax targets for windows of no class need the background output")
        return shares
    return np.concatenate([shares, (present == 0).astype(np.float32)], axis=1)


def conditioned_copies(
    windows: WindowSet, background: np.ndarray | None, *, aug: Augmentation, seed: int
) -> np.ndarray:
    """float32 copies of ``windows``' log-mel features under the conditions the model is trained
    for: each at a random gain in ``aug.gain_db`` and, where ``background`` windows are given, with a
    random one of them added at a random ratio in ``aug.background_snr_db`` (powers add), as
    :func:`training_dataset` does to training windows. Thresholds set on these hold for sounds at
    other levels and over other beds than the validation clips' own. Deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    x = windows.features.astype(np.float64)
    if x.ndim != 3 or not len(x):
        return windows.features
    if background is not None and len(background):
        other = background[rng.integers(len(background), size=len(x))].astype(np.float64)
        power, noise = 10 ** (x / 10), 10 ** (other / 10)
        snr_db = rng.uniform(*aug.background_snr_db, size=len(x))
        gain = power.mean(axis=(1, 2)) / (noise.mean(axis=(1, 2)) + 1e-20) * 10 ** (-snr_db / 10)
        x = 10 * np.log10(power + gain[:, None, None] * noise + 1e-20)
    x = x + aug.gain_shift(rng.uniform(*aug.gain_db, size=len(x))[:, None, None])
    return x.astype(np.float32)


def balanced_sample_weights(truth: np.ndarray) -> np.ndarray:
    """float32 ``[n]``: ``n / (k * count_g)`` for a window of group ``g``, ``k`` groups present, so
    every group weighs alike. A window's group is its class (``truth``: ``[n, n_classes]``
    multi-hot, or ``[n]`` class indices with -1 for none); windows of no class (background) are a
    group of their own, and so are windows of several classes."""
    truth = np.asarray(truth)
    if truth.ndim == 1:
        keys = truth.astype(np.int64)
    else:
        present = truth.sum(axis=1)
        keys = np.where(present == 0, -1, np.where(present == 1, truth.argmax(axis=1), -2))
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return (len(keys) / (len(counts) * counts[inverse])).astype(np.float32)


def spectral_config(dataset: dict):
    """The FeatureConfig of a dataset of dB spectral windows (log-mel or MFCC), or ``None`` (embeddings,
    or features without dB values): what augmentation in dB and the level gates need."""
    from soundshard.schemas.config import FeatureConfig
    from soundshard.schemas.fields import FEATURE_COLUMN

    if dataset.get("feature_column", FEATURE_COLUMN) != FEATURE_COLUMN:
        return None
    config = FeatureConfig.from_dict(dataset["feature_config"])
    return config if config.log_compression == "db" else None


def read_dataset_json(data_dir: str) -> dict:
    """The dataset description of a features output (raises ConfigError naming the path when
    there is none).

    For an incremental output (nightly runs) this is every committed night with the latest
    night's features together (:func:`ledger.nightly_dataset`), not the latest night alone; the
    nights read are listed under ``nights``.
    """
    import fsspec

    from soundshard.transforms.io import ledger

    path = data_dir.rstrip("/") + "/dataset.json"
    try:
        with fsspec.open(path, "rt") as f:
            dataset = json.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"--features {data_dir!r} has no dataset.json: not a soundshard features output"
        ) from exc
    if not dataset.get("incremental"):
        return dataset
    try:
        return ledger.nightly_dataset(data_dir)
    except ValueError as exc:
        raise ConfigError(f"--features {data_dir!r}: {exc}") from exc


def read_window_table(data_dir: str, dataset: dict, *, columns: Sequence[str] | None = None) -> pa.Table:
    """The window rows of a features output's Parquet shards, in shard order (rows that a later
    night replaced left out; see :func:`read_dataset_json`).

    Raises:
        ConfigError: no Parquet shards (the TFRecord-only layout is read by ``tfrecord_dataset``).
    """
    import pyarrow.parquet as pq

    from soundshard.transforms.io import ledger

    entries = dataset.get("shards", {}).get("parquet")
    if not entries:
        raise ConfigError(
            f"--features {data_dir!r} has no Parquet shards (write them with --format parquet or both)"
        )
    superseded = dataset.get("superseded", {})
    wanted = None if columns is None else sorted(set(columns) | ({"source_uri"} if superseded else set()))
    tables = []
    for entry in entries:
        name, run_id = (entry["path"], entry.get("run_id")) if isinstance(entry, dict) else (entry, None)
        table = pq.read_table(data_dir.rstrip("/") + "/" + name, columns=wanted)
        tables.append(ledger.current_rows(table, run_id=run_id, superseded=superseded))
    table = pa.concat_tables(tables, promote_options="default")
    return table if columns is None else table.select(list(columns))


def load_windows(data_dir: str, dataset: dict, *, labelled: bool = True) -> WindowSet:
    """Every window of a features output, from its Parquet shards (all in memory).

    Labels are read by name against ``dataset["label_map"]`` (nights of an incremental output
    each number their own labels); with ``labelled=False`` every window is unlabelled (``-1``, no
    strong targets), as background data is, whatever labels it was computed with.

    Raises:
        ConfigError: no Parquet shards (the TFRecord-only layout is read by ``tfrecord_dataset``).
    """
    table, features = fields.split_features(read_window_table(data_dir, dataset))
    folds = table.column("fold").to_numpy(zero_copy_only=False)
    splits = table.column("split").to_pylist()
    augmented = None
    if "augmentation" in table.column_names:
        augmented = np.asarray([a is not None for a in table.column("augmentation").to_pylist()], bool)
    label_map = dataset.get("label_map", {}) if labelled else {}
    labels = np.asarray([label_map.get(name, -1) for name in table.column("label").to_pylist()], np.int32)
    targets = strong = None
    if labelled and "strong" in table.column_names:
        strong = np.asarray(table.column("strong").fill_null(False).to_pylist(), bool)
        if strong.any():
            targets = fields.multi_hot(table, label_map)
        else:
            strong = None
    return WindowSet(
        features=np.ascontiguousarray(features, dtype=np.float32),
        labels=labels,
        clip_ids=np.asarray(table.column("clip_id").to_pylist(), dtype=object),
        folds=np.nan_to_num(folds.astype(np.float64), nan=-1).astype(np.int32),
        splits=np.asarray([s or "" for s in splits], dtype=object),
        augmented=augmented,
        targets=targets,
        strong=strong,
        times=_window_times(table),
        silence_rule=silence_rule(spectral_config(dataset) if "feature_config" in dataset else None),
    )


def _window_times(table: pa.Table) -> np.ndarray | None:
    """``[n, 3]`` window index, start and end (s) of each row, or ``None`` without those columns."""
    names = ("window_index", "start_s", "end_s")
    if not set(names) <= set(table.column_names):
        return None
    columns = [table.column(name).to_numpy(zero_copy_only=False) for name in names]
    return np.stack(columns, axis=1).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Split:
    """Which windows train, validate and test a model, by predefined fold or split name."""

    train: WindowSet
    validation: WindowSet
    test: WindowSet
    description: dict


def held_out_name(description: dict) -> str:
    """What a split (``Split.description``) tests on, in words: ``fold 4`` or ``split 'test'``."""
    if description.get("by") == "fold":
        return f"fold {description.get('test_fold')}"
    return f"split {description.get('test', 'test')!r}"


def split_by_fold(windows: WindowSet, *, test_fold: int, validation_fold: int | None = None) -> Split:
    """Test on ``test_fold``, validate on ``validation_fold`` (default: the next fold, cyclically),
    train on the other folds.

    Raises:
        ConfigError: the dataset has no folds, or a named fold is not in it, or a part is empty.
    """
    folds = sorted(set(windows.folds.tolist()) - {-1})
    if not folds:
        raise ConfigError("the dataset has no folds (no fold column in its manifest); use --split-column")
    if test_fold not in folds:
        raise ConfigError(f"--test-fold {test_fold} is not a fold of the dataset; folds: {folds}")
    if validation_fold is None:
        validation_fold = folds[(folds.index(test_fold) + 1) % len(folds)]
    if validation_fold not in folds or validation_fold == test_fold:
        raise ConfigError(
            f"--validation-fold {validation_fold} must be a fold of the dataset other than the test fold; "
            f"folds: {folds}"
        )
    labelled = windows.usable
    held_out = labelled & windows.originals  # never validate or test on augmented copies
    train_mask = labelled & ~np.isin(windows.folds, [test_fold, validation_fold, -1])
    parts = Split(
        train=windows.take(train_mask),
        validation=windows.take(held_out & (windows.folds == validation_fold)),
        test=windows.take(held_out & (windows.folds == test_fold)),
        description={
            "by": "fold",
            "test_fold": test_fold,
            "validation_fold": validation_fold,
            "train_folds": [f for f in folds if f not in (test_fold, validation_fold)],
        },
    )
    _check_split(parts)
    return parts


def split_by_name(
    windows: WindowSet, *, train: str = "train", validation: str = "validation", test: str = "test"
):
    """Train, validate and test on the windows of the named splits.

    Raises:
        ConfigError: a named split is absent or empty.
    """
    present = sorted(set(windows.splits.tolist()) - {""})
    for name in (train, validation, test):
        if name not in present:
            raise ConfigError(f"split {name!r} is not in the dataset; splits: {present}")
    labelled = windows.usable
    held_out = labelled & windows.originals
    parts = Split(
        train=windows.take(labelled & (windows.splits == train)),
        validation=windows.take(held_out & (windows.splits == validation)),
        test=windows.take(held_out & (windows.splits == test)),
        description={"by": "split", "train": train, "validation": validation, "test": test},
    )
    _check_split(parts)
    return parts


def _check_split(parts: Split) -> None:
    for name in ("train", "validation", "test"):
        if len(getattr(parts, name)) == 0:
            raise ConfigError(f"the {name} part of {parts.description} has no labelled windows")
    # a copy's clip id is its original's plus "~<augmentation>"
    train_clips = {
        str(c).rsplit(augment.COPY_SEPARATOR, 1)[0] if a else c
        for c, a in zip(parts.train.clip_ids, ~parts.train.originals, strict=True)
    }
    overlap = train_clips & (set(parts.test.clip_ids) | set(parts.validation.clip_ids))
    if overlap:  # folds come from the manifest: a clip in two folds is a manifest error
        raise ConfigError(f"clips in both training and held-out data: {sorted(overlap)[:5]}")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """On-the-fly augmentation of training windows (log-mel ``[n_mels, n_frames]``).

    Attributes:
        time_shift_frames: Shift each window by up to this many frames either way (the frames
            shifted in repeat the edge frame): the window position varies.
        noise_prob: Probability of adding noise to a window.
        noise_snr_db: ``(low, high)`` signal-to-noise ratio of the added noise, in dB relative to
            the window's peak power, drawn uniformly.
        spec_augment_masks: Frequency masks and time masks per window (SpecAugment).
        freq_mask_bands: Maximum width of a frequency mask in mel bands.
        time_mask_frames: Maximum width of a time mask in frames.
        mixup_alpha: Beta(alpha, alpha) mixing of pairs of windows and their labels; 0 is off.
        background_mix_prob: Probability of adding a random window of the background data (site
            ambience, other sounds: ``train --background``) to a training window, as a recording
            of the sound over that background would sound (powers add). Only with background data.
        background_snr_db: ``(low, high)`` ratio of the window's mean power to the added
            background's, in dB, drawn uniformly.
        gain_db: ``(low, high)`` gain applied to every training window (after any background is
            mixed in), in dB, drawn uniformly: log-mel values are absolute levels, and the same
            sound is recorded louder or quieter than in the training clips.
        gain_profile: How a gain of 1 dB moves each feature row: ``None`` for log-mels in dB (every
            value by 1 dB); for MFCC ``sqrt(n_mels)`` on the first coefficient and 0 elsewhere (the
            orthonormal DCT of a constant shift). See :func:`for_features`.
    """

    time_shift_frames: int = 4
    noise_prob: float = 0.3
    noise_snr_db: tuple[float, float] = (10.0, 40.0)
    spec_augment_masks: int = 1
    freq_mask_bands: int = 8
    time_mask_frames: int = 6
    mixup_alpha: float = 0.2
    background_mix_prob: float = 0.5
    background_snr_db: tuple[float, float] = (0.0, 25.0)
    gain_db: tuple[float, float] = (0.0, 0.0)
    gain_profile: tuple[float, ...] | None = None

    @classmethod
    def none(cls) -> Augmentation:
        """No augmentation at all."""
        return cls(0, 0.0, (10.0, 40.0), 0, 0, 0, 0.0, 0.0, (0.0, 25.0), (0.0, 0.0))

    def gain_shift(self, gain_db):
        """The change of a window ``[rows, frames]`` at a gain of ``gain_db`` (broadcastable)."""
        if self.gain_profile is None:
            return gain_db
        return gain_db * np.asarray(self.gain_profile, np.float32)[:, None]


def for_features(aug: Augmentation, config) -> Augmentation:
    """``aug`` as it applies to windows of ``config`` (a FeatureConfig, or ``None`` for embeddings,
    which are never augmented in feature space). Log-mel windows in dB take all of it. MFCC windows
    are not powers per band: added noise, background mixing (powers add) and frequency masks (mel
    bands) have no MFCC equivalent and are off; time shift, time masks, mixup and gain (a shift of
    the first coefficient) stay."""
    if config is None or config.feature_type != "mfcc":
        return aug
    profile = np.zeros(config.feature_rows)
    profile[0] = np.sqrt(config.n_mels)
    return dataclasses.replace(
        aug,
        noise_prob=0.0,
        freq_mask_bands=0,
        background_mix_prob=0.0,
        gain_profile=tuple(float(v) for v in profile),
    )


def augment_batch(x, *, aug: Augmentation, seed):
    """A batch of log-mel windows ``[b, n_mels, n_frames]`` (dB), each window augmented with draws
    of its own: time shift, noise, SpecAugment masks (TensorFlow ops on the whole batch; stateless
    RNG, so one ``seed`` gives one result)."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 8)
    b = tf.shape(x)[0]
    n_mels, n_frames = x.shape[1], x.shape[2]
    per_window = tf.stack([b, 1, 1])
    if aug.time_shift_frames:
        k = aug.time_shift_frames
        shift = tf.random.stateless_uniform(tf.stack([b, 1]), seeds[0], -k, k + 1, dtype=tf.int32)
        index = tf.clip_by_value(tf.range(n_frames)[None, :] - shift, 0, n_frames - 1)
        x = tf.gather(x, index, axis=2, batch_dims=1)
    if aug.noise_prob > 0:
        power = tf.pow(10.0, x / 10.0)
        low, high = aug.noise_snr_db
        snr_db = tf.random.stateless_uniform(per_window, seeds[1], low, high)
        noise = tf.reduce_max(power, axis=[1, 2], keepdims=True) * tf.pow(10.0, -snr_db / 10.0)
        # |white noise|^2 per bin: exponential, drawn as -log(1 - U) (a gamma sampler is 10x slower)
        noise = noise * -tf.math.log1p(-tf.random.stateless_uniform(tf.shape(x), seeds[2]))
        noisy = 10.0 * tf.math.log(power + noise) / tf.math.log(10.0)
        apply = tf.random.stateless_uniform(per_window, seeds[3]) < aug.noise_prob
        x = tf.where(apply, noisy, x)
    for m in range(aug.spec_augment_masks):
        fill = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        s = tf.random.experimental.stateless_split(seeds[4 + (m % 4)], 4)
        width = tf.random.stateless_uniform(per_window, s[0], 0, aug.freq_mask_bands + 1, dtype=tf.int32)
        start = tf.random.stateless_uniform(per_window, s[1], 0, n_mels, dtype=tf.int32)
        bands = tf.range(n_mels)[None, :, None]
        x = tf.where((bands >= start) & (bands < start + width), fill, x)
        width = tf.random.stateless_uniform(per_window, s[2], 0, aug.time_mask_frames + 1, dtype=tf.int32)
        start = tf.random.stateless_uniform(per_window, s[3], 0, n_frames, dtype=tf.int32)
        frames = tf.range(n_frames)[None, None, :]
        x = tf.where((frames >= start) & (frames < start + width), fill, x)
    return x


def mix_background(x, background, *, snr_db):
    """Log-mel windows (dB; one ``[rows, frames]`` or a batch ``[b, rows, frames]``) with
    background windows of the same shape added at ``snr_db`` (the ratio of each pair's mean
    powers; a scalar or ``[b, 1, 1]``): powers add, as they do when the sound is recorded over the
    background."""
    import tensorflow as tf

    power, other = tf.pow(10.0, x / 10.0), tf.pow(10.0, background / 10.0)
    mean = functools.partial(tf.reduce_mean, axis=[-2, -1], keepdims=True)
    gain = mean(power) / (mean(other) + 1e-20) * tf.pow(10.0, -snr_db / 10.0)
    return 10.0 * tf.math.log(power + gain * other + 1e-20) / tf.math.log(10.0)


def training_dataset(
    windows: WindowSet,
    *,
    n_classes: int,
    batch_size: int,
    seed: int,
    aug: Augmentation,
    class_weights: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    sample_weights: np.ndarray | None = None,
    background: np.ndarray | None = None,
):
    """Shuffled, augmented, batched ``(features, targets[, sample weights])`` for ``fit``.

    Augmentation runs on whole batches (:func:`augment_batch`, one seed per batch, draws per
    window): one call of a few TensorFlow ops per batch instead of per window. Mixup mixes each
    batch with a shuffled copy of itself (targets and weights mixed alike).

    Args:
        windows: The training windows.
        n_classes: Classes (targets are their one-hot rows unless ``targets`` is given).
        batch_size: Windows per batch.
        seed: Seed of shuffling and augmentation.
        aug: The augmentation.
        class_weights: ``[n_classes]``: each window weighs its class's weight (``None``: alike).
        targets: float32 ``[n, width]`` targets instead of the one-hot rows of ``windows.labels``.
        sample_weights: float32 ``[n]`` weights instead of ``class_weights``.
        background: float32 ``[m, *window]`` windows mixed into training windows with probability
            ``aug.background_mix_prob`` (:func:`mix_background`), or ``None``.
    """
    import tensorflow as tf

    if targets is None:
        targets = np.eye(n_classes, dtype=np.float32)[windows.labels]
    if sample_weights is None and class_weights is not None:
        sample_weights = np.asarray(class_weights, np.float32)[windows.labels]
    weighted = sample_weights is not None
    columns = (windows.features, targets) + ((sample_weights,) if weighted else ())
    data = tf.data.Dataset.from_tensor_slices(columns)
    data = data.shuffle(len(windows), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size, drop_remainder=len(windows) >= batch_size)
    counter = tf.data.Dataset.counter(start=seed * 1_000_003).map(lambda i: tf.stack([i, i * 7 + 1]))
    spectral = windows.features.ndim == 3
    mixing = background is not None and len(background) > 0 and aug.background_mix_prob > 0 and spectral
    if mixing:
        others = tf.data.Dataset.from_tensor_slices(background).shuffle(len(background), seed=seed + 1)
        others = others.repeat().batch(batch_size)
        data = tf.data.Dataset.zip((data, counter, others))
    else:
        data = tf.data.Dataset.zip((data, counter))

    def per_batch(batch, s, others=None):
        x = batch[0]
        if spectral:
            b = tf.shape(x)[0]
            per_window = tf.stack([b, 1, 1])
            if mixing:
                seeds = tf.random.experimental.stateless_split(s + 11, 2)
                low, high = aug.background_snr_db
                snr_db = tf.random.stateless_uniform(per_window, seeds[0], low, high)
                apply = tf.random.stateless_uniform(per_window, seeds[1]) < aug.background_mix_prob
                x = tf.where(apply, mix_background(x, others[:b], snr_db=snr_db), x)
            if aug.gain_db != (0.0, 0.0):
                low, high = aug.gain_db
                gain_seed = tf.random.experimental.stateless_split(s + 17, 1)[0]
                x = x + aug.gain_shift(tf.random.stateless_uniform(per_window, gain_seed, low, high))
            x = augment_batch(x, aug=aug, seed=s)
        batch = (x, *batch[1:])
        return mixup(batch, s + 5) if aug.mixup_alpha > 0 else batch

    def mixup(batch, s):
        x = batch[0]
        n = tf.shape(x)[0]
        alpha = aug.mixup_alpha
        g1 = tf.random.stateless_gamma([n], s, alpha=alpha)
        g2 = tf.random.stateless_gamma([n], s + 1, alpha=alpha)
        lam = g1 / (g1 + g2 + 1e-12)
        order = tf.argsort(tf.random.stateless_uniform([n], s + 2))
        lam_x = tf.reshape(lam, [-1] + [1] * (len(x.shape) - 1))
        mixed = [lam_x * x + (1 - lam_x) * tf.gather(x, order)]
        mixed.append(lam[:, None] * batch[1] + (1 - lam[:, None]) * tf.gather(batch[1], order))
        if weighted:
            mixed.append(lam * batch[2] + (1 - lam) * tf.gather(batch[2], order))
        return tuple(mixed)

    # A sequential map: one call per batch, and TF 2.21's parallel map logs an error line per
    # epoch about an attribute its own runtime does not know.
    return data.map(per_batch).prefetch(tf.data.AUTOTUNE)


def resolve_precision(precision: str, *, gpus: int, distributed: bool = False) -> str:
    """The Keras dtype policy of ``TrainConfig.precision`` on a machine with ``gpus`` GPUs:
    ``mixed_float16`` for ``mixed``, and for ``auto`` where a GPU trains (not under a multi-worker
    strategy, whose custom loop does not scale the loss); ``float32`` otherwise.

    Raises:
        ConfigError: ``mixed`` under a multi-worker strategy.
    """
    if precision == "mixed" and distributed:
        raise ConfigError("--precision mixed is for training on one worker (its loss is scaled by fit)")
    if precision == "mixed" or (precision == "auto" and gpus > 0 and not distributed):
        return "mixed_float16"
    return "float32"


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras' global dtype policy set to ``name`` while models are built (their layers keep the
    policy they were built with), restored afterwards."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


class WeightAverage:
    """Exponential moving average of a model's trainable weights, taken once per epoch:
    ``average = d * average + (1 - d) * weights`` with ``d = min(decay, (1 + t) / (2 + t))`` at
    the ``t``-th update (the first epochs' weights fade quickly).

    Early stopping judges, and keeps, the averaged weights. On a small dataset the validation
    score of the raw weights swings by several clips from one epoch to the next, and the epoch
    that happens to score best is a lucky draw rather than the best model; the average moves
    slowly and generalises better (Polyak averaging). Batch-norm statistics are not averaged:
    those of the current epoch go with the averaged weights (averages of statistics measured
    while the weights moved fast, in the first epochs, describe no network).
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"weight average decay={decay} must be in [0, 1)")
        self.decay = decay
        self.updates = 0
        self._average: list[np.ndarray] | None = None

    def update(
        self, weights: Sequence[np.ndarray], *, averaged: Sequence[bool] | None = None
    ) -> list[np.ndarray]:
        """Folds in this epoch's weights; returns the average (each array in its own dtype).

        ``averaged`` marks the weights to average (default: all); the others are returned as
        given (e.g. batch-norm statistics, which must match the weights of now).
        """
        decay = min(self.decay, (1.0 + self.updates) / (2.0 + self.updates))
        if self._average is None:
            self._average = [np.array(w, dtype=np.float64) for w in weights]
        else:
            for average, w in zip(self._average, weights, strict=True):
                average *= decay
                average += (1.0 - decay) * np.asarray(w, dtype=np.float64)
        self.updates += 1
        if averaged is None:
            averaged = [True] * len(weights)
        return [
            _as_dtype(a, np.asarray(w).dtype) if keep else np.asarray(w)
            for a, w, keep in zip(self._average, weights, averaged, strict=True)
        ]


def trainable_mask(model) -> list[bool]:
    """Per entry of ``model.get_weights()``: whether it is a trainable weight."""
    trainable = {id(v) for v in model.trainable_weights}
    return [id(v) in trainable for v in model.weights]


def _as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` in ``dtype``, rounded to the nearest integer for integer types."""
    return (np.rint(values) if np.issubdtype(dtype, np.integer) else values).astype(dtype)


def predict(model, features: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """``model``'s outputs for ``features``, ``batch_size`` windows per call.

    ``predict_on_batch`` on slices rather than ``model.predict``: Keras feeds ``predict`` through a
    tf.data pipeline whose parallel map, with op determinism on (as in training), makes TensorFlow
    log an error line about an attribute its own runtime does not know, once per call. Every slice
    is ``batch_size`` windows (the last padded with zeros, its padding's outputs dropped), so a
    model's predict function is traced once, whatever the number of windows of each call.
    """
    n = len(features)
    if n == 0:
        return np.zeros((0, *model.output_shape[1:]), np.float32)
    outputs = []
    for i in range(0, n, batch_size):
        part = features[i : i + batch_size]
        if len(part) < batch_size:
            part = np.concatenate([part, np.zeros((batch_size - len(part), *part.shape[1:]), part.dtype)])
        outputs.append(np.asarray(model.predict_on_batch(part))[: min(batch_size, n - i)])
    return np.concatenate(outputs)


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (k * count_c)`` per class (1.0 for classes without windows)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 1.0)
    return weights.astype(np.float32)


def silence_rule(config) -> str:
    """How digital silence shows in windows of ``config`` (a FeatureConfig or ``None``): ``"window"``
    (log-mel: every value equal) or ``"frames"`` (MFCC: every frame equal, the DCT of identical
    log-mel frames)."""
    return "frames" if config is not None and config.feature_type == "mfcc" else "window"


def silent_windows(features: np.ndarray, *, rule: str = "window") -> np.ndarray:
    """bool ``[n_windows]``: windows without any signal (digital silence gives a constant log-mel
    window, e.g. the zero padding of short clips): with ``rule="window"`` every value equal, with
    ``"frames"`` (MFCC) every row constant over the frames. Vectors (embeddings) are never taken
    for silent here."""
    if features.ndim < 3 or len(features) == 0:
        return np.zeros(len(features), bool)
    if rule == "frames":
        return (features.max(axis=2) == features.min(axis=2)).all(axis=1)
    flat = features.reshape(len(features), -1)
    return flat.max(axis=1) == flat.min(axis=1)


def aggregate(
    probabilities: np.ndarray,
    clip_ids: Sequence[str],
    *,
    method: str = "mean",
    silent: np.ndarray | None = None,
):
    """Clip-level probabilities from window probabilities.

    Args:
        probabilities: float ``[n_windows, n_classes]``.
        clip_ids: ``[n_windows]`` clip of each window.
        method: ``mean`` (average), ``max`` (per class maximum, renormalised) or ``majority``
            (share of the clip's windows whose top class is each class).
        silent: bool ``[n_windows]`` (:func:`silent_windows`): these windows take no part in
            their clip's probabilities, unless every window of the clip is silent. A silent
            window says nothing about the sound, whatever a model makes of it.

    Returns:
        ``(clips, clip_probabilities)``: sorted unique clip ids and ``[n_clips, n_classes]``.
    """
    if method not in AGGREGATIONS:
        raise ConfigError(f"aggregation={method!r} is not one of {AGGREGATIONS}")
    clips, inverse = np.unique(np.asarray(clip_ids, dtype=object).astype(str), return_inverse=True)
    n_classes = probabilities.shape[1]
    if silent is not None and silent.any():
        sounding = np.bincount(inverse, weights=~silent, minlength=len(clips)) > 0
        keep = ~silent | ~sounding[inverse]
        probabilities, inverse = probabilities[keep], inverse[keep]
    if method == "majority":
        values = np.eye(n_classes)[probabilities.argmax(axis=1)]
    else:
        values = probabilities.astype(np.float64)
    counts = np.bincount(inverse, minlength=len(clips))[:, None]
    if method == "max":
        out = np.full((len(clips), n_classes), -np.inf)
        np.maximum.at(out, inverse, values)
        out = out / out.sum(axis=1, keepdims=True)
    else:
        out = np.zeros((len(clips), n_classes))
        np.add.at(out, inverse, values)
        out = out / counts
    return clips, out


def clip_accuracy(probabilities: np.ndarray, windows: WindowSet, *, method: str = "mean") -> float:
    """Share of ``windows``' clips whose aggregated top class is their label (silent windows left
    out of their clips, as everywhere)."""
    _, truth = clip_labels(windows.labels, windows.clip_ids)
    _, clip_probs = aggregate(probabilities, windows.clip_ids, method=method, silent=windows.silent)
    return float((clip_probs.argmax(axis=1) == truth).mean())


def judged(select_on: str, validation: WindowSet) -> str:
    """What early stopping judges for ``select_on`` on this validation data: ``recordings`` (the
    strongly labelled recordings' window ranking), ``clips`` (the weakly labelled clips' accuracy)
    or ``windows`` (the ranking of all windows, when there are neither).

    Raises:
        ValueError: ``recordings`` without strongly labelled validation windows.
    """
    strong = validation.strongly_labelled.any()
    if select_on == "recordings" and not strong:
        raise ValueError("select_on='recordings' needs strongly labelled validation recordings")
    if select_on == "recordings" or (select_on == "auto" and strong):
        return "recordings"
    return "clips" if validation.weak.any() else "windows"


def selection_score(
    probabilities: np.ndarray, validation: WindowSet, *, aggregation: str, select_on: str = "auto"
) -> float:
    """What early stopping maximises (``TrainConfig.select_on``): the clip accuracy of the weakly
    labelled validation clips, or the mean average precision over classes of the windows of the
    strongly labelled validation recordings (background windows are their negatives).

    ``clips`` falls back to the mean average precision of all windows when the validation data
    has no weakly labelled clip; ``auto`` judges the recordings when there are any.

    Raises:
        ValueError: ``recordings`` without strongly labelled validation windows.
    """
    from soundshard.transforms.tagging import events

    what = judged(select_on, validation)
    if what == "recordings":
        strong = validation.strongly_labelled
        truth = validation.take(strong).truth(probabilities.shape[1])
        return events.mean_average_precision(probabilities[strong], truth)
    if what == "clips":
        weak = validation.weak
        return clip_accuracy(probabilities[weak], validation.take(weak), method=aggregation)
    return events.mean_average_precision(probabilities, validation.truth(probabilities.shape[1]))


def clip_labels(labels: np.ndarray, clip_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(clips, labels)`` per clip (a clip's windows share its label)."""
    clips, first = np.unique(np.asarray(clip_ids, dtype=object).astype(str), return_index=True)
    return clips, labels[first]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix."""
    n = len(label_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(n), where=actual > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0
    )
    per_class = {
        name: {
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(actual[i]),
        }
        for i, name in enumerate(label_names)
    }
    present = actual > 0
    return {
        "accuracy": round(float(true_pos.sum() / max(1, confusion.sum())), 4),
        "macro_f1": round(float(f1[present].mean()) if present.any() else 0.0, 4),
        "n": int(confusion.sum()),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def evaluate_predictions(probabilities: np.ndarray, windows: WindowSet, label_names: Sequence[str]) -> dict:
    """Window metrics and clip metrics for every aggregation method (silent windows count in the
    window metrics, not in their clips')."""
    result = {"window": classification_metrics(windows.labels, probabilities.argmax(axis=1), label_names)}
    clips, truth = clip_labels(windows.labels, windows.clip_ids)
    for method in AGGREGATIONS:
        agg_clips, clip_probs = aggregate(
            probabilities, windows.clip_ids, method=method, silent=windows.silent
        )
        assert np.array_equal(agg_clips, clips)
        result[f"clip_{method}"] = classification_metrics(truth, clip_probs.argmax(axis=1), label_names)
    return result


# -- knowledge distillation ----------------------------------------------------------------------


def teacher_targets(probabilities: np.ndarray, *, head: str, background: bool) -> np.ndarray:
    """float32 soft targets of a student from a teacher model folder's outputs.

    Args:
        probabilities: ``[n, n_classes]`` the teacher's saved outputs (a softmax model trained with
            background data gives the classes' share only: the rest is the background's).
        head: The student's (and teacher's) head, ``softmax`` or ``sigmoid``.
        background: The student has a background output (softmax): ``[p, 1 - sum p]``; without
            one the classes' probabilities are renormalised to sum to one.
    """
    p = np.clip(np.asarray(probabilities, np.float64), 0.0, 1.0)
    if head == "sigmoid":
        return p.astype(np.float32)
    if background:
        rest = np.clip(1.0 - p.sum(axis=1, keepdims=True), 0.0, 1.0)
        p = np.concatenate([p, rest], axis=1)
    return (p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)).astype(np.float32)


def tempered(targets: np.ndarray, *, temperature: float, head: str) -> np.ndarray:
    """Soft targets at ``temperature`` (Hinton et al. 2015): the softmax of ``log(p) / T`` over the
    outputs (softmax head), or per class the sigmoid of ``logit(p) / T`` (sigmoid head), computed
    from probabilities so that any teacher's saved outputs serve."""
    p = np.clip(np.asarray(targets, np.float64), 1e-12, 1.0)
    if head == "sigmoid":
        q, r = p ** (1.0 / temperature), np.clip(1.0 - p, 1e-12, 1.0) ** (1.0 / temperature)
        return (q / (q + r)).astype(np.float32)
    logits = np.log(p) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def align_by_time(
    student: WindowSet, teacher: WindowSet, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A teacher's per-window ``values`` (``[m, k]``, for ``teacher``'s windows) carried to
    ``student``'s windows of the same clip: the mean over the teacher windows that overlap each
    student window in time, weighted by the overlap (the nearest teacher window where none
    overlaps), so windows of other lengths and hops (an embedding model's) map onto log-mel ones.

    Returns:
        ``(values [n, k], matched [n] bool)``: rows of student windows whose clip the teacher has
        no window of are zeros and unmatched.
    """
    if student.times is None or teacher.times is None:
        raise ConfigError("the teacher's data and the training data need window start and end times")
    out = np.zeros((len(student), values.shape[1]), np.float32)
    matched = np.zeros(len(student), bool)
    by_clip: dict[str, list[int]] = {}
    for i, clip in enumerate(teacher.clip_ids):
        by_clip.setdefault(clip, []).append(i)
    rows_of: dict[str, list[int]] = {}
    for i, clip in enumerate(student.clip_ids):
        if clip in by_clip:
            rows_of.setdefault(clip, []).append(i)
    for clip, rows in rows_of.items():
        t = np.asarray(by_clip[clip])
        s = np.asarray(rows)
        t_start, t_end = teacher.times[t, 1], teacher.times[t, 2]
        s_start, s_end = student.times[s, 1], student.times[s, 2]
        overlap = np.clip(
            np.minimum(s_end[:, None], t_end[None, :]) - np.maximum(s_start[:, None], t_start[None, :]),
            0.0,
            None,
        )
        none = overlap.sum(axis=1) == 0
        if none.any():
            centre = (s_start[none] + s_end[none])[:, None] / 2 - (t_start + t_end)[None, :] / 2
            overlap[np.flatnonzero(none), np.abs(centre).argmin(axis=1)] = 1.0
        weights = overlap / overlap.sum(axis=1, keepdims=True)
        out[s] = weights @ values[t]
        matched[s] = True
    return out, matched


def distillation_model(student, *, temperature: float, head: str):
    """A model for training ``student`` on labels and a teacher's soft targets together: its one
    output is the student's probabilities followed by the same logits' probabilities at
    ``temperature``. It shares every weight with ``student`` (which alone is saved)."""
    import keras

    layers = keras.layers
    logits = student.get_layer("logits").output
    # float32 under any policy, as the student's head (architectures.build_model)
    scaled = layers.Rescaling(1.0 / temperature, name="temperature", dtype="float32")(logits)
    soft = (
        layers.Softmax(name="soft", dtype="float32")(scaled)
        if head == "softmax"
        else layers.Activation("sigmoid", dtype="float32")(scaled)
    )
    joined = layers.Concatenate(name="distillation", dtype="float32")([student.output, soft])
    return keras.Model(student.input, joined, name=f"{student.name}_distillation")


def distillation_loss(
    width: int, *, weight: float, temperature: float, head: str, label_smoothing: float = 0.0
):
    """Loss of :func:`distillation_model`: targets are ``[labels (width), teacher's tempered
    soft targets (width)]``; ``(1 - weight) * CE(labels, p) + weight * T^2 * CE(soft, p_T)`` with
    categorical (softmax head) or per-class binary (sigmoid head) cross-entropy. ``T^2`` keeps the
    soft part's gradients at the scale of the hard part's (Hinton et al. 2015). ``label_smoothing``
    smooths the labels of the hard part (the soft targets are soft already)."""
    import keras

    entropy = keras.losses.categorical_crossentropy if head == "softmax" else keras.losses.binary_crossentropy

    def loss(y_true, y_pred):
        hard = entropy(y_true[:, :width], y_pred[:, :width], label_smoothing=label_smoothing)
        soft = entropy(y_true[:, width:], y_pred[:, width:])
        return (1.0 - weight) * hard + weight * temperature**2 * soft

    return loss
