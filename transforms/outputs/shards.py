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
import json
import math
import os
import shutil
import tempfile
import time
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
from soundshard.schemas.uris import redact
from soundshard.transforms.io import ledger
from soundshard.transforms.outputs import totals

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


def join(base: str, *parts: str) -> str:
    """Joins path parts with ``/`` for local paths and URLs alike."""
    return "/".join([base.rstrip("/"), *parts])


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


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through Beam's FileSystems (local, gs://, s3://...)."""
    if not data and path.startswith("s3://"):
        # Beam's S3 writer always completes a multipart upload, which S3 rejects without parts.
        import fsspec

        fs, key = fsspec.core.url_to_fs(path)
        fs.pipe_file(key, b"")
        return
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


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


class WriteWindowShards(beam.PTransform):
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

    def expand(self, batches):
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


class ShardCount(beam.PTransform):
    """Expected windows per unit → one-element PCollection with the number of shards."""

    def __init__(self, *, config: FeatureConfig | EmbeddingConfig, spec: ShardSpec):
        super().__init__()
        self._config = config
        self._spec = spec

    def expand(self, windows_per_unit):
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


class _CommitFn(beam.DoFn):
    def __init__(self, *, config, spec, label_map, extra_columns, n_inputs, manifest, levels=None):
        self._levels = levels
        self._config = config
        self._spec = spec
        self._label_map = label_map
        self._extra_columns = tuple(extra_columns)
        self._n_inputs = n_inputs
        self._manifest = manifest

    def process(
        self,
        _,
        written,
        dead_letters,
        run_totals,
        n_shards,
        items=(),
        tallies=(),
        level_files=(),
        level_hours=(),
    ):
        spec = self._spec
        manifest = dict(self._manifest)
        manifest.update(copy.deepcopy(run_totals))  # the side input is shared: never mutate it
        if spec.incremental:
            moves = self._incremental_files(written, dead_letters, manifest)
        else:
            moves = self._replacing_files(written, dead_letters, n_shards, manifest)
        moves.extend(self._level_files(level_files, level_hours, manifest))
        yield commit_run(
            moves,
            manifest,
            output=spec.output,
            temp_dir=spec.temp_dir,
            manifest_name="dataset.json",  # it marks a complete dataset (incremental: the latest run)
            run_id=spec.run_id,
            run_date=spec.run_date if spec.incremental else None,
            fingerprint=self._config.fingerprint,
            items=items,
            tallies=tallies,
        )

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


def temp_file(relative: str, data: bytes, *, temp_dir: str, output: str) -> tuple[str, str]:
    """Writes ``data`` to a run's temporary folder; returns its move to ``<output>/<relative>``."""
    temp = join(temp_dir, "files", relative)
    write_bytes(temp, data)
    return temp, join(output, relative)


def commit_run(
    moves: list[tuple[str, str]],
    manifest: dict,
    *,
    output: str,
    temp_dir: str,
    manifest_name: str,
    run_id: str,
    run_date: str | None,
    fingerprint: str,
    items=(),
    tallies=(),
    before_moving=None,
) -> str:
    """The end of every run that writes files (features, embed, tag): its wall-time figures into
    ``manifest``, its files moved into place, an incremental run's ledger (the run's commit
    point: written once all its other files are in place, see ``transforms/io/ledger.py``) and
    the manifest last (a folder with it is complete); the temporary folder removed.

    Args:
        moves: ``(temporary, final)`` paths of the run's files.
        manifest: The run's manifest; ``manifest["figures"]`` gets ``wall_s``,
            ``speed_x_realtime`` and ``real_time_factor`` (from ``run.started_unix_s``).
        output: The output folder.
        temp_dir: The run's temporary folder.
        manifest_name: ``dataset.json`` or ``run.json``.
        run_id: The run's id.
        run_date: An incremental run's partition date, or ``None`` (a run that replaces).
        fingerprint: What the ledger records the inputs as processed with.
        items: An incremental run's inputs (SourceItem).
        tallies: An incremental run's ``(clip_id, ClipTally)`` pairs (``totals.RunTotals``).
        before_moving: Called just before the files move (a replacing tag run deletes what an
            earlier run left).

    Returns:
        The path of the manifest.
    """
    figures = manifest["figures"]
    wall_s = time.time() - manifest["run"]["started_unix_s"]
    figures["wall_s"] = round(wall_s, 3)
    figures["speed_x_realtime"] = round(figures["audio_s"] / wall_s, 2) if wall_s > 0 else None
    figures["real_time_factor"] = round(wall_s / figures["audio_s"], 6) if figures["audio_s"] else None
    data = redact(json.dumps(manifest, indent=2)).encode()

    def placed(relative: str, content: bytes) -> tuple[str, str]:
        return temp_file(relative, content, temp_dir=temp_dir, output=output)

    if run_date is not None:
        moves = [*moves, placed(join(ledger.RUNS_DIR, f"{run_id}.json"), data)]
    if before_moving is not None:
        before_moving()
    move_into_place(moves)
    if run_date is not None:
        rows = ledger.ledger_table(
            items,
            {clip: (t.n_windows, t.reason) for clip, t in tallies},
            fingerprint=fingerprint,
            run_id=run_id,
            run_date=run_date,
        )
        move_into_place([placed(join(ledger.LEDGER_DIR, f"{run_id}.parquet"), ledger.table_bytes(rows))])
    move_into_place([placed(manifest_name, data)])
    remove_tree(temp_dir)
    return join(output, manifest_name)


def move_into_place(moves: Sequence[tuple[str, str]]) -> None:
    """Renames temporary files to their final paths (replacing files already there).

    A retried commit finds some sources already moved: those are skipped.
    """
    pending = [(src, dst) for src, dst in moves if FileSystems.exists(src)]
    for folder in {dst.rsplit("/", 1)[0] for _, dst in pending}:
        if not FileSystems.exists(folder):
            FileSystems.mkdirs(folder)
    existing = [dst for _, dst in pending if FileSystems.exists(dst)]
    if existing:
        FileSystems.delete(existing)
    if pending:
        FileSystems.rename([src for src, _ in pending], [dst for _, dst in pending])


def remove_tree(path: str) -> None:
    """Deletes a folder and everything under it (a local tree, or every object under a prefix)."""
    if "://" not in path or path.startswith("file://"):
        shutil.rmtree(path.removeprefix("file://"), ignore_errors=True)
        return
    objects = matching_paths(join(path, "**"))
    if objects:
        FileSystems.delete(objects)


def matching_paths(pattern: str) -> list[str]:
    """Paths matching ``pattern`` through Beam's FileSystems (``**`` for whole trees)."""
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


class CommitDataset(beam.PTransform):
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
        config, spec, label_map, extra_columns: As for :class:`WriteWindowShards`.
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
        label_map,
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
        self._args = dict(
            config=config,
            spec=spec,
            label_map=dict(label_map),
            extra_columns=tuple(extra_columns),
            n_inputs=n_inputs,
            manifest=manifest,
            levels=levels,
        )

    def expand(self, root):
        counted = (self._summaries, self._dead_letters)
        if self._label_counts is not None:
            counted += (self._label_counts,)
        tallied = counted | "RunTotals" >> totals.RunTotals(self._args["n_inputs"])
        side_inputs = dict(
            written=beam.pvalue.AsList(self._written),
            dead_letters=beam.pvalue.AsList(self._dead_letters),
            run_totals=beam.pvalue.AsSingleton(tallied["totals"]),
            n_shards=beam.pvalue.AsSingleton(self._n_shards),
        )
        if self._args["spec"].incremental:
            if self._items is None:
                raise ValueError("an incremental commit needs the run's items (for its ledger)")
            side_inputs["items"] = beam.pvalue.AsList(self._items)
            side_inputs["tallies"] = beam.pvalue.AsList(tallied["tallies"])
        if self._level_files is not None:
            side_inputs["level_files"] = beam.pvalue.AsList(self._level_files)
            side_inputs["level_hours"] = beam.pvalue.AsList(self._level_hours)
        return (
            root
            | "CommitTrigger" >> beam.Create([None])
            | "Commit" >> beam.ParDo(_CommitFn(**self._args), **side_inputs)
        )
