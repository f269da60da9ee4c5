"""Benchmark: tagging quality in a realistic soundscape and on the clean longform recording.

    .venv/bin/python tests/bench/bench_soundscape.py \\
        --models bench-results/m-edge-base,bench-results/m-edge-bg-gain \\
        [--work bench-results/soundscape] [--json bench-results/soundscape.json] [--no-ablations]

Each model (trained with ``--test-fold 4``: the recordings are made of fold-4 clips) tags
``../shared/data/soundscape_dev`` (20 min, 16 kHz: ESC-10 fold-4 targets among other everyday
sounds over an ambient bed) and ``../shared/data/longform`` (10 min, clips between quiet noise)
with ``soundshard tag`` and its defaults (the model's thresholds and event rules), scored by
``soundshard score`` (sed_eval: segment F1 on 1 s segments, event F1 with a 0.5 s onset collar,
offsets not evaluated; segment average precision). Then, as ablations of the tagging rules (a fixed
list, not a search): no median filter, one threshold of 0.5 for every class, no gate above the
recording's floor, and an absolute activity gate.
The soundscape is development data: settings are not tuned to it per class or per file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
RECORDINGS = {
    "soundscape_dev": (
        DATA / "soundscape_dev" / "soundscape_dev_20min_seed11.flac",
        DATA / "soundscape_dev" / "soundscape_dev_20min_seed11.txt",
    ),
    "longform": (
        DATA / "longform" / "esc10_longform_10min_seed0.flac",
        DATA / "longform" / "esc10_longform_10min_seed0.txt",
    ),
}
#: Tagging rules tried beside the defaults (flags of ``soundshard tag``).
ABLATIONS = {
    "no median filter": ["--median-filter-windows", "1"],
    "threshold 0.5 for all": ["--threshold", "0.5"],
    "no gate above the floor": ["--min-level-above-floor-db", "off"],
    "gate -50 dB": ["--min-level-db", "-50"],
}
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2"}


def tag(model: Path, recording: Path, out: Path, *flags: str) -> None:
    command = [sys.executable, "-m", "soundshard.pipelines.cli", "tag", "--input", str(recording)]
    command += ["--model-dir", str(model), "--output", str(out), *flags]
    subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def figures(result: dict) -> dict:
    segment, event = result["segment"]["overall"], result["event"]["overall"]

    def r(value):
        return None if value is None else round(value, 4)

    return {
        "segment_f1": r(segment["f1"]),
        "segment_precision": r(segment["precision"]),
        "segment_recall": r(segment["recall"]),
        "event_f1": r(event["f1"]),
        "event_precision": r(event["precision"]),
        "event_recall": r(event["recall"]),
        "segment_ap": r(result["threshold_free"]["macro"]),
        "events": event["n_estimated"],
    }


def bench_model(model: Path, work: Path, *, ablations: bool = True) -> dict:
    from soundshard.pipelines.score import score_tags

    description = json.loads((model / "model.json").read_text())
    row = {
        "model": str(model),
        "architecture": description["training"]["model"],
        "head": description["training"].get("head", "softmax"),
        "background": bool(description["training"].get("background")),
        "postprocessing": description.get("postprocessing"),
        "clip_accuracy_fold4": json.loads((model / "metrics.json").read_text())["clip_mean"]["accuracy"],
        "results": {},
    }
    for name, (recording, reference) in RECORDINGS.items():
        results = {}
        for variant, flags in {"default": [], **(ABLATIONS if ablations else {})}.items():
            out = work / f"{model.name}-{name}-{variant.replace(' ', '_')}"
            tag(model, recording, out, *flags)
            scored = score_tags(str(reference), str(out))
            results[variant] = figures(scored)
            if variant == "default":
                results["per_class"] = {
                    label: {
                        "segment_f1": scored["segment"]["per_class"][label]["f1"],
                        "event_f1": scored["event"]["per_class"][label]["f1"],
                        "segment_ap": scored["threshold_free"]["per_class"][label]["ap"],
                    }
                    for label in scored["classes"]
                }
        row["results"][name] = results
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="Comma-separated model folders (fold 4 held out).")
    parser.add_argument("--work", default=str(ROOT / "bench-results" / "soundscape"))
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "soundscape.json"))
    parser.add_argument(
        "--ablations",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also tag with each rule of ABLATIONS changed (--no-ablations: the defaults only).",
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [bench_model(Path(m), work, ablations=args.ablations) for m in args.models.split(",")]
    print(
        f"\n{'model':<34}{'recording':<16}{'rules':<24}{'seg F1':>8}{'evt F1':>8}{'seg AP':>8}{'events':>8}"
    )
    for r in rows:
        for name, results in r["results"].items():
            for variant, f in results.items():
                if variant == "per_class":
                    continue
                ap = f"{f['segment_ap']:.3f}" if f["segment_ap"] is not None else "-"
                print(
                    f"{Path(r['model']).name:<34}{name:<16}{variant:<24}{f['segment_f1'] or 0:>8.3f}"
                    f"{f['event_f1'] or 0:>8.3f}{ap:>8}{f['events'] or 0:>8}"
                )
    Path(args.json).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
