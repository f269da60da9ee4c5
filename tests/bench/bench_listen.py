"""Benchmark: ``soundshard listen`` on the shared longform recording.

    .venv/bin/python tests/bench/bench_listen.py --model bench-results/train19/dscnn-s-cv/fold-4 \\
        [--hours 1] [--json bench-results/listen.json]

In one process, on one core (``OMP_NUM_THREADS``/TensorFlow threads 1, set before TensorFlow loads):

- **Throughput**: the 10-minute recording pushed as fast as possible in 5 s blocks: audio seconds
  per second of wall time.
- **Latency**: the recording pushed in 0.1 s blocks (as a live input arrives); for each window, the
  compute time from the push of the block that completes it to its score (the time a live stream
  adds beyond the window's end and the block); median and 99th percentile.
- **Memory**: ``--hours`` of audio (the recording looped) streamed in 5 s blocks; resident memory
  (``VmRSS``) every 10 audio minutes: flat means bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LONGFORM = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "longform"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "listen.json"))
    args = parser.parse_args()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from soundshard.pipelines.listen import Listener

    path = next(LONGFORM.glob("*.flac"))
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    duration = len(audio) / rate

    def fresh():
        return Listener(args.model, source_rate_hz=rate)

    # throughput: 5 s blocks, as fast as possible (a warm-up pass first: TensorFlow traces)
    listener = fresh()
    for start in range(0, rate * 30, rate * 5):
        listener.push(audio[start : start + rate * 5])
    listener = fresh()
    started = time.perf_counter()
    for start in range(0, len(audio), rate * 5):
        listener.push(audio[start : start + rate * 5])
    listener.finish()
    wall = time.perf_counter() - started
    throughput = duration / wall
    print(f"throughput: {duration:.0f} s of audio in {wall:.2f} s: {throughput:.0f}x real time", flush=True)

    # latency: 0.1 s blocks; per window, the compute time of the push that completed it
    listener = fresh()
    block = rate // 10
    latencies = []
    for start in range(0, len(audio), block):
        t0 = time.perf_counter()
        windows, _, _ = listener.push(audio[start : start + block])
        spent = time.perf_counter() - t0
        latencies += [spent] * len(windows)
    ms = np.array(latencies) * 1000
    median, p99 = float(np.median(ms)), float(np.percentile(ms, 99))
    print(f"latency per window: median {median:.1f} ms, p99 {p99:.1f} ms", flush=True)

    # memory over a long stream
    listener = fresh()
    total = int(args.hours * 3600 * rate)
    pushed, marks, next_mark = 0, [], 0
    while pushed < total:
        for start in range(0, len(audio), rate * 5):
            if pushed >= total:
                break
            part = audio[start : start + rate * 5]
            listener.push(part)
            pushed += len(part)
            if pushed >= next_mark:
                marks.append((round(pushed / rate / 60), round(rss_mb(), 1)))
                next_mark += rate * 600
    listener.finish()
    print("resident memory (audio minutes, MB): " + ", ".join(f"{m}: {r}" for m, r in marks), flush=True)
    result = {
        "model": args.model,
        "audio_s": duration,
        "throughput_x_real_time": round(throughput, 1),
        "latency_ms": {"median": round(median, 2), "p99": round(p99, 2)},
        "rss_mb_by_audio_minute": marks,
        "windows_streamed": listener.windows_scored,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
