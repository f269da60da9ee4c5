"""Benchmark: int8 edge artifacts of trained ESC-10 models, float vs int8 per held-out fold.

    .venv/bin/python tests/bench/bench_edge.py \\
        --models 'bench-results/train16/edgecnn-cv/fold-*' \\
        --data bench-results/train16/esc10-features [--target cortex-m4-256k] \\
        [--work bench-results/edge] [--json bench-results/edge.json]

Runs ``soundshard compile-edge`` on each model folder matched by ``--models`` (one per fold of a
``train --cv`` run), each into ``<work>/<parent>-<folder>``, and reads its ``report.json`` (written
whether the artifact passed or not). Prints one row per model: clip accuracy of the float model and
of the int8 model run by TensorFlow Lite Micro on the model's held-out fold, the difference in
percentage points, the share of windows whose top class agrees, the difference between TFLite
Micro and LiteRT (builtin kernels; XNNPACK), int8 model size, the measured tensor arena and the one
with its margin, MACs per window, flash and RAM needed against the target, the status and the
wall time; writes them as JSON. Exit status 0 when every model was compiled (whatever its status).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compile_edge(model: str, *, data: str, target: str, output: str, extra: list[str]) -> tuple[int, float]:
    command = [sys.executable, "-m", "soundshard.pipelines.cli", "compile-edge", "--model-dir", model]
    command += ["--features", data, "--target", target, "--output", output, "--quiet", *extra]
    print("$ soundshard " + " ".join(command[3:]), flush=True)
    started = time.monotonic()
    result = subprocess.run(
        command, env={**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    return result.returncode, time.monotonic() - started


def row_of(name: str, report: dict, *, exit_code: int, wall_s: float) -> dict:
    v, b = report["verification"], report["budget"]
    clip = v["clip_accuracy"]
    interpreters = v["interpreters"]
    return {
        "model": name,
        "architecture": report["model"]["architecture"],
        "held_out": v["held_out"],
        "clips": v["n_clips"],
        "windows": v["n_windows"],
        "clip_accuracy_float": clip["float"],
        "clip_accuracy_int8": clip["int8"],
        "delta_pp": clip["delta_pp"],
        "within_1pp": abs(clip["delta_pp"]) <= 1.0,
        "no_drop_over_1pp": clip["delta_pp"] >= -1.0,
        "window_accuracy_float": v["window_accuracy"]["float"],
        "window_accuracy_int8": v["window_accuracy"]["int8"],
        "window_top_class_agreement": v["window_top_class_agreement"],
        "tflm_vs_litert_builtin_max_steps": interpreters["tflite-micro vs litert-builtin"][
            "max_abs_diff_steps"
        ],
        "tflm_vs_litert_xnnpack_max_steps": interpreters["tflite-micro vs litert-xnnpack"][
            "max_abs_diff_steps"
        ],
        "parameters": report["model"]["parameters"],
        "macs_per_window": report["model"]["macs_per_window"],
        "int8_bytes": report["int8"]["bytes"],
        "arena_measured_bytes": report["arena"]["measured_bytes"],
        "arena_bytes": report["arena"]["arena_bytes"],
        "flash_needed_bytes": b["flash"]["needed_bytes"],
        "flash_budget_bytes": b["flash"]["budget_bytes"],
        "ram_needed_bytes": b["ram"]["needed_bytes"],
        "ram_budget_bytes": b["ram"]["budget_bytes"],
        "fits": b["fits"],
        "target": b["target"]["name"],
        "status": report["status"],
        "exit_code": exit_code,
        "wall_s": round(wall_s, 1),
        "versions": report["versions"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | held out | float clip acc | int8 clip acc | Δ pp | top class agrees | TFLM vs LiteRT "
        "(builtin / XNNPACK, steps) | int8 KiB | arena KiB (measured / +margin) | MACs | flash KiB | "
        "RAM KiB | status | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['held_out']} | {r['clip_accuracy_float']:.4f} | "
            f"{r['clip_accuracy_int8']:.4f} | "
            f"{r['delta_pp']:+.2f} | {r['window_top_class_agreement']:.4f} | "
            f"{r['tflm_vs_litert_builtin_max_steps']} / {r['tflm_vs_litert_xnnpack_max_steps']} | "
            f"{r['int8_bytes'] / 1024:.1f} | {r['arena_measured_bytes'] / 1024:.1f} / "
            f"{r['arena_bytes'] / 1024:.1f} | "
            f"{r['macs_per_window'] / 1e6:.2f} M | {r['flash_needed_bytes'] / 1024:.1f} / "
            f"{r['flash_budget_bytes'] / 1024:.0f} | {r['ram_needed_bytes'] / 1024:.1f} / "
            f"{r['ram_budget_bytes'] / 1024:.0f} | {r['status']} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="Glob of model folders (quote it).")
    parser.add_argument("--data", required=True, help="Features output the models were trained on.")
    parser.add_argument("--target", default="cortex-m4-256k")
    parser.add_argument("--extra", default="", help="More compile-edge flags, e.g. '--golden 2'.")
    parser.add_argument("--work", default=str(ROOT / "bench-results" / "edge"))
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "edge.json"))
    args = parser.parse_args()
    folders = sorted(p for p in glob.glob(args.models) if os.path.isfile(os.path.join(p, "model.json")))
    if not folders:
        print(f"no model folders match {args.models!r}", file=sys.stderr)
        return 1
    rows, failed = [], []
    for folder in folders:
        path = Path(folder)
        name = f"{path.parent.name}/{path.name}"
        output = Path(args.work) / f"{path.parent.name}-{path.name}"
        code, wall_s = compile_edge(
            folder, data=args.data, target=args.target, output=str(output), extra=args.extra.split()
        )
        report = output / "report.json"
        if code == 2 or not report.is_file():
            failed.append(name)
            continue
        rows.append(row_of(name, json.loads(report.read_text()), exit_code=code, wall_s=wall_s))
    print()
    print(table(rows))
    if rows:
        deltas = [abs(r["delta_pp"]) for r in rows]
        mean_float = sum(r["clip_accuracy_float"] for r in rows) / len(rows)
        mean_int8 = sum(r["clip_accuracy_int8"] for r in rows) / len(rows)
        print(
            f"\nfolds: {len(rows)}; mean clip accuracy float {mean_float:.4f}, int8 {mean_int8:.4f}; "
            f"largest |Δ| {max(deltas):.2f} pp; "
            f"|Δ| within 1 pp on every fold: {all(r['within_1pp'] for r in rows)}; no fold loses more than "
            f"1 pp: {all(r['no_drop_over_1pp'] for r in rows)}; fits {args.target}: "
            f"{all(r['fits'] for r in rows)}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"command": sys.argv, "target": args.target, "rows": rows, "failed": failed}, indent=2)
        + "\n"
    )
    print(f"-> {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
