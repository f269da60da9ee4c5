"""Multi-worker data-parallel training (``tf.distribute.MultiWorkerMirroredStrategy``; no Beam).

Every worker runs the same ``soundshard train`` command with its own index. The cluster comes from
``--workers host:port,... --worker-index i`` or from ``TF_CONFIG`` (never both). Worker 0 (the
``chief`` task when ``TF_CONFIG`` names one) is the chief: it alone writes the model folder.

Each worker loads the whole training split (it is small next to the audio, and the normalisation
statistics and class weights must be the same everywhere) but trains on its own share only: the
training windows ``i, i + k, i + 2k, ...`` for worker ``i`` of ``k``, taken before batching, with
a per-worker batch of ``global batch / k``. TensorFlow's auto-sharding is turned off so the data is
not sharded a second time. Gradients are all-reduced every step; batch-normalisation moving
statistics, which Keras 3 keeps per worker, are averaged over the workers after every epoch.

Keras 3's ``Model.fit`` fails under ``MultiWorkerMirroredStrategy`` (it reduces a per-replica
batch across workers while building the model and cannot convert it), so :func:`fit` is a custom
loop around the same Keras model, compiled loss and optimizer: ``strategy.run`` per step, the
optimizer all-reducing the gradients itself. Every collective is issued by every worker in the
same order, and early stopping decides from the chief's validation clip accuracy shared by an
all-gather, so all workers stop at the same epoch (a worker that stopped alone would leave the
others waiting in a collective for ever).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from soundshard.schemas.errors import ConfigError
from soundshard.transforms.models import training

TF_CONFIG = "TF_CONFIG"
#: Task types of TF_CONFIG that MultiWorkerMirroredStrategy runs, in their global order.
JOB_ORDER = ("chief", "worker")
_DIGEST_MASK = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """The training cluster and this process's place in it.

    Attributes:
        jobs: ``((task_type, (host:port, ...)), ...)`` in :data:`JOB_ORDER`.
        task_type: This process's task type (``worker``, or ``chief``).
        task_id: This process's index within its task type.
        source: Where the cluster came from: ``flags`` or ``TF_CONFIG``.
    """

    jobs: tuple[tuple[str, tuple[str, ...]], ...]
    task_type: str
    task_id: int
    source: str

    def __post_init__(self):
        names = [name for name, _ in self.jobs]
        if not names or any(name not in JOB_ORDER for name in names):
            raise ConfigError(f"cluster jobs {names} must be 'worker' (and optionally one 'chief')")
        addresses = self.workers
        if len(set(addresses)) != len(addresses):
            raise ConfigError(f"cluster addresses {list(addresses)} name a host:port twice")
        tasks = dict(self.jobs)
        if self.task_type not in tasks:
            raise ConfigError(f"task type {self.task_type!r} is not in the cluster's jobs {names}")
        if not 0 <= self.task_id < len(tasks[self.task_type]):
            raise ConfigError(
                f"task index {self.task_id} is out of range for {len(tasks[self.task_type])} "
                f"{self.task_type!r} task(s)"
            )
        if len(tasks.get("chief", ())) > 1:
            raise ConfigError(f"TF_CONFIG names {len(tasks['chief'])} chief tasks; at most one")

    @property
    def workers(self) -> tuple[str, ...]:
        """Every task's address, chief first: position ``i`` is worker index ``i``."""
        return tuple(address for _, addresses in self.jobs for address in addresses)

    @property
    def n_workers(self) -> int:
        """Number of training processes."""
        return len(self.workers)

    @property
    def worker_index(self) -> int:
        """This process's position in :attr:`workers` (0 is the chief)."""
        offset = 0
        for name, addresses in self.jobs:
            if name == self.task_type:
                return offset + self.task_id
            offset += len(addresses)
        raise AssertionError("unreachable: task type checked on construction")

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the model folder."""
        return self.worker_index == 0

    def to_dict(self) -> dict:
        """JSON form, for metrics and logs."""
        return {
            "workers": list(self.workers),
            "worker_index": self.worker_index,
            "task": {"type": self.task_type, "index": self.task_id},
            "source": self.source,
        }


def parse_address(text: str, *, what: str) -> str:
    """Checks one ``host:port`` (``[v6 address]:port`` too) and returns it stripped.

    Raises:
        ConfigError: no host, or a port that is not an integer in 1..65535; names ``what``.
    """
    address = text.strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {text!r} is not host:port (port 1-65535)")
    return address


def resolve_cluster(
    *, workers: str | None, worker_index: int | None, environ: Mapping[str, str] | None = None
) -> ClusterConfig | None:
    """The cluster from ``--workers``/``--worker-index`` or else ``TF_CONFIG``; ``None`` when neither.

    Args:
        workers: ``host:port,host:port,...``, worker 0 first (``--workers``).
        worker_index: This process's index into ``workers`` (``--worker-index``).
        environ: Environment to read ``TF_CONFIG`` from (default ``os.environ``).

    Raises:
        ConfigError: flags and ``TF_CONFIG`` both given, one flag without the other, a malformed
            address or ``TF_CONFIG``, an index out of range, or task types other than chief/worker.
    """
    environ = os.environ if environ is None else environ
    tf_config = (environ.get(TF_CONFIG) or "").strip()
    if workers is not None or worker_index is not None:
        if tf_config:
            raise ConfigError(
                f"--workers/--worker-index and TF_CONFIG are both set (TF_CONFIG={_clip(tf_config)}); "
                "give the cluster one way: unset TF_CONFIG or drop the flags"
            )
        if workers is None or worker_index is None:
            given, missing = (
                ("--workers", "--worker-index") if worker_index is None else ("--worker-index", "--workers")
            )
            raise ConfigError(f"{given} needs {missing}")
        addresses = tuple(parse_address(a, what="--workers") for a in workers.split(",") if a.strip())
        if not addresses:
            raise ConfigError(f"--workers {workers!r} names no host:port")
        if not 0 <= worker_index < len(addresses):
            raise ConfigError(
                f"--worker-index {worker_index} is out of range for {len(addresses)} worker(s) in --workers"
            )
        return ClusterConfig((("worker", addresses),), "worker", worker_index, "flags")
    if not tf_config:
        return None
    try:
        spec = json.loads(tf_config)
        cluster, task = spec["cluster"], spec["task"]
        task_type, task_id = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"TF_CONFIG={_clip(tf_config)} is not JSON with 'cluster' and 'task': {{'type', 'index'}} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(cluster, dict):
        raise ConfigError(f"TF_CONFIG cluster {cluster!r} is not a mapping of task type to addresses")
    other = sorted(set(cluster) - set(JOB_ORDER))
    if other:
        raise ConfigError(
            f"TF_CONFIG task types {other} are not used by MultiWorkerMirroredStrategy "
            f"(only {list(JOB_ORDER)})"
        )
    jobs = tuple(
        (name, tuple(parse_address(str(a), what=f"TF_CONFIG cluster.{name}") for a in cluster[name]))
        for name in JOB_ORDER
        if cluster.get(name)
    )
    return ClusterConfig(jobs, task_type, task_id, "TF_CONFIG")


def _clip(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def make_strategy(cluster: ClusterConfig):
    """``MultiWorkerMirroredStrategy`` for ``cluster``; starts this worker's gRPC server.

    Call it before any other TensorFlow op runs in the process: collective ops can only be
    configured at start-up.

    Raises:
        ConfigError: TensorFlow already ran ops in this process, or the server cannot start.
    """
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({name: list(addresses) for name, addresses in cluster.jobs}),
        task_type=cluster.task_type,
        task_id=cluster.task_id,
        rpc_layer="grpc",
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except (RuntimeError, ValueError, tf.errors.OpError) as exc:
        raise ConfigError(
            f"cannot start worker {cluster.worker_index} of {list(cluster.workers)} "
            f"({type(exc).__name__}: {exc}); multi-worker training must start before any other "
            "TensorFlow op in the process"
        ) from exc


def shard_indices(n_windows: int, *, worker_index: int, n_workers: int) -> np.ndarray:
    """Positions of worker ``worker_index``'s training windows: every ``n_workers``-th from
    ``worker_index``. The shares of ``0..n_workers-1`` are disjoint and cover ``range(n_windows)``
    (sizes differ by at most one)."""
    if not 0 <= worker_index < n_workers:
        raise ConfigError(f"worker_index={worker_index} is out of range for {n_workers} worker(s)")
    return np.arange(worker_index, n_windows, n_workers)


def check_batch(n_windows: int, *, batch_size: int, n_workers: int) -> tuple[int, int]:
    """``(per-worker batch, steps per epoch)`` for a global batch split over ``n_workers``.

    Every worker runs the same number of steps (its collectives must pair with the others'):
    as many full per-worker batches as the smallest share holds.

    Raises:
        ConfigError: the batch does not divide among the workers, or a share is smaller than
            one per-worker batch.
    """
    if batch_size % n_workers:
        raise ConfigError(f"--batch-size {batch_size} must be a multiple of the {n_workers} workers")
    per_worker = batch_size // n_workers
    steps = (n_windows // n_workers) // per_worker
    if steps < 1:
        raise ConfigError(
            f"--batch-size {batch_size} is too large: {n_windows} training windows over {n_workers} "
            f"workers give fewer than {per_worker} windows per worker"
        )
    return per_worker, steps


def window_keys(clip_ids: Sequence[str]) -> np.ndarray:
    """``"<clip id>#<k>"`` for the ``k``-th window of each clip, in the given order: a name for
    each window of a split that is the same on every worker."""
    seen: dict[str, int] = {}
    keys = []
    for clip in clip_ids:
        clip = str(clip)
        k = seen.get(clip, 0)
        seen[clip] = k + 1
        keys.append(f"{clip}#{k}")
    return np.asarray(keys, dtype=object)


def window_digest(keys: Sequence[str]) -> str:
    """Order-independent, additive digest of a set of window keys (16 hex digits).

    The sum modulo 2**64 of each key's 64-bit BLAKE2b hash, so the digests of disjoint shares
    add up (:func:`combine_digests`) to the digest of their union.
    """
    total = 0
    for key in keys:
        total += int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little")
    return f"{total & _DIGEST_MASK:016x}"


def combine_digests(digests: Sequence[str]) -> str:
    """The :func:`window_digest` of the union of disjoint window sets, from theirs."""
    return f"{sum(int(d, 16) for d in digests) & _DIGEST_MASK:016x}"


def share_summary(
    train: training.WindowSet, indices: np.ndarray, *, worker_index: int, n_workers: int
) -> dict:
    """What one worker trains on: counts and a digest of its windows, for ``metrics.json``."""
    keys = window_keys(train.clip_ids)[indices]
    return {
        "worker_index": worker_index,
        "workers": n_workers,
        "training_windows": int(len(indices)),
        "training_windows_total": len(train),
        "selection": {"first": worker_index, "every": n_workers},
        "clips": len(set(train.clip_ids[indices].tolist())),
        "window_digest": window_digest(keys),
    }


class StopRule:
    """Early stopping on a score (higher is better): stop after ``patience`` epochs without
    improvement; the best epoch's weights are kept by the caller."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = -1.0
        self.best_epoch = 0

    def update(self, epoch: int, score: float) -> tuple[bool, bool]:
        """``(improved, stop)`` after ``epoch`` (0-based) scored ``score``."""
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            return True, False
        return False, epoch - self.best_epoch >= self.patience


@dataclasses.dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        history: Per-epoch ``loss``, ``accuracy`` (training, over all workers), ``val_loss``,
            ``val_accuracy`` (windows) and ``val_clip_accuracy``.
        best_epoch: 0-based epoch whose weights the model holds on return.
        best: Validation clip accuracy of that epoch.
        share: This worker's :func:`share_summary`.
        shares: Every worker's ``{training_windows, window_digest}``, by worker index.
        per_worker_batch_size: Windows per step on each worker.
        steps_per_epoch: Steps per epoch (the same on every worker).
        validation_spread: Largest difference seen between a worker's validation clip accuracy
            and the chief's (0.0 when all workers hold the same weights, as they should).
    """

    history: dict
    best_epoch: int
    best: float
    share: dict
    shares: list
    per_worker_batch_size: int
    steps_per_epoch: int
    validation_spread: float


def fit(
    model,
    *,
    strategy,
    cluster: ClusterConfig,
    train: training.WindowSet,
    validation: training.WindowSet,
    n_classes: int,
    batch_size: int,
    seed: int,
    aug: training.Augmentation,
    class_weights: np.ndarray | None,
    epochs: int,
    patience: int,
    aggregation: str,
    select_on: str = "auto",
    average: training.WeightAverage | None = None,
    verbose: bool = True,
) -> FitResult:
    """Trains ``model`` (built and compiled under ``strategy.scope()``) on this worker's share.

    Args:
        model: Keras model compiled with an optimizer and a loss, under ``strategy.scope()``.
        strategy: From :func:`make_strategy`.
        cluster: This worker's :class:`ClusterConfig`.
        train: The whole training split (the same on every worker); this worker uses its share.
        validation: The whole validation split; every worker evaluates all of it.
        n_classes: Number of classes.
        batch_size: Global batch (windows per step over all workers).
        seed: Base seed; worker ``i`` of ``k`` shuffles and augments with ``seed * k + i``.
        aug: Augmentation of training windows.
        class_weights: ``[n_classes]`` weights (from the whole training split), or ``None``.
        epochs: Maximum epochs.
        patience: Early stopping patience in epochs.
        aggregation: Clip aggregation for the validation clip accuracy.
        select_on: What early stopping judges (:func:`training.selection_score`).
        average: Per-epoch weight average that early stopping judges and keeps (as in
            ``soundshard train``'s single-worker loop), or ``None`` for the raw weights.
        verbose: One progress line per epoch.

    Returns:
        A :class:`FitResult`; the model holds the best epoch's weights.

    Raises:
        ConfigError: the global batch does not divide among the replicas, or a share is smaller
            than one per-worker batch.
    """
    import tensorflow as tf

    k, index = cluster.n_workers, cluster.worker_index
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(
            f"--batch-size {batch_size} must be a multiple of the {replicas} replicas ({k} workers)"
        )
    per_worker, steps = check_batch(len(train), batch_size=batch_size, n_workers=k)
    indices = shard_indices(len(train), worker_index=index, n_workers=k)
    mine = train.take(indices)
    share = share_summary(train, indices, worker_index=index, n_workers=k)

    def dataset_fn(context):
        data = training.training_dataset(
            mine,
            n_classes=n_classes,
            batch_size=context.get_per_replica_batch_size(batch_size),
            seed=seed * k + index,
            aug=aug,
            class_weights=class_weights,
        )
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return data.with_options(options)

    distributed = strategy.distribute_datasets_from_function(dataset_fn)
    gather = _Gather(strategy)
    shares = _gather_shares(gather, share, k)
    if sum(s["training_windows"] for s in shares) != len(train) or combine_digests(
        [s["window_digest"] for s in shares]
    ) != window_digest(window_keys(train.clip_ids)):
        raise AssertionError(f"worker shares {shares} do not cover the {len(train)} training windows once")

    @tf.function
    def train_step(iterator):
        def step(x, y, sample_weight=None):
            with tf.GradientTape() as tape:
                probabilities = model(x, training=True)
                # scaled by 1 / replicas for the optimizer's all-reduce (sum) of the gradients
                loss = model.compute_loss(
                    x=x, y=y, y_pred=probabilities, sample_weight=sample_weight, training=True
                )
            gradients = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            hits = tf.equal(tf.argmax(y, axis=1), tf.argmax(probabilities, axis=1))
            return tf.stack(
                [loss, tf.reduce_sum(tf.cast(hits, tf.float32)), tf.cast(tf.shape(x)[0], tf.float32)]
            )

        totals = strategy.run(step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, totals, axis=None)

    averaged = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]

    @tf.function
    def average_statistics():
        def local_mean():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in averaged])

        means = strategy.experimental_local_results(strategy.run(local_mean))[0]
        for variable, mean in zip(averaged, means, strict=True):
            variable.assign(mean)

    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    rule = StopRule(patience)
    best_weights = None
    spread = 0.0
    history = {key: [] for key in ("loss", "accuracy", "val_loss", "val_accuracy", "val_clip_accuracy")}
    for epoch in range(epochs):
        iterator = iter(distributed)
        totals = np.zeros(3)
        for _ in range(steps):
            totals += train_step(iterator).numpy()
        if averaged:
            average_statistics()
        raw = None
        if average is not None:  # judged (and kept) averaged, trained on raw
            raw = model.get_weights()
            model.set_weights(average.update(raw, averaged=training.trainable_mask(model)))
        probabilities = np.concatenate(
            [predict(validation.features[i : i + 256]).numpy() for i in range(0, len(validation), 256)]
        )
        local = training.selection_score(  # the background output (if any) left out
            probabilities[:, :n_classes], validation, aggregation=aggregation, select_on=select_on
        )
        scores = gather(np.array([local], np.float64))[:, 0]
        spread = max(spread, float(np.abs(scores - scores[0]).max()))
        score = float(scores[0])  # the chief's, so that every worker takes the same decision
        picked = np.clip(probabilities[np.arange(len(validation)), validation.labels], 1e-7, 1.0)
        regularization = float(sum(float(loss) for loss in model.losses))
        history["loss"].append(float(totals[0] / steps))
        history["accuracy"].append(float(totals[1] / max(1.0, totals[2])))
        history["val_loss"].append(float(-np.log(picked).mean()) + regularization)
        history["val_accuracy"].append(float((probabilities.argmax(axis=1) == validation.labels).mean()))
        history["val_clip_accuracy"].append(score)
        improved, stop = rule.update(epoch, score)
        if improved:
            best_weights = model.get_weights()
        if raw is not None:
            model.set_weights(raw)
        if verbose:
            print(
                f"[worker {index}/{k}] epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f}, "
                f"accuracy {history['accuracy'][-1]:.3f}, val_loss {history['val_loss'][-1]:.4f}, "
                f"val_clip_accuracy {score:.3f}" + (" (best)" if improved else ""),
                flush=True,
            )
        if stop:
            break
    if spread > 0 and verbose:
        print(
            f"[worker {index}/{k}] warning: validation clip accuracy differed between workers by up to "
            f"{spread:.4f}; early stopping followed the chief",
            file=sys.stderr,
            flush=True,
        )
    if best_weights is not None:
        model.set_weights(best_weights)
    return FitResult(
        history=history,
        best_epoch=rule.best_epoch,
        best=rule.best,
        share=share,
        shares=shares,
        per_worker_batch_size=per_worker,
        steps_per_epoch=steps,
        validation_spread=round(spread, 6),
    )


class _Gather:
    """All-gather of a small vector across the workers (a collective: every worker must call it,
    in the same order). Traced once per dtype, not once per call."""

    def __init__(self, strategy):
        import tensorflow as tf

        def gather(value):
            def local():
                # a copy on the replica's device: a collective needs to know where its input lives
                return tf.distribute.get_replica_context().all_gather(tf.identity(value), axis=0)

            return strategy.experimental_local_results(strategy.run(local))[0]

        self.strategy = strategy
        self.function = tf.function(gather)

    def __call__(self, value: np.ndarray) -> np.ndarray:
        """Every replica's ``value`` (``[n]``) by replica (worker) index: ``[replicas, n]``."""
        gathered = self.function(value).numpy()
        return gathered.reshape(self.strategy.num_replicas_in_sync, -1)


def _gather_shares(gather: _Gather, share: dict, n_workers: int) -> list[dict]:
    """Every worker's share size and digest."""
    digest = int(share["window_digest"], 16)
    rows = gather(np.array([share["training_windows"], digest >> 32, digest & 0xFFFFFFFF], np.int64))
    rows = rows[:: len(rows) // n_workers]  # one row per worker when a worker has several replicas
    return [
        {"worker_index": i, "training_windows": int(n), "window_digest": f"{(int(hi) << 32) | int(lo):016x}"}
        for i, (n, hi, lo) in enumerate(rows)
    ]


def local_copy(model):
    """A copy of ``model`` with plain (not distributed) variables holding the same weights: what
    the chief predicts with and saves, so that no save or export step involves the other workers."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def side_folder(output: str, cluster: ClusterConfig) -> str:
    """Where a worker other than the chief writes its metrics: ``<output>-worker-<i>``."""
    return f"{output.rstrip('/')}-worker-{cluster.worker_index}"
