"""What every command that runs a pipeline shares: resolving the run's inputs and settings from
its flags (feature, level, recording and storage settings; the sources, less what an incremental
run's ledger says is done), the output lock, logging, launching locally or remotely, exit codes.

``pipelines/features.py``, ``embed.py`` and ``tag.py`` build on it; each of those is options →
``prepare`` → ``build`` → run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import sys
import time
import typing
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import apache_beam as beam
import threadpoolctl
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

import soundshard
from soundshard.pipelines import arguments
from soundshard.pipelines import runner as runners
from soundshard.pipelines.arguments import EXIT_TOO_MANY_FAILURES
from soundshard.schemas.config import FeatureConfig, RecordingConfig, load_feature_config
from soundshard.schemas.embedding import EmbeddingConfig
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.levels import LevelConfig
from soundshard.schemas.records import DeadLetter, FileSummary, SourceItem, UnitLevels, WindowBatch, WorkUnit
from soundshard.schemas.storage import StorageConfig
from soundshard.schemas.uris import redact
from soundshard.transforms.features.compute import (
    ComputedWindows,
    DecodeAndCompute,
    PlanUnits,
    fetched_objects,
)
from soundshard.transforms.io import ledger, listing, storage
from soundshard.transforms.labels import strong_labels

#: Exit codes of the commands that run pipelines (features, embed, tag).
EXIT_OK, EXIT_NOTHING_PROCESSED, EXIT_CONFIG = 0, 1, 2
#: Another run holds the output folder's lock (``EX_TEMPFAIL``: try again later).
EXIT_LOCKED = 75


def feature_config_from_args(args: argparse.Namespace) -> FeatureConfig:
    """The FeatureConfig from ``--config`` and the per-field flags (config errors name the value)."""
    hints = typing.get_type_hints(FeatureConfig)
    overrides = {}
    for field in dataclasses.fields(FeatureConfig):
        raw = getattr(args, f"feature__{field.name}", None)
        if raw is not None:
            overrides[field.name] = arguments.parse_value(raw, hints[field.name])
    if args.config:
        return load_feature_config(args.config, **overrides)
    return FeatureConfig.from_dict(overrides)


def calibration_table(uri: str) -> tuple[tuple[str, float], ...]:
    """``(site or site/deployment, offset_db)`` pairs of a calibration CSV (ConfigError names the
    file and row of a bad value)."""
    import csv
    import io

    try:
        with FileSystems.open(uri) as f:
            text = f.read().decode("utf-8-sig")
    except Exception as exc:  # noqa: BLE001 - any storage failure is a config error here
        raise ConfigError(f"--calibration-table {redact(uri)!r} cannot be read: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    if not {"site", "level_offset_db"} <= columns:
        raise ConfigError(
            f"--calibration-table {redact(uri)!r} needs columns 'site' and 'level_offset_db' "
            f"(has {sorted(columns)})"
        )
    pairs = []
    for line, row in enumerate(reader, start=2):
        key = row["site"].strip()
        if row.get("deployment", "").strip():
            key += "/" + row["deployment"].strip()
        try:
            value = float(row["level_offset_db"])
        except ValueError:
            raise ConfigError(
                f"--calibration-table {redact(uri)!r} line {line}: level_offset_db="
                f"{row['level_offset_db']!r} is not a number"
            ) from None
        if not key:
            raise ConfigError(f"--calibration-table {redact(uri)!r} line {line}: empty site")
        pairs.append((key, value))
    return tuple(pairs)


def level_config_from_args(args: argparse.Namespace) -> LevelConfig | None:
    """The LevelConfig of the level flags, or ``None`` without ``--levels``."""
    if not getattr(args, "levels", False):
        return None
    table = calibration_table(args.calibration_table) if args.calibration_table else ()
    try:
        return LevelConfig(
            interval_s=args.level_interval_s,
            bands=args.level_bands,
            offset_db=args.level_offset_db,
            timezone=args.timezone,
            site_offsets_db=table,
        )
    except ConfigError as exc:
        flag = {"interval_s": "--level-interval-s", "offset_db": "--level-offset-db"}
        message = str(exc)
        for name, option in flag.items():
            message = message.replace(f"{name}=", f"{option}=")
        raise ConfigError(message) from None


def recording_config_from_args(args: argparse.Namespace) -> RecordingConfig:
    """Where start times and sites come from (raises ConfigError naming a bad value)."""
    return RecordingConfig(
        timezone=args.timezone, time_from_filename=args.time_from_filename, site_pattern=args.site_pattern
    )


def list_sources(args: argparse.Namespace, recording: RecordingConfig) -> listing.SourceListing:
    """Sources from ``--manifest`` or from listing ``--input``."""
    labels = strong_labels_from_args(args)
    if args.manifest:
        columns = listing.ManifestColumns(
            filename=args.filename_column,
            label=args.label_column,
            fold=args.fold_column,
            split=args.split_column,
            start_time=args.start_time_column,
        )
        return listing.from_manifest(
            args.manifest,
            input_uri=args.input,
            columns=columns,
            recording=recording,
            allow_outside_input=args.allow_outside_input,
            labels=labels,
        )
    if labels is not None and labels.column:
        raise ConfigError(f"--labels-column {labels.column!r} needs a --manifest")
    return listing.from_listing(
        args.input,
        label_from_parent=args.label_from_parent,
        member_glob=args.archive_glob,
        recording=recording,
        labels=labels,
    )


def strong_labels_from_args(args: argparse.Namespace) -> listing.StrongLabels | None:
    """The ``--labels`` settings, or ``None`` without ``--labels`` (commands without these flags
    too); ConfigError names a flag given without ``--labels`` or a bad value."""
    if not getattr(args, "labels", False):
        for flag, given in (
            ("--labels-column", getattr(args, "labels_column", None) is not None),
            ("--labels-optional", getattr(args, "labels_optional", False)),
        ):
            if given:
                raise ConfigError(f"{flag} needs --labels")
        return None
    try:
        strong_labels.check_min_overlap(args.min_label_overlap)
    except ValueError:
        raise ConfigError(
            f"--min-label-overlap={args.min_label_overlap} must lie between 0 and 1 (a share of the "
            "shorter of window and annotation)"
        ) from None
    return listing.StrongLabels(optional=args.labels_optional, column=args.labels_column)


class RedactingFormatter(logging.Formatter):
    """Formats log records (tracebacks included) without credentials (``schemas/uris.py``)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _own_or_serious(record: logging.LogRecord) -> bool:
    """Without ``--verbose``: soundshard's own warnings, and other libraries' errors only (their
    warnings about platforms and resources are not the user's business)."""
    return record.name.startswith("soundshard") or record.levelno >= logging.ERROR


def setup_logging(*, verbose: bool) -> None:
    """Logs at INFO with ``--verbose`` (else WARNING, and of other libraries only errors), through
    handlers that redact credentials."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter._fmt if handler.formatter else None))
        if not verbose and _own_or_serious not in handler.filters:
            handler.addFilter(_own_or_serious)
        elif verbose and _own_or_serious in handler.filters:
            handler.removeFilter(_own_or_serious)


def source_rates(args: argparse.Namespace) -> tuple[int, int]:
    """``--source-rates-hz MIN:MAX`` as ``(min, max)`` (raises ConfigError naming a bad value)."""
    text = args.source_rates_hz
    try:
        low, high = (int(float(part)) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--source-rates-hz={text!r} is not MIN:MAX in Hz, e.g. 1000:2000000") from None
    if not 0 < low <= high:
        raise ConfigError(f"--source-rates-hz={text!r} needs 0 < MIN <= MAX")
    return low, high


def check_failed_fraction(args: argparse.Namespace) -> None:
    """Raises ConfigError unless ``--max-failed-fraction`` lies in [0, 1]."""
    if not 0.0 <= args.max_failed_fraction <= 1.0:
        raise ConfigError(f"--max-failed-fraction={args.max_failed_fraction} must lie between 0 and 1")


def exit_code(figures: dict, *, prog: str, max_failed_fraction: float, what: str, where: str) -> int:
    """The exit code of a finished run from its figures, with the error line when it is not 0.

    Args:
        figures: The run's figures (``inputs``, ``files_processed``, ``dead_letter_inputs``).
        prog: Command name for messages.
        max_failed_fraction: Largest share of inputs that may fail for a successful run.
        what: What the run does to an input ("processed", "tagged").
        where: Where the dead letters are.
    """
    inputs, failed = figures["inputs"], figures["dead_letter_inputs"]
    if figures["files_processed"] == 0:
        print(f"{prog}: error: no input could be {what}; see {where}", file=sys.stderr)
        return EXIT_NOTHING_PROCESSED
    if inputs and failed / inputs > max_failed_fraction:
        print(
            f"{prog}: error: {failed} of {inputs} inputs ({failed / inputs:.0%}) failed, more than "
            f"--max-failed-fraction {max_failed_fraction:g}; the outputs are written, see {where}",
            file=sys.stderr,
        )
        return EXIT_TOO_MANY_FAILURES
    return EXIT_OK


def locked_run(args: argparse.Namespace, *, prog: str):
    """The output folder's lock for this run (see ``transforms/io/lock.py``)."""
    from soundshard.transforms.io import lock

    if not args.output:
        raise ConfigError("--output is required")
    storage.check_store(args.output, flag="--output")
    return lock.output_lock(args.output, command=prog, break_lock=args.break_lock)


def storage_config(args: argparse.Namespace) -> StorageConfig:
    """The run's storage settings: defaults, the launcher's ``SOUNDSHARD_STORAGE_*``, then the
    ``--storage-*`` flags; made this process's too (listing reads objects here). Raises
    ConfigError naming a bad value, before any worker starts."""
    config = StorageConfig.resolve(
        {f.name: getattr(args, f"storage_{f.name}", None) for f in dataclasses.fields(StorageConfig)}
    )
    storage.configure(config)
    return config


@dataclasses.dataclass(frozen=True)
class TakenSources:
    """What a run takes on: the listing (in incremental runs, only what is new) and its context.

    Attributes:
        listing: Inputs to process and listing dead letters.
        recording: Where start times and sites come from.
        run_date: Partition date of an incremental run, else ``None``.
        committed_runs: Run ids of earlier committed runs into the output (incremental runs).
        unchanged: Inputs earlier runs already processed with this fingerprint (skipped).
    """

    listing: listing.SourceListing
    recording: RecordingConfig
    run_date: str | None
    committed_runs: frozenset[str] = frozenset()
    unchanged: tuple = ()


def take_sources(args: argparse.Namespace, *, fingerprint: str) -> TakenSources:
    """Lists the inputs of ``args`` and, in incremental runs, leaves out those the ledger under
    ``--output`` says were processed with ``fingerprint`` (ConfigError names bad values)."""
    run_date = _run_date(args)
    recording = recording_config_from_args(args)
    storage.check_store(args.input, flag="--input")
    if args.manifest:
        storage.check_store(args.manifest, flag="--manifest")
    listed = list_sources(args, recording)
    if not listed.items and not listed.dead_letters:
        raise ConfigError(f"no inputs found in --manifest {args.manifest!r}")
    if run_date is None:
        return TakenSources(listed, recording, None)
    earlier = ledger.read_ledger(args.output.rstrip("/"))
    done = ledger.done_keys(earlier, retry_dead_letters=args.retry_dead_letters)
    # Local files have no content digest in their listing: hash those the keys do not settle (new,
    # or touched since), so the ledger can tell a touched file from a changed one.
    items = listing.with_content(
        listed.items, where=lambda item: ledger.key_of(item, fingerprint) not in done
    )
    new, unchanged = ledger.split_new(
        items, earlier, fingerprint=fingerprint, retry_dead_letters=args.retry_dead_letters
    )
    return TakenSources(
        dataclasses.replace(listed, items=tuple(new)),
        recording,
        run_date,
        frozenset(ledger.committed_runs(earlier)),
        tuple(unchanged),
    )


def _run_date(args: argparse.Namespace) -> str | None:
    """The partition date of an incremental run (``None`` otherwise); a bad date is a ConfigError."""
    if not args.incremental:
        if args.run_date is not None or args.retry_dead_letters:
            raise ConfigError("--run-date and --retry-dead-letters need --incremental")
        return None
    if args.run_date is None:
        return time.strftime("%Y-%m-%d", time.gmtime())
    try:
        return datetime.date.fromisoformat(args.run_date).isoformat()
    except ValueError as exc:
        raise ConfigError(f"--run-date={args.run_date!r} is not a date YYYY-MM-DD") from exc


def manifest_blocks(run_id: str, *, run_date: str | None, unchanged: int, earlier_runs: int) -> dict:
    """The ``run`` and ``incremental`` blocks of a run's manifest (dataset.json, run.json): the
    run's id, start time and versions; an incremental run's date and what its ledger skipped."""
    return {
        "incremental": (
            {"run_date": run_date, "unchanged_skipped": unchanged, "earlier_runs": earlier_runs}
            if run_date is not None
            else None
        ),
        "run": {
            "run_id": run_id,
            "started_unix_s": time.time(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "soundshard_version": soundshard.__version__,
            "beam_version": beam.__version__,
        },
    }


RAN, NOTHING_NEW, JOB_WRITTEN = "ran", "nothing_new", "job_written"


class SourceRun(Protocol):
    """What :func:`launch` and :func:`decode_and_compute` read of a resolved run (``FeatureRun``
    of features and embed, ``TagRun`` of tag): frozen dataclasses built on the launcher."""

    listing: listing.SourceListing
    config: FeatureConfig | EmbeddingConfig
    committed_runs: frozenset[str]
    unit_s: float | None
    augmentations: tuple
    keep_fetched: bool
    source_rates_hz: tuple[int, int]
    levels: LevelConfig | None
    storage: StorageConfig | None


class Front(NamedTuple):
    """The outputs of :func:`decode_and_compute`.

    Attributes:
        items: The listed SourceItems, redistributed.
        units: WorkUnits as planned.
        windows: One WindowBatch (or EmbeddingBatch) per processed unit.
        summaries: FileSummary per processed unit.
        dead_letters: DeadLetters of listing, planning and compute.
        levels: UnitLevels per unit, or ``None`` when the run measures no levels.
    """

    items: beam.PCollection[SourceItem]
    units: beam.PCollection[WorkUnit]
    windows: beam.PCollection[WindowBatch]
    summaries: beam.PCollection[FileSummary]
    dead_letters: beam.PCollection[DeadLetter]
    levels: beam.PCollection[UnitLevels] | None


def launch(
    run: SourceRun, beam_args: Sequence[str], *, label: str, build, output: str, incremental: bool
) -> str:
    """Runs ``build(p, run)`` where the options say: locally on the FnApiRunner (with a progress
    line) or on a remote runner (waiting for it).

    An incremental run first removes what killed runs left under ``output``, and has nothing to
    do when the ledger says every input was processed.

    Args:
        run: The resolved run (``listing``, ``committed_runs``).
        beam_args: Beam flags.
        label: Name on the progress line.
        build: Composes the pipeline on ``p``.
        output: The output folder.
        incremental: Whether this is an incremental run.

    Returns:
        :data:`RAN` (outputs written), :data:`NOTHING_NEW` or :data:`JOB_WRITTEN` (a template
        run: the job was written for a later start).
    """
    if incremental:
        removed = ledger.recover(output, set(run.committed_runs))
        if removed:
            print(
                f"removed {len(removed)} file(s) left by runs that never committed, e.g. {removed[0]}",
                file=sys.stderr,
            )
        if not run.listing.items and not run.listing.dead_letters:
            return NOTHING_NEW
    options = PipelineOptions(beam_args, save_main_session=False)
    input_bytes = sum(i.size_bytes or 0 for i in run.listing.items)
    workers_given = any(a.startswith("--direct_num_workers") for a in beam_args)
    if runners.local_run(options, input_bytes=input_bytes, workers_given=workers_given):
        # Units are decoded in the process that planned them unless the workers are processes.
        in_process = options.view_as(DirectOptions).direct_running_mode != "multi_processing"
        # One BLAS thread for the whole run, not only per DoFn instance (see _LogMelFn.setup):
        # worker threads share the process's BLAS, and an instance that restores the process's
        # setting at teardown would change the summation order under another one's feet.
        with (
            threadpoolctl.threadpool_limits(limits=1, user_api="blas"),
            runners.progress(len(run.listing.items), label=label),
        ):
            try:
                with runners.make_pipeline(options, local=True) as p:
                    build(p, dataclasses.replace(run, keep_fetched=in_process))
            finally:  # what a failed decode left kept must not outlive the run
                fetched_objects().clear()  # what no unit of this run took
        return RAN
    p = runners.make_pipeline(options, local=False)
    build(p, run)
    return RAN if runners.run_remote(p, options) else JOB_WRITTEN


def decode_and_compute(
    p: beam.Pipeline,
    run: SourceRun,
    *,
    label: str,
    compute: beam.PTransform[beam.PCollection[WorkUnit], ComputedWindows],
) -> Front:
    """Sources → :class:`DecodeAndCompute` on ``p`` with the run's settings.

    Args:
        p: The pipeline.
        run: The resolved run.
        label: Stable step label of the compute stage.
        compute: WorkUnits → :class:`ComputedWindows` (``ComputeLogMel``, ``ComputeEmbeddings``).
    """
    listed = run.listing
    items = p | "ListSources" >> beam.Create(listed.items) | "Distribute" >> beam.Reshuffle()
    plan = PlanUnits(
        run.config,
        unit_s=run.unit_s,
        augmentations=run.augmentations,
        keep_fetched=run.keep_fetched,
        rates_hz=run.source_rates_hz,
        storage=run.storage,
    )
    computed = items | "DecodeAndCompute" >> DecodeAndCompute(
        plan, compute=compute, label=label, measures_levels=run.levels is not None
    )
    listing_dead = p | "ListingDeadLetters" >> beam.Create(listed.dead_letters)
    dead_letters = (listing_dead, computed.dead_letters) | "AllDeadLetters" >> beam.Flatten()
    return Front(
        items=items,
        units=computed.units,
        windows=computed.windows,
        summaries=computed.summaries,
        dead_letters=dead_letters,
        levels=computed.levels,
    )
