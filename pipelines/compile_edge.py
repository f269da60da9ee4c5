"""Compile a trained model into a verified int8 TensorFlow Lite Micro artifact for a microcontroller.

Example::

    soundshard compile-edge --model-dir models/esc10-f1 --features out/esc10 --target cortex-m4-256k \\
        --output edge/esc10-f1

Runs on one machine (no Beam): quantises the model to full-integer int8 (int8 input and output)
with a representative set drawn from the model's training split only, runs the int8 model on the
held-out fold (or test split) with TensorFlow Lite Micro's kernels (``tflite-micro``) and with
LiteRT, compares it with the float model, measures the smallest tensor arena, checks flash and
RAM against the target's budget, and writes::

    edge/esc10-f1/
      model_int8.tflite        the int8 flatbuffer
      model_data.h             macros: array length, arena size, input shape and quantisation, labels
      model_data.cc            alignas(16) const unsigned char g_model_data[] (C++, micro_speech style)
      model_data.c             the same text, for C11 builds
      soundshard_features.h    sample rate, n_fft, hop, window table, sparse mel filterbank, log and
                               normalisation constants: the steps a device follows (not named
                               features.h, which would shadow glibc's <features.h> on an -I path);
                               A-weighting sections and static inline LAeq code (soundshard_level_*)
      golden_vectors.h/.c      a few held-out windows: audio, features, int8 input, expected output,
                               LAeq
      golden/*.npy, golden/golden.json   the same vectors for Python
      manifest.json            hashes, feature config and fingerprint, labels, shapes, quantisation,
                               ops, measured arena, budget, target, source model and dataset
      report.md, report.json   float vs int8 accuracy, per-class deltas, agreement, budget

Exit codes: ``0`` verified and within budget; ``2`` configuration error (nothing written; e.g. a
model that cannot be fully int8-quantised, unknown target, features that differ from the model's);
``3`` over the target's flash or RAM budget; ``4`` verification failed (int8 clip accuracy more
than ``--max-accuracy-drop`` points below float, or TFLite Micro and LiteRT disagree). With ``3``
or ``4`` the output folder holds only ``report.md`` and ``report.json``, with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) is noise for a CLI user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from soundshard.pipelines import arguments
from soundshard.schemas.config import FeatureConfig  # noqa: E402
from soundshard.schemas.edge import TARGETS, target_profile  # noqa: E402
from soundshard.schemas.errors import ConfigError, DataError  # noqa: E402
from soundshard.schemas.training import recipe_of  # noqa: E402
from soundshard.transforms.edge import artifact as edge
from soundshard.transforms.edge import cexport
from soundshard.transforms.models import architectures as models  # noqa: E402
from soundshard.transforms.models import training

MANIFEST_FORMAT = "soundshard-edge/1"
#: TFLite Micro against LiteRT's builtin int8 kernels: largest allowed difference of the int8
#: outputs in steps, and the share of held-out windows whose top class must agree. The two are not
#: bit-exact everywhere (softmax and requantisation round differently in a few windows: up to 2
#: steps of 1/256 on ESC-10 SB-CNN). LiteRT with XNNPACK differs more (up to 12 steps) and is only
#: reported: where two classes tie in int8 (e.g. dozens of identical silent windows of a fold), the
#: two runtimes can break the tie differently for all of them at once.
MAX_INTERPRETER_DIFF_STEPS = 4
MIN_INTERPRETER_TOP_CLASS_AGREEMENT = 0.99
#: The feature constants header (``features.h`` would shadow the C library's ``<features.h>``).
FEATURES_HEADER = "soundshard_features.h"
EXIT_CONFIG, EXIT_OVER_BUDGET, EXIT_VERIFICATION = 2, 3, 4


def make_parser(prog: str = "soundshard compile-edge") -> argparse.ArgumentParser:
    """Argument parser of ``soundshard compile-edge``."""
    parser = arguments.Parser(prog=prog, description=__doc__.split("\n\n")[0])
    arguments.add_model_dir(parser)
    arguments.add_features(parser, help="Output folder of `soundshard features` the model was trained on.")
    parser.add_argument(
        "--target",
        default="cortex-m4-256k",
        help=f"Target profile (flash and RAM budget): one of {', '.join(sorted(TARGETS))}.",
    )
    parser.add_argument("--output", required=True, help="Artifact folder to write (replaced).")
    parser.add_argument(
        "--representative-windows",
        "--representative_windows",
        dest="representative_windows",
        type=int,
        default=edge.REPRESENTATIVE_WINDOWS,
        help="Calibration windows from the model's training split: all of them, or a seeded draw of this "
        f"many when there are more (default {edge.REPRESENTATIVE_WINDOWS}).",
    )
    parser.add_argument(
        "--golden", type=int, default=4, help="Held-out windows written as golden vectors (1-16)."
    )
    parser.add_argument(
        "--max-accuracy-drop",
        "--max_accuracy_drop",
        dest="max_accuracy_drop",
        type=float,
        default=2.0,
        help="Largest allowed drop of clip accuracy from float to int8, in percentage points.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the representative draw.")
    parser.add_argument("--quiet", action="store_true", help="Only the summary.")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.golden <= 16:
        raise ConfigError(f"--golden={args.golden} must lie in 1..16")
    if not args.max_accuracy_drop >= 0:
        raise ConfigError(f"--max-accuracy-drop={args.max_accuracy_drop} must be 0 or more percentage points")
    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise ConfigError(f"--output {args.output!r} is the model folder")


def held_out(windows: training.WindowSet, split: dict) -> tuple[training.WindowSet, np.ndarray]:
    """The model's held-out test windows (labelled originals of its test fold or test split) and
    their mask over ``windows``.

    Raises:
        ConfigError: no such windows in the data.
    """
    labelled = (windows.labels >= 0) & windows.originals
    if split.get("by") == "fold":
        mask = labelled & (windows.folds == split.get("test_fold"))
        what = f"test fold {split.get('test_fold')}"
    elif split.get("by") == "split":
        mask = labelled & (windows.splits == split.get("test", "test"))
        what = f"test split {split.get('test', 'test')!r}"
    else:
        raise ConfigError(f"model split {split!r} is neither by fold nor by split name")
    if not mask.any():
        raise ConfigError(f"the data has no labelled windows of the model's {what}")
    return windows.take(mask), mask


def _window_sources(data_dir: str, dataset: dict) -> dict[str, np.ndarray]:
    """Source URI and window index of every window, in ``load_windows`` order."""
    table = training.read_window_table(data_dir, dataset, columns=["source_uri", "window_index"])
    return {key: np.asarray(table.column(key).to_pylist(), dtype=object) for key in table.column_names}


def golden_vectors(
    test: training.WindowSet,
    sources: dict[str, np.ndarray],
    *,
    config: FeatureConfig,
    n_clips: int,
) -> dict:
    """Decodes the source audio of a few held-out windows and cuts what a device frames.

    Also recomputes each window's features from that audio (``melspec.log_mel_windows``) and
    records the largest difference from the stored training features.

    Returns:
        ``{"rows", "audio" [n, window_samples], "features" [n, n_mels, n_frames], "clips",
        "recompute_max_abs_diff"}``.

    Raises:
        ConfigError: none of the chosen windows' audio can be read.
    """
    import fsspec

    from soundshard.transforms.audio import decode as audio_io
    from soundshard.transforms.features import melspec

    window_index = sources["window_index"].astype(np.int64)
    candidates = edge.golden_candidates(test, window_index, n_clips=4 * n_clips)
    rows, clips, cuts, recomputed, errors = [], [], [], [], []
    for row in candidates:
        if len(rows) == n_clips:
            break
        uri = str(sources["source_uri"][row])
        try:
            with fsspec.open(uri, "rb") as f:
                decoded = audio_io.decode_audio(
                    f,
                    sample_rate_hz=config.sample_rate_hz,
                    channel=config.channel,
                    resample_quality=config.resample_quality,
                    name=uri,
                )
        except (OSError, DataError) as exc:
            errors.append(f"{uri}: {exc}")
            continue
        k = int(window_index[row])
        cuts.append(edge.window_samples(decoded.samples, config, window_index=k))
        recomputed.append(melspec.log_mel_windows(decoded.samples, config, first_window=k, n_windows=1)[0])
        rows.append(row)
        clips.append(f"{test.clip_ids[row]}#{k}")
    if not rows:
        raise ConfigError(
            "golden vectors need the source audio of held-out windows; none could be read: "
            + "; ".join(errors[:3])
        )
    features = test.features[rows]
    return {
        "rows": rows,
        "audio": np.stack(cuts).astype(np.float32),
        "features": np.ascontiguousarray(features, dtype=np.float32),
        "clips": clips,
        "recompute_max_abs_diff": float(np.abs(np.stack(recomputed) - features).max()),
    }


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _replace_folder(output: str, write) -> None:
    """Writes a folder through ``write(tmp_folder)`` next to ``output`` and then moves it into
    place, so ``output`` is never half-written; an earlier ``output`` is replaced."""
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".compile-edge-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        write(tmp)
        if os.path.exists(output):
            old = tmp + "-old"
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _model_name(folder: str) -> str:
    """The model folder's name; with its parent's for a cross-validation fold (``sbcnn-cv/fold-1``)."""
    path = os.path.normpath(folder)
    name = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    return f"{parent}/{name}" if name.startswith("fold-") and parent else name


def _location(path: str) -> str:
    """Absolute local path, or the URL as given."""
    return path if "://" in path else os.path.abspath(path)


def _sha256_file(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def report_markdown(report: dict) -> str:
    """``report.md`` of a ``report.json``."""
    v, b, m = report["verification"], report["budget"], report["model"]
    clip, window = v["clip_accuracy"], v["window_accuracy"]
    lines = [
        f"# Edge artifact: {m['name']} → {b['target']['name']}",
        "",
        f"Status: **{report['status']}**"
        + (f" ({'; '.join(report['problems'])})" if report["problems"] else ""),
        "",
        f"- Source model: `{m['folder']}` ({m['architecture']}, {m['parameters']} parameters, "
        f"{m['macs_per_window']} MACs per window), data `{report['data']['path']}`",
        f"- Held-out: {v['held_out']} ({v['n_clips']} clips, {v['n_windows']} windows)",
        f"- Representative set: {report['representative']['n_windows']} windows of the training split "
        f"{report['representative'].get('folds', report['representative'].get('split'))}",
        f"- int8 model: {report['int8']['bytes']} bytes, ops {', '.join(report['int8']['ops'])}",
        f"- Tensor arena: {report['arena']['measured_bytes']} bytes measured with TFLite Micro, "
        f"{report['arena']['arena_bytes']} with the margin ({report['arena']['margin_bytes']} bytes)",
        "",
        "## Float vs int8",
        "",
        "| | float | int8 (TFLite Micro) | delta (pp) |",
        "|---|---:|---:|---:|",
        f"| clip accuracy (mean of windows) | {clip['float']:.4f} | {clip['int8']:.4f} | "
        f"{clip['delta_pp']:+.2f} |",
        f"| window accuracy | {window['float']:.4f} | {window['int8']:.4f} | "
        f"{100 * (window['int8'] - window['float']):+.2f} |",
        "",
        f"Windows whose top class agrees (float vs int8): {v['window_top_class_agreement']:.4f}.",
        "",
        "| int8 interpreters | max difference (int8 steps) | identical outputs | same top class |",
        "|---|---:|---:|---:|",
        *(
            f"| {pair} | {row['max_abs_diff_steps']} | {row['share_identical']:.4f} | "
            f"{row['top_class_agreement']:.4f} |"
            for pair, row in v["interpreters"].items()
        ),
        "",
        "| class | clips | float recall | int8 recall | delta (pp) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in v["per_class"].items():
        lines.append(
            f"| {name} | {row['support']} | {row['float_recall']:.3f} | {row['int8_recall']:.3f} | "
            f"{row['delta_pp']:+.1f} |"
        )
    lines += ["", "## Budget", "", *(f"- {line}" for line in edge.budget_lines(b)), ""]
    lines += [
        "Reserved amounts are the target profile's allowance for the TFLite Micro runtime and kernels,",
        "feature code, application, stack and audio buffers (`soundshard/schemas/edge.py`).",
        "",
    ]
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None, *, prog: str = "soundshard compile-edge") -> int:
    """Runs ``soundshard compile-edge``; returns the exit code (see the module docstring)."""
    args = make_parser(prog).parse_args(argv)
    started = time.monotonic()

    def say(message: str) -> None:
        if not args.quiet:
            print(f"[compile-edge] {message}", flush=True)

    try:
        _check_args(args)
        target = target_profile(args.target)
        model, description, dataset = models.load_with_data(args.model, args.data)
        kind = description.get("input", {}).get("kind", "log_mel")
        if kind != "log_mel":
            raise ConfigError(
                f"--model-dir {args.model!r} takes {kind!r} inputs; compile-edge needs a log-mel or MFCC "
                "model (a device computes those features; an embedding network is megabytes beyond its "
                "flash)"
            )
        config = FeatureConfig.from_dict(description["feature_config"])
        if config.fingerprint != description["feature_fingerprint"]:
            raise ConfigError(
                f"--model-dir {args.model!r}: feature_config has fingerprint {config.fingerprint}, "
                f"model.json says {description['feature_fingerprint']} (edited or from another soundshard "
                "version)"
            )
        if list(model.input_shape[1:]) != list(config.feature_shape):
            raise ConfigError(
                f"--model-dir {args.model!r} takes inputs of shape {list(model.input_shape[1:])}, but its "
                f"features are windows of shape {list(config.feature_shape)} ([n_mels, window_frames])"
            )
        tables = edge.feature_tables(config)
        label_names = description["label_names"]
        split = description["split"]
        windows = training.load_windows(args.data, dataset)
        test, test_mask = held_out(windows, split)
        representative, rep_info = edge.representative_set(
            windows, split=split, n_windows=args.representative_windows, seed=args.seed
        )
        say(
            f"quantising {description['training']['model']} to int8 with {rep_info['n_windows']} "
            f"windows of the training split ({rep_info.get('folds', rep_info.get('split'))})"
        )
        flatbuffer = edge.convert_int8(model, representative=representative)
        tflite = edge.describe_tflite(flatbuffer)
        in_q = (tflite["input"]["scale"], tflite["input"]["zero_point"])
        out_q = (tflite["output"]["scale"], tflite["output"]["zero_point"])
        x_test = edge.quantize(test.features, scale=in_q[0], zero_point=in_q[1])
        arena = edge.measure_arena(flatbuffer, sample_input=x_test[0])
        arena_bytes, margin = edge.arena_with_margin(arena["measured_bytes"])
        say(
            f"{len(flatbuffer)} byte int8 model, ops {', '.join(tflite['ops'])}; tensor arena "
            f"{arena['measured_bytes']} bytes measured ({arena['steps']} TFLite Micro runs), {arena_bytes} "
            "with the margin"
        )
        say(f"verifying on {len(test)} held-out windows with TFLite Micro and LiteRT")
        # at the measured minimum arena: the figures come from the arena the device is sized for
        tflm_out = edge.tflm_invoke(flatbuffer, x_test, arena_size_bytes=arena["measured_bytes"])
        sources = _window_sources(args.data, dataset)
        test_sources = {key: values[test_mask] for key, values in sources.items()}
        golden = golden_vectors(test, test_sources, config=config, n_clips=args.golden)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    litert_out = {
        kernels: edge.litert_invoke(flatbuffer, x_test, kernels=kernels) for kernels in edge.LITERT_KERNELS
    }
    float_probs = training.predict(model, test.features)
    verification = edge.compare_predictions(
        float_probabilities=float_probs,
        int8_outputs=tflm_out,
        litert_outputs=litert_out,
        output_scale=out_q[0],
        output_zero_point=out_q[1],
        windows=test,
        label_names=label_names,
    )
    verification["held_out"] = training.held_out_name(split)
    sizes = {
        "model_bytes": len(flatbuffer),
        "feature_flash_bytes": tables.flash_bytes,
        "arena_bytes": arena_bytes,
        "feature_ram_bytes": tables.ram_bytes,
    }
    fit = edge.budget(target, **sizes)
    problems = []
    drop = -verification["clip_accuracy"]["delta_pp"]
    if drop > args.max_accuracy_drop:
        problems.append(
            f"int8 clip accuracy {verification['clip_accuracy']['int8']:.4f} is {drop:.2f} points below "
            f"float {verification['clip_accuracy']['float']:.4f} "
            f"(--max-accuracy-drop {args.max_accuracy_drop})"
        )
    agree = verification["interpreters"]["tflite-micro vs litert-builtin"]
    fast = verification["interpreters"]["tflite-micro vs litert-xnnpack"]
    if (
        agree["max_abs_diff_steps"] > MAX_INTERPRETER_DIFF_STEPS
        or agree["top_class_agreement"] < MIN_INTERPRETER_TOP_CLASS_AGREEMENT
    ):
        problems.append(
            "TFLite Micro and LiteRT (builtin kernels) disagree: max difference "
            f"{agree['max_abs_diff_steps']} int8 steps (allowed {MAX_INTERPRETER_DIFF_STEPS}), "
            f"same top class on {agree['top_class_agreement']:.4f} of windows "
            f"(needed {MIN_INTERPRETER_TOP_CLASS_AGREEMENT})"
        )
    verified = not problems
    if not fit["fits"]:
        problems.extend(line for line in edge.budget_lines(fit) if "OVER" in line)
    status = "ok" if not problems else ("verification failed" if not verified else "over budget")

    golden_inputs = x_test[golden["rows"]]
    golden_outputs = tflm_out[golden["rows"]]
    golden_labels = test.labels[golden["rows"]]
    model_sha = edge.sha256_bytes(flatbuffer)
    report = {
        "format": MANIFEST_FORMAT,
        "status": status,
        "problems": problems,
        "model": {
            "name": _model_name(args.model),
            "folder": args.model,
            "architecture": recipe_of(description).model,
            "parameters": int(model.count_params()),
            "macs_per_window": models.count_macs(model),
        },
        "data": {"path": args.data, "feature_fingerprint": dataset["feature_fingerprint"]},
        "representative": rep_info,
        "int8": {"bytes": len(flatbuffer), "sha256": model_sha, "ops": tflite["ops"]},
        "arena": {
            **arena,
            "arena_bytes": arena_bytes,
            "margin_bytes": margin,
            "margin_rule": f"max({edge.ARENA_MARGIN_FRACTION:.0%}, {edge.ARENA_MARGIN_MIN_BYTES} bytes) "
            "over the measured minimum, rounded up to 16 bytes: room for optimised kernels' scratch buffers",
        },
        "verification": verification,
        "budget": fit,
        "versions": edge.tool_versions(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_sha256": model_sha,
        "model_bytes": len(flatbuffer),
        "model_file": "model_int8.tflite",
        "source_model": {
            "folder": _location(args.model),
            "model_file_sha256": _sha256_file(
                os.path.join(args.model, description.get("model_file", "model.keras"))
            ),
            "architecture": recipe_of(description).model,
            "split": split,
            "parameters": report["model"]["parameters"],
            "macs_per_window": report["model"]["macs_per_window"],
        },
        "dataset": {
            "path": _location(args.data),
            "feature_fingerprint": dataset["feature_fingerprint"],
            "schema_version": dataset.get("schema_version"),
        },
        "feature_fingerprint": config.fingerprint,
        "feature_config": config.to_dict(),
        "labels": label_names,
        "input": {
            **tflite["input"],
            "layout": "row-major [n_mels, window_frames]",
        },
        "output": tflite["output"],
        "quantization": {
            "input_scale": in_q[0],
            "input_zero_point": in_q[1],
            "output_scale": out_q[0],
            "output_zero_point": out_q[1],
            "scheme": "full-integer int8 (TFLITE_BUILTINS_INT8), per-channel weights, int32 biases",
            "representative": rep_info,
        },
        "ops": tflite["ops"],
        "op_counts": tflite["op_counts"],
        "tensor_types": tflite["tensor_types"],
        "tensor_arena": {**report["arena"]},
        "target": target.to_dict(),
        "budget": fit,
        "verification": {
            key: verification[key]
            for key in (
                "held_out",
                "n_windows",
                "n_clips",
                "clip_accuracy",
                "window_accuracy",
                "window_top_class_agreement",
                "interpreters",
            )
        },
        "golden": {
            "n": len(golden["rows"]),
            "clips": golden["clips"],
            "labels": [label_names[i] for i in golden_labels],
            "audio_samples": int(golden["audio"].shape[1]),
            "features_recomputed_max_abs_diff": round(golden["recompute_max_abs_diff"], 6),
        },
        "files": {},
        "versions": report["versions"],
    }

    def write_artifact(folder: str) -> None:
        files = {}
        with open(os.path.join(folder, "model_int8.tflite"), "wb") as f:
            f.write(flatbuffer)
        files["model_int8.tflite"] = "int8 TFLite flatbuffer"
        sources = cexport.model_data_files(
            flatbuffer,
            model_name=report["model"]["name"],
            model_sha256=model_sha,
            label_names=label_names,
            input_shape=tflite["input"]["shape"][1:],
            input_quantization=in_q,
            output_quantization=out_q,
            arena_bytes=arena_bytes,
            arena_measured_bytes=arena["measured_bytes"],
            feature_fingerprint=config.fingerprint,
        )
        sources[FEATURES_HEADER] = cexport.features_header(tables)
        sources.update(
            cexport.golden_files(
                audio=golden["audio"],
                features=golden["features"],
                inputs=golden_inputs,
                outputs=golden_outputs,
                labels=golden_labels,
                clip_names=golden["clips"],
                sample_rate_hz=config.sample_rate_hz,
            )
        )
        for name, text in sources.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
            files[name] = "C source" if name.endswith((".c", ".cc")) else "C header"
        os.makedirs(os.path.join(folder, "golden"))
        for name, array in (
            ("audio", golden["audio"]),
            ("features", golden["features"]),
            ("input_int8", golden_inputs),
            ("output_int8", golden_outputs),
            ("labels", golden_labels.astype(np.int32)),
        ):
            np.save(os.path.join(folder, "golden", f"{name}.npy"), array)
            files[f"golden/{name}.npy"] = f"golden {name}, {array.dtype} {list(array.shape)}"
        manifest["files"] = files
        _write_json(os.path.join(folder, "manifest.json"), manifest)
        _write_report(folder)

    def _write_report(folder: str) -> None:
        _write_json(os.path.join(folder, "report.json"), report)
        with open(os.path.join(folder, "report.md"), "w") as f:
            f.write(report_markdown(report))

    _replace_folder(args.output, write_artifact if status == "ok" else _write_report)
    clip = verification["clip_accuracy"]
    print(
        f"[compile-edge] {report['model']['name']}: clip accuracy float {clip['float']:.3f} / int8 "
        f"{clip['int8']:.3f} ({clip['delta_pp']:+.2f} pp) on {verification['held_out']}, top class agrees on "
        f"{verification['window_top_class_agreement']:.3f} of windows; TFLite Micro vs LiteRT max "
        f"{agree['max_abs_diff_steps']} step(s) (builtin kernels), {fast['max_abs_diff_steps']} (XNNPACK)",
        flush=True,
    )
    for line in edge.budget_lines(fit):
        print(f"[compile-edge] {line}", flush=True)
    if status != "ok":
        print(f"{prog}: {status}: " + "; ".join(problems), file=sys.stderr)
        print(f"{prog}: figures in {os.path.join(args.output, 'report.md')}", file=sys.stderr)
        if verified:
            fits_on = [
                n for n, t in sorted(TARGETS.items()) if n != target.name and edge.budget(t, **sizes)["fits"]
            ]
            print(
                f"{prog}: hint: a model of this size fits "
                + (", ".join(fits_on) if fits_on else "none of the targets")
                + "; microcontroller-sized models are `soundshard train --arch dscnn-xs`, "
                "`dscnn-s` or `edgecnn`",
                file=sys.stderr,
            )
        return EXIT_VERIFICATION if not verified else EXIT_OVER_BUDGET
    print(f"[compile-edge] artifact -> {args.output} ({len(manifest['files']) + 3} files)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run())
