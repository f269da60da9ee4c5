"""Multi-worker training: cluster configuration, window shares, and two real worker processes.

The two-worker test runs both workers inside a private network namespace (``unshare --net``) whose
only interface is loopback: TensorFlow's gRPC server listens on every interface of the port it is
given, whatever host the cluster names, so on the host it would be reachable from the network.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from soundshard.pipelines import train
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.models import distributed, training

#: Clip accuracy the 2-worker model must reach on the test fold (8 clips, 4 classes, chance 0.25),
#: and how far below the single-worker model's it may be: one clip of the 8. The two runs see
#: the same windows but batched differently (per-worker shuffles, mixup within a worker's batch,
#: other augmentation draws), so they are not bit-identical.
MIN_CLIP_ACCURACY = 0.75
TOLERANCE = 0.125
TRAIN_FLAGS = ["--arch", "edgecnn", "--test-fold", "1", "--epochs", "30", "--patience", "10"]
TRAIN_FLAGS += ["--batch-size", "16", "--quiet"]
WORKER_TIMEOUT_S = 240

TF_CONFIG_2 = {"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}, "task": {"type": "worker"}}


def tf_config(index, **changes):
    spec = json.loads(json.dumps(TF_CONFIG_2))
    spec["task"]["index"] = index
    spec.update(changes)
    return {"TF_CONFIG": json.dumps(spec)}


def test_cluster_from_flags():
    cluster = distributed.resolve_cluster(
        workers="127.0.0.1:2222, 127.0.0.1:2223", worker_index=1, environ={}
    )
    assert cluster.workers == ("127.0.0.1:2222", "127.0.0.1:2223")
    assert (cluster.worker_index, cluster.n_workers, cluster.is_chief, cluster.source) == (
        1,
        2,
        False,
        "flags",
    )
    assert distributed.resolve_cluster(workers=None, worker_index=None, environ={}) is None
    assert distributed.side_folder("models/m/", cluster) == "models/m-worker-1"


def test_cluster_from_tf_config_chief_first():
    cluster = distributed.resolve_cluster(workers=None, worker_index=None, environ=tf_config(1))
    assert (cluster.worker_index, cluster.source, cluster.task_type) == (1, "TF_CONFIG", "worker")
    chief = {
        "cluster": {"worker": ["h1:1", "h2:1"], "chief": ["h0:1"]},
        "task": {"type": "worker", "index": 0},
    }
    cluster = distributed.resolve_cluster(
        workers=None, worker_index=None, environ={"TF_CONFIG": json.dumps(chief)}
    )
    assert cluster.workers == ("h0:1", "h1:1", "h2:1") and cluster.worker_index == 1 and not cluster.is_chief


@pytest.mark.parametrize(
    "workers, index, environ, message",
    [
        ("127.0.0.1:1,127.0.0.1:2", 0, tf_config(0), "--workers/--worker-index and TF_CONFIG are both set"),
        (None, 0, tf_config(0), "--workers/--worker-index and TF_CONFIG are both set"),
        ("127.0.0.1:1,127.0.0.1:2", None, {}, "--workers needs --worker-index"),
        (None, 1, {}, "--worker-index needs --workers"),
        ("127.0.0.1:1,127.0.0.1:2", 2, {}, "--worker-index 2 is out of range for 2 worker"),
        ("127.0.0.1:1,localhost", 0, {}, "--workers: 'localhost' is not host:port"),
        ("127.0.0.1:1,127.0.0.1:99999", 0, {}, "'127.0.0.1:99999' is not host:port"),
        ("127.0.0.1:1,127.0.0.1:1", 0, {}, "name a host:port twice"),
        (None, None, {"TF_CONFIG": "{not json"}, "TF_CONFIG='{not json' is not JSON"),
        (None, None, tf_config(5), "task index 5 is out of range for 2 'worker'"),
        (
            None,
            None,
            tf_config(0, cluster={"worker": ["a:1"], "ps": ["b:1"]}),
            "task types ['ps'] are not used",
        ),
    ],
)
def test_cluster_errors_name_the_bad_value(workers, index, environ, message):
    with pytest.raises(ConfigError) as info:
        distributed.resolve_cluster(workers=workers, worker_index=index, environ=environ)
    assert message in str(info.value)


def test_shares_are_disjoint_and_cover_the_windows():
    for n, k in [(96, 2), (97, 2), (10, 3), (2, 4)]:
        shares = [distributed.shard_indices(n, worker_index=i, n_workers=k) for i in range(k)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    keys = distributed.window_keys(["b", "a", "b", "c", "a", "b"])
    assert keys.tolist() == ["b#0", "a#0", "b#1", "c#0", "a#1", "b#2"]
    halves = [distributed.window_digest(keys[i::2]) for i in range(2)]
    assert distributed.combine_digests(halves) == distributed.window_digest(keys)
    assert distributed.window_digest(keys[::-1]) == distributed.window_digest(keys)
    assert distributed.window_digest(keys[:-1]) != distributed.window_digest(keys)


def test_batch_split_over_workers():
    assert distributed.check_batch(96, batch_size=16, n_workers=2) == (8, 6)
    assert distributed.check_batch(97, batch_size=16, n_workers=2) == (8, 6)  # shares of 49 and 48
    with pytest.raises(ConfigError, match="--batch-size 15 must be a multiple of the 2 workers"):
        distributed.check_batch(96, batch_size=15, n_workers=2)
    with pytest.raises(ConfigError, match="--batch-size 64 is too large: 40 training windows over 2"):
        distributed.check_batch(40, batch_size=64, n_workers=2)


def test_stop_rule_is_a_pure_function_of_the_scores():
    rule = distributed.StopRule(patience=2)
    decisions = [rule.update(epoch, score) for epoch, score in enumerate([0.25, 0.5, 0.5, 0.5, 0.75])]
    assert decisions == [(True, False), (True, False), (False, False), (False, True), (True, False)]
    assert (rule.best, rule.best_epoch) == (0.75, 4)


def test_train_refuses_flags_and_tf_config_together(demo_features, tmp_path, capsys, monkeypatch):
    base = ["--features", str(demo_features), "--output", str(tmp_path / "m"), *TRAIN_FLAGS]
    monkeypatch.setenv("TF_CONFIG", tf_config(0)["TF_CONFIG"])
    assert train.run([*base, "--workers", "127.0.0.1:1,127.0.0.1:2", "--worker-index", "0"]) == 2
    assert "--workers/--worker-index and TF_CONFIG are both set" in capsys.readouterr().err
    monkeypatch.delenv("TF_CONFIG")
    two = ["--workers", "127.0.0.1:1,127.0.0.1:2", "--worker-index", "1"]
    assert train.run([*base, "--batch-size", "15", *two]) == 2
    assert "--batch-size 15 must be a multiple of the 2 workers" in capsys.readouterr().err
    assert train.run([*base, "--precision", "mixed", *two]) == 2
    assert "--precision mixed is for training on one worker" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m-worker-1").exists()


# Runs inside the private network namespace: brings loopback up, takes two free ports on 127.0.0.1,
# starts one `soundshard train` per worker and waits for both.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, json, socket, struct, subprocess, sys

    spec = json.loads(sys.argv[1])
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    flags = struct.unpack("16sH", fcntl.ioctl(probe, SIOCGIFFLAGS, struct.pack("16sH", b"lo", 0)))[1]
    fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    workers = ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in sockets)
    for s in sockets:
        s.close()
    procs = []
    for index, log in enumerate(spec["logs"]):
        argv = [*spec["argv"], "--workers", workers, "--worker-index", str(index)]
        procs.append(subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    with open("/proc/net/dev") as f:
        interfaces = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    with open(spec["report"], "w") as f:
        json.dump({"returncodes": codes, "interfaces": interfaces, "workers": workers}, f)
    """
)

NETNS = ["unshare", "--user", "--map-root-user", "--net", "--"]


def _netns_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run([*NETNS, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
def test_two_workers_train_like_one(demo_features, tmp_path):
    if not _netns_available():
        pytest.skip(
            "needs unprivileged user and network namespaces (unshare): TensorFlow's servers would "
            "otherwise listen on every interface"
        )
    out = tmp_path / "model"
    argv = [sys.executable, "-m", "soundshard.pipelines.cli", "train", "--features", str(demo_features)]
    argv += ["--output", str(out), *TRAIN_FLAGS]
    logs = [str(tmp_path / f"worker-{i}.log") for i in range(2)]
    spec = {"argv": argv, "logs": logs, "report": str(tmp_path / "report.json")}
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    started = time.monotonic()
    launcher = subprocess.Popen(
        [*NETNS, sys.executable, "-c", LAUNCHER, json.dumps(spec)], env=env, start_new_session=True
    )
    try:
        # the single-worker reference trains here meanwhile, on the same data and flags
        single = tmp_path / "single"
        assert train.run(["--features", str(demo_features), "--output", str(single), *TRAIN_FLAGS]) == 0
        launcher.wait(timeout=max(1.0, WORKER_TIMEOUT_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        tails = {log: open(log).read()[-3000:] for log in logs if os.path.exists(log)}
        pytest.fail(f"workers still running after {WORKER_TIMEOUT_S} s; logs: {tails}")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interfaces"] == ["lo"]  # nothing but this namespace's loopback reaches the servers
    assert report["returncodes"] == [0, 0], {log: open(log).read()[-3000:] for log in logs}

    # the chief wrote a complete model folder; the other worker only its metrics, beside it
    for name in ("model.keras", "model.json", "metrics.json", "history.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert (out / "learning_curves.png").is_file() and (out / "saved_model" / "saved_model.pb").is_file()
    side = tmp_path / "model-worker-1"
    assert sorted(p.name for p in side.iterdir()) == ["history.json", "metrics.json"]
    chief = json.loads((out / "metrics.json").read_text())
    other = json.loads((side / "metrics.json").read_text())
    reference = json.loads((single / "metrics.json").read_text())

    # each worker read its own share: disjoint, together the single-worker training set
    windows = training.load_windows(str(demo_features), training.read_dataset_json(str(demo_features)))
    keys = distributed.window_keys(training.split_by_fold(windows, test_fold=1).train.clip_ids)
    shares = [set(keys[i::2].tolist()) for i in range(2)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(keys.tolist())
    for i, metrics in enumerate((chief, other)):
        share = metrics["training_share"]
        assert (share["worker_index"], share["workers"]) == (i, 2)
        assert share["training_windows"] == len(shares[i]) == len(keys) // 2
        assert share["window_digest"] == distributed.window_digest(sorted(shares[i]))
        assert metrics["distributed"]["shares"] == chief["distributed"]["shares"]
    whole = reference["training_share"]
    assert (whole["workers"], whole["training_windows"]) == (1, len(keys))
    assert (
        distributed.combine_digests([m["training_share"]["window_digest"] for m in (chief, other)])
        == (whole["window_digest"])
    )

    # the workers agreed on every early-stopping decision and hold the same weights
    assert chief["distributed"]["validation_clip_accuracy_spread"] == 0.0
    assert (chief["epochs_run"], chief["best_epoch"]) == (other["epochs_run"], other["best_epoch"])
    assert chief["clip_mean"] == other["clip_mean"] and chief["window"] == other["window"]
    assert json.loads((out / "history.json").read_text()) == json.loads((side / "history.json").read_text())

    # as good as one worker on the same data, within one clip of the 8 test clips
    multi, one = chief["clip_mean"]["accuracy"], reference["clip_mean"]["accuracy"]
    assert chief["clip_mean"]["n"] == 8
    assert multi >= MIN_CLIP_ACCURACY and one >= MIN_CLIP_ACCURACY, (multi, one)
    assert multi >= one - TOLERANCE, (multi, one)

    # the saved model is the trained one
    evaluate = ["--model-dir", str(out), "--features", str(demo_features), "--test-fold", "1"]
    assert train.run_evaluate([*evaluate, "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["clip_mean"] == chief["clip_mean"]
