"""Output tables of the tag and features runs: rows per recording, files per bundle (Beam layer).

Per-recording stages produce :class:`TableRows`; :class:`WriteTables` gathers a bundle's rows of
each table into one Parquet and/or CSV file in the run's temporary folder and returns a
:class:`Move` per file; the run's commit moves them into ``<format>/<table>/[<partition>/]``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import posixpath
import uuid
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from apache_beam.transforms.window import GlobalWindows

from soundshard.schemas.records import SourceItem
from soundshard.transforms.outputs.shards import join, parquet_bytes, write_bytes

#: Rows per table file: a bundle's rows are cut into files of at most this many.
MAX_ROWS_PER_FILE = 1_000_000


def utc_column(start_us: int | None, seconds: np.ndarray) -> pa.Array:
    """Times ``start_us + seconds`` as a UTC timestamp column (nulls when the start is unknown)."""
    if start_us is None:
        return pa.nulls(len(seconds), pa.timestamp("us", tz="UTC"))
    values = start_us + np.round(np.asarray(seconds, np.float64) * 1e6).astype(np.int64)
    return pa.array(values, pa.timestamp("us", tz="UTC"))


def source_columns(item: SourceItem, n: int) -> dict[str, pa.Array]:
    """The columns that say where ``n`` rows come from (recording, archive member, site)."""
    return {
        "source_uri": pa.array([item.public_uri] * n, pa.string()),
        "clip_id": pa.array([item.clip_id] * n, pa.string()),
        "archive_member": pa.array([item.archive_member] * n, pa.string()),
        "site": pa.array([item.site] * n, pa.string()),
        "deployment": pa.array([item.deployment] * n, pa.string()),
    }


@dataclasses.dataclass(frozen=True)
class TableRows:
    """Rows of one output table (``windows``, ``files``, ``events``, ``levels_second``, ...) from one
    recording."""

    table: str
    rows: pa.Table


@dataclasses.dataclass(frozen=True)
class Move:
    """A file written to the run's temporary folder and where the commit puts it.

    Attributes:
        kind: What it is (``windows``, ``files``, ``events``, ``audacity``, ``raven``).
        temp_path: Where it was written.
        relative: Its path under the output folder.
        rows: Rows it holds (label files: events).
        labels: For event tables, ``(label, events)`` pairs of the rows it holds.
    """

    kind: str
    temp_path: str
    relative: str
    rows: int
    labels: tuple[tuple[str, int], ...] = ()


def table_files(table: pa.Table, formats: Sequence[str]) -> dict[str, bytes]:
    """A table as file contents per format (``parquet``: as the shards; ``csv``: header row, UTC
    ISO times)."""
    out = {}
    if "parquet" in formats:
        out["parquet"] = parquet_bytes(table)
    if "csv" in formats:
        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        out["csv"] = sink.getvalue()
    return out


class _WriteTablesFn(beam.DoFn):
    """Gathers a bundle's rows per table and writes them as files to the temporary folder."""

    def __init__(self, *, temp_dir: str, formats: tuple[str, ...], partition: str):
        self._temp_dir = temp_dir
        self._formats = formats
        self._partition = partition

    def start_bundle(self):
        self._pending: dict[str, list[pa.Table]] = {}
        self._rows: dict[str, int] = {}

    def process(self, rows: TableRows):
        self._pending.setdefault(rows.table, []).append(rows.rows)
        self._rows[rows.table] = self._rows.get(rows.table, 0) + rows.rows.num_rows
        if self._rows[rows.table] >= MAX_ROWS_PER_FILE:
            yield from self._flush(rows.table)

    def finish_bundle(self):
        for table in list(self._pending):
            for move in self._flush(table):
                yield GlobalWindows.windowed_value(move)

    def _flush(self, table: str):
        parts = self._pending.pop(table, [])
        self._rows.pop(table, None)
        if not parts:
            return
        merged = pa.concat_tables(parts, promote_options="default")
        if merged.num_rows == 0:
            return
        name = f"part-{uuid.uuid4().hex[:12]}"
        labels = ()
        if table == "events":
            labels = tuple(sorted(collections.Counter(merged.column("label").to_pylist()).items()))
        for fmt, data in table_files(merged, self._formats).items():
            relative = posixpath.join(fmt, table, self._partition, f"{name}.{fmt}")
            temp = join(self._temp_dir, "tables", relative)
            write_bytes(temp, data)
            yield Move(table, temp, relative, merged.num_rows, labels)


class WriteTables(beam.PTransform[beam.PCollection[TableRows], beam.PCollection[Move]]):
    """TableRows → files in the run's temporary folder (one per table and format per bundle, at
    ``<format>/<table>/[<partition>/]``); returns their :class:`Move`s for the commit.

    Args:
        temp_dir: The run's temporary folder.
        formats: ``parquet`` and/or ``csv``.
        partition: Sub-folder of each table (``run_date=2026-11-24`` in incremental runs) or ``""``.
    """

    def __init__(self, *, temp_dir: str, formats: Sequence[str], partition: str = ""):
        super().__init__()
        self._fn = _WriteTablesFn(temp_dir=temp_dir, formats=tuple(formats), partition=partition)

    def expand(self, rows: beam.PCollection[TableRows]):
        return rows | "WriteTableFiles" >> beam.ParDo(self._fn)


def table_name(table: str, index: int, fmt: str, *, run_id: str, partition: str = "") -> str:
    """Final path of a table file under the output: ``<fmt>/<table>/[<partition>/]part-<run>-<n>.<fmt>``."""
    return posixpath.join(fmt, table, partition, f"part-{run_id}-{index:05d}.{fmt}")


def numbered(moves: Sequence[Move], *, tables: Sequence[str], run_id: str, partition: str = ""):
    """``(move, final relative path)`` of the table files among ``moves``, numbered per table
    (a part's Parquet and CSV files share a number); other moves are left out."""
    parts = collections.defaultdict(list)
    for move in moves:
        if move.kind in tables:
            parts[move.kind].append(move)
    out = []
    for table in tables:
        stems = sorted({_stem(m.relative) for m in parts[table]})
        number = {stem: i for i, stem in enumerate(stems)}
        for move in sorted(parts[table], key=lambda m: m.relative):
            fmt = move.relative.rsplit(".", 1)[1]
            out.append(
                (
                    move,
                    table_name(table, number[_stem(move.relative)], fmt, run_id=run_id, partition=partition),
                )
            )
    return out


def _stem(relative: str) -> str:
    return posixpath.splitext(posixpath.basename(relative))[0]
