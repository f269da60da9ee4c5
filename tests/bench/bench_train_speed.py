"""Benchmark: training speed on this machine's cores: the input pipeline against the training step.

    .venv/bin/python tests/bench/bench_train_speed.py [--features bench-results/train/esc10-features]
        [--models sbcnn,edgecnn] [--precisions auto] [--steps 60] [--json bench-results/train-speed.json]

For each model, on ESC-10's windows of folds 1-3 (what a ``--test-fold 4`` run trains on) with the
default recipe's batches (batch 64, class-balanced weights, time shift, noise, SpecAugment masks,
mixup), in one process:

- **input pipeline alone**: batches per second that ``training.training_dataset`` delivers, and
  the process's CPU use meanwhile (CPU seconds per wall second: 2.0 is two cores busy);
- **training**: steps per second of ``fit`` on that dataset, and CPU use;
- **input / training**: how many times faster batches are made than a step consumes them (above 1,
  the input pipeline is not what limits training; prefetching overlaps the two).

``--precisions`` lists the ``train --precision`` values to time each model with (e.g.
``float32,mixed`` on a GPU: the policy each resolves to, and whether Keras compiled the step with
XLA, are printed and recorded).

Each part runs after a warm-up (the graph traced, the shuffle buffer filled). The features are
computed with the defaults (``soundshard features``) when the folder does not hold them yet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ESC10 = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "esc10"


def timed(run) -> tuple[float, float]:
    """``(wall s, CPU s of the whole process)`` of ``run()``."""
    cpu, wall = time.process_time(), time.monotonic()
    run()
    return time.monotonic() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default=str(ROOT / "bench-results" / "train" / "esc10-features"))
    parser.add_argument("--models", default="sbcnn,edgecnn")
    parser.add_argument("--steps", type=int, default=60, help="Batches (and training steps) timed.")
    parser.add_argument("--precisions", default="auto", help="train --precision values, comma-separated.")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "train-speed.json"))
    args = parser.parse_args()
    features = Path(args.features)
    if not (features / "dataset.json").is_file():
        if not (ESC10 / "meta.csv").is_file():
            print(f"ESC-10 not found at {ESC10}", file=sys.stderr)
            return 1
        command = [
            sys.executable,
            "-m",
            "soundshard.pipelines.cli",
            "features",
            "--input",
            str(ESC10 / "audio"),
        ]
        command += ["--manifest", str(ESC10 / "meta.csv"), "--output", str(features), "--format", "parquet"]
        subprocess.run(command, check=True)

    import keras
    import tensorflow as tf

    from soundshard.transforms.models import architectures as models
    from soundshard.transforms.models import training

    dataset, windows = training.load_datasets([str(features)])
    train = windows.take(np.isin(windows.folds, [1, 2, 3]) & windows.sounding)
    n_classes = len(dataset["label_map"])
    aug = training.for_features(training.Augmentation(), training.spectral_config(dataset))

    def batches():
        return training.training_dataset(
            train,
            n_classes=n_classes,
            batch_size=64,
            seed=0,
            aug=aug,
            sample_weights=training.balanced_sample_weights(train.truth(n_classes)),
        ).repeat()

    results = {"cores": os.cpu_count(), "windows": len(train), "batch_size": 64, "steps": args.steps}
    it = iter(batches())
    for _ in range(10):
        next(it)
    wall, cpu = timed(lambda: [next(it) for _ in range(args.steps)])
    results["input"] = {"batches_per_s": round(args.steps / wall, 1), "cpu_per_wall": round(cpu / wall, 2)}
    print(f"input pipeline: {args.steps / wall:.1f} batches/s, CPU {cpu / wall:.2f} s per s", flush=True)
    gpus = len(tf.config.list_physical_devices("GPU"))
    results["gpus"] = gpus
    runs = [(m, p) for m in args.models.split(",") for p in args.precisions.split(",")]
    for model_name, precision in runs:
        policy = training.resolve_precision(precision, gpus=gpus)
        name = model_name if len(args.precisions.split(",")) == 1 else f"{model_name}/{precision}"
        keras.utils.set_random_seed(0)
        with training.dtype_policy(policy):
            model = models.build_model(
                model_name,
                input_shape=train.features.shape[1:],
                n_classes=n_classes,
                normalization=(float(train.features.mean()), float(train.features.var())),
            )
        model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=keras.losses.CategoricalCrossentropy())
        data = batches()
        model.fit(
            data, steps_per_epoch=10, epochs=1, verbose=0, shuffle=False
        )  # warm-up: trace, fill the buffers
        wall, cpu = timed(
            lambda m=model, d=data: m.fit(d, steps_per_epoch=args.steps, epochs=1, verbose=0, shuffle=False)
        )
        steps = args.steps / wall
        results[name] = {
            "steps_per_s": round(steps, 2),
            "cpu_per_wall": round(cpu / wall, 2),
            "windows_per_s": round(steps * 64, 1),
            "input_over_training": round(results["input"]["batches_per_s"] / steps, 1),
            "policy": policy,
            "xla": bool(model.jit_compile),
        }
        print(
            f"{name} ({policy}, XLA {'on' if model.jit_compile else 'off'}): {steps:.2f} steps/s "
            f"({steps * 64:.0f} windows/s), CPU {cpu / wall:.2f} s per s, "
            f"input {results[name]['input_over_training']}x faster than training",
            flush=True,
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
