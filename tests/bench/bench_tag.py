"""Benchmark: tagging the 10-minute longform recording: event quality and throughput.

    .venv/bin/pip install sed_eval        # the established SED metrics (bench only)
    .venv/bin/python tests/bench/bench_tag.py \\
        --models bench-results/train16/edgecnn-cv/fold-4,bench-results/train16/sbcnn-cv/fold-4 \\
        [--repeats 3] [--copies 6] [--work bench-results/tag] [--json bench-results/tag.json]

Models: trained on ESC-10 with fold 4 held out (``soundshard train --cv`` writes them as
``fold-4``); the longform clips are mostly from fold 4, so none of them was trained on.

Quality: ``soundshard tag`` with its defaults (the model's validation-fold thresholds,
hysteresis 0.1, gaps up to 0.5 s merged) against the recording's Audacity label track, with
sed_eval: segment-based F1 on 1 s segments and event-based F1 with a 0.5 s onset collar (offsets
not evaluated), micro (overall) and per class. Then, as a sensitivity table (not tuned on this
recording: a fixed grid), the same scores recomputed from the window table with an activity gate
(``--min_level_db``) and a minimum duration.

Throughput: in the same run and on the same input, ``soundshard features`` (log-mel only,
Parquet) against ``soundshard tag`` (log-mel, the model, all tables), each a fresh process timed
from start to exit, alternating, median of ``--repeats``; on the 10-minute file, and on a folder
listing it ``--copies`` times (default 6: one hour), where start-up costs weigh less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SOUNDSHARD_SHARED_DATA", ROOT.parent / "shared" / "data"))
LONGFORM = DATA / "longform" / "esc10_longform_10min_seed0.flac"
LABELS = DATA / "longform" / "esc10_longform_10min_seed0.txt"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2"}


def soundshard(*args: str) -> float:
    """Runs a soundshard command in a fresh process; returns its wall time in seconds."""
    command = [sys.executable, "-m", "soundshard.pipelines.cli", *map(str, args)]
    print("$ soundshard " + " ".join(map(str, args)), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def reference_events() -> list[dict]:
    rows = []
    for line in LABELS.read_text().splitlines():
        onset, offset, label = line.split("\t")
        rows.append(
            {"filename": LONGFORM.name, "event_label": label, "onset": float(onset), "offset": float(offset)}
        )
    return rows


def sed_scores(estimated: list[dict], labels: list[str]) -> dict:
    """Segment-based (1 s) and event-based (0.5 s onset collar) F1, overall and per class."""
    import dcase_util
    import sed_eval

    reference = dcase_util.containers.MetaDataContainer(reference_events())
    estimate = dcase_util.containers.MetaDataContainer(estimated)
    segment = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=labels, time_resolution=1.0)
    event = sed_eval.sound_event.EventBasedMetrics(
        event_label_list=labels, t_collar=0.5, evaluate_onset=True, evaluate_offset=False
    )
    segment.evaluate(reference_event_list=reference, estimated_event_list=estimate)
    event.evaluate(reference_event_list=reference, estimated_event_list=estimate)
    out = {}
    for name, metrics in (("segment", segment), ("event", event)):
        overall = metrics.results_overall_metrics()["f_measure"]
        per_class = metrics.results_class_wise_metrics()
        out[name] = {
            "f1": round(float(overall["f_measure"]), 4),
            "precision": round(float(overall["precision"]), 4),
            "recall": round(float(overall["recall"]), 4),
            "per_class_f1": {
                label: round(float(np.nan_to_num(per_class[label]["f_measure"]["f_measure"])), 4)
                for label in labels
            },
        }
    return out


def events_from_windows(windows: pd.DataFrame, tag_config: dict, duration_s: float, **changes) -> list[dict]:
    """Events recomputed from the window table with other event rules."""
    from soundshard.schemas.tagging import TagConfig
    from soundshard.transforms.tagging import events as ev

    config = TagConfig.from_dict({**tag_config, **changes})
    w = windows.sort_values("window_index")
    scores = w[[f"score_{label}" for label in config.label_names]].to_numpy()
    found = ev.find_events(
        scores,
        start_s=w["start_s"].to_numpy(),
        end_s=w["end_s"].to_numpy(),
        window_index=w["window_index"].to_numpy(),
        config=config,
        level_db=w["level_db"].to_numpy() if "level_db" in w else None,
        duration_s=duration_s,
    )
    return [
        {"filename": LONGFORM.name, "event_label": e.label, "onset": e.start_s, "offset": e.end_s}
        for e in found
    ]


def timed_pair(source: Path, model: Path, work: Path, tags: Path, repeats: int) -> tuple[list, list]:
    """Wall times of ``features`` and ``tag`` on ``source``, alternating which goes first."""
    features_s, tag_s = [], []
    local = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]
    for i in range(repeats):
        order = ("features", "tag") if i % 2 == 0 else ("tag", "features")
        for what in order:
            if what == "features":
                out = work / f"features-{source.name}"
                features_s.append(
                    soundshard("features", "--input", source, "--output", out, "--format", "parquet", *local)
                )
            else:
                tag_s.append(
                    soundshard("tag", "--input", source, "--model-dir", model, "--output", tags, *local)
                )
    return features_s, tag_s


def bench_model(model: Path, work: Path, repeats: int, copies: int) -> dict:
    name = f"{json.loads((model / 'model.json').read_text())['training']['model']}-{model.name}"
    tags = work / f"tags-{name}"
    features_s, tag_s = timed_pair(LONGFORM, model, work, tags, repeats)
    # the same recording listed ``copies`` times: fixed costs (imports, model load) amortised
    hour = work / f"longform-x{copies}"
    hour.mkdir(exist_ok=True)
    for i in range(copies):
        link = hour / f"copy{i}.flac"
        if not link.exists():
            link.symlink_to(LONGFORM)
    long_features_s, long_tag_s = timed_pair(hour, model, work, work / f"tags-{name}-x{copies}", repeats)
    manifest = json.loads((tags / "run.json").read_text())
    audio_s = manifest["figures"]["audio_s"]
    events = pd.read_parquet(tags / "parquet" / "events")
    estimated = [
        {"filename": LONGFORM.name, "event_label": r.label, "onset": r.start_s, "offset": r.end_s}
        for r in events.itertuples()
    ]
    labels = sorted(
        set(manifest["tag_config"]["label_names"]) | {e["event_label"] for e in reference_events()}
    )
    quality = {"default": sed_scores(estimated, labels)}
    windows = pd.read_parquet(tags / "parquet" / "windows")
    for gate in (None, -30.0, -10.0):
        for min_duration in (0.0, 1.0):
            if gate is None and min_duration == 0.0:
                continue  # the default
            variant = events_from_windows(
                windows, manifest["tag_config"], audio_s, min_level_db=gate, min_duration_s=min_duration
            )
            rule = f"gate {gate:g} dB" if gate is not None else "no gate"
            quality[f"{rule}, min {min_duration:g} s"] = sed_scores(variant, labels)
    features_med, tag_med = statistics.median(features_s), statistics.median(tag_s)
    return {
        "model": name,
        "folder": str(model),
        "parameters": json.loads((model / "metrics.json").read_text()).get("parameters"),
        "audio_s": audio_s,
        "events": len(events),
        "reference_events": len(reference_events()),
        "features_wall_s": [round(v, 2) for v in features_s],
        "tag_wall_s": [round(v, 2) for v in tag_s],
        "features_audio_s_per_s": round(audio_s / features_med, 1),
        "tag_audio_s_per_s": round(audio_s / tag_med, 1),
        "tag_vs_features": round(features_med / tag_med, 3),
        "copies": copies,
        "copies_features_wall_s": [round(v, 2) for v in long_features_s],
        "copies_tag_wall_s": [round(v, 2) for v in long_tag_s],
        "copies_features_audio_s_per_s": round(copies * audio_s / statistics.median(long_features_s), 1),
        "copies_tag_audio_s_per_s": round(copies * audio_s / statistics.median(long_tag_s), 1),
        "copies_tag_vs_features": round(
            statistics.median(long_features_s) / statistics.median(long_tag_s), 3
        ),
        "thresholds": manifest["tag_config"]["window_thresholds"],
        "quality": quality,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="Comma-separated model folders (fold 4 held out).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--copies", type=int, default=6, help="Copies of the recording for the long input (6: 1 h)."
    )
    parser.add_argument("--work", default=str(ROOT / "bench-results" / "tag"))
    parser.add_argument("--json", default=str(ROOT / "bench-results" / "tag.json"))
    args = parser.parse_args()
    if not LONGFORM.is_file():
        print(f"longform recording not found at {LONGFORM}", file=sys.stderr)
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [bench_model(Path(m), work, args.repeats, args.copies) for m in args.models.split(",")]
    print()
    print(
        f"{'model':<18}{'params':>9}{'events':>8}{'seg F1':>8}{'evt F1':>8}{'features a-s/s':>16}"
        f"{'tag a-s/s':>11}{'tag/features':>14}"
    )
    for r in rows:
        q = r["quality"]["default"]
        print(
            f"{r['model']:<18}{r['parameters'] or 0:>9}{r['events']:>8}{q['segment']['f1']:>8.3f}"
            f"{q['event']['f1']:>8.3f}{r['features_audio_s_per_s']:>16}{r['tag_audio_s_per_s']:>11}"
            f"{r['tag_vs_features']:>14}"
        )
        print(
            f"{'  x' + str(r['copies']) + ' copies':<58}{r['copies_features_audio_s_per_s']:>16}"
            f"{r['copies_tag_audio_s_per_s']:>11}{r['copies_tag_vs_features']:>14}"
        )
    for r in rows:
        print(f"\n{r['model']}: sensitivity (segment F1 / event F1)")
        for name, q in r["quality"].items():
            print(f"  {name:<28}{q['segment']['f1']:.3f} / {q['event']['f1']:.3f}")
        print("  per class (default, segment F1): " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["quality"]["default"]["segment"]["per_class_f1"].items()
        ))  # fmt: skip
    Path(args.json).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
