"""Benchmark: what the levels stage costs, and whether a peer library agrees with its LAeq.

    .venv/bin/python tests/bench/bench_levels.py [--repeats 3] [--json bench-results/levels.json]

1. **Cost.** ``soundshard features`` on the shared longform (10 min, 44.1 kHz) and development
   soundscape (20 min, 16 kHz) recordings, each listed ``--scale`` times (symlinks; default 4:
   2 hours of audio, so that fixed costs such as imports are amortised as in a nightly run), with
   and without ``--levels`` (and, with ``--bands``, ``--levels --level-bands third``), one worker,
   60 s work units, each run in a fresh process, the modes interleaved ``--repeats`` times. The
   figure is the median wall time with levels over the median without, minus one: the share of
   the features run that levels add.
   With ``--model DIR`` (a model folder from ``soundshard train``), the same for ``soundshard
   tag`` (levels on, its default) against ``tag --no-levels``.
2. **Agreement.** The per-second LAeq of the longform recording from ``features --levels
   --sample-rate-hz 44100`` (measured at the file's own rate) against PyOctaveBand
   (``WeightingFilter(rate, "A").filter``, its class 1 design run oversampled, then the mean
   square of each second) on the same decoded samples; and the same at the default analysis rate
   (22.05 kHz). PyOctaveBand is used here only: ``pip install PyOctaveBand``.
   (acoustic-toolbox 0.2.2, the python-acoustics fork, is not usable as the peer: its
   ``frequency_weighting`` applies PyOctaveBand 2's oversampled-rate sections at the base rate,
   -20 dB at 31.5 Hz where the standard says -39.4.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
RECORDINGS = (
    DATA / "longform" / "esc10_longform_10min_seed0.flac",
    DATA / "soundscape_dev" / "soundscape_dev_20min_seed11.flac",
)
MODES = {
    "no-levels": [],
    "levels": ["--levels"],
    "levels-third-octaves": ["--levels", "--level-bands", "third"],
}


def _soundshard() -> str:
    exe = Path(sys.executable).with_name("soundshard")
    return str(exe) if exe.exists() else "soundshard"


def _features(inputs: Path, out: Path, extra: list[str], *, command: str = "features") -> float:
    argv = [_soundshard(), command, "--input", str(inputs), "--output", str(out), "--format", "parquet"]
    argv += ["--direct_num_workers", "1", *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall


def cost(repeats: int, *, scale: int, bands: bool, model: str | None = None) -> dict:
    modes = {m: (extra, "features") for m, extra in MODES.items() if bands or "octave" not in m}
    if model:
        modes["tag-no-levels"] = (["--model-dir", model, "--no-levels"], "tag")
        modes["tag-levels"] = (["--model-dir", model], "tag")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for copy in range(scale):
            for path in RECORDINGS:
                (inputs / f"{path.stem}-{copy}{path.suffix}").symlink_to(path)
        walls = {mode: [] for mode in modes}
        _features(inputs, Path(tmp) / "warm", [])  # page cache and first-run effects
        for r in range(repeats):
            for mode, (extra, command) in modes.items():
                walls[mode].append(_features(inputs, Path(tmp) / f"{mode}-{r}", extra, command=command))
        base = statistics.median(walls["no-levels"])
        return {
            "audio_s": 1800.0 * scale,
            "median_wall_s": {m: round(statistics.median(w), 3) for m, w in walls.items()},
            "walls_s": {m: [round(x, 3) for x in w] for m, w in walls.items()},
            "added_share": {
                m: round(statistics.median(w) / base - 1, 4)
                for m, w in walls.items()
                if m.startswith("levels")
            },
            **(
                {
                    "tag_added_share": round(
                        statistics.median(walls["tag-levels"]) / statistics.median(walls["tag-no-levels"])
                        - 1,
                        4,
                    )
                }
                if model
                else {}
            ),
        }


def agreement() -> dict:
    import pyarrow.parquet as pq
    from pyoctaveband import WeightingFilter

    from soundshard.transforms.audio.decode import decode_audio

    out = {}
    recording = RECORDINGS[0]
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (44100, 22050):
            folder = Path(tmp) / str(rate)
            folder.mkdir()
            (folder / recording.name).symlink_to(recording)
            result = Path(tmp) / f"out-{rate}"
            _features(folder, result, ["--levels", "--sample-rate-hz", str(rate)])
            table = pq.read_table(next((result / "parquet" / "levels_second").rglob("*.parquet"))).to_pandas()
            ours = table.sort_values("start_s").laeq.to_numpy(np.float64)
            x = decode_audio(str(recording), sample_rate_hz=rate).samples.astype(np.float64)
            weighted = WeightingFilter(rate, "A").filter(x)
            seconds = len(x) // rate
            mean_square = (weighted[: seconds * rate] ** 2).reshape(seconds, rate).mean(axis=1)
            peer = 10 * np.log10(np.maximum(mean_square, 1e-15))
            n = min(len(peer), len(ours))
            sounding = ours[:n] > -100  # digital silence: both read their own floors
            diff = np.abs(ours[:n] - peer[:n])[sounding]
            out[str(rate)] = {
                "seconds_compared": int(sounding.sum()),
                "max_abs_diff_db": round(float(diff.max()), 4),
                "mean_abs_diff_db": round(float(diff.mean()), 4),
                "p99_abs_diff_db": round(float(np.percentile(diff, 99)), 4),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--scale", type=int, default=4, help="Copies of the two recordings (default 4: 2 h).")
    parser.add_argument("--bands", action="store_true", help="Also time --level-bands third.")
    parser.add_argument(
        "--model", default=None, help="Model folder: also time `tag` with and without levels."
    )
    args = parser.parse_args()
    missing = [str(p) for p in RECORDINGS if not p.is_file()]
    if missing:
        raise SystemExit(f"shared data not found: {missing}")
    report = {"agreement_laeq_1s": agreement()}
    print(json.dumps(report, indent=2), flush=True)
    if not args.skip_cost:
        report["cost"] = cost(args.repeats, scale=args.scale, bands=args.bands, model=args.model)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
