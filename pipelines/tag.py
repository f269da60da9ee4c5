"""Tag pipeline: recordings → trained classifier → window scores, file labels, events, summaries.

Same sources, planning, decoding and features as ``soundshard features`` (or ``embed``, for a
model trained on embeddings), computed with the model's own feature config; then the model
scores every window through Beam's RunInference, each recording's windows are gathered (the
units of a long recording included, so events spanning unit boundaries come out whole) and
turned into tables.

Local run (FnApiRunner; no network needed)::

    soundshard tag --input ../shared/data/longform --model-dir models/esc10-f4 --output out/tags \\
        --audacity --raven
    soundshard tag --input 'recordings/**/*.flac' --model-dir models/esc10-f1 --output out/night \\
        --incremental --site-pattern 'site=(?P<site>[^/]+)/'

Dataflow (workers need the soundshard package, see ``infra/``)::

    soundshard tag --input 'gs://bucket/site=*/2026-11-24/*.flac' --model-dir gs://bucket/models/esc10-f1 \\
        --output gs://bucket/tags/ --runner DataflowRunner --project my-project \\
        --region europe-west1 --temp_location gs://bucket/tmp --sdk_container_image IMAGE

Output layout (``--output``; with ``--incremental`` each table folder has ``run_date=<date>/``
partitions and every file carries the run id)::

    run.json                          model, feature and tag config, counts, audio hours, speed
    parquet/windows/part-<run>-00000.parquet  per window: time, top label and score, class scores
    parquet/files/...                 per recording: aggregated scores, best label, labels over threshold
    parquet/events/...                per event: label, start, end, confidence, UTC times when known
    parquet/hourly/...                per site, UTC hour and label: events, seconds, mean confidence
    csv/<table>/part-<run>-00000.csv  the same tables as CSV
    dead_letters.parquet              every input that failed: source, stage, reason, message
    audacity/<clip>.txt               label track per recording (--audacity)
    raven/<clip>.Table.1.selections.txt   selection table per recording (--raven)
    plots/<clip>.png                  spectrogram, scores, thresholds, events, reference (--plot)
    snippets/<clip>/<start>_<end>_<label>.flac   each event's audio from the source (--snippets)
    snippets/index.parquet, index.csv one row per snippet (incremental: snippets/run_date=<date>/
                                      index-<run>.parquet, beside that night's FLAC folders)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import posixpath
import sys
import time
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from soundshard.pipelines import arguments, runs
from soundshard.pipelines import runner as runners
from soundshard.pipelines.arguments import db_or_off  # noqa: F401 - named here for callers
from soundshard.schemas import fields
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.embedding import EmbeddingConfig
from soundshard.schemas.errors import ConfigError, OutputLockedError
from soundshard.schemas.levels import LevelConfig
from soundshard.schemas.records import SourceItem
from soundshard.schemas.storage import StorageConfig
from soundshard.schemas.tagging import RULE_DEFAULTS, TagConfig, parse_thresholds
from soundshard.schemas.training import recipe_of
from soundshard.schemas.uris import redact
from soundshard.transforms.features.compute import SOURCE_RATES_HZ, ComputeLogMel
from soundshard.transforms.features.embeddings import ComputeEmbeddings, check_model, model_digest
from soundshard.transforms.io import listing
from soundshard.transforms.labels import annotations as ann
from soundshard.transforms.levels import level_tables
from soundshard.transforms.models import architectures as models
from soundshard.transforms.models.architectures import check_fingerprint
from soundshard.transforms.outputs import shards, totals
from soundshard.transforms.outputs.commit import CommitOutputs
from soundshard.transforms.tagging import classify as tagging
from soundshard.transforms.tagging import plots
from soundshard.transforms.tagging import snippets as snip
from soundshard.transforms.tagging.commit import TagFiles, TagOutputSettings

PROG = "soundshard tag"
_LOG = logging.getLogger(__name__)
DEFAULT_THRESHOLD = arguments.DEFAULT_THRESHOLD
FORMATS = arguments.TAG_FORMATS
#: Output folders a replacing run owns (files in them that it did not write are removed).
OWNED = (*FORMATS, *tagging.LABEL_FILES, *tagging.EXTRA_OUTPUTS)


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of the tag command (``pipelines/arguments.py``)."""
    return arguments.tag_parser(prog)


def model_config(description: dict, *, model_uri: str) -> FeatureConfig | EmbeddingConfig:
    """The feature config the model was trained on, checked against its recorded fingerprint and
    input shape (a model from another version of the feature maths is refused)."""
    kind = description.get("input", {}).get("kind", fields.FEATURE_COLUMN)
    values = description.get("feature_config")
    if not isinstance(values, dict):
        raise ConfigError(f"--model-dir {model_uri!r}: model.json has no feature_config")
    config = EmbeddingConfig.from_dict(values) if kind == "embedding" else FeatureConfig.from_dict(values)
    if config.fingerprint != description.get("feature_fingerprint"):
        raise ConfigError(
            f"--model-dir {model_uri!r}: its feature config gives fingerprint {config.fingerprint}, but the "
            f"model records {description.get('feature_fingerprint')} (trained with other feature maths); "
            "recompute the features and retrain"
        )
    shape = list(description.get("input", {}).get("shape", []))
    if shape and shape != list(config.feature_shape):
        raise ConfigError(
            f"--model-dir {model_uri!r} takes inputs of shape {shape}, but its feature config gives "
            f"{list(config.feature_shape)}"
        )
    return config


def check_requested_config(args: argparse.Namespace, description: dict) -> None:
    """Refuses a ``--config`` or feature flags that differ from the model's features."""
    given = any(
        getattr(args, f"feature__{f.name}", None) is not None for f in dataclasses.fields(FeatureConfig)
    )
    if not (args.config or given):
        return
    requested = runs.feature_config_from_args(args)
    check_fingerprint(
        description,
        {"feature_fingerprint": requested.fingerprint, "feature_config": requested.to_dict()},
        what="the features asked for (--config/flags)",
    )


def tag_config_from_args(args: argparse.Namespace, description: dict) -> TagConfig:
    """Thresholds (model's validation thresholds < ``--threshold`` < ``--thresholds``) and rules."""
    names = tuple(description["label_names"])
    learned = description.get("thresholds") or {}
    window = list(learned.get("window") or [DEFAULT_THRESHOLD] * len(names))
    clip = list(learned.get("clip") or [DEFAULT_THRESHOLD] * len(names))
    if args.threshold is not None:
        window = [args.threshold] * len(names)
        clip = [args.threshold] * len(names)
    if args.thresholds:
        for label, value in parse_thresholds(args.thresholds, names).items():
            window[names.index(label)] = value
            clip[names.index(label)] = value
    # event rules: the flag, else what the model's training chose (model.json), else the default
    chosen = description.get("postprocessing") or {}
    rules = {name: chosen.get(name, default) for name, default in RULE_DEFAULTS.items()}
    rules.update({name: getattr(args, name) for name in RULE_DEFAULTS if getattr(args, name) is not None})
    rules = {name: None if value == "off" else value for name, value in rules.items()}
    return TagConfig(
        label_names=names,
        window_thresholds=tuple(window),
        file_thresholds=tuple(clip),
        aggregation=args.aggregation,
        min_level_db=args.min_level_db,
        top_k=args.top_k,
        **rules,
    )


# -- plots and snippets -----------------------------------------------------------------------------


def plot_references(reference: str, items: Sequence[SourceItem]) -> dict[str, str]:
    """Matches ``--plot-reference`` to the recordings: ``{clip_id: annotation file}``.

    A folder's files match a recording by the clip id's path (``site1/night1.txt`` for clip
    ``site1/night1``), else by the recording's file name (``pipelines/score.py``'s
    ``recording_stem``); one file matches the recording of its name, or the only recording.
    Unlike ``soundshard score``, recordings or files without a partner are no error here (a
    nightly run sees only part of a reference folder).

    Raises:
        ConfigError: ``reference`` does not exist; one file would match several recordings (or a
            recording several files).
    """
    import fsspec

    from soundshard.pipelines.score import recording_stem

    fs, path = fsspec.core.url_to_fs(reference)
    stems = {
        i.clip_id: recording_stem(clip_id=i.clip_id, source_uri=i.uri, archive_member=i.archive_member)
        for i in items
    }
    matched: dict[str, str] = {}
    if fs.isdir(path):
        files = ann.annotation_files(reference.rstrip("/"))
        by_stem = collections.defaultdict(list)
        for key in files:
            by_stem[posixpath.basename(key)].append(key)
        used: dict[str, str] = {}
        for clip, stem in stems.items():
            if clip in files:
                key = clip
            else:
                candidates = by_stem.get(stem, [])
                if len(candidates) > 1:
                    raise ConfigError(
                        f"--plot-reference: recording {clip!r} has several references named {stem!r}: "
                        f"{[files[k] for k in candidates]}; put them in folders as the clip ids are"
                    )
                if not candidates:
                    continue
                key = candidates[0]
            if key in used:
                raise ConfigError(
                    f"--plot-reference: {files[key]!r} matches recordings {used[key]!r} and {clip!r}; "
                    "name it by the clip id's path to tell them apart"
                )
            used[key] = clip
            matched[clip] = files[key]
    elif fs.isfile(path):
        stem = ann.annotation_stem(path) or posixpath.splitext(posixpath.basename(path))[0]
        found = [c for c, s in stems.items() if stem in (c, s)]
        if len(found) > 1:
            raise ConfigError(f"--plot-reference {reference!r} matches several recordings by name: {found}")
        if found:
            matched[found[0]] = reference
        elif len(stems) == 1:
            matched[next(iter(stems))] = reference
    else:
        raise ConfigError(f"--plot-reference {reference!r}: no such file or folder")
    return matched


def extra_outputs(
    args: argparse.Namespace, *, config: FeatureConfig | EmbeddingConfig, items: Sequence[SourceItem]
) -> tuple[plots.PlotOptions | None, snip.SnippetOptions | None, dict]:
    """``--plot`` and ``--snippets`` options, checked, with the reference files read (so one that
    does not parse stops the run before any audio is read).

    Returns:
        ``(plot options or None, snippet options or None, their description for run.json)``.

    Raises:
        ConfigError: naming the bad flag or reference file.
    """
    if not args.snippets:
        for flag, value in (
            ("--snippet-margin-s", args.snippet_margin_s),
            ("--snippet-max-per-label", args.snippet_max_per_label),
        ):
            if value is not None:
                raise ConfigError(f"{flag}={value} needs --snippets")
    snippet_options = None
    if args.snippets:
        margin_s = snip.SnippetOptions.margin_s if args.snippet_margin_s is None else args.snippet_margin_s
        snippet_options = snip.SnippetOptions(margin_s=margin_s, max_per_label=args.snippet_max_per_label)
    plot = None
    described = {"plot": None, "snippets": None}
    if args.plot or args.plot_reference:
        grid = plots.SpectrogramGrid.from_config(config) if isinstance(config, FeatureConfig) else None
        references: tuple = ()
        reference = None
        if args.plot_reference:
            matched = plot_references(args.plot_reference, items)
            references = tuple(
                (clip, tuple((a.start_s, a.end_s, a.label) for a in ann.read_annotations(uri)))
                for clip, uri in sorted(matched.items())
            )
            if items and not matched:
                _LOG.warning(
                    "--plot-reference %s: no recording of this run has a reference", args.plot_reference
                )
            reference = {
                "uri": args.plot_reference,
                "recordings_matched": len(matched),
                "recordings_without_reference": len(items) - len(matched),
            }
        plot = plots.PlotOptions(grid=grid, references=references)
        described["plot"] = {
            "max_columns": grid.max_columns if grid is not None else plots.MAX_COLUMNS,
            "max_classes": plot.max_classes,
            "spectrogram": grid is not None,
            "reference": reference,
        }
    if snippet_options is not None:
        described["snippets"] = {
            "margin_s": snippet_options.margin_s,
            "max_per_label": snippet_options.max_per_label,
            "audio": "FLAC at the source's sample rate and channels",
        }
    return plot, snippet_options, described


# -- the run ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TagRun:
    """Everything ``build`` needs, resolved and validated on the launcher."""

    listing: listing.SourceListing
    config: FeatureConfig | EmbeddingConfig
    tag: TagConfig
    model_uri: str
    output: str
    run_id: str
    formats: tuple[str, ...]
    label_files: tuple[str, ...]
    manifest: dict
    fingerprint: str
    run_date: str | None = None
    committed_runs: frozenset[str] = frozenset()
    unit_s: float | None = 60.0
    augmentations: tuple = ()
    keep_fetched: bool = False
    max_batch_windows: int = 2048
    source_rates_hz: tuple[int, int] = SOURCE_RATES_HZ
    plot: plots.PlotOptions | None = None
    snippets: snip.SnippetOptions | None = None
    levels: LevelConfig | None = None
    storage: StorageConfig | None = None

    @property
    def temp_dir(self) -> str:
        """The run's temporary folder under the output."""
        return shards.join(self.output, f"_tmp-{self.run_id}")

    @property
    def partition(self) -> str:
        """Sub-folder of this run's files in each table folder (``""`` unless incremental)."""
        return f"run_date={self.run_date}" if self.run_date else ""

    @property
    def high_freq_hz(self) -> float:
        """Top of the analysed band (Raven selections span it)."""
        if isinstance(self.config, FeatureConfig):
            return float(self.config.fmax_resolved_hz)
        return self.config.sample_rate_hz / 2


def prepare(args: argparse.Namespace) -> TagRun:
    """Validates the arguments, loads and checks the model's description, lists the sources.

    Raises:
        ConfigError: naming the bad value (before any data is read).
    """
    if not args.input:
        raise ConfigError("--input is required (folder, glob or file)")
    if not args.output:
        raise ConfigError("--output is required")
    if not args.model:
        raise ConfigError("--model-dir is required (a folder written by `soundshard train`)")
    if args.unit_s < 0:
        raise ConfigError(f"--unit-s={args.unit_s} must be 0 (never split) or positive")
    if args.max_batch_windows < 1:
        raise ConfigError(f"--max-batch-windows={args.max_batch_windows} must be at least 1")
    runs.check_failed_fraction(args)
    storage_settings = runs.storage_config(args)
    rates_hz = runs.source_rates(args)
    model_uri = args.model.rstrip("/")
    description = models.verify_model_folder(model_uri)
    config = model_config(description, model_uri=model_uri)
    check_requested_config(args, description)
    if isinstance(config, EmbeddingConfig):
        config = check_model(config)  # the embedding model's file is there and unchanged
        if config.fingerprint != description["feature_fingerprint"]:
            raise ConfigError(
                f"embedding model {config.model_uri!r} changed since the classifier was trained"
            )
    tag = tag_config_from_args(args, description)
    level_config = runs.level_config_from_args(args)
    digest = model_digest(model_uri)
    fingerprint = hashlib.sha256(
        json.dumps([digest, config.fingerprint, tag.to_dict()], sort_keys=True).encode()
    ).hexdigest()[:16]
    taken = runs.take_sources(args, fingerprint=fingerprint)
    if level_config is not None:
        level_tables.check_offsets(taken.listing.items)
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    formats = FORMATS if args.format == "both" else (args.format,)
    label_files = tuple(k for k in tagging.LABEL_FILES if getattr(args, k))
    plot, snippet_options, extras = extra_outputs(args, config=config, items=taken.listing.items)
    manifest = {
        "format": "soundshard-tags/1",
        "model": {
            "uri": model_uri,
            "sha256": digest,
            "architecture": recipe_of(description).model,
            "label_names": list(tag.label_names),
            "trained_on": description.get("data", {}).get("path"),
            "split": description.get("split"),
        },
        "tag_fingerprint": fingerprint,
        "feature_fingerprint": config.fingerprint,
        "feature_config": config.to_dict(),
        "feature_column": fields.feature_column_of(config),
        "levels": (
            level_tables.summary(level_config, sample_rate_hz=config.sample_rate_hz)
            if level_config is not None
            else None
        ),
        "window_s": config.window_s,
        "window_hop_s": config.window_hop_s,
        "tag_config": tag.to_dict(),
        "thresholds_from": (
            "--thresholds/--threshold"
            if args.threshold is not None or args.thresholds
            else (
                "model validation fold" if description.get("thresholds") else f"default {DEFAULT_THRESHOLD}"
            )
        ),
        "recording_config": taken.recording.to_dict(),
        "outputs_config": extras,
        "sources": {"input": args.input, "manifest": args.manifest},
        "storage": storage_settings.to_dict(),
        **runs.manifest_blocks(
            run_id,
            run_date=taken.run_date,
            unchanged=len(taken.unchanged),
            earlier_runs=len(taken.committed_runs),
        ),
    }
    return TagRun(
        levels=level_config,
        listing=taken.listing,
        config=config,
        tag=tag,
        model_uri=model_uri,
        output=args.output.rstrip("/"),
        run_id=run_id,
        formats=formats,
        label_files=label_files,
        manifest=manifest,
        fingerprint=fingerprint,
        run_date=taken.run_date,
        committed_runs=taken.committed_runs,
        unit_s=args.unit_s or None,
        max_batch_windows=args.max_batch_windows,
        source_rates_hz=rates_hz,
        plot=plot,
        snippets=snippet_options,
        storage=storage_settings,
    )


class TagOutputs(NamedTuple):
    """What :func:`build` composed: PCollections of the run's stages.

    Attributes:
        scored: ScoredBatch per unit.
        rows: TableRows of the per-recording tables.
        moves: Move per file of the run.
        dead_letters: DeadLetters of inputs.
        output_dead_letters: DeadLetters of plots and snippets that failed.
        tagged: TaggedRecording per recording (with ``--plot`` or ``--snippets``).
        summaries: FileSummary per processed unit.
        manifest: The path of ``run.json`` (one element, after the commit).
    """

    scored: beam.PCollection
    rows: beam.PCollection
    moves: beam.PCollection
    dead_letters: beam.PCollection
    output_dead_letters: beam.PCollection
    tagged: beam.PCollection
    summaries: beam.PCollection
    manifest: beam.PCollection[str]


def build(p: beam.Pipeline, run: TagRun, *, handler=None) -> TagOutputs:
    """Composes the tag pipeline on ``p`` (does not run it).

    Args:
        p: The pipeline.
        run: The resolved run.
        handler: Replaces the RunInference model handler (tests).
    """
    if isinstance(run.config, EmbeddingConfig):
        compute = ComputeEmbeddings(run.config, levels=run.levels, storage=run.storage)
        label = "ComputeEmbeddings"
    else:
        compute = ComputeLogMel(run.config, levels=run.levels, storage=run.storage)
        label = "ComputeLogMel"
    front = runs.decode_and_compute(p, run, label=label, compute=compute)
    handler = handler or tagging.ClassifierHandler(
        run.model_uri, min_windows=min(64, run.max_batch_windows), max_windows=run.max_batch_windows
    )
    dbs = isinstance(run.config, FeatureConfig) and run.config.log_compression == "db"
    level = run.config if dbs else None
    scored = front.windows | "ScoreWindows" >> tagging.ScoreWindows(handler, level=level)
    recordings = {"scored": scored.scored, "summaries": front.summaries}
    if run.levels is not None:
        recordings["levels"] = front.levels
    if run.plot is not None and run.plot.grid is not None:
        recordings["images"] = {
            "windows": front.windows,
            "units": front.units,
        } | "SpectrogramColumns" >> tagging.SpectrogramColumns(run.plot.grid)
    tagged = recordings | "TagRecordings" >> tagging.TagRecordings(
        run.tag,
        temp_dir=run.temp_dir,
        label_files=run.label_files,
        high_freq_hz=run.high_freq_hz,
        plot=run.plot,
        tagged=run.snippets is not None,
        levels=run.levels,
    )
    table_moves = tagged.rows | "WriteTables" >> tagging.WriteTables(
        temp_dir=run.temp_dir, formats=run.formats, partition=run.partition
    )
    hourly = (
        tagged.rows
        | "HourlyParts" >> beam.FlatMap(tagging.hourly_keyed)
        | "HourlySums" >> beam.CombinePerKey(tagging.sum_triples)
    )
    extra_moves, extra_dead, side = [], [], {}
    if run.plot is not None:
        drawn = tagged.tagged | "DrawPlots" >> tagging.DrawPlots(
            run.plot, temp_dir=run.temp_dir, partition=run.partition
        )
        extra_moves.append(drawn.moves)
        extra_dead.append(drawn.dead_letters)
    if run.snippets is not None:
        cut = tagged.tagged | "WriteSnippets" >> tagging.WriteSnippets(
            run.snippets, temp_dir=run.temp_dir, partition=run.partition, storage=run.storage
        )
        extra_moves.append(cut.moves)
        extra_dead.append(cut.dead_letters)
        side["snippet_index"] = beam.pvalue.AsList(cut.index)
    moves = (table_moves, tagged.moves, *extra_moves) | "AllMoves" >> beam.Flatten()
    dead_letters = (front.dead_letters, scored.dead_letters) | "TagDeadLetters" >> beam.Flatten()
    # Plots and snippets that failed are dead letters of outputs, not of inputs: written with the
    # others, but kept out of the input accounting and the ledger (the recording was tagged).
    output_dead = (
        tuple(extra_dead) | "OutputDeadLetters" >> beam.Flatten()
        if extra_dead
        else p | "NoOutputDeadLetters" >> beam.Create([])
    )
    tallied = (front.summaries, dead_letters) | "RunTotals" >> totals.RunTotals(run.listing.n_inputs)
    side.update(
        moves=beam.pvalue.AsList(moves),
        dead_letters=beam.pvalue.AsList(dead_letters),
        hourly=beam.pvalue.AsList(hourly),
        output_dead_letters=beam.pvalue.AsList(output_dead),
    )
    if run.levels is not None:
        side["level_hours"] = beam.pvalue.AsList(
            tagged.level_hours | "CombineLevelHours" >> beam.CombinePerKey(level_tables.combine_hours)
        )
        side["label_energy"] = beam.pvalue.AsList(
            tagged.label_energy | "CombineLabelEnergy" >> beam.CombinePerKey(sum)
        )
    files = TagFiles(
        TagOutputSettings(
            output=run.output,
            temp_dir=run.temp_dir,
            run_id=run.run_id,
            run_date=run.run_date or None,
            partition=run.partition,
            formats=run.formats,
            manifest=run.manifest,
            fingerprint=run.fingerprint,
            owned=OWNED,
            levels=run.levels,
            plots=run.plot is not None,
            snippets=run.snippets is not None,
        )
    )
    manifest = p | "Commit" >> CommitOutputs(files, tallied=tallied, items=front.items, side_inputs=side)
    return TagOutputs(
        scored=scored.scored,
        rows=tagged.rows,
        moves=moves,
        dead_letters=dead_letters,
        output_dead_letters=output_dead,
        tagged=tagged.tagged,
        summaries=front.summaries,
        manifest=manifest,
    )


# -- command ----------------------------------------------------------------------------------------


def summary_text(manifest: dict, output: str) -> str:
    """A one-screen summary of a finished tag run."""
    fig = manifest["figures"]
    lines = [
        f"output           {output}",
        f"inputs           {fig['inputs']}  tagged {fig['files_processed']}  "
        f"dead letters {fig['dead_letters']}  (all accounted for: {fig['accounted_for']})",
        f"audio            {fig['audio_s']:.1f} s ({fig['audio_hours']:.3f} h) in {fig['wall_s']:.1f} s "
        f"({fig['speed_x_realtime']}x real time)",
        f"windows          {fig['windows_scored']}  events {fig['events']}  hourly rows {fig['hourly_rows']}"
        + (
            " (no recording start times: recorder file names or --start-time-column give them)"
            if fig["hourly_rows"] == 0 and fig["events"]
            else ""
        ),
        f"model            {manifest['model']['uri']}  ({manifest['thresholds_from']} thresholds)",
    ]
    if fig.get("events_by_label"):
        lines.append("events by label  " + ", ".join(f"{k} {v}" for k, v in fig["events_by_label"].items()))
    if fig.get("level_rows"):
        lines.append(level_tables.summary_line(fig["level_rows"], manifest.get("levels") or {}))
    if fig["label_files"]:
        lines.append("label files      " + ", ".join(f"{k} {v}" for k, v in fig["label_files"].items()))
    if "plots" in manifest or "snippets" in manifest:
        made = []
        if "plots" in manifest:
            made.append(f"plots {fig.get('plots', 0)}")
        if "snippets" in manifest:
            made.append(f"snippets {fig.get('snippets', 0)} ({', '.join(manifest['snippets']['index'])})")
        failed = fig.get("output_dead_letters_by_stage") or {}
        if failed:
            made.append("failed: " + ", ".join(f"{k} {v}" for k, v in failed.items()))
        lines.append("outputs          " + "  ".join(made))
    if fig["dead_letters_by_reason"]:
        lines.append(
            "dead letters     " + ", ".join(f"{k} {v}" for k, v in fig["dead_letters_by_reason"].items())
        )
    if manifest.get("replaced"):
        removed = ", ".join(f"{k} {v}" for k, v in manifest["replaced"].items())
        lines.append(f"replaced         an earlier run's outputs here; files removed: {removed}")
    return "\n".join(lines)


def read_manifest(output: str) -> dict:
    """Reads ``<output>/run.json``."""
    with FileSystems.open(shards.join(output, "run.json")) as f:
        return json.loads(f.read())


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs the tag command; returns the exit code (as ``soundshard features``: 0 ok, 1 nothing
    tagged, 2 config error, 5 more than ``--max-failed-fraction`` of the inputs failed, 75 the
    output folder is in use by another run)."""
    parser = make_parser(prog)
    args, beam_args = parser.parse_known_args(argv)
    runs.setup_logging(verbose=args.verbose)
    try:
        runners.check_beam_args(beam_args)
        if args.watch:
            return watch(args, beam_args, prog=prog)
        with runs.locked_run(args, prog=prog):
            return _run(args, beam_args, prog=prog)
    except ConfigError as exc:
        print(f"{prog}: error: {redact(str(exc))}", file=sys.stderr)
        return runs.EXIT_CONFIG
    except OutputLockedError as exc:
        print(f"{prog}: error: {redact(str(exc))}", file=sys.stderr)
        return runs.EXIT_LOCKED


def watch(args: argparse.Namespace, beam_args: Sequence[str], *, prog: str, sleep=time.sleep) -> int:
    """``tag --watch``: incremental runs, one every ``--watch-interval-s``, each over the inputs that
    arrived since (the ledger decides), until interrupted or ``--watch-for-s`` has passed.

    Local Beam runners cannot run ``fileio.MatchContinuously`` here (the direct and FnApi runners
    end at once, the bundle-based one cannot run its Watch transform, Prism is a download), so new
    files are found by listing, run after run: each run is the batch pipeline, its outputs go to
    ``<table>/run_date=<date>/`` partitions, and a file lands in exactly one run's tables.

    Returns:
        0, or the first configuration error's or locked output's exit code.
    """
    if not args.watch_interval_s > 0:
        raise ConfigError(f"--watch-interval-s={args.watch_interval_s} must be positive")
    if args.watch_for_s is not None and args.watch_for_s < 0:
        raise ConfigError(f"--watch-for-s={args.watch_for_s} must not be negative")
    args = argparse.Namespace(**{**vars(args), "incremental": True, "watch": False})
    started = time.monotonic()
    n_runs = 0
    try:
        while True:
            began = time.monotonic()
            with runs.locked_run(args, prog=prog):
                code = _run(args, beam_args, prog=prog)
            n_runs += 1
            if code == runs.EXIT_CONFIG:
                return code
            if code != runs.EXIT_OK:
                print(f"{prog}: watch run {n_runs} ended with exit code {code}; watching on", file=sys.stderr)
            elapsed = time.monotonic() - started
            if args.watch_for_s is not None and elapsed + args.watch_interval_s > args.watch_for_s:
                break
            sleep(max(0.0, args.watch_interval_s - (time.monotonic() - began)))
    except KeyboardInterrupt:
        pass
    print(f"[tag] watched for {time.monotonic() - started:.0f} s: {n_runs} run(s)", flush=True)
    return runs.EXIT_OK


def _run(args: argparse.Namespace, beam_args: Sequence[str], *, prog: str) -> int:
    tag_run = prepare(args)
    outcome = runs.launch(
        tag_run,
        beam_args,
        label="tag",
        build=build,
        output=tag_run.output,
        incremental=tag_run.run_date is not None,
    )
    if outcome == runs.NOTHING_NEW:
        skipped = tag_run.manifest["incremental"]["unchanged_skipped"]
        print(f"nothing new: all {skipped} input(s) were tagged by earlier runs with this model")
    if outcome != runs.RAN:
        return runs.EXIT_OK
    manifest = read_manifest(tag_run.output)
    print(summary_text(manifest, tag_run.output))
    return runs.exit_code(
        manifest["figures"],
        prog=prog,
        max_failed_fraction=args.max_failed_fraction,
        what="tagged",
        where=shards.join(tag_run.output, manifest["dead_letters_file"]),
    )
