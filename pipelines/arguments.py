"""The command lines of the pipeline commands (``features``, ``embed``, ``tag``), without Beam.

Parsers are built here from light imports only, so ``soundshard features --help`` (and shell
completion) answers at once; the pipeline modules add nothing to them and import Beam only when a
command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from soundshard.schemas.config import SOURCE_RATES_HZ, FeatureConfig, attribute_docs
from soundshard.schemas.levels import BANDS
from soundshard.transforms.labels import strong_labels

#: More than ``--max-failed-fraction`` of the inputs failed (outputs written all the same).
EXIT_TOO_MANY_FAILURES = 5
#: Default of ``--max-failed-fraction``: a run where most inputs fail must not look like success.
DEFAULT_MAX_FAILED_FRACTION = 0.5
#: Table formats of ``tag``.
TAG_FORMATS = ("parquet", "csv")
#: The window score at which a class's event starts when the model gives no threshold.
DEFAULT_THRESHOLD = 0.5


class Parser(argparse.ArgumentParser):
    """The parser of every command: no abbreviations, and renamed flags that still work.

    A flag renamed for the one grammar (``--model`` of tag is ``--model-dir`` now) keeps its old
    spelling for one release: hidden from ``--help``, stored where the new flag stores, with a line
    on stderr that names the new spelling.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._required_renamed: list[argparse.Action] = []

    def add_renamed(self, old: str, new: argparse.Action, *, append: bool = False) -> None:
        """``old`` (and its underscore spelling) as the deprecated spelling of the flag ``new``."""
        spellings = [old] + (["--" + old[2:].replace("-", "_")] if "-" in old[2:] else [])
        self.add_argument(
            *spellings,
            dest=new.dest,
            type=new.type,
            choices=new.choices,
            action=_Renamed,
            new=new.option_strings[0],
            append=append,
            help=argparse.SUPPRESS,
        )
        if new.required:  # either spelling satisfies it: checked after parsing
            new.required = False
            self._required_renamed.append(new)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        missing = [a.option_strings[0] for a in self._required_renamed if getattr(parsed, a.dest) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return parsed, rest


class _Renamed(argparse.Action):
    """The old spelling of a renamed flag (see :meth:`Parser.add_renamed`)."""

    def __init__(self, option_strings, dest, *, new: str, append: bool = False, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.append = new, append

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: {option_string} is now {self.new} (the old spelling goes in the next release)",
            file=sys.stderr,
        )
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def add_model_dir(parser: Parser, *, required: bool = True, help: str | None = None) -> argparse.Action:
    """``--model-dir``: a model folder written by ``soundshard train`` (``--model`` before)."""
    action = parser.add_argument(
        "--model-dir",
        "--model_dir",
        dest="model",
        metavar="DIR",
        required=required,
        help=help or "Model folder written by `soundshard train` (local or gs://, s3://...).",
    )
    parser.add_renamed("--model", action)
    return action


def add_features(parser: Parser, *, help: str, append: bool = False) -> argparse.Action:
    """``--features``: an output folder of ``soundshard features`` or ``embed`` (``--data`` before)."""
    action = parser.add_argument(
        "--features",
        dest="data",
        metavar="DIR",
        required=True,
        action="append" if append else "store",
        help=help,
    )
    parser.add_renamed("--data", action, append=append)
    return action


def parse_value(text: str, hint) -> typing.Any:
    """A config value from its command-line text, by the field's type hint (``none`` for None)."""
    args = typing.get_args(hint) or (hint,)
    if text.lower() in ("none", "null") and type(None) in args:
        return None
    for kind in (bool, int, float, str):
        if kind in args:
            if kind is bool:
                if text.lower() in ("true", "1", "yes"):
                    return True
                if text.lower() in ("false", "0", "no"):
                    return False
                continue
            try:
                return kind(text)
            except ValueError:
                continue
    return text


def db_or_off(text: str) -> float | str:
    """A level difference in dB, or ``'off'``."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of dB nor 'off'") from exc


#: What ``db_or_off`` accepts (Flex template parameters check values against it) and an example.
db_or_off.pattern = r"^(off|[0-9]+\.?[0-9]*|\.[0-9]+)$"
db_or_off.example = "6"


def add_output_args(parser: argparse.ArgumentParser, *, feature_config: bool = True) -> None:
    """Sources, output and shard flags of ``features`` and ``embed``; ``--config`` (a feature
    config file) only where ``feature_config``.

    One options story: each command's flags live in its argparse parser (these helpers), the
    rest of the command line goes to Beam's ``PipelineOptions`` untouched; the Flex Template
    metadata is generated from the same parsers (``infra/templates.py``)."""
    add_source_args(parser)
    parser.add_argument("--output", help="Output folder (local or gs://, s3://...). Required.")
    parser.add_argument(
        "--config",
        help="Feature config file (TOML or JSON); flags override it."
        if feature_config
        else argparse.SUPPRESS,  # embed takes --embedding-config; --config is refused with that hint
    )
    parser.add_argument(
        "--format",
        default="both",
        choices=("both", "parquet", "tfrecord"),
        help="Shard formats to write.",
    )
    parser.add_argument(
        "--num-shards", "--num_shards", type=int, default=None, help="Fixed number of shards."
    )
    parser.add_argument(
        "--shard-size-mb",
        "--shard_size_mb",
        type=float,
        default=64.0,
        help="Target shard size when --num-shards is unset.",
    )
    parser.add_argument(
        "--augment",
        default=None,
        help="Offline augmentation: also write copies of every readable recording, e.g. "
        "'pitch_shift=-2,pitch_shift=2,time_stretch=0.9' (semitones; stretch rate). Copies are "
        "marked in the augmentation column; training never validates or tests on them.",
    )


def add_label_args(parser: argparse.ArgumentParser) -> None:
    """Flags of strong labels from annotation files (features and embed).

    The command's parser owns ``--labels``; Beam's GoogleCloudOptions, which also has one
    (Dataflow job labels), never sees it. On Dataflow, give job labels with Beam's ``--label
    key=value``.
    """
    parser.add_argument(
        "--labels",
        action="store_true",
        help="Strong labels: read each recording's annotation file (the Audacity label track or "
        "Raven selection table beside it with its stem, or the file named in --labels-column) "
        "and label each window with the annotations it overlaps (several when they overlap; "
        "none: background). A recording without one is a dead letter (missing_labels), a "
        "malformed one too (bad_labels). (Dataflow job labels: Beam's --label key=value.) "
        "Default: %(default)s.",
    )
    parser.add_argument(
        "--labels-column",
        "--labels_column",
        dest="labels_column",
        default=None,
        help="With --labels and --manifest: the column naming each recording's annotation file "
        "(relative to --input like audio paths; '' to use the files beside the recordings). "
        "Default: %(default)s, i.e. 'labels_file' when the manifest has it.",
    )
    parser.add_argument(
        "--labels-optional",
        "--labels_optional",
        dest="labels_optional",
        action="store_true",
        help="With --labels: keep recordings without an annotation file, weakly labelled by their "
        "clip label when they have one, else as all background. Default: %(default)s.",
    )
    parser.add_argument(
        "--min-label-overlap",
        "--min_label_overlap",
        dest="min_label_overlap",
        type=float,
        default=strong_labels.MIN_OVERLAP,
        help="With --labels: a window takes an annotation's label when they overlap by at least "
        "this share of the shorter of the two (so an annotation wholly inside a window labels "
        "it); a point label labels the windows that contain it. Default: %(default)s.",
    )


def add_source_args(parser: argparse.ArgumentParser, *, incremental_help: str | None = None) -> None:
    """Flags of what to read and how (shared by features, embed and tag): inputs, manifest
    columns, recording times and sites, archives, nightly mode (``incremental_help`` says what it
    does where it differs from the features run's) and work units."""
    parser.add_argument(
        "--input",
        help="Folder, glob ('**' allowed) or file; local, gs://, s3://... Required.",
    )
    parser.add_argument("--manifest", help="CSV or Parquet manifest; relative paths resolve against --input.")
    parser.add_argument(
        "--filename-column", "--filename_column", default=None, help="Manifest column with audio paths."
    )
    parser.add_argument(
        "--label-column", "--label_column", default=None, help="Manifest label column ('' for none)."
    )
    parser.add_argument(
        "--fold-column", "--fold_column", default=None, help="Manifest fold column ('' for none)."
    )
    parser.add_argument(
        "--split-column", "--split_column", default=None, help="Manifest split column ('' for none)."
    )
    parser.add_argument(
        "--label-from-parent",
        "--label_from_parent",
        action="store_true",
        help="Without a manifest: label = parent folder name.",
    )
    parser.add_argument(
        "--allow-outside-input",
        "--allow_outside_input",
        dest="allow_outside_input",
        action="store_true",
        help="Read manifest rows that name files outside --input (absolute paths, '..', other "
        "URLs); by default they are dead letters (outside_input).",
    )
    parser.add_argument(
        "--start-time-column",
        "--start_time_column",
        default=None,
        help="Manifest column with each recording's start (ISO 8601; default: 'start_time' or "
        "'recording_start' when present; '' for none).",
    )
    parser.add_argument(
        "--timezone",
        default="UTC",
        help="IANA zone of start times given without an offset (file names, manifest).",
    )
    parser.add_argument(
        "--no-time-from-filename",
        "--no_time_from_filename",
        dest="time_from_filename",
        action="store_false",
        help="Do not read start times from recorder file names (AudioMoth YYYYMMDD_HHMMSS.WAV, "
        "Song Meter PREFIX_YYYYMMDD_HHMMSS.wav).",
    )
    parser.add_argument(
        "--site-pattern",
        "--site_pattern",
        default=None,
        help="Regular expression searched in each input path; named groups 'site' and "
        "'deployment' fill those columns, e.g. 'sites/(?P<site>[^/]+)/(?P<deployment>[^/]+)/'.",
    )
    parser.add_argument(
        "--archive-glob",
        "--archive_glob",
        default=None,
        help="Members of tar/zip inputs to read (fnmatch on the member path); default: audio files.",
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help=incremental_help
        or "Nightly mode: take on only inputs that no earlier run processed with the same "
        "config (ledger in <output>/ledger/), add this run's shards under "
        "<format>/run_date=<date>/[site=<site>/] instead of replacing the dataset.",
    )
    parser.add_argument(
        "--run-date",
        "--run_date",
        default=None,
        help="Incremental runs: the partition date, YYYY-MM-DD (default: today, UTC).",
    )
    parser.add_argument(
        "--retry-dead-letters",
        "--retry_dead_letters",
        action="store_true",
        help="Incremental runs: take on again inputs that earlier runs dead-lettered "
        "(by default only those that failed for a transient reason, or changed).",
    )
    parser.add_argument(
        "--max-failed-fraction",
        "--max_failed_fraction",
        dest="max_failed_fraction",
        type=float,
        default=DEFAULT_MAX_FAILED_FRACTION,
        help=f"Exit with code {EXIT_TOO_MANY_FAILURES} when more than this fraction of the inputs "
        "became dead letters (their outputs are still written; 1 never fails the run). "
        "Default: %(default)s.",
    )
    parser.add_argument(
        "--break-lock",
        "--break_lock",
        dest="break_lock",
        action="store_true",
        help="Remove the output folder's lock first: a run killed while writing there left it "
        "(check that no run is writing there).",
    )
    parser.add_argument(
        "--source-rates-hz",
        "--source_rates_hz",
        dest="source_rates_hz",
        default=f"{SOURCE_RATES_HZ[0]}:{SOURCE_RATES_HZ[1]}",
        help="Sample rates a file header may declare, MIN:MAX Hz; a file outside them is a dead "
        "letter (implausible_sample_rate). Default: %(default)s.",
    )
    parser.add_argument(
        "--unit-s",
        "--unit_s",
        type=float,
        default=60.0,
        help="Split recordings into work units of about this many seconds (0: never split). "
        "Units decode in parallel and bound memory; values do not depend on the split.",
    )

    add_storage_flags(parser)


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    """``--storage-*``: how reads from object stores retry and how many run at once
    (:class:`StorageConfig`; resolved and checked on the launcher, carried to the workers)."""
    from soundshard.schemas.storage import STORAGE_ENV_PREFIX, STORAGE_FLAGS, StorageConfig

    group = parser.add_argument_group(
        "object-store reads (default: SOUNDSHARD_STORAGE_<NAME> of the launcher's environment, "
        "else the value shown)"
    )
    docs = attribute_docs(StorageConfig)
    for field in dataclasses.fields(StorageConfig):
        flag = STORAGE_FLAGS[field.name]
        group.add_argument(
            flag,
            "--" + flag[2:].replace("-", "_"),
            dest=f"storage_{field.name}",
            type=int if field.type in (int, "int") else float,
            default=None,
            metavar="VALUE",
            help=f"{docs.get(field.name, '')} Default: {field.default} "
            f"({STORAGE_ENV_PREFIX}{field.name.upper()}).",
        )


def add_feature_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per FeatureConfig field (``--n_mels 40``); given values override ``--config``."""
    group = parser.add_argument_group("feature config (override --config)")
    docs = attribute_docs(FeatureConfig)
    for field in dataclasses.fields(FeatureConfig):
        default = "none" if field.default is None else field.default
        names = [f"--{field.name.replace('_', '-')}", f"--{field.name}"]
        group.add_argument(
            *dict.fromkeys(names),
            dest=f"feature__{field.name}",
            default=None,
            metavar="VALUE",
            help=f"{docs.get(field.name, '')} Default: {default}.".strip().replace("%", "%%"),
        )


def add_level_flags(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """The levels stage's flags (``features``: off by default; ``tag``: on)."""
    group = parser.add_argument_group(
        "sound levels (IEC 61672-1: LAeq, LCeq, LAFmax, L10/L50/L90, SEL, bands)"
    )
    group.add_argument(
        "--levels",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="Write the levels tables (levels_second, levels_interval, levels_hourly, lden) under "
        "<output>/<format>/. Default: %(default)s.",
    )
    group.add_argument(
        "--level-interval-s",
        "--level_interval_s",
        dest="level_interval_s",
        type=float,
        default=60.0,
        help="Seconds per row of levels_interval (a whole number). Default: %(default)s.",
    )
    group.add_argument(
        "--level-bands",
        "--level_bands",
        dest="level_bands",
        choices=BANDS,
        default="none",
        help="Band levels (LZeq per IEC 61260 band) in levels_interval. Default: %(default)s.",
    )
    group.add_argument(
        "--level-offset-db",
        "--level_offset_db",
        dest="level_offset_db",
        type=float,
        default=None,
        help="Calibration: dB SPL that 0 dBFS stands for (94 minus what a 94 dB calibrator reads "
        "in dBFS). Without it (and without a manifest column level_offset_db or a "
        "--calibration-table entry) levels are dBFS. Default: none.",
    )
    group.add_argument(
        "--calibration-table",
        "--calibration_table",
        dest="calibration_table",
        default=None,
        help="CSV of per-sensor calibration: columns site, level_offset_db and optionally "
        "deployment (sites from --site-pattern). Default: none.",
    )


def features_parser(prog: str = "soundshard features") -> argparse.ArgumentParser:
    """Argument parser of the features command (Beam flags pass through)."""
    parser = Parser(
        prog=prog,
        description="Audio → log-mel windows → Parquet + TFRecord shards. Other flags go to Beam "
        "(--runner, --direct_num_workers, --project, ...).",
        allow_abbrev=False,
    )
    add_output_args(parser)
    add_label_args(parser)
    add_level_flags(parser, default=False)
    add_feature_flags(parser)
    parser.add_argument("--verbose", action="store_true", help="Log at INFO level.")
    return parser


EMBED_CONFIG_FLAGS = {
    "input_repr": ("--input-repr", "--input_repr"),
    "content_type": ("--content-type", "--content_type"),
    "embedding_size": ("--embedding-size", "--embedding_size"),
    "frontend": ("--frontend",),
    "sample_rate_hz": ("--sample-rate-hz", "--sample_rate_hz"),
    "window_s": ("--window-s", "--window_s"),
    "hop_s": ("--hop-s", "--hop_s"),
    "center": ("--center",),
    "output": ("--embedding-output", "--embedding_output"),
    "signature": ("--signature",),
    "model_sha256": ("--embedding-sha256", "--embedding_sha256"),
    "channel": ("--channel",),
    "resample_quality": ("--resample-quality", "--resample_quality"),
}
#: Spellings of earlier releases (hidden, with a note on stderr).
EMBED_RENAMED = {"output": ("--model-output",), "model_sha256": ("--model-sha256", "--weights-sha256")}
_EMBED_HELP = {
    "input_repr": "OpenL3 spectrogram: linear, mel128 or mel256 (default).",
    "content_type": "OpenL3 training content: env or music (default).",
    "embedding_size": "Values per embedding (OpenL3: 512 or 6144, default 6144).",
    "frontend": "OpenL3 front-end of openl3 0.4 (default) or 0.3 (the one the weights were trained with).",
    "sample_rate_hz": "Rate the model takes (OpenL3: 48000).",
    "window_s": "Seconds of audio per embedding (OpenL3: 1).",
    "hop_s": "Seconds between windows (0.1).",
    "center": "true: pad half a window before the start, as openl3 (default for OpenL3).",
    "output": "Output name or index of a SavedModel/TFLite model, or for TFLite the name of an inner "
    "tensor (a classifier's embedding layer, as BirdNET's).",
    "signature": "SavedModel signature (serving_default).",
    "model_sha256": "Expected SHA-256 of the weight/model file (checked before the run).",
    "channel": "Keep this channel (default: mix all down).",
    "resample_quality": "soxr preset: QQ, LQ, MQ, HQ (default), VHQ.",
}


def tag_parser(prog: str = "soundshard tag") -> argparse.ArgumentParser:
    """Argument parser of the tag command (Beam flags pass through)."""
    from soundshard.schemas.tagging import (
        AGGREGATIONS,
        PLOT_MAX_CLASSES,
        PLOT_MAX_COLUMNS,
        RULE_DEFAULTS,
        SNIPPET_MARGIN_S,
    )

    parser = Parser(
        prog=prog,
        description="Tag recordings with a trained model: per-window scores, per-file labels, events, "
        "hourly summaries (Parquet and CSV), Audacity/Raven label files. Other flags go to Beam "
        "(--runner, --direct_num_workers, --project, ...).",
        allow_abbrev=False,
    )
    add_source_args(
        parser,
        incremental_help="Nightly mode: tag only inputs that no earlier run tagged with the same model "
        "and settings (ledger in <output>/ledger/); this run's tables go under "
        "<table>/run_date=<date>/ instead of replacing the outputs.",
    )
    parser.add_argument("--output", help="Output folder (local or gs://, s3://...). Required.")
    add_model_dir(
        parser,
        required=False,
        help="Model folder written by `soundshard train` (local or gs://, s3://...). Required.",
    )
    parser.add_argument(
        "--config",
        help="Feature config file (TOML or JSON) the tags must be computed with; it must equal the "
        "model's (checked), default: the model's own.",
    )
    watch = parser.add_argument_group("watching a folder or bucket for new recordings")
    watch.add_argument(
        "--watch",
        action="store_true",
        help="Keep tagging what arrives: an incremental run every --watch-interval-s over the inputs "
        "no earlier run tagged (the ledger of --incremental: a restart neither repeats nor skips a "
        "file), until interrupted or --watch-for-s. Default: off (one run).",
    )
    watch.add_argument(
        "--watch-interval-s",
        "--watch_interval_s",
        dest="watch_interval_s",
        type=float,
        default=30.0,
        help="Seconds between the starts of watch runs. Default: %(default)s.",
    )
    watch.add_argument(
        "--watch-for-s",
        "--watch_for_s",
        dest="watch_for_s",
        type=float,
        default=None,
        help="Stop watching after this many seconds (the run in progress finishes). Default: never.",
    )
    out = parser.add_argument_group("tables")
    out.add_argument(
        "--format", default="both", choices=("both", *TAG_FORMATS), help="Table formats to write."
    )
    add_level_flags(parser, default=True)
    out.add_argument(
        "--top_k",
        "--top-k",
        dest="top_k",
        type=int,
        default=0,
        help="Classes per window in the window table (0: every class's score, the default).",
    )
    out.add_argument("--audacity", action="store_true", help="Write an Audacity label track per recording.")
    out.add_argument("--raven", action="store_true", help="Write a Raven selection table per recording.")
    extra = parser.add_argument_group("plots and snippets")
    extra.add_argument(
        "--plot",
        action="store_true",
        help="Write plots/<clip>.png per recording: the log-mel spectrogram (log-mel models), the "
        f"scores of the top {PLOT_MAX_CLASSES} classes with their thresholds dashed, the events as "
        f"coloured spans; at most {PLOT_MAX_COLUMNS} time columns (max-pooled) however long the "
        "recording. Default: off.",
    )
    extra.add_argument(
        "--plot-reference",
        "--plot_reference",
        dest="plot_reference",
        metavar="FILE_OR_FOLDER",
        default=None,
        help="Reference annotations (Audacity label tracks, Raven selection tables) drawn as a lane "
        "under the events: one file, or a folder whose files are matched to recordings by clip id "
        "path, else by file name (as `soundshard score --reference`); implies --plot. Default: none.",
    )
    extra.add_argument(
        "--snippets",
        action="store_true",
        help="Write each event's audio as snippets/<clip>/<start>_<end>_<label>.flac, read from the "
        "source at its own sample rate and channels, and an index (snippets/index.parquet, .csv). "
        "Default: off.",
    )
    extra.add_argument(
        "--snippet-margin-s",
        "--snippet_margin_s",
        dest="snippet_margin_s",
        type=float,
        default=None,
        help="Seconds of audio kept before and after each event, clipped to the recording "
        f"(default: {SNIPPET_MARGIN_S}).",
    )
    extra.add_argument(
        "--snippet-max-per-label",
        "--snippet_max_per_label",
        dest="snippet_max_per_label",
        type=int,
        default=None,
        metavar="N",
        help="Per recording and label, at most N snippets, the most confident events first "
        "(default: every event).",
    )
    rules = parser.add_argument_group("labels and events")
    rules.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="mean",
        help="How a file's window scores combine into its scores (mean, max, majority).",
    )
    rules.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="One threshold for every class (default: per class from the model's validation fold, "
        f"else {DEFAULT_THRESHOLD}).",
    )
    rules.add_argument(
        "--thresholds",
        default=None,
        help="Per-class thresholds, e.g. 'dog=0.6,rain=0.4' (override --threshold).",
    )
    rules.add_argument(
        "--hysteresis",
        type=float,
        default=None,
        help="An event goes on while the score stays above its threshold minus this (default: the "
        f"model's, else {RULE_DEFAULTS['hysteresis']}).",
    )
    rules.add_argument(
        "--min_duration_s",
        "--min-duration-s",
        dest="min_duration_s",
        type=float,
        default=None,
        help="Drop events shorter than this, seconds (default: the model's, else "
        f"{RULE_DEFAULTS['min_duration_s']}).",
    )
    rules.add_argument(
        "--median-filter-windows",
        "--median_filter_windows",
        dest="median_filter_windows",
        type=int,
        default=None,
        help="Smooth each class's scores with a running median over this many windows (odd; 1: off) "
        f"before events are found (default: the model's, else {RULE_DEFAULTS['median_filter_windows']}).",
    )
    rules.add_argument(
        "--max_gap_s",
        "--max-gap-s",
        dest="max_gap_s",
        type=float,
        default=None,
        help="Merge events of a label separated by at most this, seconds (default: the model's, else "
        f"{RULE_DEFAULTS['max_gap_s']}).",
    )
    rules.add_argument(
        "--min_level_db",
        "--min-level-db",
        dest="min_level_db",
        type=float,
        default=None,
        help="Activity gate: windows whose loudest log-mel value is below this (dB) take no part in "
        "events (log-mel models).",
    )
    rules.add_argument(
        "--min-level-above-floor-db",
        "--min_level_above_floor_db",
        dest="min_level_above_floor_db",
        type=db_or_off,
        default=None,
        help="Activity gate relative to each recording's background: windows less than this many dB "
        "above its floor (the 10th percentile of its windows' loudest log-mel values, as L90) take "
        "no part in events; recordings under about 30 s are not gated; 'off' for no gate (a sound "
        "that lasts most of a recording is its background) (default: the model's, else "
        f"{RULE_DEFAULTS['min_level_above_floor_db']}).",
    )
    rules.add_argument(
        "--onset-rise-db",
        "--onset_rise_db",
        dest="onset_rise_db",
        type=db_or_off,
        default=None,
        help="Place each event's start where the sound rises: within 1 s before and 0.7 s after the "
        "start its windows give, the frame where the level climbs most in 0.3 s, if by at least this "
        "many dB; 'off' keeps starts on the window grid (default: the model's, else "
        f"{RULE_DEFAULTS['onset_rise_db']}).",
    )
    batching = parser.add_argument_group("inference")
    batching.add_argument(
        "--max-batch-windows",
        "--max_batch_windows",
        type=int,
        default=2048,
        help="Most windows per model call (Beam batches work units up to this).",
    )
    parser.add_argument("--verbose", action="store_true", help="Log at INFO level.")
    add_feature_flags(parser)
    return parser


def embed_parser(prog: str = "soundshard embed") -> argparse.ArgumentParser:
    """Argument parser of the embed command (Beam flags pass through)."""
    parser = Parser(
        prog=prog,
        description="Audio → pretrained embeddings (OpenL3, or a SavedModel/TFLite model) → Parquet + "
        "TFRecord shards. Other flags go to Beam (--runner, --direct_num_workers, --project, ...).",
        allow_abbrev=False,
    )
    add_output_args(parser, feature_config=False)
    add_label_args(parser)
    group = parser.add_argument_group("model")
    embedding_model = group.add_argument(
        "--embedding-model",
        "--embedding_model",
        dest="model",
        default=None,
        help="'openl3' (default), 'saved_model:PATH_OR_URI' (a TF SavedModel folder) or "
        "'tflite:PATH_OR_URI'.",
    )
    parser.add_renamed("--model", embedding_model)
    group.add_argument(
        "--weights", default=None, help="OpenL3 weight file openl3_audio_<repr>_<content>.h5 (path or URI)."
    )
    embedding_config = group.add_argument(
        "--embedding-config",
        "--embedding_config",
        dest="model_config",
        default=None,
        help="TOML/JSON model config (keys of EmbeddingConfig, top level or under [embedding]); flags "
        "override it.",
    )
    parser.add_renamed("--model-config", embedding_config)
    for name, flags in EMBED_CONFIG_FLAGS.items():
        action = group.add_argument(
            *flags, dest=f"embed__{name}", default=None, metavar="VALUE", help=_EMBED_HELP.get(name)
        )
        for old in EMBED_RENAMED.get(name, ()):
            parser.add_renamed(old, action)
    group.add_argument(
        "--trust-model-code",
        "--trust_model_code",
        dest="trust_model_code",
        action="store_true",
        help="SavedModels are programs; this runs whatever ops the graph contains. Without it, a "
        "SavedModel whose graph has ops outside an allow-list of inference ops (reading or writing "
        "files, Python, printing, ...) is refused before any audio is read. Only for model files "
        "you trust.",
    )
    batching = parser.add_argument_group("inference")
    batching.add_argument(
        "--min-batch-size", "--min_batch_size", dest="min_batch_size", type=int, default=None, help="(16)"
    )
    batching.add_argument(
        "--max-batch-size",
        "--max_batch_size",
        dest="max_batch_size",
        type=int,
        default=None,
        help="Windows per model call (16); with min < max Beam adapts the size between them. Memory grows "
        "with it (OpenL3 mel256: ~33 MB per window of a batch).",
    )
    batching.add_argument(
        "--large-model",
        "--large_model",
        dest="large_model",
        action="store_true",
        help="One model copy per machine, shared by its worker processes (Beam's large_model).",
    )
    parser.add_argument("--verbose", action="store_true", help="Log at INFO level.")
    return parser
