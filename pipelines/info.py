"""``soundshard info PATH``: what a features or embedding output, a model folder or a tag output
holds, read from its descriptions (``dataset.json``, ``model.json``, ``run.json``) without loading
features, models or Beam.

    soundshard info out/esc10            # config, counts per label, fold and night, shards, dead letters
    soundshard info models/esc10-f4      # architecture, size, classes, thresholds, rules, metrics
    soundshard info out/tags --json      # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from soundshard.schemas.errors import ConfigError
from soundshard.schemas.training import recipe_of
from soundshard.schemas.uris import redact

PROG = "soundshard info"


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of ``soundshard info``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Show what a features or embedding output, a model folder or a tag output holds.",
        allow_abbrev=False,
    )
    parser.add_argument("path", help="The folder (local, gs://, s3://...).")
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON. Default: text.")
    return parser


def _read_json(path: str) -> dict | None:
    import fsspec

    try:
        with fsspec.open(path, "rt") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from exc


def _counts(mapping: dict | None) -> str:
    if not mapping:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in sorted(mapping.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def describe(path: str) -> dict:
    """``{"kind": "features" | "embeddings" | "model" | "tags", "path", ...}`` of the folder.

    Raises:
        ConfigError: ``path`` holds none of the three descriptions.
    """
    from soundshard.transforms.models import architectures as models
    from soundshard.transforms.models import training

    folder = path.rstrip("/")
    model = _read_json(f"{folder}/{models.MODEL_JSON}")
    if model is not None:
        models.verify_description(folder, model)
        return {"kind": "model", "path": folder, **_model(model, folder)}
    if _read_json(f"{folder}/dataset.json") is not None:
        dataset = training.read_dataset_json(folder)
        return {"kind": _data_kind(dataset), "path": folder, **_dataset(dataset)}
    run = _read_json(f"{folder}/run.json")
    if run is not None and str(run.get("format", "")).startswith("soundshard-tags/"):
        return {"kind": "tags", "path": folder, **_tags(run, folder)}
    raise ConfigError(f"{path!r} holds no dataset.json, model.json or tag run.json: not a soundshard output")


def _data_kind(dataset: dict) -> str:
    return "embeddings" if dataset.get("feature_column", "log_mel") != "log_mel" else "features"


def _dataset(dataset: dict) -> dict:
    counts, figures = dataset.get("counts", {}), dataset.get("figures", {})
    shards = dataset.get("shards", {})
    described = ("schema_version", "feature_fingerprint", "feature_config", "feature_shape", "window_s")
    return {
        **_pick(dataset, *described, "window_hop_s", "nights", "sources"),
        "labels": sorted(dataset.get("label_map", {})),
        **_pick(counts, "clips_by_label", "windows_by_label", "clips_by_fold", "strong_labels"),
        **_pick(figures, "inputs", "dead_letters_by_reason", "windows"),
        "processed": figures.get("files_processed"),
        "dead_letters": figures.get("dead_letter_inputs"),
        "audio_hours": None if figures.get("audio_s") is None else round(figures["audio_s"] / 3600, 3),
        "shards": {fmt: len(shards[fmt]) for fmt in ("parquet", "tfrecord") if shards.get(fmt)},
        "levels": _levels(dataset.get("levels"), figures=None),
    }


def _levels(levels: dict | None, *, figures: dict | None) -> dict | None:
    """What a run wrote of the levels tables: rows per table and the settings."""
    if not levels:
        return None
    config = levels.get("config") or {}
    rows = levels.get("rows") or (figures or {}).get("level_rows") or {}
    return {
        "rows": rows,
        "interval_s": config.get("interval_s"),
        "bands": config.get("bands"),
        "calibration": (
            f"{config['offset_db']:g} dB SPL at 0 dBFS" if config.get("offset_db") is not None else None
        ),
        "calibrated_sites": len(config.get("site_offsets_db") or ()),
        "measured_at_hz": levels.get("measured_at_hz"),
    }


def _pick(source: dict, *keys: str) -> dict:
    return {key: source.get(key) for key in keys}


def _model(model: dict, folder: str) -> dict:
    metrics = _read_json(f"{folder}/metrics.json") or {}
    recipe = recipe_of(model)
    thresholds = model.get("thresholds") or {}
    names = model.get("label_names", [])
    window = thresholds.get("window") or []
    clip = metrics.get("clip_mean", {})
    return {
        "architecture": recipe.model,
        "head": recipe.head,
        **_pick(metrics, "parameters", "macs_per_window", "best_epoch", "epochs_run", "train_wall_s"),
        "classes": names,
        **_pick(model, "input", "feature_fingerprint", "feature_config", "split"),
        "trained_on": model.get("data", {}).get("path"),
        "background": ((model.get("training") or {}).get("background") or {}).get("data"),
        "ensemble_seeds": ((model.get("training") or {}).get("ensemble") or {}).get("seeds"),
        "window_thresholds": dict(zip(names, window, strict=False)) if window else None,
        "thresholds_from": thresholds.get("from"),
        "event_rules": model.get("postprocessing"),
        "test_clip_accuracy": clip.get("accuracy"),
        "test_clips": clip.get("n"),
    }


def _tags(run: dict, folder: str) -> dict:
    figures = run.get("figures", {})
    by_label = figures.get("events_by_label")
    if by_label is None and figures.get("events"):  # written before the summary counted them
        by_label = _events_by_label(folder)
    model = run.get("model", {})
    return {
        "model": model.get("uri"),
        "model_sha256": model.get("sha256"),
        "classes": model.get("label_names"),
        "inputs": figures.get("inputs"),
        "recordings_tagged": figures.get("recordings_tagged", figures.get("files_processed")),
        "dead_letters": figures.get("dead_letter_inputs"),
        "dead_letters_by_reason": figures.get("dead_letters_by_reason"),
        "audio_hours": figures.get("audio_hours"),
        "events": figures.get("events"),
        "events_by_label": by_label,
        "hourly_rows": figures.get("hourly_rows"),
        "levels": _levels(run.get("levels"), figures=figures),
        "tag_config": run.get("tag_config"),
        "run": run.get("run"),
    }


def _events_by_label(folder: str) -> dict | None:
    import collections

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f"{folder}/parquet/events", columns=["label"])
    except (FileNotFoundError, OSError):
        return None
    return dict(collections.Counter(table.column("label").to_pylist()))


def _split(split: dict) -> str | None:
    if split.get("by") == "fold":
        return (
            f"test fold {split.get('test_fold')}, validation fold {split.get('validation_fold')}, "
            f"trained on folds {split.get('train_folds')}"
        )
    if split.get("by") == "split":
        names = (split.get(k) for k in ("train", "validation", "test"))
        return "splits: train {!r}, validation {!r}, test {!r}".format(*names)
    return json.dumps(split) if split else None


def _levels_text(levels: dict | None) -> str | None:
    if not levels:
        return None
    reference = levels.get("calibration") or "dBFS unless a recording's manifest or site is calibrated"
    if levels.get("calibrated_sites"):
        reference = f"{levels['calibrated_sites']} calibrated sites, else " + reference
    bands = "" if levels.get("bands") in (None, "none") else f", {levels['bands']} bands"
    return (
        f"{_counts(levels.get('rows'))}; every {levels.get('interval_s'):g} s{bands}; measured at "
        f"{levels.get('measured_at_hz')} Hz; {reference}"
    )


def summary_text(info: dict) -> str:
    """The summary for a terminal."""
    kind = info["kind"]
    lines = [f"{kind:<16} {info['path']}"]

    def add(name: str, value) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"{name:<16} {value}")

    if kind in ("features", "embeddings"):
        config = info.get("feature_config") or {}
        add("schema", f"v{info['schema_version']}  fingerprint {info['feature_fingerprint']}")
        if kind == "features":
            add(
                "features",
                f"{_feature_name(config)} {info.get('feature_shape')} at {config.get('sample_rate_hz')} Hz, "
                "windows of "
                f"{info['window_s']:.2f} s every {info['window_hop_s']:.2f} s",
            )
        else:
            add("embeddings", f"{config.get('model_uri', '')} shape {info.get('feature_shape')}")
        add("inputs", f"{info['inputs']}  processed {info['processed']}  dead letters {info['dead_letters']}")
        add("dead letters", _counts(info.get("dead_letters_by_reason")) if info.get("dead_letters") else None)
        add("windows", f"{info['windows']}  audio {info['audio_hours']} h")
        add("clips by label", _counts(info.get("clips_by_label")))
        add("clips by fold", _counts(info.get("clips_by_fold")))
        strong = info.get("strong_labels") or {}
        if strong.get("recordings"):
            add(
                "strong labels",
                f"{strong['recordings']} recordings, {strong['windows']} windows "
                f"({strong['background_windows']} background, {strong['multi_label_windows']} multi-label)",
            )
        add("shards", _counts(info.get("shards")))
        add("levels", _levels_text(info.get("levels")))
        add("nights", ", ".join(map(str, info["nights"])) if info.get("nights") else None)
    elif kind == "model":
        size = []
        if info.get("parameters") is not None:
            size.append(f"{info['parameters']:,} parameters")
        if info.get("macs_per_window") is not None:
            size.append(f"{info['macs_per_window']:,} MACs per window")
        seeds = info.get("ensemble_seeds")
        what = f"mean of {len(seeds)} {info['architecture']} models" if seeds else info["architecture"]
        add("architecture", f"{what} ({info['head']} head)  " + ", ".join(size))
        if seeds:
            add("ensemble", "seeds " + ", ".join(str(seed) for seed in seeds))
        add("classes", ", ".join(info["classes"]))
        shape = info.get("input") or {}
        add("input", f"{shape.get('kind')} {shape.get('shape')} {shape.get('dtype')}" if shape else None)
        add("trained on", info.get("trained_on"))
        add("background", info.get("background"))
        add("split", _split(info.get("split") or {}))
        if info.get("test_clip_accuracy") is not None:
            add("test", f"clip accuracy {info['test_clip_accuracy']:.3f} on {info['test_clips']} clips")
        if info.get("epochs_run") and seeds:
            runs = zip(info["epochs_run"], info["best_epoch"], strict=False)
            add("epochs", ", ".join(f"{run} run (best {best})" for run, best in runs))
        elif info.get("epochs_run"):
            add("epochs", f"{info['epochs_run']} run, best {info['best_epoch']}")
        if info.get("window_thresholds"):
            add("thresholds", ", ".join(f"{k} {v:g}" for k, v in info["window_thresholds"].items()))
            add("", f"({info.get('thresholds_from')})")
        rules = {k: v for k, v in (info.get("event_rules") or {}).items() if k != "from"}
        add("event rules", ", ".join(f"{k} {v}" for k, v in rules.items()))
        add("", f"({info['event_rules']['from']})" if (info.get("event_rules") or {}).get("from") else None)
    else:
        add("model", f"{info['model']}  ({', '.join(info.get('classes') or [])})")
        add(
            "inputs",
            f"{info['inputs']}  tagged {info['recordings_tagged']}  dead letters {info['dead_letters']}",
        )
        add("dead letters", _counts(info.get("dead_letters_by_reason")) if info.get("dead_letters") else None)
        add("audio", f"{info['audio_hours']} h")
        add("events", info.get("events"))
        add("events by label", _counts(info.get("events_by_label")))
        add("hourly rows", info.get("hourly_rows"))
        add("levels", _levels_text(info.get("levels")))
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs ``soundshard info``; returns the exit code (2 when the path is not a soundshard output)."""
    args = make_parser(prog).parse_args(argv)
    try:
        info = describe(args.path)
    except ConfigError as exc:
        print(f"{prog}: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    text = json.dumps(info, indent=2) if args.json else summary_text(info)
    print(redact(text))
    return 0


def _feature_name(config: dict) -> str:
    if config.get("feature_type") != "mfcc":
        return "log-mel"
    deltas = config.get("mfcc_deltas", 0)
    return f"MFCC ({config.get('n_mfcc')} coefficients" + (f", {deltas} delta order(s))" if deltas else ")")
