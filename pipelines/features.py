"""Features pipeline: audio folders, globs or manifests → log-mel windows → Parquet + TFRecord.

Local run (FnApiRunner; no network needed)::

    soundshard features --input ../shared/data/esc10/audio \\
        --manifest ../shared/data/esc10/meta.csv --output out/esc10
    soundshard features --input 'recordings/**/*.flac' --output out/night \\
        --config features.toml --direct_num_workers 2
    soundshard features --input recordings/ --labels --output out/strong   # Audacity/Raven beside

Dataflow (workers need the soundshard package, see ``infra/``)::

    soundshard features --input 'gs://bucket/audio/**/*.flac' --output gs://bucket/features/ \\
        --runner DataflowRunner --project my-project --region europe-west1 \\
        --temp_location gs://bucket/tmp --sdk_container_image IMAGE

Output layout (``--output``)::

    dataset.json                       config, fingerprint, label map, counts, run figures
    dead_letters.parquet               every input that failed: source, stage, reason, message
    parquet/windows-00000-of-0000N.parquet
    tfrecord/windows-00000-of-0000N.tfrecord
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from soundshard.pipelines import arguments
from soundshard.pipelines import runner as runners
from soundshard.pipelines.arguments import (  # noqa: F401 - the flags' helpers, named here for callers
    DEFAULT_MAX_FAILED_FRACTION,
    EXIT_TOO_MANY_FAILURES,
    add_feature_flags,
    add_label_args,
    add_level_flags,
    add_source_args,
)
from soundshard.pipelines.runs import (  # noqa: F401 - EXIT_LOCKED, EXIT_OK: named here for callers
    EXIT_CONFIG,
    EXIT_LOCKED,
    EXIT_OK,
    NOTHING_NEW,
    RAN,
    check_failed_fraction,
    decode_and_compute,
    exit_code,
    feature_config_from_args,
    launch,
    level_config_from_args,
    locked_run,
    manifest_blocks,
    setup_logging,
    source_rates,
    storage_config,
    strong_labels_from_args,
    take_sources,
)
from soundshard.schemas import fields
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.embedding import EmbeddingConfig
from soundshard.schemas.errors import ConfigError, OutputLockedError
from soundshard.schemas.levels import LevelConfig
from soundshard.schemas.storage import StorageConfig
from soundshard.schemas.uris import redact
from soundshard.transforms.audio import augment
from soundshard.transforms.features.compute import (
    SOURCE_RATES_HZ,
    AssignWindowLabels,
    ComputeLogMel,
)
from soundshard.transforms.io import listing
from soundshard.transforms.labels import strong_labels
from soundshard.transforms.levels import level_tables
from soundshard.transforms.outputs import shards
from soundshard.transforms.outputs.tables import WriteTables

_LOG = logging.getLogger(__name__)


def make_parser(prog: str = "soundshard features") -> argparse.ArgumentParser:
    """Argument parser of the features command (``pipelines/arguments.py``)."""
    return arguments.features_parser(prog)


@dataclasses.dataclass(frozen=True)
class FeatureRun:
    """Everything ``build`` needs, resolved and validated on the launcher.

    ``config`` is a FeatureConfig (``soundshard features``) or an EmbeddingConfig
    (``soundshard embed``, see ``pipelines/embed.py``): both plan, decode, shard and commit alike.
    ``keep_fetched`` (set by ``launch`` for local runs on threads): small remote objects fetched
    whole by the header read stay in the process until decoded (see ``PlanUnits``).
    """

    listing: listing.SourceListing
    config: FeatureConfig | EmbeddingConfig
    spec: shards.ShardSpec
    manifest: dict
    unit_s: float | None = 60.0
    committed_runs: frozenset[str] = frozenset()
    augmentations: tuple = ()
    keep_fetched: bool = False
    source_rates_hz: tuple[int, int] = SOURCE_RATES_HZ
    min_label_overlap: float = strong_labels.MIN_OVERLAP
    levels: LevelConfig | None = None
    storage: StorageConfig | None = None


class DatasetOutputs(NamedTuple):
    """What :func:`build` (and embed's) composed: PCollections of the run's stages.

    Attributes:
        units: WorkUnits as planned.
        windows: WindowBatches (EmbeddingBatches for embed), with their strong labels.
        dead_letters: DeadLetters of listing, planning and compute.
        summaries: FileSummary per processed unit.
        written: WrittenShard per shard file.
        dataset: The path of ``dataset.json`` (one element, after the commit).
        level_rows: TableRows of the level tables, or ``None`` without levels.
    """

    units: beam.PCollection
    windows: beam.PCollection
    dead_letters: beam.PCollection
    summaries: beam.PCollection
    written: beam.PCollection
    dataset: beam.PCollection[str]
    level_rows: beam.PCollection | None = None


def build(p: beam.Pipeline, run: FeatureRun) -> DatasetOutputs:
    """Composes the features pipeline on ``p`` (does not run it)."""
    compute = ComputeLogMel(run.config, levels=run.levels, storage=run.storage)
    return compose(p, run, label="ComputeLogMel", compute=compute)


def compose(p: beam.Pipeline, run: FeatureRun, *, label: str, compute: beam.PTransform) -> DatasetOutputs:
    """Sources → plan → ``compute`` → shards → commit, on ``p`` (does not run it).

    Args:
        p: The pipeline.
        run: The resolved run.
        label: Stable step label of the compute stage (``ComputeLogMel``, ``ComputeEmbeddings``).
        compute: WorkUnits → :class:`ComputedWindows` (``ComputeLogMel``, ``ComputeEmbeddings``).
    """
    front = decode_and_compute(p, run, label=label, compute=compute)
    # Every run passes its windows through (a no-op for recordings without annotations), so the
    # step graph does not depend on the inputs.
    labelled = front.windows | "AssignWindowLabels" >> AssignWindowLabels(min_overlap=run.min_label_overlap)
    n_shards = (
        front.units
        | "ExpectedWindows" >> beam.Map(lambda unit: unit.n_windows)
        | "CountShards" >> shards.ShardCount(config=run.config, spec=run.spec)
    )
    listed, items, windows = run.listing, front.items, labelled.windows
    summaries, dead_letters = front.summaries, front.dead_letters
    written = windows | "WriteShards" >> shards.WriteWindowShards(
        config=run.config,
        spec=run.spec,
        label_map=listed.label_map,
        extra_columns=listed.extra_columns,
        n_shards=n_shards,
    )
    level_files = level_rows = level_hours = None
    if run.levels is not None:
        measured = front.levels | "RecordingLevels" >> level_tables.RecordingLevels(run.levels)
        level_rows, level_hours = measured.rows, measured.hours
        spec = run.spec
        level_files = level_rows | "WriteLevelTables" >> WriteTables(
            temp_dir=shards.join(spec.temp_dir, "levels"),
            formats=level_tables.FORMATS,
            partition=f"run_date={spec.run_date}" if spec.incremental else "",
        )
    dataset = p | "CommitDataset" >> shards.CommitDataset(
        items=items,
        written=written,
        n_shards=n_shards,
        dead_letters=dead_letters,
        summaries=summaries,
        config=run.config,
        spec=run.spec,
        extra_columns=listed.extra_columns,
        n_inputs=listed.n_inputs,
        manifest=run.manifest,
        label_counts=labelled.label_counts,
        level_files=level_files,
        level_hours=level_hours,
        levels=run.levels,
    )
    return DatasetOutputs(
        units=front.units,
        windows=windows,
        dead_letters=dead_letters,
        summaries=summaries,
        written=written,
        dataset=dataset,
        level_rows=level_rows,
    )


def prepare(args: argparse.Namespace, *, config: FeatureConfig | EmbeddingConfig | None = None) -> FeatureRun:
    """Validates the arguments and lists the sources (raises ConfigError naming bad values).

    Args:
        args: Parsed arguments of the command.
        config: The resolved config; default: the FeatureConfig of ``--config`` and the flags.
    """
    if not args.input:
        raise ConfigError("--input is required (folder, glob or file)")
    if not args.output:
        raise ConfigError("--output is required")
    if args.num_shards is not None and args.num_shards < 1:
        raise ConfigError(f"--num-shards={args.num_shards} must be at least 1")
    if not args.shard_size_mb > 0:
        raise ConfigError(f"--shard-size-mb={args.shard_size_mb} must be positive")
    if args.unit_s < 0:
        raise ConfigError(f"--unit-s={args.unit_s} must be 0 (never split) or positive")
    check_failed_fraction(args)
    storage_settings = storage_config(args)
    rates_hz = source_rates(args)
    labels = strong_labels_from_args(args)
    if config is None:
        config = feature_config_from_args(args)
    augmentations = augment.parse_augmentations(getattr(args, "augment", None))
    level_config = level_config_from_args(args)
    if augmentations and not isinstance(config, FeatureConfig):
        raise ConfigError("--augment makes log-mel copies; it is an option of `soundshard features` only")
    taken = take_sources(args, fingerprint=config.fingerprint)
    listed, run_date, recording = taken.listing, taken.run_date, taken.recording
    if level_config is not None:
        level_tables.check_offsets(taken.listing.items)
    committed, unchanged = taken.committed_runs, taken.unchanged
    output = args.output.rstrip("/")
    formats = shards.FORMATS if args.format == "both" else (args.format,)
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    spec = shards.ShardSpec(
        output=output,
        formats=formats,
        num_shards=args.num_shards,
        shard_size_mb=args.shard_size_mb,
        run_id=run_id,
        run_date=run_date,
        by_site=run_date is not None and recording.site_pattern is not None,
    )
    manifest = {
        "schema_version": fields.SCHEMA_VERSION,
        "feature_fingerprint": config.fingerprint,
        "feature_config": config.to_dict(),
        "feature_shape": list(config.feature_shape),
        "feature_column": fields.feature_column_of(config),
        "window_s": config.window_s,
        "window_hop_s": config.window_hop_s,
        "recording_config": recording.to_dict(),
        "augmentations": [a.name for a in augmentations],
        "label_map": listed.label_map,
        "strong_labels": (
            {
                "column": labels.column,
                "optional": labels.optional,
                "min_overlap": args.min_label_overlap,
                "rule": "a window takes an annotation's label when they overlap by at least "
                "min_overlap of the shorter of the two (and more than 1 us); a point label labels "
                "the windows that contain it; windows with no label are background",
            }
            if labels is not None
            else None
        ),
        "extra_columns": [fields.EXTRA_PREFIX + c for c in listed.extra_columns],
        "levels": (
            level_tables.summary(level_config, sample_rate_hz=config.sample_rate_hz)
            if level_config is not None
            else None
        ),
        "sources": {"input": args.input, "manifest": args.manifest},
        "storage": storage_settings.to_dict(),
        **manifest_blocks(run_id, run_date=run_date, unchanged=len(unchanged), earlier_runs=len(committed)),
    }
    return FeatureRun(
        listing=listed,
        config=config,
        spec=spec,
        manifest=manifest,
        unit_s=args.unit_s or None,
        committed_runs=frozenset(committed),
        augmentations=augmentations,
        source_rates_hz=rates_hz,
        min_label_overlap=args.min_label_overlap if labels is not None else strong_labels.MIN_OVERLAP,
        levels=level_config,
        storage=storage_settings,
    )


def read_dataset_json(output: str) -> dict:
    """Reads ``<output>/dataset.json`` through Beam's FileSystems."""
    with FileSystems.open(shards.join(output, "dataset.json")) as f:
        return json.loads(f.read())


def summary_text(dataset: dict, output: str) -> str:
    """A one-screen summary of a finished features run."""
    fig = dataset["figures"]
    lines = [
        f"output           {output}",
        f"inputs           {fig['inputs']}  processed {fig['files_processed']}  "
        f"dead letters {fig['dead_letters']}  (all accounted for: {fig['accounted_for']})",
        f"work units       {fig['work_units']}  (partially failed files: {fig['partial_files']})",
        f"windows          {fig['windows']}  shape {dataset['feature_shape']}  "
        f"fingerprint {dataset['feature_fingerprint']}",
        f"audio            {fig['audio_s']:.1f} s in {fig['wall_s']:.1f} s "
        f"({fig['speed_x_realtime']}x real time)",
        f"shards           {len(dataset['shards'].get('parquet', dataset['shards'].get('tfrecord', [])))} "
        f"per format: {', '.join(k for k in dataset['shards'] if k != 'rows_per_shard')}",
    ]
    if dataset["label_map"]:
        per_label = dataset["counts"]["clips_by_label"]
        lines.append("clips by label   " + ", ".join(f"{k} {v}" for k, v in per_label.items()))
    strong = dataset.get("counts", {}).get("strong_labels") or {}
    if strong.get("recordings"):
        lines.append(
            f"strong labels    {strong['recordings']} recordings, {strong['windows']} windows "
            f"({strong['background_windows']} background, {strong['multi_label_windows']} multi-label)"
        )
    if (dataset.get("levels") or {}).get("rows"):
        lines.append(level_tables.summary_line(dataset["levels"]["rows"], dataset["levels"]))
    if fig["dead_letters_by_reason"]:
        lines.append(
            "dead letters     " + ", ".join(f"{k} {v}" for k, v in fig["dead_letters_by_reason"].items())
        )
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None, *, prog: str = "soundshard features") -> int:
    """Runs the features command; returns the exit code.

    Exit codes: 0 when at least one input produced windows and at most ``--max-failed-fraction``
    of them failed; 1 when inputs were found but none succeeded; 2 on a configuration error
    (nothing is processed); 5 when more than ``--max-failed-fraction`` of the inputs failed
    (outputs written); 75 when another run holds the output folder's lock.
    """
    parser = make_parser(prog)
    args, beam_args = parser.parse_known_args(argv)
    return execute(args, beam_args, prog=prog, label="features", prepare=prepare, build=build)


def execute(
    args: argparse.Namespace,
    beam_args: Sequence[str],
    *,
    prog: str,
    label: str,
    prepare: typing.Callable[[argparse.Namespace], FeatureRun],
    build: typing.Callable[[beam.Pipeline, FeatureRun], dict],
) -> int:
    """Prepares, runs and summarises a run of a command built on :func:`compose`; the exit code.

    Args:
        args: The command's parsed arguments.
        beam_args: The remaining (Beam) flags.
        prog: Command name for messages.
        label: Name on the progress line.
        prepare: Arguments → :class:`FeatureRun` (raises ConfigError).
        build: Composes the pipeline (see :func:`build`).
    """
    setup_logging(verbose=args.verbose)
    try:
        runners.check_beam_args(beam_args)
        with locked_run(args, prog=prog):
            return _execute(args, beam_args, prog=prog, label=label, prepare=prepare, build=build)
    except ConfigError as exc:
        print(f"{prog}: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except OutputLockedError as exc:
        print(f"{prog}: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_LOCKED


def _execute(args, beam_args, *, prog, label, prepare, build) -> int:
    feature_run = prepare(args)
    outcome = launch(
        feature_run,
        beam_args,
        label=label,
        build=build,
        output=feature_run.spec.output,
        incremental=feature_run.spec.incremental,
    )
    if outcome == NOTHING_NEW:
        skipped = feature_run.manifest["incremental"]["unchanged_skipped"]
        print(f"nothing new: all {skipped} input(s) were processed by earlier runs with this config")
    if outcome != RAN:
        return EXIT_OK
    dataset = read_dataset_json(feature_run.spec.output)
    print(summary_text(dataset, feature_run.spec.output))
    return exit_code(
        dataset["figures"],
        prog=prog,
        max_failed_fraction=args.max_failed_fraction,
        what="processed",
        where=shards.join(feature_run.spec.output, dataset["dead_letters_file"]),
    )
