"""Beam layer that writes window shards (Parquet, TFRecord), dead letters and dataset.json.

Shards are assigned by a stable hash of the clip id (and, for a recording split into work units,
of each unit's first window), so which rows land in which shard, and in
what order, does not depend on the runner or the number of workers. Every file is first written
under ``<output>/_tmp-<run_id>/`` and moved into place by a single commit step that runs after all
shards exist; ``dataset.json`` is written last and marks a complete dataset.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import math
import os
import shutil
import tempfile
import urllib.parse
import uuid
import zlib
from collections.abc import Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from soundshard.schemas import fields
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.embedding import EmbeddingConfig, unit_source
from soundshard.schemas.records import DeadLetter, SourceItem, WindowBatch
from soundshard.schemas.tfexample import tfrecord_frame
from soundshard.transforms.outputs import totals
from soundshard.transforms.outputs.commit import (  # noqa: F401 - path helpers named here for callers
    CommitOutputs,
    RunFiles,
    RunTarget,
    commit_run,
    join,
    matching_paths,
    move_into_place,
    remove_tree,
    temp_file,
    write_bytes,
)

FORMATS = ("parquet", "tfrecord")
_SUFFIX = {"parquet": ".parquet", "tfrecord": ".tfrecord"}
_ROW_GROUP_BYTES = 32 * 2**20
_FRAGMENT_BYTES = 64 * 2**20
#: Hive's folder value for a null partition key (pyarrow and DuckDB read it as null).
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Where and how shards are written.

    Attributes:
        output: Output folder (local path or a Beam filesystem URI such as ``gs://...``).
        formats: Subset of ``("parquet", "tfrecord")``.
        num_shards: Fixed shard count, or ``None`` to derive it from ``shard_size_mb``.
        shard_size_mb: Target size of one shard in MB (feature bytes) when ``num_shards`` is None.
        run_id: Unique id of this run; names the temporary folder (and, in incremental runs,
            every file the run adds).
        run_date: Incremental runs only: the night's date (``YYYY-MM-DD``); shards go to
            ``<fmt>/run_date=<date>/`` and are named after the run, so runs add files and never
            replace those of earlier runs.
        by_site: Incremental runs only: partition further by site (``site=<site>/``).
    """

    output: str
    formats: tuple[str, ...] = FORMATS
    num_shards: int | None = None
    shard_size_mb: float = 64.0
    run_id: str = "run"
    run_date: str | None = None
    by_site: bool = False

    @property
    def incremental(self) -> bool:
        """True when runs add date-partitioned files instead of replacing the dataset."""
        return self.run_date is not None

    @property
    def temp_dir(self) -> str:
        """Folder for files not yet committed."""
        return join(self.output, f"_tmp-{self.run_id}")

    def partition_of(self, source: SourceItem) -> str:
        """Partition folder of a source's windows: ``""``, or ``run_date=D[/site=S]``."""
        if not self.incremental:
            return ""
        partition = f"run_date={self.run_date}"
        if self.by_site:
            # Hive-style value: URI-encoded (no '/'), null as Hive's default partition name.
            site = urllib.parse.quote(source.site, safe="") if source.site else HIVE_NULL
            partition += f"/site={site}"
        return partition

    def shard_name(self, fmt: str, index: int, n_shards: int, partition: str = "") -> str:
        """Relative path of one shard, e.g. ``parquet/windows-00000-of-00004.parquet``, or in an
        incremental run ``parquet/run_date=2026-11-25/windows-<run_id>-00000-of-00004.parquet``."""
        if not self.incremental:
            return f"{fmt}/windows-{index:05d}-of-{n_shards:05d}{_SUFFIX[fmt]}"
        return f"{fmt}/{partition}/windows-{self.run_id}-{index:05d}-of-{n_shards:05d}{_SUFFIX[fmt]}"


def shard_count(total_windows: int, *, config: FeatureConfig | EmbeddingConfig, spec: ShardSpec) -> int:
    """Number of shards: ``spec.num_shards``, or enough to keep shards near the target size."""
    if spec.num_shards:
        return spec.num_shards
    window_bytes = 4 * math.prod(config.feature_shape) + 200
    return max(1, math.ceil(total_windows * window_bytes / (spec.shard_size_mb * 2**20)))


def shard_of(clip_id: str, n_shards: int, *, first_window: int = 0) -> int:
    """Stable shard index of a work unit's windows (CRC32; same on every worker and run).

    A whole recording (``first_window`` 0) goes to the shard of its clip id; the units of a
    split recording are spread over shards by their first window, so one long recording never
    makes one oversized shard, and a shard stays near the target size however long its inputs.
    """
    key = clip_id if first_window == 0 else f"{clip_id}@{first_window}"
    return zlib.crc32(key.encode()) % n_shards


def _parquet_options(schema: pa.Schema) -> dict:
    # zstd halves the size of float features against snappy at about the same speed (measured);
    # dictionary encoding helps the repeated strings only and costs time on the feature column.
    # Statistics on the feature column (min/max of every float) cost time and prune nothing.
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    scalars = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
    return {"compression": "zstd", "use_dictionary": strings, "write_statistics": scalars}


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes, with the options of the shards (zstd, dictionaries for strings)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, **_parquet_options(table.schema))
    return sink.getvalue()


def _records_bytes(table: pa.Table) -> bytes:
    return b"".join(tfrecord_frame(example) for example in fields.table_to_examples(table))


@dataclasses.dataclass(frozen=True)
class Fragment:
    """Windows of one shard from one bundle, spilled as an Arrow IPC file next to the shards.

    Only this small record travels through the shuffle that groups windows into shards; the
    feature arrays stay in fragment files until the shard writer reads them. A retried bundle
    writes new fragments under new names; only fragments named by records of a successful
    bundle are read, and the whole temporary folder is removed by the commit.
    """

    path: str
    rows: int


@dataclasses.dataclass(frozen=True)
class WrittenShard:
    """A shard written to the temporary folder, waiting for the commit."""

    fmt: str
    index: int
    n_shards: int
    temp_path: str
    rows: int
    partition: str = ""


class _SpillFn(beam.DoFn):
    """WindowBatches → one fragment file per shard and bundle; emits ``(shard index, Fragment)``.

    Tables are buffered per shard and all buffers are written when together they reach
    ``_FRAGMENT_BYTES`` or the bundle ends, so a dataset of many short clips does not become as
    many small files.
    """

    def __init__(self, *, config, spec, label_map, extra_columns):
        self._config = config
        self._spec = spec
        self._label_map = label_map
        self._extra_columns = tuple(extra_columns)

    def start_bundle(self):
        self._buffers: dict[tuple[str, int], list[pa.Table]] = collections.defaultdict(list)
        self._sizes: dict[tuple[str, int], int] = collections.defaultdict(int)

    def process(self, batch: WindowBatch, n_shards: int):
        table = fields.batch_to_table(
            batch, config=self._config, label_map=self._label_map, extra_columns=self._extra_columns
        )
        source, unit_first_window = unit_source(batch)
        index = shard_of(source.clip_id, n_shards, first_window=unit_first_window)
        key = (self._spec.partition_of(batch.source), index)
        self._buffers[key].append(table)
        self._sizes[key] += table.nbytes
        # Bound what the bundle holds in all buffers together, not per shard: a long recording
        # spreads over many shards, and per-shard buffers would grow with their count.
        if sum(self._sizes.values()) >= _FRAGMENT_BYTES:
            for full in sorted(self._buffers):
                yield full, self._spill(full)

    def finish_bundle(self):
        for key in sorted(self._buffers):
            yield WindowedValue((key, self._spill(key)), MIN_TIMESTAMP, [GlobalWindow()])

    def _spill(self, key: tuple[str, int]) -> Fragment:
        tables = self._buffers.pop(key)
        self._sizes.pop(key)
        path = join(self._spec.temp_dir, "fragments", f"{key[1]:05d}-{uuid.uuid4().hex}.arrow")
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, tables[0].schema) as writer:
            for table in tables:
                writer.write_table(table)
        write_bytes(path, sink.getvalue().to_pybytes())
        return Fragment(path, sum(t.num_rows for t in tables))


def _read_fragment(fragment: Fragment) -> pa.Table:
    with FileSystems.open(fragment.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read()
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def write_shard_files(
    spec: ShardSpec, index: int, n_shards: int, schema: pa.Schema, tables, partition: str = ""
) -> list[WrittenShard]:
    """Streams ``tables`` into one shard per format in the temporary folder.

    Memory stays near one row group (``_ROW_GROUP_BYTES``), whatever the shard size. Each file is
    built in a local temporary file and then copied, so any Beam filesystem works as output.
    """
    locals_ = {fmt: tempfile.TemporaryFile() for fmt in spec.formats}
    parquet = (
        pq.ParquetWriter(locals_["parquet"], schema, **_parquet_options(schema))
        if "parquet" in locals_
        else None
    )
    pending: list[pa.Table] = []
    pending_bytes = 0
    rows = 0

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        group = pa.concat_tables(pending)
        if parquet is not None:
            parquet.write_table(group)
        if "tfrecord" in locals_:
            locals_["tfrecord"].write(_records_bytes(group))
        pending, pending_bytes = [], 0

    try:
        for table in tables:
            table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
            pending.append(table)
            pending_bytes += table.nbytes
            rows += table.num_rows
            if pending_bytes >= _ROW_GROUP_BYTES:
                flush()
        flush()
        if parquet is not None:
            parquet.close()
        written = []
        for fmt, local in locals_.items():
            temp_path = join(spec.temp_dir, spec.shard_name(fmt, index, n_shards, partition))
            size = local.seek(0, os.SEEK_END)
            local.seek(0)
            if size == 0:
                write_bytes(temp_path, b"")
            else:
                with FileSystems.create(temp_path, compression_type=CompressionTypes.UNCOMPRESSED) as out:
                    shutil.copyfileobj(local, out, length=4 * 2**20)
            written.append(WrittenShard(fmt, index, n_shards, temp_path, rows, partition))
        return written
    finally:
        for local in locals_.values():
            local.close()


class _WriteShardFn(beam.DoFn):
    def __init__(self, *, config, spec, extra_columns):
        self._spec = spec
        self._schema = fields.arrow_schema(config, extra_columns)

    def process(self, keyed, n_shards):
        (partition, index), fragments = keyed
        # Rows sorted by clip and window: shard bytes do not depend on how bundles were cut.
        table = pa.concat_tables(_read_fragment(f) for f in fragments)
        order = pa.compute.sort_indices(table, [("clip_id", "ascending"), ("window_index", "ascending")])
        # Taken in slices, so the sorted copy never exists whole next to the unsorted rows.
        sorted_slices = (table.take(order.slice(start, 256)) for start in range(0, len(order), 256))
        yield from write_shard_files(self._spec, index, n_shards, self._schema, sorted_slices, partition)


class WriteWindowShards(beam.PTransform[beam.PCollection[WindowBatch], beam.PCollection[WrittenShard]]):
    """WindowBatches → shards in the temporary folder.

    ``expand`` returns a PCollection of :class:`WrittenShard`.

    Args:
        config: Feature configuration of the batches.
        spec: Output folder, formats and sharding.
        label_map: Label name to index.
        extra_columns: Manifest columns copied into each row.
        n_shards: One-element PCollection with the shard count (see :class:`ShardCount`); known
            before the batches exist, so shard assignment fuses with the feature step.
    """

    def __init__(
        self,
        *,
        config: FeatureConfig | EmbeddingConfig,
        spec: ShardSpec,
        label_map,
        extra_columns=(),
        n_shards,
    ):
        super().__init__()
        self._n_shards = n_shards
        self._config = config
        self._spec = spec
        self._label_map = dict(label_map)
        self._extra_columns = tuple(extra_columns)

    def expand(self, batches: beam.PCollection[WindowBatch]):
        config, spec = self._config, self._spec
        n_side = beam.pvalue.AsSingleton(self._n_shards)
        spill = _SpillFn(
            config=config, spec=spec, label_map=self._label_map, extra_columns=self._extra_columns
        )
        return (
            batches
            | "SpillFragments" >> beam.ParDo(spill, n_shards=n_side)
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard"
            >> beam.ParDo(
                _WriteShardFn(config=config, spec=spec, extra_columns=self._extra_columns), n_shards=n_side
            )
        )


class ShardCount(beam.PTransform[beam.PCollection[int], beam.PCollection[int]]):
    """Expected windows per unit → one-element PCollection with the number of shards."""

    def __init__(self, *, config: FeatureConfig | EmbeddingConfig, spec: ShardSpec):
        super().__init__()
        self._config = config
        self._spec = spec

    def expand(self, windows_per_unit: beam.PCollection[int]):
        config, spec = self._config, self._spec
        return (
            windows_per_unit
            | "TotalWindows" >> beam.CombineGlobally(sum)
            | "ShardCount" >> beam.Map(lambda total: shard_count(total, config=config, spec=spec))
        )


_DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field(f.name, pa.string(), nullable=f.name in ("clip_id", "augmentation"))
        for f in dataclasses.fields(DeadLetter)
    ]
)


def dead_letters_name(*, run_id: str, run_date: str | None) -> str:
    """Where a run's dead letters go under its output: one file that each replacing run rewrites,
    or one per incremental run in its date's partition."""
    if run_date is None:
        return "dead_letters.parquet"
    return f"dead_letters/run_date={run_date}/dead_letters-{run_id}.parquet"


def dead_letter_table(dead_letters: Sequence[DeadLetter]) -> pa.Table:
    """Dead letters as an Arrow table sorted by source (columns as in :class:`DeadLetter`)."""
    rows = sorted((dataclasses.asdict(d) for d in dead_letters), key=lambda r: (r["source_uri"], r["stage"]))
    return pa.Table.from_pylist(rows, schema=_DEAD_LETTER_SCHEMA)


class DatasetFiles:
    """The files of a features or embed run (a :class:`commit.Gather`): its shards (a replacing
    run's N of N, an incremental run's own), dead letters, levels tables, and ``dataset.json``'s
    content. Runs once, on a worker, in :class:`commit.CommitOutputs`."""

    def __init__(self, *, config, spec: ShardSpec, extra_columns, manifest: dict, levels=None):
        self._levels = levels
        self._config = config
        self._spec = spec
        self._extra_columns = tuple(extra_columns)
        self._manifest = manifest

    def target(self) -> RunTarget:
        """Where the run's files land; ``dataset.json`` marks a complete dataset (incremental:
        the latest run)."""
        spec = self._spec
        return RunTarget(
            output=spec.output,
            temp_dir=spec.temp_dir,
            run_id=spec.run_id,
            run_date=spec.run_date if spec.incremental else None,
            manifest_name="dataset.json",
            fingerprint=self._config.fingerprint,
        )

    def __call__(
        self, run_totals: dict, *, written, dead_letters, n_shards: int, level_files=(), level_hours=()
    ) -> RunFiles:
        spec = self._spec
        manifest = dict(self._manifest)
        manifest.update(copy.deepcopy(run_totals))  # the side input is shared: never mutate it
        if spec.incremental:
            moves = self._incremental_files(written, dead_letters, manifest)
        else:
            moves = self._replacing_files(written, dead_letters, n_shards, manifest)
        moves.extend(self._level_files(level_files, level_hours, manifest))
        return RunFiles(moves, manifest)

    def _level_files(self, level_files, level_hours, manifest) -> list[tuple[str, str]]:
        """Moves of the levels tables (``--levels``); a replacing run also deletes the levels
        tables an earlier run left in the output folder."""
        from soundshard.transforms.levels import level_tables
        from soundshard.transforms.outputs import tables

        spec = self._spec
        partition = f"run_date={spec.run_date}" if spec.incremental else ""
        moves, outputs, rows = [], collections.defaultdict(list), collections.Counter()
        if self._levels is not None:
            for move, relative in tables.numbered(
                level_files, tables=level_tables.RECORDING_TABLES, run_id=spec.run_id, partition=partition
            ):
                moves.append((move.temp_path, join(spec.output, relative)))
                outputs[move.kind].append(relative)
                rows[move.kind] += move.rows if relative.endswith(".parquet") else 0
            hours = list(level_hours)
            combined = {
                "levels_hourly": level_tables.hourly_levels_table(hours),
                "lden": level_tables.lden_table(hours, timezone=self._levels.timezone),
            }
            for table, data in combined.items():
                if data.num_rows:
                    rows[table] = data.num_rows
                    for fmt, content in tables.table_files(data, level_tables.FORMATS).items():
                        relative = tables.table_name(table, 0, fmt, run_id=spec.run_id, partition=partition)
                        moves.append(self._temp_file(relative, content))
                        outputs[table].append(relative)
            manifest["levels"] = {**manifest.get("levels", {}), "tables": dict(outputs), "rows": dict(rows)}
        if not spec.incremental:
            finals = {dst for _, dst in moves}
            stale = [
                p
                for fmt in level_tables.FORMATS
                for table in (*level_tables.RECORDING_TABLES, *level_tables.COMBINED_TABLES)
                for p in matching_paths(join(spec.output, fmt, table, "**"))
                if p not in finals
            ]
            if stale:
                FileSystems.delete(stale)
        return moves

    def _temp_file(self, relative: str, data: bytes) -> tuple[str, str]:
        return temp_file(relative, data, temp_dir=self._spec.temp_dir, output=self._spec.output)

    def _replacing_files(self, written, dead_letters, n_shards, manifest) -> list[tuple[str, str]]:
        """Moves of a run that replaces the dataset: shards 0..N-1 of N (empty ones included),
        dead letters; earlier shards that are not replaced are deleted."""
        spec, config = self._spec, self._config
        present = {(w.fmt, w.index) for w in written}
        moves = [(w.temp_path, join(spec.output, spec.shard_name(w.fmt, w.index, n_shards))) for w in written]
        rows = {w.index: w.rows for w in written}
        schema = fields.arrow_schema(config, self._extra_columns)
        for index in range(n_shards):
            if any((fmt, index) not in present for fmt in spec.formats):  # names stay 00000..N-1 of N
                for shard in write_shard_files(spec, index, n_shards, schema, []):
                    moves.append(
                        (shard.temp_path, join(spec.output, spec.shard_name(shard.fmt, index, n_shards)))
                    )
        dead_name = dead_letters_name(run_id=spec.run_id, run_date=None)
        moves.append(self._temp_file(dead_name, parquet_bytes(dead_letter_table(dead_letters))))
        finals = {dst for _, dst in moves}
        for fmt in FORMATS:  # shards of an earlier run into the same folder must not mix in
            stale = [p for p in matching_paths(join(spec.output, fmt, "windows-*")) if p not in finals]
            if stale:
                FileSystems.delete(stale)
        manifest["shards"] = {
            fmt: [spec.shard_name(fmt, i, n_shards) for i in range(n_shards)] for fmt in spec.formats
        }
        manifest["shards"]["rows_per_shard"] = [rows.get(i, 0) for i in range(n_shards)]
        manifest["dead_letters_file"] = dead_name
        return moves

    def _incremental_files(self, written, dead_letters, manifest) -> list[tuple[str, str]]:
        """Moves of an incremental run: its own shards (non-empty only) and dead letters, all named
        after the run, into the run date's partition; nothing of earlier runs is touched."""
        spec = self._spec
        moves, shard_files = [], collections.defaultdict(list)
        for w in sorted(written, key=lambda w: (w.fmt, w.partition, w.index)):
            if w.rows:
                name = spec.shard_name(w.fmt, w.index, w.n_shards, w.partition)
                moves.append((w.temp_path, join(spec.output, name)))
                shard_files[w.fmt].append({"path": name, "rows": w.rows})
        dead_name = dead_letters_name(run_id=spec.run_id, run_date=spec.run_date)
        moves.append(self._temp_file(dead_name, parquet_bytes(dead_letter_table(dead_letters))))
        manifest["shards"] = dict(shard_files)
        manifest["dead_letters_file"] = dead_name
        return moves


class CommitDataset(beam.PTransform[beam.pvalue.PBegin, beam.PCollection[str]]):
    """Moves shards and dead letters into place and writes ``dataset.json`` (runs once, last).

    Applied to the pipeline root; takes the written shards, dead letters, the run's totals and
    the shard count as side inputs so that it runs only after all of them are complete. The
    summaries and label counts reach it only as the totals a combine made of them
    (:class:`totals.RunTotals`), and, in incremental runs, as one tally per recording for the
    ledger. Returns a PCollection with the path of ``dataset.json``.

    Args:
        written: PCollection of :class:`WrittenShard`.
        n_shards: One-element PCollection with the shard count.
        dead_letters: PCollection of :class:`DeadLetter`.
        summaries: PCollection of :class:`FileSummary`.
        config, spec, extra_columns: As for :class:`WriteWindowShards`.
        n_inputs: Inputs seen by the listing (for the accounting check).
        manifest: dataset.json fields known at launch (config, sources, run info); its
            ``run.started_unix_s`` is used for the wall time.
        items: PCollection of the run's :class:`SourceItem` (incremental runs: for the ledger).
        label_counts: PCollection of :class:`LabelCount` (strong labels), or ``None``.
        level_files: PCollection of the levels tables' ``Move``s (``transforms/outputs/tables.py``), or
            ``None`` without levels.
        level_hours: PCollection of combined ``((site, hour_us, level_unit), HourSums)``.
        levels: The LevelConfig, or ``None``.
    """

    def __init__(
        self,
        *,
        written,
        n_shards,
        dead_letters,
        summaries,
        config,
        spec,
        extra_columns,
        n_inputs,
        manifest,
        items=None,
        label_counts=None,
        level_files=None,
        level_hours=None,
        levels=None,
    ):
        super().__init__()
        self._label_counts = label_counts
        self._level_files = level_files
        self._level_hours = level_hours
        self._written = written
        self._n_shards = n_shards
        self._dead_letters = dead_letters
        self._summaries = summaries
        self._items = items
        self._n_inputs = n_inputs
        self._files = DatasetFiles(
            config=config, spec=spec, extra_columns=extra_columns, manifest=manifest, levels=levels
        )

    def expand(self, root: beam.pvalue.PBegin):
        counted = (self._summaries, self._dead_letters)
        if self._label_counts is not None:
            counted += (self._label_counts,)
        tallied = counted | "RunTotals" >> totals.RunTotals(self._n_inputs)
        side_inputs = dict(
            written=beam.pvalue.AsList(self._written),
            dead_letters=beam.pvalue.AsList(self._dead_letters),
            n_shards=beam.pvalue.AsSingleton(self._n_shards),
        )
        if self._level_files is not None:
            side_inputs["level_files"] = beam.pvalue.AsList(self._level_files)
            side_inputs["level_hours"] = beam.pvalue.AsList(self._level_hours)
        return root | CommitOutputs(
            self._files,
            tallied=tallied,
            items=self._items,
            side_inputs=side_inputs,
        )
