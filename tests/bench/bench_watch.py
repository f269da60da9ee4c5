"""Benchmark: ``soundshard tag --watch``: seconds from a recording landing to its tags being written.

    .venv/bin/python tests/bench/bench_watch.py --model bench-results/train19/dscnn-s-cv/fold-4 \\
        [--files 20] [--every-s 3] [--interval-s 5] [--json bench-results/watch.json]

A thread lands ``--files`` recordings (10 s clips cut from the shared longform recording, written
whole and renamed into the watched folder, as an upload completes) one every ``--every-s``
seconds, while ``tag --watch --watch-interval-s`` runs in this process. A file's latency is the
time from its landing to the commit of the run that tagged it (its ledger file, written last).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
LONGFORM = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "longform"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--every-s", type=float, default=3.0)
    parser.add_argument("--interval-s", type=float, default=5.0)
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "watch.json"))
    args = parser.parse_args()
    from soundshard.pipelines import tag

    audio, rate = sf.read(next(LONGFORM.glob("*.flac")), dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    incoming, out = work / "incoming", work / "tags"
    incoming.mkdir()
    landed: dict[str, float] = {}

    def arrive():
        for k in range(args.files):
            part = incoming / f".part-{k}.wav"
            sf.write(part, audio[k * rate * 10 : (k + 1) * rate * 10], rate)
            part.rename(incoming / f"rec-{k:02d}.wav")
            landed[f"rec-{k:02d}"] = time.time()
            time.sleep(args.every_s)

    writer = threading.Thread(target=arrive)
    writer.start()
    watch_for = args.files * args.every_s + 2 * args.interval_s
    argv = [
        "--input",
        str(incoming),
        "--model-dir",
        args.model,
        "--output",
        str(out),
        "--runner",
        "DirectRunner",
    ]
    argv += ["--format", "parquet", "--watch", "--watch-interval-s", str(args.interval_s)]
    code = tag.run([*argv, "--watch-for-s", str(watch_for)])
    writer.join()
    latencies = []
    for ledger in (out / "ledger").glob("*.parquet"):
        committed = ledger.stat().st_mtime
        for clip in pq.read_table(ledger, columns=["clip_id"]).column("clip_id").to_pylist():
            latencies.append(committed - landed[clip])
    median = statistics.median(latencies)
    print(
        f"{len(latencies)} of {args.files} files tagged (exit {code}); latency from landing to tags: "
        f"median {median:.1f} s, max {max(latencies):.1f} s (runs every {args.interval_s:g} s)",
        flush=True,
    )
    result = {
        "files": args.files,
        "tagged": len(latencies),
        "interval_s": args.interval_s,
        "latency_s": {"median": round(median, 2), "max": round(max(latencies), 2)},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
