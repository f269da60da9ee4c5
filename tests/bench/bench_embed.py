"""Benchmark: ``soundshard embed`` (OpenL3 through RunInference) vs the bare Keras model.

    .venv/bin/python tests/bench/bench_embed.py [--clips 4] [--repeats 3] [--batch-size 16]
        [--input-repr mel256] [--json bench-results/embed.json]

The official weights are not available here, so the network loads a weight file in the official
layout written from a randomly initialised network: the work per window is the same.

1. Throughput, in one process (``throughput`` mode): the model loaded once and warmed up; then
   - ``bare``: ``model.predict_on_batch`` on pre-built batches (``--batch-size`` windows of the
     first ``--clips`` ESC-10 clips, decoded, resampled to 48 kHz and framed beforehand, not
     timed);
   - ``pipeline``: ``soundshard embed`` on the same clips (a manifest subset) with
     ``--min/max-batch-size`` equal to the same size, timed from the call to its exit (listing,
     planning, decoding, resampling, framing, model load, inference, shards, commit), in-process
     FnApiRunner;
   - ``bare`` again; pipeline and bare runs alternate ``--repeats`` times, since the load of the
     shared machine drifts within minutes. Reported: the ratio of the medians, and each pipeline
     run against the mean of the bare runs just before and after it.
   GFLOP/s counts 2 FLOP per multiply-accumulate of the conv stack.
2. Peak RSS (``rss`` mode, each run in a fresh process): ``soundshard embed`` on synthetic
   48 kHz recordings of 10 minutes and 1 hour. OpenL3 runs with ``--hop-s 10`` (a window every
   10 s: a dense 1-hour run takes hours on this CPU, and memory does not depend on the hop, since
   units decode 60 s and windows are views of them, streamed in batches); the tiny SavedModel of
   the tests runs with the dense default hop of 0.1 s (36,000 windows an hour) through the same
   path.
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
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
ESC10 = SHARED / "esc10"


def _quiet():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def throughput(args) -> dict:
    _quiet()
    import numpy as np

    from soundshard.pipelines import embed
    from soundshard.schemas.embedding import EmbeddingConfig
    from soundshard.transforms.audio.decode import decode_audio
    from soundshard.transforms.audio.framing import FrameGrid
    from soundshard.transforms.features import openl3
    from soundshard.transforms.features.embeddings import load_embedding_model
    from tests.embedding_fixtures import make_openl3_weights

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    weights = make_openl3_weights(work / "weights", input_repr=args.input_repr, content_type="env")
    lines = (ESC10 / "meta.csv").read_text().splitlines()
    manifest = work / "meta.csv"
    manifest.write_text("\n".join(lines[: args.clips + 1]) + "\n")
    config = EmbeddingConfig(
        input_repr=args.input_repr, content_type="env", embedding_size=512, model_uri=str(weights)
    )
    model = load_embedding_model(config)
    grid = FrameGrid.from_config(config)
    frames = []
    audio_s = 0.0
    for line in lines[1 : args.clips + 1]:
        audio = decode_audio(str(ESC10 / "audio" / line.split(",")[0]), sample_rate_hz=48000)
        audio_s += audio.duration_s
        frames.extend(grid.frames(audio.samples))
    batches = [
        np.ascontiguousarray(np.stack(frames[k : k + args.batch_size]))
        for k in range(0, len(frames), args.batch_size)
    ]
    n_windows = len(frames)
    model.embed(batches[0][:2])  # warm-up: graph building, oneDNN kernels

    def bare() -> float:
        started = time.perf_counter()
        for batch in batches:
            model.embed(batch)
        return time.perf_counter() - started

    rows = []
    macs = openl3.macs_per_window(args.input_repr)

    def row(mode, wall_s):
        rows.append(
            {
                "mode": mode,
                "windows": n_windows,
                "audio_s": round(audio_s, 1),
                "wall_s": round(wall_s, 2),
                "windows_per_s": round(n_windows / wall_s, 3),
                "audio_s_per_s": round(audio_s / wall_s, 3),
                "gflop_per_s": round(n_windows * 2 * macs / wall_s / 1e9, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    def pipeline(index: int) -> float:
        out = work / f"out{index}"
        argv = [
        "--input", str(ESC10 / "audio"), "--manifest", str(manifest), "--output", str(out),
        "--weights", str(weights), "--input-repr", args.input_repr, "--content-type", "env",
        "--embedding-size", "512", "--min-batch-size", str(args.batch_size),
        "--max-batch-size", str(args.batch_size),
        ]  # fmt: skip
        started = time.perf_counter()
        code = embed.run(argv)
        wall = time.perf_counter() - started
        assert code == 0
        dataset = json.loads((out / "dataset.json").read_text())
        assert dataset["figures"]["windows"] == n_windows, dataset["figures"]
        return wall

    # Alternating runs: the machine is shared, and its load drifts within minutes.
    row("bare", bare())
    for index in range(args.repeats):
        row("pipeline", pipeline(index))
        row("bare", bare())
    walls = {mode: sorted(r["wall_s"] for r in rows if r["mode"] == mode) for mode in ("bare", "pipeline")}
    medians = {mode: statistics.median(w) for mode, w in walls.items()}
    # each pipeline run against the mean of the bare runs just before and after it
    pairs = [
        (rows[2 * k]["wall_s"] + rows[2 * k + 2]["wall_s"]) / 2 / rows[2 * k + 1]["wall_s"]
        for k in range(args.repeats)
    ]
    return {
        "rows": rows,
        "median_wall_s": medians,
        "pipeline_vs_bare_median": round(medians["bare"] / medians["pipeline"], 3),
        "pipeline_vs_neighbouring_bare": [round(p, 3) for p in pairs],
    }


def _make_recording(path: Path, duration_s: float) -> None:
    import numpy as np
    import soundfile

    rate = 48000
    rng = np.random.default_rng(0)
    with soundfile.SoundFile(str(path), "w", rate, 1, "PCM_16", format="FLAC") as f:
        for start in range(0, int(duration_s), 60):
            t = np.arange(60 * rate) / rate + start
            y = 0.3 * np.sin(2 * np.pi * (300 + 50 * np.sin(t / 7)) * t) + 0.05 * rng.standard_normal(len(t))
            f.write(y.astype(np.float32))


def _isolated_rss(args) -> list[dict]:
    """Each RSS run's peak in a fresh interpreter, so the larger earlier ones do not mask it."""
    rows = []
    for index in range(4):
        command = [sys.executable, __file__, "--mode", "rss-one", "--index", str(index),
                   "--input-repr", args.input_repr]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rss_one(args) -> dict:
    _quiet()
    from tests.embedding_fixtures import make_openl3_weights, make_saved_model

    name, duration_s, model = [("10min", 600, "openl3"), ("10min", 600, "tiny-dense"),
                               ("1h", 3600, "openl3"), ("1h", 3600, "tiny-dense")][args.index]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-embed-rss-"))
    recording = work / f"field-{name}.flac"
    _make_recording(recording, duration_s)
    if model == "openl3":
        weights = make_openl3_weights(work / "weights", input_repr=args.input_repr, content_type="env")
        extra = ["--weights", str(weights), "--input-repr", args.input_repr, "--content-type", "env",
                 "--embedding-size", "512", "--hop-s", "10"]  # fmt: skip
    else:
        tiny = make_saved_model(work / "tiny", window_samples=48000)
        (work / "tiny.toml").write_text(
            'sample_rate_hz = 48000\nwindow_s = 1.0\nhop_s = 0.1\nembedding_size = 5\noutput = "embedding"\n'
        )
        extra = ["--embedding-model", f"saved_model:{tiny}", "--embedding-config", str(work / "tiny.toml")]
    out = work / "out"
    command = [sys.executable, "-m", "soundshard.pipelines.cli", "embed", "--input", str(recording),
               "--output", str(out), "--format", "parquet", *extra]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = json.loads((out / "dataset.json").read_text())
    return {
        "recording": name,
        "model": model,
        "windows": dataset["figures"]["windows"],
        "work_units": dataset["figures"]["work_units"],
        "wall_s": round(wall_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("all", "throughput", "rss", "rss-one"), default="all")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--input-repr", default="mel256", choices=("linear", "mel128", "mel256"))
    parser.add_argument("--repeats", type=int, default=3, help="pipeline runs, each between two bare runs")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.mode == "rss-one":
        print(json.dumps(rss_one(args)))
        return 0
    if not (ESC10 / "meta.csv").is_file() and args.mode in ("all", "throughput"):
        print(f"ESC-10 not found at {ESC10}", file=sys.stderr)
        return 1
    results = {"input_repr": args.input_repr, "batch_size": args.batch_size, "clips": args.clips}
    if args.mode in ("all", "throughput"):
        results["throughput"] = throughput(args)
    if args.mode in ("all", "rss"):
        results["rss"] = _isolated_rss(args)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
