"""``soundshard demo``: a labelled synthetic dataset (with broken files) through the pipeline.

Writes ``<workdir>/audio`` (4 classes × 8 clips of 3 s, WAV and FLAC at 16, 22.05 and 44.1 kHz,
folds 1–4, plus a zero-byte file and a text file named ``.wav``) and ``<workdir>/manifest.csv``,
runs the features pipeline into ``<workdir>/features``, prints a summary, then trains the
edge-sized CNN on the shards (``<workdir>/model``) and prints its accuracy on the held-out fold,
tags a synthetic 40 s recording with it (``<workdir>/tags``) and prints the events,
and compiles it into a verified int8 TensorFlow Lite Micro artifact (``<workdir>/edge``).
No data or network needed; the same seed gives the same files.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence

import numpy as np
import soundfile

from soundshard.transforms.audio.synth import CLASSES, synth_clip

CLIPS_PER_CLASS = 8
DURATION_S = 3.0
_RATES = (16000, 22050, 44100)


def make_dataset(workdir: str, *, seed: int = 0) -> str:
    """Synthesises the demo dataset; returns the manifest path."""
    audio_dir = os.path.join(workdir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for label in CLASSES:
        for i in range(CLIPS_PER_CLASS):
            rate = _RATES[(i + len(label)) % len(_RATES)]
            ext = "flac" if i % 2 else "wav"
            name = f"{label}-{i:02d}.{ext}"
            soundfile.write(
                os.path.join(audio_dir, name),
                synth_clip(label, rng=rng, sample_rate_hz=rate, duration_s=DURATION_S),
                rate,
            )
            rows.append({"filename": name, "label": label, "fold": i % 4 + 1})
    open(os.path.join(audio_dir, "broken-empty.wav"), "wb").close()
    with open(os.path.join(audio_dir, "broken-text.wav"), "w") as f:
        f.write("this is not audio\n")
    rows.append({"filename": "broken-empty.wav", "label": "hum", "fold": 1})
    rows.append({"filename": "broken-text.wav", "label": "chirp", "fold": 2})
    manifest = os.path.join(workdir, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "label", "fold"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def make_parser(prog: str = "soundshard demo") -> argparse.ArgumentParser:
    """Argument parser of ``soundshard demo``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", default="soundshard-demo", help="Folder for the data and outputs. Default: %(default)s."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the synthesised data. Default: %(default)s."
    )
    parser.add_argument(
        "--no-train", "--no_train", dest="no_train", action="store_true", help="Features only."
    )
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the exit code."""
    args, beam_args = make_parser().parse_known_args(argv)
    manifest = make_dataset(args.workdir, seed=args.seed)
    audio = os.path.join(args.workdir, "audio")
    output = os.path.join(args.workdir, "features")
    print(
        f"synthesised {len(CLASSES) * CLIPS_PER_CLASS} clips of {len(CLASSES)} classes "
        f"(+2 broken files) in {audio}"
    )
    from soundshard.pipelines import features

    code = features.run(
        ["--input", audio, "--manifest", manifest, "--output", output, *beam_args], prog="soundshard demo"
    )
    if code != 0:
        return code
    print(
        f'\nread it back:  python -c "import pandas as pd; '
        f"print(pd.read_parquet('{output}/parquet').head())\""
    )
    if args.no_train:
        return 0
    from soundshard.pipelines import train

    model_dir = os.path.join(args.workdir, "model")
    print(f"\ntraining the edge-sized CNN on folds 3-4 (fold 2 validates, fold 1 tests) -> {model_dir}")
    train_args = ["--features", output, "--arch", "edgecnn", "--test-fold", "1", "--output", model_dir]
    train_args += ["--epochs", "20", "--batch-size", "16", "--seed", str(args.seed), "--quiet"]
    code = train.run(train_args, prog="soundshard demo")
    if code != 0:
        return code
    code = tag_step(args.workdir, model=model_dir, seed=args.seed)
    if code != 0:
        return code
    return compile_edge_step(args.workdir, features=output, model=model_dir)


#: The synthetic long recording: (label or None for background, seconds).
LONG_SEGMENTS = (("chirp", 6), (None, 4), ("hum", 10), ("click_train", 8), ("noise_burst", 6), (None, 6))


def make_long_recording(folder: str, *, seed: int = 0, sample_rate_hz: int = 16000) -> tuple[str, list]:
    """Writes a 40 s recording of known segments (quiet background between some) under an
    AudioMoth file name, so it starts at 2026-11-24 00:59:45 UTC and crosses an hour.

    Returns:
        ``(path, [(label, start_s, end_s), ...])``.
    """
    rng = np.random.default_rng(seed + 1)
    parts, truth, t = [], [], 0.0
    for label, seconds in LONG_SEGMENTS:
        if label is None:
            parts.append(rng.normal(0.0, 1e-4, seconds * sample_rate_hz).astype(np.float32))
        else:
            parts.append(synth_clip(label, rng=rng, sample_rate_hz=sample_rate_hz, duration_s=seconds))
            truth.append((label, t, t + seconds))
        t += seconds
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "20261124_005945.WAV")
    soundfile.write(path, np.concatenate(parts), sample_rate_hz, subtype="PCM_16")
    return path, truth


def tag_step(workdir: str, *, model: str, seed: int = 0) -> int:
    """Tags a synthetic long recording with the demo model (10 s work units) into
    ``<workdir>/tags`` and prints its events next to the truth; returns tag's exit code."""
    import pyarrow.parquet as pq

    from soundshard.pipelines import tag

    path, truth = make_long_recording(os.path.join(workdir, "long"), seed=seed)
    out = os.path.join(workdir, "tags")
    print(f"\ntagging a 40 s recording ({os.path.basename(path)}, 10 s work units) with the model -> {out}")
    code = tag.run(
        ["--input", path, "--model-dir", model, "--output", out, "--unit-s", "10", "--audacity", "--raven"],
        prog="soundshard demo",
    )
    if code != 0:
        return code
    events = sorted(
        pq.read_table(os.path.join(out, "parquet", "events")).to_pylist(), key=lambda e: e["start_s"]
    )
    print("events (start-end s, label, confidence, UTC start):")
    for e in events:
        when = f"{e['start_s']:6.2f}-{e['end_s']:6.2f}"
        print(f"  {when}  {e['label']:<12} {e['confidence']:.2f}  {e['start_utc']:%H:%M:%S}")
    print("truth:  " + "; ".join(f"{label} {a:g}-{b:g} s" for label, a, b in truth))
    return 0


def compile_edge_step(workdir: str, *, features: str, model: str) -> int:
    """Compiles the demo model for the cortex-m4-256k target into ``<workdir>/edge`` and prints
    the artifact's summary; returns compile-edge's exit code."""
    from soundshard.pipelines import compile_edge

    edge_dir = os.path.join(workdir, "edge")
    print(f"\ncompiling the model to int8 for TensorFlow Lite Micro (cortex-m4-256k) -> {edge_dir}")
    edge_args = [
        "--model-dir",
        model,
        "--features",
        features,
        "--target",
        "cortex-m4-256k",
        "--output",
        edge_dir,
    ]
    # the held-out fold has 8 clips: allow int8 to differ from float by one clip (12.5 points)
    edge_args += ["--max-accuracy-drop", "12.5", "--quiet"]
    code = compile_edge.run(edge_args, prog="soundshard demo")
    if code == 0:
        names = sorted(name for name in os.listdir(edge_dir) if name != "golden")
        print(f"artifact: {', '.join(names)}, golden/*.npy (see {edge_dir}/report.md)")
    return code


if __name__ == "__main__":
    sys.exit(run())
