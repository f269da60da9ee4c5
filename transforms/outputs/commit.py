"""The end of every run that writes files (features, embed, tag): after everything else, the run's
files moved from its temporary folder into place, an incremental run's ledger, and the manifest
(``dataset.json``, ``run.json``) last, so that a folder with its manifest is complete.

:class:`CommitOutputs` is the one composite for it: each command supplies what its files are (a
:class:`Gather`: the side inputs it needs → :class:`RunFiles`), and the commit itself
(:func:`commit_run`) is the same for all. Path helpers for local paths and URLs alike live here too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from soundshard.schemas.records import SourceItem
from soundshard.schemas.uris import redact
from soundshard.transforms.io import ledger
from soundshard.transforms.outputs.totals import Tallied


def join(base: str, *parts: str) -> str:
    """Joins path parts with ``/`` for local paths and URLs alike."""
    return "/".join([base.rstrip("/"), *parts])


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


# -- the composite ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """Where a run's files land and what marks them complete.

    Attributes:
        output: The output folder.
        temp_dir: The run's temporary folder (removed by the commit).
        run_id: The run's id.
        run_date: An incremental run's partition date, or ``None`` (a run that replaces).
        manifest_name: ``dataset.json`` or ``run.json``.
        fingerprint: What the ledger records an incremental run's inputs as processed with.
    """

    output: str
    temp_dir: str
    run_id: str
    run_date: str | None
    manifest_name: str
    fingerprint: str


@dataclasses.dataclass
class RunFiles:
    """What a command's commit moves and writes.

    Attributes:
        moves: ``(temporary, final)`` paths of the run's files.
        manifest: The run's manifest (``figures`` gets the wall-time figures).
        before_moving: Called just before the files move (a replacing run deletes what an
            earlier run left), or ``None``.
    """

    moves: list[tuple[str, str]]
    manifest: dict
    before_moving: Callable[[], None] | None = None


class Gather(Protocol):
    """A command's files from the run's totals and its own side inputs (runs once, on a worker),
    and where they land."""

    def target(self) -> RunTarget: ...

    def __call__(self, run_totals: dict, **side_inputs: Any) -> RunFiles: ...


class _CommitOutputsFn(beam.DoFn):
    def __init__(self, gather: Gather, target: RunTarget):
        self._gather = gather
        self._target = target

    def process(self, _, run_totals: dict, items=(), tallies=(), **side_inputs):
        files = self._gather(run_totals, **side_inputs)
        t = self._target
        yield commit_run(
            files.moves,
            files.manifest,
            output=t.output,
            temp_dir=t.temp_dir,
            manifest_name=t.manifest_name,
            run_id=t.run_id,
            run_date=t.run_date,
            fingerprint=t.fingerprint,
            items=items,
            tallies=tallies,
            before_moving=files.before_moving,
        )


class CommitOutputs(beam.PTransform[beam.pvalue.PBegin, beam.PCollection[str]]):
    """Applied to the pipeline root: once every side input is complete, ``gather`` makes the run's
    files of them and :func:`commit_run` puts them in place. Returns a PCollection with the path
    of the manifest.

    Args:
        gather: What the command's files are and where they land (:class:`Gather`).
        tallied: The run's totals (:class:`totals.RunTotals`): ``gather`` gets ``totals`` as
            ``run_totals``; an incremental run's ledger gets the per-recording tallies.
        items: PCollection of the run's :class:`SourceItem` (needed by incremental runs, for
            their ledger).
        side_inputs: ``gather``'s own side inputs by keyword (``beam.pvalue.AsList(...)`` etc.).
    """

    def __init__(
        self,
        gather: Gather,
        *,
        tallied: Tallied,
        items: beam.PCollection[SourceItem] | None = None,
        side_inputs: dict[str, beam.pvalue.AsSideInput],
    ):
        super().__init__()
        target = gather.target()
        if target.run_date is not None and items is None:
            raise ValueError("an incremental commit needs the run's items (for its ledger)")
        self._gather, self._target, self._tallied = gather, target, tallied
        self._items, self._side_inputs = items, dict(side_inputs)

    def expand(self, root: beam.pvalue.PBegin):
        sides = {**self._side_inputs, "run_totals": beam.pvalue.AsSingleton(self._tallied.totals)}
        if self._target.run_date is not None:
            sides["items"] = beam.pvalue.AsList(self._items)
            sides["tallies"] = beam.pvalue.AsList(self._tallied.tallies)
        return (
            root
            | "CommitTrigger" >> beam.Create([None])
            | "Commit" >> beam.ParDo(_CommitOutputsFn(self._gather, self._target), **sides)
        )
