"""A run's totals and per-recording tallies, combined in a pipeline."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from soundshard.transforms.outputs import totals

from ..unit.test_totals import DEAD, LABELS, SUMMARIES


def test_run_totals_in_a_pipeline(beam_runner):
    with BeamTestPipeline(runner=beam_runner) as p:
        summaries = p | "S" >> beam.Create(SUMMARIES)
        dead = p | "D" >> beam.Create(DEAD)
        labels = p | "L" >> beam.Create(LABELS)
        out = (summaries, dead, labels) | totals.RunTotals(6)
        assert_that(
            out.totals,
            equal_to([totals.summarize(SUMMARIES, DEAD, n_inputs=6, label_counts=LABELS)]),
            label="Totals",
        )
        assert_that(
            out.tallies | beam.MapTuple(lambda clip, t: (clip, t.n_windows, t.reason)),
            equal_to(
                [
                    ("a", 10, None),
                    ("silent", 4, None),
                    ("long", 150, "features_failed"),
                    ("strong", 20, None),
                    ("a#pitch", 10, None),
                    ("broken", 0, "unreadable_audio"),
                    ("", 0, "bad_manifest_row"),
                    ("a#gain", 0, "augment_failed"),
                ]
            ),
            label="Tallies",
        )


def test_an_empty_run_has_totals(beam_runner):
    with BeamTestPipeline(runner=beam_runner) as p:
        none = p | beam.Create([])
        out = (none,) | totals.RunTotals(0)
        assert_that(out.totals, equal_to([totals.summarize([], [], n_inputs=0)]))
    empty = totals.summarize([], [], n_inputs=0)
    assert empty["figures"]["accounted_for"] is True and empty["figures"]["windows"] == 0
