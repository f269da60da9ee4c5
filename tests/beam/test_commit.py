"""The one commit every run ends in: a command's files (its Gather) moved into place after every
side input is complete, the manifest last; composites check the type of what they are given."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.typehints.decorators import TypeCheckError

from soundshard.transforms.features.compute import AssignWindowLabels
from soundshard.transforms.outputs import commit, totals

from ..unit.test_totals import DEAD, SUMMARIES


class _Gather:
    """Writes one file per side-input element, and the run's totals into the manifest."""

    def __init__(self, target: commit.RunTarget):
        self._target = target

    def target(self) -> commit.RunTarget:
        return self._target

    def __call__(self, run_totals, *, names, marker):
        moves = [
            commit.temp_file(
                f"parts/{name}.txt", name.encode(), temp_dir=self._target.temp_dir, output=self._target.output
            )
            for name in sorted(names)
        ]
        manifest = {
            "run": {"started_unix_s": 0.0},
            "figures": run_totals["figures"],
            "counts": run_totals["counts"],
            "marker": marker,
        }
        return commit.RunFiles(moves, manifest)


def test_commit_outputs_moves_what_the_gather_says_and_writes_the_manifest_last(tmp_path, beam_runner):
    output = tmp_path / "out"
    target = commit.RunTarget(
        output=str(output),
        temp_dir=str(output / "_tmp-r1"),
        run_id="r1",
        run_date=None,
        manifest_name="run.json",
        fingerprint="f",
    )
    (output / "parts").mkdir(parents=True)
    (output / "parts" / "b.txt").write_text("an earlier run's")
    with BeamTestPipeline(runner=beam_runner) as p:
        summaries = p | "S" >> beam.Create(SUMMARIES)
        dead = p | "D" >> beam.Create(DEAD)
        tallied = (summaries, dead) | totals.RunTotals(6)
        names = p | "Names" >> beam.Create(["a", "b", "c"])
        marker = p | "Marker" >> beam.Create(["m"])
        p | commit.CommitOutputs(
            _Gather(target),
            tallied=tallied,
            side_inputs={"names": beam.pvalue.AsList(names), "marker": beam.pvalue.AsSingleton(marker)},
        )
    assert sorted(f.name for f in (output / "parts").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert (output / "parts" / "b.txt").read_text() == "b"  # replaced
    manifest = json.loads((output / "run.json").read_text())
    expected = totals.summarize(SUMMARIES, DEAD, n_inputs=6)
    assert manifest["marker"] == "m" and manifest["counts"] == expected["counts"]
    assert manifest["figures"]["inputs"] == expected["figures"]["inputs"]
    assert "wall_s" in manifest["figures"]  # commit_run's own figures
    assert not (output / "_tmp-r1").exists()


def test_an_incremental_commit_without_its_items_is_refused():
    target = commit.RunTarget("o", "o/_tmp", "r", "2026-12-07", "dataset.json", "f")
    with pytest.raises(ValueError, match="needs the run's items"):
        commit.CommitOutputs(_Gather(target), tallied=None, side_inputs={})


def test_a_composite_refuses_elements_of_the_wrong_type_when_the_pipeline_is_built():
    p = BeamTestPipeline()
    strings = p | beam.Create(["not a window batch"])
    with pytest.raises(TypeCheckError, match="AssignWindowLabels"):
        strings | "AssignWindowLabels" >> AssignWindowLabels()
