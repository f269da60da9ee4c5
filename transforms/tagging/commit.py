"""The files of a tag run (a :class:`commit.Gather` for :class:`commit.CommitOutputs`): its tables
numbered per table, label files, plots, the snippet index, the hourly and level tables combined
over the run, dead letters (of inputs and of outputs), and ``run.json``'s content. A replacing run
owns its output folders: what an earlier run left there goes.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import posixpath

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from soundshard.schemas.levels import LevelConfig
from soundshard.transforms.levels import level_tables
from soundshard.transforms.outputs import shards, tables
from soundshard.transforms.outputs.commit import RunFiles, RunTarget
from soundshard.transforms.tagging import classify as tagging
from soundshard.transforms.tagging import snippets as snip


@dataclasses.dataclass(frozen=True)
class TagOutputSettings:
    """What a tag run's commit needs to know of the run (resolved on the launcher).

    Attributes:
        output: The output folder.
        temp_dir: The run's temporary folder.
        run_id: The run's id.
        run_date: An incremental run's partition date, or ``None``.
        partition: Sub-folder of this run's files in each table folder (``""`` unless incremental).
        formats: Table formats, the first one counted.
        manifest: ``run.json`` fields known at launch.
        fingerprint: What the ledger records the inputs as processed with.
        owned: Output folders a replacing run owns (files in them it did not write are removed).
        levels: The LevelConfig, or ``None``.
        plots: The run draws plots.
        snippets: The run cuts snippets.
    """

    output: str
    temp_dir: str
    run_id: str
    run_date: str | None
    partition: str
    formats: tuple[str, ...]
    manifest: dict
    fingerprint: str
    owned: tuple[str, ...]
    levels: LevelConfig | None = None
    plots: bool = False
    snippets: bool = False


class TagFiles:
    """A tag run's files and ``run.json`` from the run's totals and its side inputs."""

    def __init__(self, settings: TagOutputSettings):
        self._settings = settings

    def target(self) -> RunTarget:
        """Where the run's files land; ``run.json``, last, marks a complete run."""
        s = self._settings
        return RunTarget(
            output=s.output,
            temp_dir=s.temp_dir,
            run_id=s.run_id,
            run_date=s.run_date,
            manifest_name="run.json",
            fingerprint=s.fingerprint,
        )

    def __call__(
        self,
        run_totals: dict,
        *,
        moves,
        dead_letters,
        hourly,
        output_dead_letters=(),
        snippet_index=(),
        level_hours=(),
        label_energy=(),
    ) -> RunFiles:
        run = self._settings
        manifest = json.loads(json.dumps(run.manifest))
        final_moves, outputs = self._table_moves(moves)
        extras = self._extra_outputs(moves, snippet_index, final_moves)
        rows = collections.Counter()
        by_label = collections.Counter()
        for move in moves:
            if move.kind in tagging.TABLES and move.relative.endswith(f".{run.formats[0]}"):
                rows[move.kind] += move.rows
                by_label.update(dict(move.labels))
        level_hours = list(level_hours)
        shares = level_tables.energy_shares(label_energy, level_hours) if run.levels is not None else None
        combined = {"hourly": tagging.hourly_table(hourly, shares=shares)}
        if run.levels is not None:
            combined["levels_hourly"] = level_tables.hourly_levels_table(level_hours)
            combined["lden"] = level_tables.lden_table(level_hours, timezone=run.levels.timezone)
        for table, content in combined.items():
            rows[table] = content.num_rows
            if content.num_rows:
                for fmt, data in tagging.table_files(content, run.formats).items():
                    relative = self._name(table, 0, fmt)
                    final_moves.append(self._temp_file(relative, data))
                    outputs[table].append(relative)
        label_files = collections.Counter(m.kind for m in moves if m.kind in tagging.LABEL_FILES)
        dead_name = shards.dead_letters_name(run_id=run.run_id, run_date=run.run_date)
        every_dead = [*dead_letters, *output_dead_letters]
        final_moves.append(
            self._temp_file(dead_name, shards.parquet_bytes(shards.dead_letter_table(every_dead)))
        )
        summary = copy.deepcopy(run_totals)  # the side input is shared: never mutate it
        figures = summary["figures"]
        figures.update(
            {
                "recordings_tagged": rows["files"],
                "windows_scored": rows["windows"],
                "events": rows["events"],
                "events_by_label": dict(sorted(by_label.items(), key=lambda kv: (-kv[1], kv[0]))),
                "hourly_rows": rows["hourly"],
                "label_files": dict(label_files),
                "audio_hours": round(figures["audio_s"] / 3600, 4),
                "plots": len(extras.get("plots", [])),
                "snippets": extras.get("snippets", {}).get("files", 0),
                "output_dead_letters": len(output_dead_letters),
                "output_dead_letters_by_stage": dict(
                    sorted(collections.Counter(d.stage for d in output_dead_letters).items())
                ),
            }
        )
        if run.levels is not None:
            figures["level_rows"] = {
                t: rows[t] for t in (*level_tables.RECORDING_TABLES, *level_tables.COMBINED_TABLES)
            }
        manifest["figures"] = figures
        manifest["counts"] = summary["counts"]
        manifest["tables"] = dict(outputs)
        manifest.update(extras)
        manifest["dead_letters_file"] = dead_name
        # a replacing run owns the output folder: what an earlier run left in its folders goes,
        # those this run does not write again included (e.g. raven/ without --raven this time)
        stale = {} if run.run_date else self._stale({dst for _, dst in final_moves})
        before_moving = None
        if stale:
            manifest["replaced"] = {folder: len(paths) for folder, paths in stale.items()}
            before_moving = functools.partial(
                FileSystems.delete, [p for paths in stale.values() for p in paths]
            )
        return RunFiles(final_moves, manifest, before_moving)

    def _extra_outputs(self, moves, snippet_index, final_moves: list[tuple[str, str]]) -> dict:
        """The plots and snippets of the run for run.json; writes the snippet index (one table,
        also when empty, so that readers find it) and adds it to ``final_moves``."""
        run = self._settings
        out = {}
        if run.plots:
            out["plots"] = sorted(m.relative for m in moves if m.kind == "plots")
        if not run.snippets:
            return out
        index = pa.concat_tables([snip.INDEX_SCHEMA.empty_table(), *snippet_index])
        index = index.sort_by([("clip_id", "ascending"), ("start_s", "ascending"), ("label", "ascending")])
        names = []
        for fmt, data in tagging.table_files(index, run.formats).items():
            if run.partition:
                relative = posixpath.join("snippets", run.partition, f"index-{run.run_id}.{fmt}")
            else:
                relative = f"snippets/index.{fmt}"
            final_moves.append(self._temp_file(relative, data))
            names.append(relative)
        labels = collections.Counter(index.column("label").to_pylist())
        out["snippets"] = {
            "index": names,
            "files": index.num_rows,
            "by_label": dict(sorted(labels.items())),
            "audio_s": round(sum(index.column("snippet_duration_s").to_pylist()), 3),
        }
        return out

    def _name(self, table: str, index: int, fmt: str) -> str:
        run = self._settings
        return tables.table_name(table, index, fmt, run_id=run.run_id, partition=run.partition)

    def _table_moves(self, moves) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
        """Final names: table files numbered per table (a part's Parquet and CSV share a number)."""
        run = self._settings
        out, outputs = [], collections.defaultdict(list)
        for move in moves:
            if move.kind not in tagging.TABLES:
                out.append((move.temp_path, shards.join(run.output, move.relative)))
        for move, relative in tables.numbered(
            moves, tables=tagging.TABLES, run_id=run.run_id, partition=run.partition
        ):
            out.append((move.temp_path, shards.join(run.output, relative)))
            outputs[move.kind].append(relative)
        return out, outputs

    def _temp_file(self, relative: str, data: bytes) -> tuple[str, str]:
        s = self._settings
        return shards.temp_file(relative, data, temp_dir=s.temp_dir, output=s.output)

    def _stale(self, finals: set[str]) -> dict[str, list[str]]:
        """Per output folder, the files an earlier run left there that this run does not write."""
        stale = {}
        for folder in self._settings.owned:
            paths = [
                p
                for p in shards.matching_paths(shards.join(self._settings.output, folder, "**"))
                if p not in finals
            ]
            if paths:
                stale[folder] = paths
        return stale
