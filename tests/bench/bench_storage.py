"""Benchmark: the ESC-10 clips read from a GCS emulator against the same clips on local disk.

    .venv/bin/python tests/bench/bench_storage.py [--repeats 3] [--workers N] [--latency_ms N]
        [--quiet_below CORES] [--no-profile] [--json bench-results/storage.json]

The GCS emulator of the tests (``tests/emulators.py``: ``gcp-storage-emulator`` in memory on
127.0.0.1 and an offline token endpoint, so gcsfs runs its real credential and request path) is
started once; the 400 clips and ``meta.csv`` are uploaded to a bucket once and read back byte for
byte. Then, alternating order,
``--repeats`` times each (medians reported), each in a fresh process with the emulator's
environment set from its start (gcsfs and fsspec read it at import):

- **local**: ``soundshard features --input ESC10/audio --manifest ESC10/meta.csv --output OUT
  --format parquet``
- **gcs**: ``soundshard features --input gs://BUCKET/audio --manifest gs://BUCKET/meta.csv
  --output OUT --format parquet``

``OUT`` is on local disk in both, so only the reading differs. No ``--direct_num_workers`` is
given (38 MB of input: the default runs in-process) unless ``--workers`` is. Each process times
``soundshard.pipelines.features.run`` after its imports and one untimed warm-up run on 4 other
clips (for gcs: 4 clips under another prefix, then the listing cache is cleared, so the timed run
lists and reads everything itself). Throughput is audio seconds per wall second; the target is
gcs ≥ 0.8 × local in the same run. The emulator runs on the same cores as the pipeline: its CPU
time during each run is reported, and ``other cores`` is the CPU time other work on the machine
took during a run divided by its wall time (the emulator included); ``--quiet_below`` waits before
each run until the machine is quieter than that, and ``quiet`` columns use only the runs during
which other work (the emulator not counted) took under 0.25 cores.

With profiling (default; ``--no-profile`` skips it), each mode runs once more, untimed, with
counters: GCS requests by kind (listing, object metadata, media download) with their count, time
and bytes, and the time spent opening sources, fetching the first blocks of a plan batch together
(``fill_all``), probing headers (plan) and decoding. Then the
clips' bytes are fetched with gcsfs alone, one request at a time and 2 or 4 at once, to separate
the cost of the requests from the pipeline and show what overlapping them would save.

The emulator answers a request in about a millisecond; a real object store takes longer per
request. ``--latency_ms N`` adds a mode ``gcs+Nms`` in which every gcsfs request first waits N ms
(in the client, so one request's wait never overlaps another's unless the requests themselves do),
to show how the reading pattern behaves at a more realistic latency.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proctree import git_state, result_line, run_measured, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ESC10 = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "esc10"
BUCKET = "esc10-bench"
MODES = ("local", "gcs")
TARGET_RATIO = 0.8
#: A run during which other work (the emulator not counted) took less than this many cores is quiet.
QUIET_OTHER_CORES = 0.25


# --- measured process --------------------------------------------------------------------------


def request_kind(method: str, path: str) -> str:
    """Kind of a gcsfs request from its method and URL template."""
    if "alt=media" in path or "/download/" in path:
        return "media GET (object bytes)"
    if path.rstrip("/").endswith("b/{}/o"):
        return f"{method} listing"
    if "b/{}/o/{}" in path:
        return f"{method} object metadata"
    return f"{method} {path}"


def instrument(stats: dict) -> None:
    """Counts gcsfs requests and times source opening, header probing and decoding in-process.

    ``stats[name] = [calls, seconds, bytes]``. Only code that runs in this process is seen (the
    in-process runner; worker processes of a multi-process run are not instrumented).
    """
    import gcsfs.core

    from soundshard.transforms.features import compute as feature_stage

    call = gcsfs.core.GCSFileSystem._call

    async def counted_call(self, method, path, *args, **kwargs):
        start = time.perf_counter()
        out = None
        try:
            out = await call(self, method, path, *args, **kwargs)
            return out
        finally:
            entry = stats["gcs " + request_kind(method, path)]
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], bytes):
                entry[2] += len(out[1])

    gcsfs.core.GCSFileSystem._call = counted_call

    def timed(module, name: str, label: str) -> None:
        function = getattr(module, name, None)
        if function is None:  # not part of this version of the stage: nothing to time
            return

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                stats[label][0] += 1
                stats[label][1] += time.perf_counter() - start

        setattr(module, name, wrapper)

    # The features stage imported these names; wrapping them there is what its DoFns call.
    timed(feature_stage, "open_source", "open_source (opening, no read)")
    timed(feature_stage, "fill_all", "fill_all (a batch's first blocks)")
    timed(feature_stage, "plan", "plan (open + header probe)")
    timed(feature_stage, "decode_audio", "decode (read + decode + resample)")


def add_latency(latency_ms: float) -> None:
    """Makes every gcsfs request wait ``latency_ms`` first (simulated object-store latency)."""
    import asyncio

    import gcsfs.core

    call = gcsfs.core.GCSFileSystem._call

    async def delayed_call(self, *args, **kwargs):
        await asyncio.sleep(latency_ms / 1000)
        return await call(self, *args, **kwargs)

    gcsfs.core.GCSFileSystem._call = delayed_call


def mode_parts(mode: str) -> tuple[str, float]:
    """``"gcs+10ms"`` → ``("gcs", 10.0)``; ``"local"`` → ``("local", 0.0)``."""
    base, _, latency = mode.partition("+")
    return base, float(latency.removesuffix("ms") or 0)


def features_argv(audio: str, manifest: str, out: str, workers: int | None) -> list[str]:
    argv = ["--input", audio, "--manifest", manifest, "--output", out, "--format", "parquet"]
    return argv + (["--direct_num_workers", str(workers)] if workers else [])


def fetch_check(inputs: dict, latency_ms: float) -> dict:
    """Seconds to fetch every clip's bytes with gcsfs alone: one request at a time, and 2 or 4 at
    once; without added latency and, if given, with ``latency_ms`` (called in a fresh subprocess).

    What the reading pattern costs apart from the pipeline, and what overlapping requests would save.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(inputs["gcs"][0])
    paths = sorted(fs.find(root))
    fs.cat_file(paths[0])  # session and token
    timings = {}
    for latency in (0.0, latency_ms) if latency_ms else (0.0,):
        if latency:
            add_latency(latency)
        start = time.perf_counter()
        for path in paths:
            fs.cat_file(path)
        timings[f"+{latency:g}ms one at a time"] = time.perf_counter() - start
        for in_flight in (2, 4):
            start = time.perf_counter()
            fs.cat(paths, batch_size=in_flight)
            timings[f"+{latency:g}ms {in_flight} at once"] = time.perf_counter() - start
    return {"mode": "fetch", "objects": len(paths), "seconds": timings}


def run_one(mode: str, inputs: dict, *, workers: int | None, profile: bool) -> dict:
    """Times one features run in this process (called in a fresh subprocess)."""
    import fsspec

    from soundshard.pipelines import features

    base, latency_ms = mode_parts(mode)
    if base == "fetch":
        return fetch_check(inputs, latency_ms)
    audio, manifest = inputs[base]
    warm_audio, warm_manifest = inputs[base + "-warmup"]
    if latency_ms:
        add_latency(latency_ms)
    with tempfile.TemporaryDirectory() as out:
        assert features.run(features_argv(warm_audio, warm_manifest, out, workers)) == 0
    if base == "gcs":
        fsspec.core.url_to_fs(audio)[0].invalidate_cache()
    stats: dict = collections.defaultdict(lambda: [0, 0.0, 0])
    if profile:
        instrument(stats)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        code = features.run(features_argv(audio, manifest, out, workers))
        wall_s = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"soundshard features exited with {code}")
        figures = json.loads(Path(out, "dataset.json").read_text())["figures"]
    return {
        "mode": mode,
        "wall_s": wall_s,
        "audio_s": figures["audio_s"],
        "files_processed": figures["files_processed"],
        "dead_letters": figures["dead_letters"],
        "windows": figures["windows"],
        "profile": {
            name: {"calls": calls, "seconds": seconds, "bytes": size}
            for name, (calls, seconds, size) in sorted(stats.items())
        },
    }


# --- launcher ------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def emulator_process():
    """The GCS emulator server started by this process (psutil.Process), or None."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if any("gcp-storage-emulator" in part for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def cpu_s(proc) -> float:
    if proc is None:
        return float("nan")
    times = proc.cpu_times()
    return times.user + times.system


def put_object(fs, local: Path, key: str) -> None:
    """Uploads one file through gcsfs's resumable upload.

    (gcp-storage-emulator's single-request multipart upload, which gcsfs's ``put`` uses for small
    files, drops a last ``\\r`` byte: one ESC-10 clip ends with one and was stored truncated.)
    """
    with open(local, "rb") as src, fs.open(key, "wb") as dst:
        dst.write(src.read())


def upload(workdir: Path, rows: list[dict], fieldnames: list[str]) -> dict[str, tuple[str, str]]:
    """Uploads the clips, the manifest and a 4-clip warm-up set, checks every byte read back;
    returns the inputs of each mode."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs("gs://")
    started = time.perf_counter()
    fs.mkdir(BUCKET)
    clips = sorted((ESC10 / "audio").iterdir())
    for clip in clips:
        put_object(fs, clip, f"{BUCKET}/audio/{clip.name}")
    put_object(fs, ESC10 / "meta.csv", f"{BUCKET}/meta.csv")
    warm = workdir / "warmup.csv"
    with open(warm, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows[:4])
    for row in rows[:4]:
        put_object(fs, ESC10 / "audio" / row["filename"], f"{BUCKET}/warmup/{row['filename']}")
    put_object(fs, warm, f"{BUCKET}/warmup.csv")
    upload_s = time.perf_counter() - started
    stored = fs.cat([f"{BUCKET}/audio/{clip.name}" for clip in clips])
    differ = [clip.name for clip in clips if stored[f"{BUCKET}/audio/{clip.name}"] != clip.read_bytes()]
    if differ:
        raise RuntimeError(f"{len(differ)} clip(s) read back from the emulator differ: {differ[:5]}")
    print(f"uploaded {len(clips)} clips to gs://{BUCKET}/audio ({upload_s:.1f} s), checked", file=sys.stderr)
    return {
        "local": (str(ESC10 / "audio"), str(ESC10 / "meta.csv")),
        "local-warmup": (str(ESC10 / "audio"), str(warm)),
        "gcs": (f"gs://{BUCKET}/audio", f"gs://{BUCKET}/meta.csv"),
        "gcs-warmup": (f"gs://{BUCKET}/warmup", f"gs://{BUCKET}/warmup.csv"),
    }


def measure(mode: str, inputs_path: Path, *, workers: int | None, profile: bool, quiet_below: float) -> dict:
    command = [sys.executable, __file__, "--one", mode, str(inputs_path), str(workers or 0)]
    if profile:
        command.append("--profile")
    waited_s = wait_for_quiet(quiet_below) if quiet_below else 0.0
    emulator = emulator_process()
    emulator_before = cpu_s(emulator)
    proc = run_measured(command, env=dict(os.environ))
    if proc["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc['stderr'][-3000:]}")
    result = json.loads(result_line(proc["stdout"]))
    result.update({k: v for k, v in proc.items() if k not in ("stdout", "stderr", "returncode")})
    result["emulator_cpu_s"] = cpu_s(emulator) - emulator_before
    result["waited_for_quiet_s"] = waited_s
    result["peak_rss_mb"] = max(result["peak_tree_rss_mb"], result["peak_process_rss_mb"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="Pass --direct_num_workers N.")
    parser.add_argument(
        "--latency_ms", type=float, default=0, help="Also run gcs with N ms added before every request."
    )
    parser.add_argument(
        "--quiet_below",
        type=float,
        default=0,
        help="Before each run, wait (up to 10 min) until the machine's busy CPU is below this many "
        "cores (0: do not wait). For shared machines.",
    )
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="Skip the profiled runs.")
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "storage.json"))
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--profile", dest="profile_one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, inputs_path, workers = args.one
        inputs = json.loads(Path(inputs_path).read_text())
        result = run_one(mode, inputs, workers=int(workers) or None, profile=args.profile_one)
        print("RESULT " + json.dumps(result))
        return 0
    if not (ESC10 / "meta.csv").exists():
        print(f"ESC-10 not found at {ESC10}", file=sys.stderr)
        return 2
    for path in (ESC10 / "audio").iterdir():  # page cache warm for both modes alike
        path.read_bytes()
    with open(ESC10 / "meta.csv") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = list(reader.fieldnames), list(reader)

    sys.path.insert(0, str(ROOT))
    import fsspec.config

    from tests.emulators import gcs_emulator

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    modes = list(MODES) + ([f"gcs+{args.latency_ms:g}ms"] if args.latency_ms else [])
    results: dict[str, list[dict]] = {m: [] for m in modes}
    profiles = {}
    fetch = None
    with tempfile.TemporaryDirectory() as workdir, gcs_emulator(Path(workdir)) as env:
        # Set before gcsfs is first imported here; the measured processes inherit it from start.
        os.environ.update(env)
        fsspec.config.set_conf_env(fsspec.config.conf)
        inputs = upload(Path(workdir), rows, fieldnames)
        inputs_path = Path(workdir) / "inputs.json"
        inputs_path.write_text(json.dumps(inputs))
        for repeat in range(args.repeats):
            for mode in modes if repeat % 2 == 0 else reversed(modes):
                print(f"[{mode}] repeat {repeat + 1}", file=sys.stderr)
                results[mode].append(
                    measure(
                        mode, inputs_path, workers=args.workers, profile=False, quiet_below=args.quiet_below
                    )
                )
        if args.profile:
            for mode in modes:
                print(f"[{mode}] profiled run", file=sys.stderr)
                profiles[mode] = measure(
                    mode, inputs_path, workers=args.workers, profile=True, quiet_below=args.quiet_below
                )
            print("[fetch] gcsfs alone", file=sys.stderr)
            fetch_mode = f"fetch+{args.latency_ms:g}ms" if args.latency_ms else "fetch"
            fetch = measure(
                fetch_mode, inputs_path, workers=None, profile=False, quiet_below=args.quiet_below
            )

    def other_cores(run: dict) -> float:
        return max(0.0, run["other_cpu_s"] - run["emulator_cpu_s"]) / run["process_wall_s"]

    def speed(runs: list[dict]) -> float | None:
        return statistics.median(r["audio_s"] / r["wall_s"] for r in runs) if runs else None

    table = []
    for mode in modes:
        runs = results[mode]
        quiet = [r for r in runs if other_cores(r) < QUIET_OTHER_CORES]
        table.append(
            {
                "mode": mode,
                "audio_s": runs[0]["audio_s"],
                "files_processed": runs[0]["files_processed"],
                "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                "audio_s_per_s": statistics.median(r["audio_s"] / r["wall_s"] for r in runs),
                "median_emulator_cpu_s": statistics.median(r["emulator_cpu_s"] for r in runs),
                "median_tree_cpu_s": statistics.median(r["tree_cpu_s"] for r in runs),
                "median_other_cores": statistics.median(other_cores(r) for r in runs),
                "quiet_runs": len(quiet),
                "quiet_audio_s_per_s": speed(quiet),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "runs": runs,
            }
        )
    local_speed, quiet_local = table[0]["audio_s_per_s"], table[0]["quiet_audio_s_per_s"]
    for row in table:
        row["ratio_to_local"] = row["audio_s_per_s"] / local_speed
        quiet_speed = row["quiet_audio_s_per_s"]
        row["quiet_ratio_to_local"] = quiet_speed / quiet_local if quiet_speed and quiet_local else None
    workers = f"--direct_num_workers {args.workers}" if args.workers else "default workers (in-process)"
    print(f"\nESC-10 features, local disk vs GCS emulator ({workers}), median of {args.repeats}")
    print(
        f"{'mode':<12}{'files':>7}{'audio s':>9}{'wall s':>9}{'audio s/s':>11}{'x local':>9}{'CPU s':>8}"
        f"{'emulator CPU s':>16}{'other cores':>13}{'peak RSS MB':>13}{'quiet runs':>12}{'quiet x local':>15}"
    )
    for r in table:
        print(
            f"{r['mode']:<12}{r['files_processed']:>7}{r['audio_s']:>9.0f}{r['median_wall_s']:>9.2f}"
            f"{r['audio_s_per_s']:>11.0f}{r['ratio_to_local']:>9.2f}{r['median_tree_cpu_s']:>8.1f}"
            f"{r['median_emulator_cpu_s']:>16.2f}{r['median_other_cores']:>13.2f}{r['peak_rss_mb']:>13.0f}"
            f"{r['quiet_runs']:>12}{fmt(r['quiet_ratio_to_local'], '.2f'):>15}"
        )
    verdicts = {}
    for key, runs in (("ratio_to_local", "all runs"), ("quiet_ratio_to_local", "quiet runs")):
        ratio = table[1][key]
        if ratio is None:
            continue
        verdicts[f"gcs_{key}_at_least_{TARGET_RATIO}"] = ratio >= TARGET_RATIO
        print(
            f"gcs / local throughput ({runs}): {ratio:.2f} (>= {TARGET_RATIO}) -> "
            f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}"
        )
    if profiles:
        print("\nProfiled runs (one each, instrumented, not timed against each other)")
        print(f"{'mode':<12}{'what':<38}{'calls':>7}{'seconds':>9}{'ms/call':>9}{'MB':>8}")
        for mode, prof in profiles.items():
            print(f"{mode:<12}{'features.run wall':<38}{1:>7}{prof['wall_s']:>9.2f}{'':>9}{'':>8}")
            for name, s in prof["profile"].items():
                per_call = 1000 * s["seconds"] / s["calls"] if s["calls"] else 0.0
                megabytes = f"{s['bytes'] / 2**20:.1f}" if s["bytes"] else ""
                print(
                    f"{mode:<12}{name:<38}{s['calls']:>7}{s['seconds']:>9.2f}{per_call:>9.2f}{megabytes:>8}"
                )
            print(f"{mode:<12}{'emulator CPU':<38}{'':>7}{prof['emulator_cpu_s']:>9.2f}")
    if fetch:
        print(f"\nFetching the {fetch['objects']} clips with gcsfs alone (no decoding), seconds")
        for name, seconds in fetch["seconds"].items():
            print(f"{name:<28}{seconds:>8.2f}")

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "started": started,
                "argv": sys.argv[1:],
                "repeats": args.repeats,
                "cpus": os.cpu_count(),
                "git": git_state(ROOT),
                "rows": table,
                "profiles": profiles,
                "fetch": fetch,
                "verdicts": verdicts,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
