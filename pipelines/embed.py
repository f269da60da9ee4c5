"""Embed pipeline: audio folders, globs or manifests → pretrained embeddings → Parquet + TFRecord.

Same sources, planning, decoding, dead letters, shards and ``dataset.json`` as ``soundshard
features`` (``pipelines/features.py``); the compute stage runs an embedding model through Beam's
RunInference (``transforms/features/embeddings.py``): OpenL3 from its official weight files, or any TF
SavedModel / TFLite model with a declared config.

Local run (FnApiRunner; no network needed)::

    soundshard embed --input ../shared/data/esc10/audio --manifest ../shared/data/esc10/meta.csv \\
        --output out/esc10-l3 --embedding-model openl3 --input-repr mel256 --content-type env \\
        --embedding-size 512 --weights models/openl3_audio_mel256_env.h5
    soundshard embed --input 'recordings/**/*.flac' --output out/yamnet \\
        --embedding-model saved_model:models/yamnet --embedding-config yamnet.toml

Dataflow (workers need the soundshard package, see ``infra/``)::

    soundshard embed --input 'gs://bucket/audio/**/*.flac' --output gs://bucket/emb/ \\
        --weights gs://models/openl3_audio_mel256_env.h5 --content-type env \\
        --runner DataflowRunner --project my-project --region europe-west1 \\
        --temp_location gs://bucket/tmp --sdk_container_image IMAGE

Output layout (``--output``): as ``soundshard features``, with an ``embedding`` column (float32,
``[embedding_size]``) instead of ``log_mel``::

    dataset.json                       embedding config, fingerprint, label map, counts, figures
    dead_letters.parquet               every input that failed: source, stage, reason, message
    parquet/windows-00000-of-0000N.parquet
    tfrecord/windows-00000-of-0000N.tfrecord
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence

import apache_beam as beam

from soundshard.pipelines import arguments, features
from soundshard.pipelines.arguments import EMBED_CONFIG_FLAGS as _CONFIG_FLAGS
from soundshard.schemas.embedding import EmbeddingConfig, load_embedding_config
from soundshard.schemas.errors import ConfigError
from soundshard.transforms.features.embeddings import ComputeEmbeddings, check_model

PROG = "soundshard embed"
#: EmbeddingConfig fields and their flags (both spellings, ``--input-repr`` and ``--input_repr``).
#: ``model`` and ``model_uri`` come from ``--embedding-model`` / ``--weights``.
_MODEL_KINDS = ("saved_model", "tflite")
#: Windows per model call by default: on a CPU, larger batches are no faster per window, and
#: memory grows with the batch (OpenL3 mel256: ~33 MB of activations per window of a batch).
DEFAULT_BATCH_SIZE = 16


@dataclasses.dataclass(frozen=True)
class EmbedRun(features.FeatureRun):
    """A :class:`FeatureRun` with an EmbeddingConfig and how RunInference batches."""

    min_batch_size: int = 16
    max_batch_size: int = 16
    large_model: bool = False


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of the embed command (``pipelines/arguments.py``)."""
    return arguments.embed_parser(prog)


def _model_values(args: argparse.Namespace) -> dict:
    values: dict[str, typing.Any] = {}
    if args.model:
        kind, sep, uri = args.model.partition(":")
        if kind == "openl3" and not sep:
            values["model"] = "openl3"
        elif kind in _MODEL_KINDS and sep and uri:
            values["model"], values["model_uri"] = kind, uri
        else:
            raise ConfigError(
                f"--embedding-model={args.model!r} must be 'openl3', 'saved_model:PATH_OR_URI' or "
                "'tflite:PATH_OR_URI'"
            )
    if args.weights:
        if values.get("model", "openl3") != "openl3":
            raise ConfigError(f"--weights is for OpenL3; {args.model!r} names its model file itself")
        values["model_uri"] = args.weights
    return values


def embedding_config_from_args(args: argparse.Namespace) -> EmbeddingConfig:
    """The EmbeddingConfig from ``--embedding-config``, ``--embedding-model``/``--weights`` and the flags."""
    hints = typing.get_type_hints(EmbeddingConfig)
    overrides = _model_values(args)
    for name in _CONFIG_FLAGS:
        raw = getattr(args, f"embed__{name}", None)
        if raw is not None:
            overrides[name] = arguments.parse_value(raw, hints[name])
    if getattr(args, "trust_model_code", False):
        overrides["trust_model_code"] = True
    if args.model_config:
        return load_embedding_config(args.model_config, **overrides)
    return EmbeddingConfig.from_dict(overrides)


def prepare(args: argparse.Namespace) -> EmbedRun:
    """Validates the arguments, checks the model file (a SavedModel's ops too, unless
    ``--trust-model-code``) and lists the sources (ConfigError names a bad value, the missing
    file or a refused op)."""
    if args.config:
        raise ConfigError(
            f"--config {args.config!r} is a feature config; the embed command takes --embedding-config"
        )
    config = check_model(embedding_config_from_args(args))
    min_batch = args.min_batch_size or min(DEFAULT_BATCH_SIZE, args.max_batch_size or DEFAULT_BATCH_SIZE)
    max_batch = args.max_batch_size or max(DEFAULT_BATCH_SIZE, min_batch)
    if min_batch < 1 or max_batch < min_batch:
        raise ConfigError(
            f"--min_batch_size={min_batch} and --max_batch_size={max_batch}: need 1 <= min <= max"
        )
    run = features.prepare(args, config=config)
    manifest = dict(run.manifest)
    manifest["embedding"] = {
        "model": config.model,
        "model_uri": config.model_uri,
        "model_sha256": config.model_sha256,
        "window_samples": config.window_samples,
        "hop_samples": config.hop_samples,
        "pad_start_samples": config.pad_start_samples,
        "min_batch_size": min_batch,
        "max_batch_size": max_batch,
    }
    fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(features.FeatureRun)}
    fields["manifest"] = manifest
    return EmbedRun(
        **fields, min_batch_size=min_batch, max_batch_size=max_batch, large_model=args.large_model
    )


def build(p: beam.Pipeline, run: EmbedRun):
    """Composes the embed pipeline on ``p`` (does not run it).

    Returns:
        As ``features.build``, with ``windows`` of EmbeddingBatch.
    """
    compute = ComputeEmbeddings(
        run.config,
        min_batch_size=run.min_batch_size,
        max_batch_size=run.max_batch_size,
        large_model=run.large_model,
        storage=run.storage,
    )
    return features.compose(p, run, label="ComputeEmbeddings", compute=compute)


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs the embed command; returns the exit code (0 ok, 1 nothing processed, 2 config error)."""
    parser = make_parser(prog)
    args, beam_args = parser.parse_known_args(argv)
    return features.execute(args, beam_args, prog=prog, label="embed", prepare=prepare, build=build)
