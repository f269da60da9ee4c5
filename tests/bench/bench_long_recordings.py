"""Benchmark: long recordings through ``soundshard features`` (memory against length, split speed-up).

    .venv/bin/python tests/bench/bench_long_recordings.py [--lengths 10m,1h,4h] [--repeats 3]
        [--split_length 1h] [--split_modes one-unit-1w,split-1w,split-2w] [--shard_size_mb MB]
        [--quiet_below CORES] [--cache bench-results/long-recordings]
        [--json bench-results/long_recordings.json]

``--lengths ''`` or ``--split_length ''`` skips that part.

Recordings are synthesised once into ``--cache`` (reused when present): mono 48 kHz 16-bit FLAC, as
a field recorder writes them, with a fixed seed: low-level coloured background noise plus a few
tone sweeps per minute (bird- or alarm-like events). They are written a minute at a time with
``soundfile.SoundFile``, so generation never holds a recording in memory; a 30 s recording of the
same kind is the warm-up input.

Two measurements, each run in a fresh process (``python bench_long_recordings.py --one ...`` calls
``soundshard.pipelines.features.run``), after its imports and one untimed warm-up run on the 30 s
recording with the same options. Timed is the whole ``features.run`` call: listing, pipeline
construction, worker start-up, header probing, decoding, features, shard writing, commit.

- **Memory against length**: ``soundshard features --input FILE --output OUT --format parquet
  --direct_num_workers 1`` (default ``--unit_s 60``) on each length. Peak RSS covers the
  process's whole life (imports and warm-up included) and is the larger of two figures, both
  reported: the largest sum of the resident sets of the process and all its descendants, sampled
  with psutil every 50 ms (``tree``), and the kernel's exact peak of the largest single process
  (``1 proc``; sampling can miss a short spike).
- **Split speed-up** on the ``--split_length`` recording: ``--unit_s 0 --direct_num_workers 1``
  (one work unit, the baseline), ``--unit_s 60 --direct_num_workers 1`` (split, one worker) and
  ``--unit_s 60 --direct_num_workers 2`` (split, two worker processes), alternating order.

Wall times are medians of ``--repeats``; peak RSS is the largest over the repeats. The machine is
shared and noisy: ratios measured in the same run count, single absolute times do not. The input
file is read once before every run so that every run finds it in the page cache. ``other cores``
is the CPU time that other work on the machine took during a run, divided by its wall time (two
cores: 1.0 means another job held one of them); ``--quiet_below`` waits before each run until the
machine is quieter than that, and ``quiet`` columns give the median over the runs during which
other work took under 0.25 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proctree import git_state, result_line, run_measured, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_RATE_HZ = 48_000
FILE_FORMAT, SUBTYPE = "FLAC", "PCM_16"
CHUNK_S = 60
SEED = 20261125
WARMUP_S = 30
#: Split-speed-up modes: name → (--unit_s, --direct_num_workers).
SPLIT_MODES = {"one-unit-1w": (0, 1), "split-1w": (60, 1), "split-2w": (60, 2)}
LENGTH_MODE = "split-1w"
RSS_TARGET_MB = 1024
FLAT_TOLERANCE = 1.2
SPEEDUP_TARGET = 1.6
#: A run during which other work took less than this many cores counts as quiet.
QUIET_OTHER_CORES = 0.25


def parse_length(text: str) -> int:
    """``"30s"``, ``"10m"``, ``"4h"`` or plain seconds → seconds."""
    text = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:])
    return int(float(text[:-1]) * scale) if scale else int(float(text))


def length_name(seconds: int) -> str:
    """Seconds → ``"30s"``, ``"10m"``, ``"4h"``."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def synth_chunk(rng: np.random.Generator, n: int, zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of field-recording-like audio, float ``[n]``, and the noise filter's state.

    Background: white noise through a one-pole low-pass (state carried across chunks, so chunk
    edges do not show) plus a little white noise, about -40 dBFS. Events: on average 4 per minute,
    tone sweeps of 0.2-1.5 s between 300 Hz and 6 kHz with a Hann envelope, -26 to -10 dBFS.
    """
    from scipy.signal import lfilter

    background, zi = lfilter([0.02], [1.0, -0.98], rng.standard_normal(n), zi=zi)
    y = background + 0.003 * rng.standard_normal(n)
    for _ in range(rng.poisson(4 * n / (60 * SAMPLE_RATE_HZ))):
        length = int(rng.uniform(0.2, 1.5) * SAMPLE_RATE_HZ)
        if length >= n:
            continue
        start = int(rng.integers(0, n - length))
        f0, f1 = rng.uniform(300, 6000, size=2)
        freq = np.linspace(f0, f1, length)
        tone = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE_HZ) * np.hanning(length)
        y[start : start + length] += rng.uniform(0.05, 0.3) * tone
    return np.clip(y, -1.0, 1.0), zi


def make_recording(path: Path, duration_s: int, *, seed: int = SEED) -> Path:
    """Writes the recording at ``path`` unless a complete one is there; returns ``path``.

    Each chunk has its own generator (``seed``, chunk index), so a recording's first minutes are
    the same whatever its length. Written under a temporary name and renamed when complete.
    """
    import soundfile

    frames = duration_s * SAMPLE_RATE_HZ
    if path.exists():
        info = soundfile.info(str(path))
        if info.frames == frames and info.samplerate == SAMPLE_RATE_HZ:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    started = time.perf_counter()
    zi = np.zeros(1)
    chunk = CHUNK_S * SAMPLE_RATE_HZ
    with soundfile.SoundFile(
        str(partial), "w", samplerate=SAMPLE_RATE_HZ, channels=1, format=FILE_FORMAT, subtype=SUBTYPE
    ) as f:
        for index, start in enumerate(range(0, frames, chunk)):
            rng = np.random.default_rng([seed, index])
            y, zi = synth_chunk(rng, min(chunk, frames - start), zi)
            f.write(y.astype(np.float32))
    os.replace(partial, path)
    print(
        f"generated {path.name}: {duration_s} s, {path.stat().st_size / 2**20:.0f} MB "
        f"in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    return path


def recording_path(cache: Path, duration_s: int) -> Path:
    return cache / f"field-{length_name(duration_s)}-{SAMPLE_RATE_HZ // 1000}k.flac"


def features_argv(
    input_path: str, out: str, *, unit_s: float, workers: int, shard_size_mb: float | None = None
) -> list[str]:
    argv = ["--input", input_path, "--output", out, "--format", "parquet", "--unit_s", str(unit_s)]
    argv += ["--direct_num_workers", str(workers)]
    return argv + (["--shard_size_mb", str(shard_size_mb)] if shard_size_mb else [])


def run_one(
    input_path: str, warmup_path: str, *, unit_s: float, workers: int, shard_size_mb: float | None = None
) -> dict:
    """Times one features run in this process (called in a fresh subprocess)."""
    from soundshard.pipelines import features

    with tempfile.TemporaryDirectory() as out:
        argv = features_argv(warmup_path, out, unit_s=unit_s, workers=workers, shard_size_mb=shard_size_mb)
        assert features.run(argv) == 0
    with tempfile.TemporaryDirectory() as out:
        argv = features_argv(input_path, out, unit_s=unit_s, workers=workers, shard_size_mb=shard_size_mb)
        start = time.perf_counter()
        code = features.run(argv)
        wall_s = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"soundshard features exited with {code}")
        figures = json.loads(Path(out, "dataset.json").read_text())["figures"]
        output_mb = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
        shards = len(list(Path(out).rglob("windows-*.parquet")))
    return {
        "wall_s": wall_s,
        "audio_s": figures["audio_s"],
        "windows": figures["windows"],
        "work_units": figures["work_units"],
        "files_processed": figures["files_processed"],
        "dead_letters": figures["dead_letters"],
        "output_mb": output_mb,
        "shards": shards,
    }


def measure(
    input_path: Path,
    warmup_path: Path,
    *,
    unit_s: float,
    workers: int,
    quiet_below: float,
    shard_size_mb: float | None,
) -> dict:
    """One measured run in a fresh process: the child's figures plus time and memory from outside."""
    with open(input_path, "rb") as f:  # page cache warm for every run alike
        while f.read(16 * 2**20):
            pass
    command = [sys.executable, __file__, "--one", str(input_path), str(warmup_path), str(unit_s)]
    command += [str(workers), str(shard_size_mb or 0)]
    waited_s = wait_for_quiet(quiet_below) if quiet_below else 0.0
    load_before = os.getloadavg()[0]
    proc = run_measured(command)
    if proc["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc['stderr'][-3000:]}")
    result = json.loads(result_line(proc["stdout"]))
    result.update({k: v for k, v in proc.items() if k not in ("stdout", "stderr", "returncode")})
    result["load_1min_before"] = load_before
    result["waited_for_quiet_s"] = waited_s
    result["peak_rss_mb"] = max(result["peak_tree_rss_mb"], result["peak_process_rss_mb"])
    return result


def other_cores(run: dict) -> float:
    return run["other_cpu_s"] / run["process_wall_s"]


def summarize_runs(runs: list[dict]) -> dict:
    """Medians of time and throughput, and the largest peaks, over repeated runs.

    ``quiet_*``: the same over the runs during which other work took under ``QUIET_OTHER_CORES``
    (None when there was none); on a shared machine these are the ones that measure the code.
    """
    quiet = [r for r in runs if other_cores(r) < QUIET_OTHER_CORES]
    return {
        "quiet_runs": len(quiet),
        "quiet_median_wall_s": statistics.median(r["wall_s"] for r in quiet) if quiet else None,
        "audio_s": runs[0]["audio_s"],
        "windows": runs[0]["windows"],
        "work_units": runs[0]["work_units"],
        "shards": runs[0]["shards"],
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "audio_s_per_s": statistics.median(r["audio_s"] / r["wall_s"] for r in runs),
        "median_tree_cpu_s": statistics.median(r["tree_cpu_s"] for r in runs),
        "median_other_cores": statistics.median(other_cores(r) for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_tree_rss_mb": max(r["peak_tree_rss_mb"] for r in runs),
        "peak_process_rss_mb": max(r["peak_process_rss_mb"] for r in runs),
        "max_processes": max(r["max_processes"] for r in runs),
        "runs": runs,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def alternating(items: list, repeat: int) -> list:
    return list(items) if repeat % 2 == 0 else list(reversed(items))


def print_tables(
    length_rows: list[dict], split_rows: list[dict], *, repeats: int, split_name: str, extra: str = ""
) -> dict:
    """Prints both tables and the verdicts against the targets; returns the verdicts."""
    verdicts = {}
    if length_rows:
        print(
            f"\nPeak RSS against length (--unit_s 60 --direct_num_workers 1{extra}), median wall of {repeats}"
        )
        print(
            f"{'length':<8}{'audio s':>9}{'units':>7}{'windows':>9}{'shards':>8}{'wall s':>9}"
            f"{'audio s/s':>11}{'peak RSS MB':>13}{'tree MB':>9}{'1 proc MB':>11}{'RSS ratio':>11}"
            f"{'other cores':>13}{'quiet runs':>12}{'quiet wall s':>14}"
        )
        for r in length_rows:
            print(
                f"{r['length']:<8}{r['audio_s']:>9.0f}{r['work_units']:>7}{r['windows']:>9}{r['shards']:>8}"
                f"{r['median_wall_s']:>9.2f}{r['audio_s_per_s']:>11.0f}{r['peak_rss_mb']:>13.0f}"
                f"{r['peak_tree_rss_mb']:>9.0f}{r['peak_process_rss_mb']:>11.0f}"
                f"{r['rss_ratio_to_shortest']:>11.2f}{r['median_other_cores']:>13.2f}"
                f"{r['quiet_runs']:>12}{fmt(r['quiet_median_wall_s'], '.2f'):>14}"
            )
    if len(length_rows) > 1:
        ratio = length_rows[-1]["rss_ratio_to_shortest"]
        verdicts["rss_flat"] = ratio <= FLAT_TOLERANCE
        print(
            f"peak RSS {length_rows[-1]['length']} / {length_rows[0]['length']}: {ratio:.2f} "
            f"(flat: <= {FLAT_TOLERANCE}) -> {'met' if verdicts['rss_flat'] else 'NOT met'}"
        )
    four_h = next((r for r in length_rows if r["length"] == "4h"), None)
    if four_h:
        verdicts["rss_4h_under_1gb"] = four_h["peak_rss_mb"] < RSS_TARGET_MB
        print(
            f"peak RSS 4h: {four_h['peak_rss_mb']:.0f} MB (< {RSS_TARGET_MB} MB) -> "
            f"{'met' if verdicts['rss_4h_under_1gb'] else 'NOT met'}"
        )
    if split_rows:
        base = split_rows[0]["mode"]
        print(f"\nSplit speed-up on the {split_name} recording{extra}, median wall of {repeats}")
        print(
            f"{'mode':<13}{'unit_s':>7}{'workers':>8}{'units':>7}{'wall s':>9}{'audio s/s':>11}"
            f"{'x ' + base:>15}{'CPU s':>8}{'peak RSS MB':>13}{'other cores':>13}"
            f"{'quiet runs':>12}{'quiet wall s':>14}{'quiet x':>9}"
        )
        for r in split_rows:
            print(
                f"{r['mode']:<13}{r['unit_s']:>7}{r['workers']:>8}{r['work_units']:>7}"
                f"{r['median_wall_s']:>9.2f}{r['audio_s_per_s']:>11.0f}{r['speedup']:>15.2f}"
                f"{r['median_tree_cpu_s']:>8.1f}{r['peak_rss_mb']:>13.0f}{r['median_other_cores']:>13.2f}"
                f"{r['quiet_runs']:>12}{fmt(r['quiet_median_wall_s'], '.2f'):>14}"
                f"{fmt(r['quiet_speedup'], '.2f'):>9}"
            )
        modes = [r["mode"] for r in split_rows]
        if modes[0] == "one-unit-1w" and "split-2w" in modes:
            row = split_rows[modes.index("split-2w")]
            for key, runs in (("speedup", "all runs"), ("quiet_speedup", "quiet runs")):
                if row[key] is None:
                    continue
                verdicts[f"split_{key}"] = row[key] >= SPEEDUP_TARGET
                print(
                    f"split-2w vs one-unit-1w ({runs}): {row[key]:.2f}x (>= {SPEEDUP_TARGET}x) -> "
                    f"{'met' if verdicts[f'split_{key}'] else 'NOT met'}"
                )
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", default="10m,1h,4h", help="Recording lengths, e.g. 10m,1h,4h ('' to skip that part)."
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--split_length", default="1h", help="Recording for the split speed-up ('' to skip that part)."
    )
    parser.add_argument(
        "--split_modes",
        default=",".join(SPLIT_MODES),
        help=f"Modes of the split part, the first is the baseline (from {', '.join(SPLIT_MODES)}).",
    )
    parser.add_argument(
        "--quiet_below",
        type=float,
        default=0,
        help="Before each run, wait (up to 10 min) until the machine's busy CPU is below this many "
        "cores (0: do not wait). For shared machines.",
    )
    parser.add_argument("--cache", default=str(ROOT / "bench-results" / "long-recordings"))
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "long_recordings.json"))
    parser.add_argument(
        "--shard_size_mb",
        type=float,
        default=None,
        help="Pass --shard_size_mb to every run (default: its default).",
    )
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        input_path, warmup_path, unit_s, workers, shard_size_mb = args.one
        result = run_one(
            input_path,
            warmup_path,
            unit_s=float(unit_s),
            workers=int(workers),
            shard_size_mb=float(shard_size_mb) or None,
        )
        print("RESULT " + json.dumps(result))
        return 0

    cache = Path(args.cache)
    lengths = sorted({parse_length(x) for x in args.lengths.split(",") if x.strip()})
    split_s = parse_length(args.split_length) if args.split_length else None
    split_modes = [m.strip() for m in args.split_modes.split(",") if m.strip()]
    unknown = [m for m in split_modes if m not in SPLIT_MODES]
    if unknown:
        parser.error(f"--split_modes: unknown {unknown}; known: {list(SPLIT_MODES)}")
    warmup = make_recording(recording_path(cache, WARMUP_S), WARMUP_S)
    files = {s: make_recording(recording_path(cache, s), s) for s in sorted({*lengths, split_s} - {None})}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    length_runs: dict[int, list[dict]] = {s: [] for s in lengths}
    unit_s, workers = SPLIT_MODES[LENGTH_MODE]
    for repeat in range(args.repeats):
        for s in alternating(lengths, repeat):
            print(f"[length] {length_name(s)} repeat {repeat + 1}", file=sys.stderr)
            length_runs[s].append(
                measure(
                    files[s],
                    warmup,
                    unit_s=unit_s,
                    workers=workers,
                    quiet_below=args.quiet_below,
                    shard_size_mb=args.shard_size_mb,
                )
            )
    length_rows = [{"length": length_name(s), **summarize_runs(length_runs[s])} for s in lengths]
    for row in length_rows:
        row["rss_ratio_to_shortest"] = row["peak_rss_mb"] / length_rows[0]["peak_rss_mb"]

    split_rows = []
    if split_s and split_modes:
        mode_runs: dict[str, list[dict]] = {m: [] for m in split_modes}
        for repeat in range(args.repeats):
            for mode in alternating(split_modes, repeat):
                print(f"[split] {mode} repeat {repeat + 1}", file=sys.stderr)
                unit_s, workers = SPLIT_MODES[mode]
                mode_runs[mode].append(
                    measure(
                        files[split_s],
                        warmup,
                        unit_s=unit_s,
                        workers=workers,
                        quiet_below=args.quiet_below,
                        shard_size_mb=args.shard_size_mb,
                    )
                )
        for mode in split_modes:
            unit_s, workers = SPLIT_MODES[mode]
            split_rows.append(
                {"mode": mode, "unit_s": unit_s, "workers": workers, **summarize_runs(mode_runs[mode])}
            )
        for row in split_rows:
            row["speedup"] = split_rows[0]["median_wall_s"] / row["median_wall_s"]
            quiet_base, quiet_wall = split_rows[0]["quiet_median_wall_s"], row["quiet_median_wall_s"]
            row["quiet_speedup"] = quiet_base / quiet_wall if quiet_base and quiet_wall else None

    verdicts = print_tables(
        length_rows,
        split_rows,
        repeats=args.repeats,
        split_name=length_name(split_s) if split_s else "",
        extra=f" --shard_size_mb {args.shard_size_mb:g}" if args.shard_size_mb else "",
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "started": started,
                "argv": sys.argv[1:],
                "repeats": args.repeats,
                "shard_size_mb": args.shard_size_mb,
                "cpus": os.cpu_count(),
                "audio_format": f"{FILE_FORMAT} {SUBTYPE} mono {SAMPLE_RATE_HZ} Hz",
                "files_mb": {length_name(s): p.stat().st_size / 2**20 for s, p in files.items()},
                "git": git_state(ROOT),
                "length_rows": length_rows,
                "split_rows": split_rows,
                "verdicts": verdicts,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
