"""Benchmark: features pipeline vs a plain single-process loop on the 400 ESC-10 clips.

    .venv/bin/python tests/bench/bench_features.py [--repeats 3] [--json bench-results/features.json]

Modes, each timed in a fresh process after its imports and one untimed warm-up on 4 clips
(interpreter start, imports and first-call initialisation are not counted; everything a run does
after that is: listing, pipeline construction, worker start-up, writing, commit):

- ``loop``: soundfile + soxr + librosa (``melspectrogram`` on each whole clip, ``power_to_db``,
  windows sliced, ``top_db`` per window) written to one Parquet file: the same features as the
  pipeline's defaults.
- ``pipeline-1w`` / ``pipeline-2w``: ``soundshard features --format parquet`` with 1 and 2
  workers (in-process FnApiRunner; multi-process FnApiRunner).
- ``pipeline-1w-both``: the default run, Parquet and TFRecord.

Each mode runs on the 400 clips and on the same clips listed ``--scale`` times (symlinked copies,
default 5: 2000 clips, 10,000 s), where fixed costs such as worker start-up are amortised.
Throughput is audio seconds per wall second; ratios are against the loop's median in the same run
(the machine is shared and noisy: ratios count, absolute times do not). Peak RSS is the largest
resident set of the process and of any worker process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ESC10 = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "esc10"
MODES = ("loop", "pipeline-1w", "pipeline-2w", "pipeline-1w-both")


def plain_loop(out_dir: str, *, audio_dir: Path, manifest: Path) -> float:
    """Returns audio seconds processed."""
    import csv

    import librosa
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile
    import soxr

    sr, n_fft, hop, n_mels, wf, wh, top_db = 22050, 1024, 512, 60, 41, 20, 80.0
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    ids, labels, folds, starts, feats = [], [], [], [], []
    audio_s = 0.0
    for row in rows:
        y, rate = soundfile.read(audio_dir / row["filename"], dtype="float32")
        y = soxr.resample(y, rate, sr)
        audio_s += len(y) / sr
        frames = 1 + len(y) // hop
        n = (frames - wf) // wh + 1
        if (n - 1) * wh + wf < frames:
            n += 1
        need = ((n - 1) * wh + wf - 1) * hop
        y = np.pad(y, (0, max(0, need - len(y))))
        mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
        db = librosa.power_to_db(mel, ref=1.0, top_db=None)
        for k in range(n):
            w = db[:, k * wh : k * wh + wf]
            feats.append(np.maximum(w, w.max() - top_db).ravel())
            ids.append(row["filename"])
            labels.append(row["category"])
            folds.append(int(row["fold"]))
            starts.append(k * wh * hop / sr)
    table = pa.table(
        {
            "clip_id": ids,
            "label": labels,
            "fold": pa.array(folds, pa.int32()),
            "start_s": starts,
            "log_mel": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(feats)), n_mels * wf),
        }
    )
    pq.write_table(table, os.path.join(out_dir, "windows.parquet"))
    return audio_s


def make_inputs(workdir: Path, scale: int) -> dict[str, tuple[Path, Path]]:
    """``{name: (audio_dir, manifest)}``: ESC-10, ESC-10 listed ``scale`` times, a 4-clip warm-up."""
    import csv

    with open(ESC10 / "meta.csv") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = reader.fieldnames, list(reader)
    scaled = workdir / "scaled"
    scaled.mkdir(parents=True, exist_ok=True)
    scaled_rows = []
    for copy in range(scale):
        (scaled / f"copy{copy}").symlink_to(ESC10 / "audio", target_is_directory=True)
        scaled_rows += [{**row, "filename": f"copy{copy}/{row['filename']}"} for row in rows]
    for name, these in (("scaled.csv", scaled_rows), ("warmup.csv", rows[:4])):
        with open(workdir / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(these)
    return {
        "esc10": (ESC10 / "audio", ESC10 / "meta.csv"),
        f"esc10x{scale}": (scaled, workdir / "scaled.csv"),
        "warmup": (ESC10 / "audio", workdir / "warmup.csv"),
    }


def run_mode(mode: str, audio_dir: Path, manifest: Path) -> float:
    """Runs one mode once; returns audio seconds processed."""
    from soundshard.pipelines import features

    with tempfile.TemporaryDirectory() as out:
        if mode == "loop":
            return plain_loop(out, audio_dir=audio_dir, manifest=manifest)
        argv = ["--input", str(audio_dir), "--manifest", str(manifest), "--output", out]
        argv += ["--direct_num_workers", "2" if mode == "pipeline-2w" else "1"]
        if not mode.endswith("both"):
            argv += ["--format", "parquet"]
        assert features.run(argv) == 0
        return json.loads(Path(out, "dataset.json").read_text())["figures"]["audio_s"]


def run_one(mode: str, audio_dir: Path, manifest: Path, warmup: tuple[Path, Path]) -> dict:
    """Times one mode in this process (called in a fresh subprocess)."""
    import librosa  # noqa: F401  (imports are not timed)

    import soundshard.pipelines.features  # noqa: F401

    run_mode(mode, *warmup)
    start = time.perf_counter()
    audio_s = run_mode(mode, audio_dir, manifest)
    wall_s = time.perf_counter() - start
    return {
        "mode": mode,
        "wall_s": wall_s,
        "audio_s": audio_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=5, help="Copies of ESC-10 in the larger input.")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "features.json"))
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, audio, manifest, warm_audio, warm_manifest, _ = args.one
        result = run_one(mode, Path(audio), Path(manifest), (Path(warm_audio), Path(warm_manifest)))
        print("RESULT " + json.dumps(result))
        return 0
    if not (ESC10 / "meta.csv").exists():
        print(f"ESC-10 not found at {ESC10}", file=sys.stderr)
        return 2
    for path in (ESC10 / "audio").iterdir():  # page cache warm for every mode alike
        path.read_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        inputs = make_inputs(Path(workdir), args.scale)
        warmup = inputs.pop("warmup")
        for input_name, (audio_dir, manifest) in inputs.items():
            results: dict[str, list[dict]] = {m: [] for m in MODES}
            for repeat in range(args.repeats):
                for mode in MODES if repeat % 2 == 0 else reversed(MODES):
                    command = [
                        sys.executable,
                        __file__,
                        "--one",
                        mode,
                        str(audio_dir),
                        str(manifest),
                        str(warmup[0]),
                        str(warmup[1]),
                        input_name,
                    ]
                    proc = subprocess.run(command, capture_output=True, text=True, check=True)
                    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
                    results[mode].append(json.loads(line[len("RESULT ") :]))
            loop_speed = statistics.median(r["audio_s"] / r["wall_s"] for r in results["loop"])
            for mode in MODES:
                speed = statistics.median(r["audio_s"] / r["wall_s"] for r in results[mode])
                rows.append(
                    {
                        "input": input_name,
                        "mode": mode,
                        "audio_s": results[mode][0]["audio_s"],
                        "median_wall_s": statistics.median(r["wall_s"] for r in results[mode]),
                        "audio_s_per_s": speed,
                        "ratio_to_loop": speed / loop_speed,
                        "real_time_factor": 1 / speed,
                        "peak_rss_mb": max(
                            max(r["peak_rss_mb"], r["peak_child_rss_mb"]) for r in results[mode]
                        ),
                        "runs": results[mode],
                    }
                )
    header = (
        f"{'input':<10}{'mode':<18}{'audio s':>9}{'wall s':>8}{'audio s/s':>11}{'x loop':>8}{'RTF':>10}"
        f"{'peak RSS MB':>13}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['input']:<10}{r['mode']:<18}{r['audio_s']:>9.0f}{r['median_wall_s']:>8.2f}"
            f"{r['audio_s_per_s']:>11.0f}{r['ratio_to_loop']:>8.2f}{r['real_time_factor']:>10.5f}"
            f"{r['peak_rss_mb']:>13.0f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"repeats": args.repeats, "cpus": os.cpu_count(), "rows": rows}, indent=2)
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
