"""The ledger of incremental runs: which inputs were processed, with which config (no Beam).

An incremental output folder holds, next to the date-partitioned shards, one ledger file per
committed run (``ledger/<run_id>.parquet``), with a row per input the run took on: its URI, size,
version (object generation, ETag or modification time), feature fingerprint and outcome. The
ledger file is the run's commit point: it is written after every other file of the run is in
place, and files named after a run that has no ledger file are leftovers of a run that was killed
before it committed, removed by :func:`recover` before the next run starts. So a killed run,
restarted, processes its inputs again, and a repeated run finds nothing new: rows are never
duplicated or lost.

Only one run may write to an output folder at a time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from soundshard.schemas.records import SourceItem

LEDGER_DIR = "ledger"
RUNS_DIR = "runs"
#: Run ids: ``YYYYMMDDTHHMMSS-<8 hex>``; every file an incremental run adds carries its id.
RUN_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")
_RUN_FILE = re.compile(rf"(?:^|[-/])(?P<run>{RUN_ID.pattern})(?:[-.]|$)")
#: Dead-letter reasons worth another try on the next run even if the file has not changed.
RETRY_REASONS = frozenset({"storage_error", "unexpected_error"})

PROCESSED, PARTIAL, DEAD_LETTER = "processed", "partial", "dead_letter"

SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("version", pa.string()),
        pa.field("content", pa.string()),
        pa.field("feature_fingerprint", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("windows", pa.int64(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("run_date", pa.string(), nullable=False),
    ]
)


@dataclasses.dataclass(frozen=True)
class Key:
    """What makes an input the same input for the ledger."""

    source_uri: str
    size_bytes: int | None
    version: str | None
    feature_fingerprint: str


def key_of(item: SourceItem, fingerprint: str) -> Key:
    """The ledger key of a source under a feature config."""
    return Key(item.public_uri, item.size_bytes, item.version, fingerprint)


def ledger_table(
    items: Iterable[SourceItem],
    outcomes: Mapping[str, tuple[int, str | None]],
    *,
    fingerprint: str,
    run_id: str,
    run_date: str,
) -> pa.Table:
    """One ledger row per input the run took on, with its outcome.

    Args:
        items: The run's inputs.
        outcomes: Per clip id, the windows written for it and the reason of a dead letter of it
            (``None`` when it had none); a clip id missing here wrote nothing and failed nothing.

    ``processed``: every unit succeeded; ``partial``: a long recording with a failed unit (its
    other units' windows are written, so it is not taken on again); ``dead_letter``: nothing of it
    was written.
    """
    rows = []
    for item in sorted(items, key=lambda i: i.public_uri):
        windows, reason = outcomes.get(item.clip_id, (0, None))
        if reason is None:
            status = PROCESSED
        else:
            status = PARTIAL if windows else DEAD_LETTER
        rows.append(
            {
                "source_uri": item.public_uri,
                "clip_id": item.clip_id,
                "size_bytes": item.size_bytes,
                "version": item.version,
                "content": item.content,
                "feature_fingerprint": fingerprint,
                "status": status,
                "reason": reason,
                "windows": windows,
                "run_id": run_id,
                "run_date": run_date,
            }
        )
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    """A ledger table as Parquet bytes."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _fs(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(output)


def read_ledger(output: str) -> pa.Table:
    """Every committed run's ledger rows under ``output`` (empty when there are none)."""
    fs, root = _fs(output)
    folder = posixpath.join(root.rstrip("/"), LEDGER_DIR)
    if not fs.exists(folder):
        return SCHEMA.empty_table()
    tables = []
    for path in sorted(fs.find(folder)):
        if RUN_ID.fullmatch(posixpath.basename(path).removesuffix(".parquet")):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            if "content" not in table.column_names:  # ledgers written before content digests
                table = table.append_column("content", pa.nulls(len(table), pa.string()))
            tables.append(table.select(SCHEMA.names).cast(SCHEMA))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def committed_runs(ledger: pa.Table) -> set[str]:
    """Run ids that committed (have a ledger file)."""
    return set(ledger.column("run_id").to_pylist())


def _done_rows(ledger: pa.Table, *, retry_dead_letters: bool) -> list[dict]:
    """Ledger rows of inputs not to take on again.

    Processed and partial inputs are done; dead-lettered ones too, unless their reason is a
    transient one (:data:`RETRY_REASONS`) or ``retry_dead_letters`` is set.
    """
    return [
        row
        for row in ledger.to_pylist()
        if not (row["status"] == DEAD_LETTER and (retry_dead_letters or row["reason"] in RETRY_REASONS))
    ]


def done_keys(ledger: pa.Table, *, retry_dead_letters: bool = False) -> set[Key]:
    """Keys of inputs not to take on again (see :func:`_done_rows`)."""
    return {
        Key(row["source_uri"], row["size_bytes"], row["version"], row["feature_fingerprint"])
        for row in _done_rows(ledger, retry_dead_letters=retry_dead_letters)
    }


def split_new(
    items: Sequence[SourceItem],
    ledger: pa.Table,
    *,
    fingerprint: str,
    retry_dead_letters: bool = False,
) -> tuple[list[SourceItem], list[SourceItem]]:
    """``(new, unchanged)``: inputs to take on, and inputs an earlier run already took on.

    An input is unchanged when its key (URI, size, version, fingerprint) is in the ledger, or when
    only its version differs (a file touched, copied again or re-uploaded) and its content digest
    (``SourceItem.content``) equals the one recorded.
    """
    done_rows = _done_rows(ledger, retry_dead_letters=retry_dead_letters)
    done = {Key(r["source_uri"], r["size_bytes"], r["version"], r["feature_fingerprint"]) for r in done_rows}
    contents: dict[tuple, set[str]] = collections.defaultdict(set)
    for row in done_rows:
        if row["content"] and row["feature_fingerprint"] == fingerprint:
            contents[(row["source_uri"], row["size_bytes"])].add(row["content"])
    new, unchanged = [], []
    for item in items:
        if key_of(item, fingerprint) in done:
            unchanged.append(item)
            continue
        recorded = contents.get((item.public_uri, item.size_bytes))
        if recorded and item.content in recorded:
            unchanged.append(item)
        else:
            new.append(item)
    return new, unchanged


def recover(output: str, committed: set[str]) -> list[str]:
    """Removes what runs that never committed left under ``output``; returns the removed paths.

    That is every temporary folder (``_tmp-<run_id>/``) and every file named after a run id that
    is not in ``committed`` (shards, dead letters and run manifests moved into place by a run
    killed before it wrote its ledger file).
    """
    fs, root = _fs(output)
    root = root.rstrip("/")
    if not fs.exists(root):
        return []
    removed = []
    for entry in fs.ls(root, detail=False):
        if posixpath.basename(entry.rstrip("/")).startswith("_tmp-"):
            removed += fs.find(entry) or [entry]
            with contextlib.suppress(FileNotFoundError):
                fs.rm(entry, recursive=True)
    orphans = []
    for path in sorted(fs.find(root)):
        relative = path[len(root) + 1 :]
        if relative.split("/", 1)[0] == LEDGER_DIR:
            continue
        match = _RUN_FILE.search(posixpath.basename(relative))
        if match and match["run"] not in committed:
            orphans.append(path)
    if orphans:
        fs.rm(orphans)
    removed += orphans
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return removed if protocol in ("file", "local") else [fs.unstrip_protocol(p) for p in removed]


def _merge_counts(parts: Sequence[dict]) -> dict:
    merged: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for counts in parts:
        for name, values in counts.items():
            merged[name].update(values)
    return {name: dict(sorted(values.items())) for name, values in merged.items()}


def nightly_dataset(output: str, ledger_rows: pa.Table | None = None) -> dict:
    """The dataset description of an incremental output folder: every committed night together.

    ``dataset.json`` of such a folder describes the latest run only. This combines the manifests
    (``runs/<run_id>.json``) of every committed run that computed the same features as the latest
    one: their shards (each entry tagged with its ``run_id``), the union of their labels (sorted,
    re-indexed: read labels by name, not by a night's ``label_index``) and summed counts. Runs with
    other features are left out and listed under ``nights.excluded``. An input that a later run
    took on again (it changed) is read from that run only: its rows in earlier runs are listed
    under ``superseded`` (``{run_id: [source_uri, ...]}``).

    Raises:
        ValueError: the folder has no committed run, or a committed run has no manifest.
    """
    fs, root = _fs(output)
    root = root.rstrip("/")
    rows = read_ledger(output) if ledger_rows is None else ledger_rows
    runs = sorted(committed_runs(rows))
    if not runs:
        raise ValueError(f"{output!r} has no committed run (no ledger file)")
    manifests = {}
    for run_id in runs:
        path = posixpath.join(root, RUNS_DIR, f"{run_id}.json")
        try:
            with fs.open(path, "rb") as f:
                manifests[run_id] = json.loads(f.read())
        except FileNotFoundError as exc:
            raise ValueError(f"committed run {run_id} has no manifest {path}") from exc
    # Run ids start with the second they started: two runs in one second need the start time.
    runs.sort(key=lambda r: (manifests[r].get("run", {}).get("started_unix_s", 0.0), r))
    order = {run_id: k for k, run_id in enumerate(runs)}
    latest = manifests[runs[-1]]
    fingerprint = latest["feature_fingerprint"]
    included = [r for r in runs if manifests[r]["feature_fingerprint"] == fingerprint]
    excluded = [
        {"run_id": r, "run_date": manifests[r]["incremental"]["run_date"], "feature_fingerprint": f}
        for r in runs
        if (f := manifests[r]["feature_fingerprint"]) != fingerprint
    ]
    shards: dict[str, list] = collections.defaultdict(list)
    labels: set[str] = set()
    for run_id in included:
        for fmt, entries in manifests[run_id].get("shards", {}).items():
            shards[fmt] += [{**entry, "run_id": run_id} for entry in entries]
        labels.update(manifests[run_id].get("label_map", {}))
    latest_run: dict[str, str] = {}
    taken: dict[str, set[str]] = collections.defaultdict(set)
    for row in rows.to_pylist():
        if row["run_id"] in included and row["status"] != DEAD_LETTER and row["windows"]:
            uri, run_id = row["source_uri"], row["run_id"]
            taken[uri].add(run_id)
            if uri not in latest_run or order[run_id] > order[latest_run[uri]]:
                latest_run[uri] = run_id
    superseded: dict[str, list[str]] = collections.defaultdict(list)
    for uri, run_ids in sorted(taken.items()):
        for run_id in run_ids - {latest_run[uri]}:
            superseded[run_id].append(uri)
    combined = dict(latest)
    combined.update(
        {
            "shards": dict(shards),
            "label_map": {name: i for i, name in enumerate(sorted(labels))},
            "counts": _merge_counts([manifests[r].get("counts", {}) for r in included]),
            "superseded": dict(superseded),
            "nights": {
                "included": [
                    {
                        "run_id": r,
                        "run_date": manifests[r]["incremental"]["run_date"],
                        "windows": manifests[r]["figures"]["windows"],
                        "files_processed": manifests[r]["figures"]["files_processed"],
                    }
                    for r in included
                ],
                "excluded": excluded,
            },
        }
    )
    return combined


def current_rows(table: pa.Table, *, run_id: str | None, superseded: dict[str, list[str]]) -> pa.Table:
    """The rows of one run's shard that no later run replaced (see :func:`nightly_dataset`)."""
    import pyarrow.compute as pc

    replaced = superseded.get(run_id or "", [])
    if not replaced:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("source_uri"), pa.array(replaced, pa.string()))))
