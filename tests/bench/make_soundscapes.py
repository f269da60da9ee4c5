"""Annotated training soundscapes, built the way a site's recordings sound (bench tooling).

Each soundscape is a continuous ambient bed (pink noise plus a chain of ambient clips with
cross-fades) with target events (ESC-10 clips of the chosen folds) and distractors (clips of other
everyday sounds) placed one after another with gaps of bed between them, each trimmed to its
sounding extent and set to a random level; an Audacity label track of the targets sits beside each
recording (``soundshard features --labels`` reads it). The recipe follows the development
soundscape's README (``../shared/data/soundscape_dev/README.md``), from other folds::

    .venv/bin/python tests/bench/make_soundscapes.py --folds 1,2,3 --count 8 --seed 100 \\
        --output bench-results/synth/train
    .venv/bin/python tests/bench/make_soundscapes.py --folds 5 --count 2 --seed 200 \\
        --output bench-results/synth/validation

Clips listed in ``--exclude`` files (e.g. the development soundscape's ``distractors.txt``) are
never used, so a model trained on these is not trained on the sounds it is scored on.
A ``meta.csv`` (``filename``, ``fold``) lists the recordings.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
RATE_HZ = 16_000


def rms_db(y: np.ndarray) -> float:
    """RMS level in dBFS."""
    return 10 * np.log10(np.mean(y.astype(np.float64) ** 2) + 1e-20)


def trimmed(y: np.ndarray, *, range_db: float = 45.0) -> np.ndarray:
    """From the first to the last 10 ms frame within ``range_db`` of the loudest."""
    frame = RATE_HZ // 100
    n = len(y) // frame
    energy = 10 * np.log10((y[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1) + 1e-20)
    loud = np.flatnonzero(energy > energy.max() - range_db)
    return y[loud[0] * frame : (loud[-1] + 1) * frame]


def at_level(y: np.ndarray, level_db: float) -> np.ndarray:
    return y * 10 ** ((level_db - rms_db(y)) / 20)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE_HZ)
    spectrum *= 1 / np.sqrt(np.maximum(f, 20.0))
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def read(path: Path) -> np.ndarray:
    y, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if rate != RATE_HZ:
        raise ValueError(f"{path}: {rate} Hz, expected {RATE_HZ}")
    return y.mean(axis=1)


def bed(n: int, ambient: list[Path], rng: np.random.Generator, *, fade_s: float = 0.5) -> np.ndarray:
    """Pink noise at -50 dBFS plus a chain of ambient clips (-44..-32 dBFS), cross-faded."""
    out = at_level(pink_noise(n, rng), -50.0)
    fade = int(fade_s * RATE_HZ)
    position = 0
    while position < n:
        clip = at_level(read(ambient[rng.integers(len(ambient))]), rng.uniform(-44, -32))
        clip = clip[: n - position]
        ramp = np.ones(len(clip))
        k = min(fade, len(clip) // 2)
        ramp[:k] = np.linspace(0, 1, k)
        ramp[len(clip) - k :] = np.linspace(1, 0, k)
        out[position : position + len(clip)] += clip * ramp
        position += max(1, len(clip) - fade)
    return out


def soundscape(
    *, seconds: float, targets: list[tuple[Path, str]], distractors: list[Path], ambient: list[Path], rng
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """One soundscape and its target events ``(start_s, end_s, label)``."""
    n = int(seconds * RATE_HZ)
    y = bed(n, ambient, rng)
    events = []
    position = rng.uniform(1, 6)
    share = len(targets) / (len(targets) + len(distractors))
    while True:
        is_target = rng.random() < share
        if is_target:
            path, label = targets[rng.integers(len(targets))]
        else:
            path, label = distractors[rng.integers(len(distractors))], None
        clip = at_level(trimmed(read(path)), rng.uniform(-30, -14))
        start = int(position * RATE_HZ)
        if start + len(clip) > n:
            break
        y[start : start + len(clip)] += clip
        if label is not None:
            events.append((start / RATE_HZ, (start + len(clip)) / RATE_HZ, label))
        position = (start + len(clip)) / RATE_HZ + rng.uniform(1, 6)
    peak = np.abs(y).max()
    if peak > 0.99:
        y *= 0.99 / peak
    return y.astype(np.float32), events


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", required=True, help="Folds of the clips to use, e.g. 1,2,3.")
    parser.add_argument("--count", type=int, default=8, help="Soundscapes to make.")
    parser.add_argument("--minutes", type=float, default=20.0, help="Length of each.")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument(
        "--exclude",
        action="append",
        default=[str(DATA / "soundscape_dev" / "distractors.txt")],
        help="Files naming clips never to use (a column holding clip file names).",
    )
    parser.add_argument(
        "--exclude-category",
        action="append",
        default=[],
        help="Negatives categories never to use (to measure how a model does on sounds it never met).",
    )
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    folds = {int(f) for f in args.folds.split(",")}
    excluded = set()
    for name in args.exclude:
        for line in Path(name).read_text().splitlines():
            excluded.update(Path(cell).stem for cell in line.split("\t") if cell.endswith((".wav", ".flac")))
    with open(DATA / "esc10" / "meta.csv") as f:
        targets = [
            (DATA / "esc10" / "audio" / r["filename"], r["category"])
            for r in csv.DictReader(f)
            if int(r["fold"]) in folds and Path(r["filename"]).stem not in excluded
        ]
    with open(DATA / "negatives" / "meta.csv") as f:
        negatives = [
            r
            for r in csv.DictReader(f)
            if int(r["fold"]) in folds
            and Path(r["filename"]).stem not in excluded
            and r["category"] not in args.exclude_category
        ]
    distractors = [DATA / "negatives" / "audio" / r["filename"] for r in negatives if r["kind"] == "event"]
    ambient = [DATA / "negatives" / "audio" / r["filename"] for r in negatives if r["kind"] == "ambient"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    for k in range(args.count):
        y, events = soundscape(
            seconds=args.minutes * 60, targets=targets, distractors=distractors, ambient=ambient, rng=rng
        )
        name = f"soundscape-f{''.join(map(str, sorted(folds)))}-{args.seed}-{k:02d}"
        soundfile.write(str(out / f"{name}.flac"), y, RATE_HZ, subtype="PCM_16")
        (out / f"{name}.txt").write_text("".join(f"{a:.6f}\t{b:.6f}\t{lab}\n" for a, b, lab in events))
        rows.append({"filename": f"{name}.flac", "fold": min(folds)})
        print(f"{name}: {len(events)} target events", flush=True)
    with open(out / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "fold"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
