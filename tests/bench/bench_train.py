"""Benchmark: clip accuracy of the classifiers on ESC-10, 5-fold cross-validation on its folds.

    .venv/bin/python tests/bench/bench_train.py [--models sbcnn,edgecnn] [--epochs 100]
        [--augment pitch_shift=-2,pitch_shift=2] [--extra='--patience 15']
        [--feature-flags='--feature-type mfcc --mfcc-deltas 2']
        [--work bench-results/train] [--json bench-results/train.json]

Computes the default log-mel features of the 400 ESC-10 clips once (``soundshard features``,
reused when present), then runs ``soundshard train --cv`` for each model: each predefined fold is
the test fold once, the next fold validates (early stopping), the other three train. Prints, per
model, the clip accuracy (mean aggregation; max and majority too) as mean ± std over the folds, the
per-fold figures, parameters, MACs per window and the CPU seconds per fold; writes them as JSON.
The train command's own defaults are used unless flags here say otherwise, so the printed
command reproduces a row. With ``--extra=--refit`` the early-stopped model of each fold (what the
run keeps without ``--refit``) is reported too: both sides of the comparison from one run; with
``--extra='--ensemble N'`` each member (one seed) is reported alone beside the ensemble.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ESC10 = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "esc10"


def soundshard(*args: str) -> None:
    command = [sys.executable, "-m", "soundshard.pipelines.cli", *args]
    print("$ soundshard " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sbcnn,edgecnn")
    parser.add_argument("--epochs", type=int, default=None, help="Passed to train (default: its own).")
    parser.add_argument("--extra", default="", help="More train flags, e.g. '--extra=--mixup-alpha 0'.")
    parser.add_argument(
        "--augment",
        default=None,
        help="Offline augmentation of the features, e.g. 'pitch_shift=-2,pitch_shift=2' (copies of the "
        "training folds' clips; never validated or tested on).",
    )
    parser.add_argument(
        "--feature-flags",
        default="",
        help="More features flags, e.g. '--feature-flags=--feature-type mfcc' (use a --work of its own).",
    )
    parser.add_argument("--work", default=str(ROOT / "bench-results" / "train"))
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "train.json"))
    args = parser.parse_args()
    if not (ESC10 / "meta.csv").is_file():
        print(f"ESC-10 not found at {ESC10}", file=sys.stderr)
        return 1
    work = Path(args.work)
    features = work / "esc10-features"
    if not (features / "dataset.json").is_file():
        soundshard(
            "features",
            "--input",
            str(ESC10 / "audio"),
            "--manifest",
            str(ESC10 / "meta.csv"),
            "--output",
            str(features),
            "--format",
            "parquet",
            *(["--augment", args.augment] if args.augment else []),
            *args.feature_flags.split(),
        )
    results = {}
    for model in args.models.split(","):
        out = work / f"{model}-cv"
        flags = ["--features", str(features), "--arch", model, "--cv", "--output", str(out), "--quiet"]
        if args.epochs:
            flags += ["--epochs", str(args.epochs)]
        flags += args.extra.split()
        started = time.monotonic()
        soundshard("train", *flags)
        summary = json.loads((out / "metrics.json").read_text())
        first = json.loads(next(out.glob("fold-*/metrics.json")).read_text())
        summary["wall_s"] = round(time.monotonic() - started, 1)
        summary["parameters"] = first["parameters"]
        summary["macs_per_window"] = first["macs_per_window"]
        summary["command"] = "soundshard train " + " ".join(flags)
        # with --refit each fold's first model (early-stopped on the validation fold, the model
        # the run keeps without --refit) is tested too: the matched pair in one run
        folds = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("fold-*/metrics.json"))}
        before = {
            k: m["refit"]["first_model_test"]["clip_accuracy_mean"] for k, m in folds.items() if "refit" in m
        }
        if before:
            values = list(before.values())
            summary["before_refit"] = {
                "clip_mean_per_fold": before,
                "accuracy_mean": round(sum(values) / len(values), 4),
                "accuracy_std": round(float(np.std(values)), 4),
                "refit_epochs": {k: m["refit"]["epochs"] for k, m in folds.items()},
            }
        # with --ensemble each member (one seed) is a model of its own: the matched single models
        seeds: dict[int, dict] = {}
        for fold, m in folds.items():
            for member in m.get("ensemble", {}).get("members", []):
                seeds.setdefault(member["seed"], {})[fold] = member["clip_accuracy_mean"]
        if seeds:
            summary["members"] = {
                str(seed): {
                    "clip_mean_per_fold": per_fold,
                    "accuracy_mean": round(float(np.mean(list(per_fold.values()))), 4),
                    "accuracy_std": round(float(np.std(list(per_fold.values()))), 4),
                }
                for seed, per_fold in seeds.items()
            }
        results[model] = summary
    print()
    print(
        f"{'model':<9}{'params':>9}{'MACs/win':>11}{'clip acc (mean)':>18}{'max':>14}{'majority':>14}"
        f"{'window':>14}{'CPU s/fold':>12}"
    )
    for model, s in results.items():

        def pm(key, s=s):
            return f"{s[key]['accuracy_mean']:.3f}±{s[key]['accuracy_std']:.3f}"

        print(
            f"{model:<9}{s['parameters']:>9}{s['macs_per_window']:>11}{pm('clip_mean'):>18}{pm('clip_max'):>14}"
            f"{pm('clip_majority'):>14}{pm('window'):>14}{s['train_cpu_s_per_fold']:>12}"
        )
        print(
            "  per fold (clip_mean): "
            + ", ".join(f"{k}: {v['clip_mean']:.3f}" for k, v in s["per_fold"].items())
        )
        if "before_refit" in s:
            b = s["before_refit"]
            print(
                f"  before the refit (the early-stopped models): "
                f"{b['accuracy_mean']:.3f}±{b['accuracy_std']:.3f}; "
                + ", ".join(f"{k}: {v:.3f}" for k, v in b["clip_mean_per_fold"].items())
            )
        for seed, member in s.get("members", {}).items():
            print(
                f"  member seed {seed} alone: {member['accuracy_mean']:.3f}±{member['accuracy_std']:.3f}; "
                + ", ".join(f"{k}: {v:.3f}" for k, v in member["clip_mean_per_fold"].items())
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
