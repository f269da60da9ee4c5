"""ComputeLogMel on a TestPipeline: main output, dead letters and counters."""

import collections

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.records import SourceItem
from soundshard.transforms.features import melspec
from soundshard.transforms.features.compute import ComputeLogMel, PlanUnits

from ..helpers import tone, write_audio


def test_compute_log_mel_outputs_and_counters(tmp_path, beam_runner):
    config = FeatureConfig(last_window="drop")
    good = write_audio(tmp_path / "good.wav", tone(duration_s=2.0), 22050)
    short = write_audio(tmp_path / "short.wav", tone(duration_s=0.3), 22050)
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    items = [SourceItem(str(p), p.stem, "x", 1) for p in (good, short, text, empty)]
    expected_windows = melspec.window_count(2 * 22050, config)
    assert expected_windows == 3

    p = BeamTestPipeline(runner=beam_runner)
    planned = p | beam.Create(items) | PlanUnits(config)
    out = planned.units | ComputeLogMel(config)
    assert_that(
        planned.units
        | "Planned" >> beam.Map(lambda u: (u.source.clip_id, u.source_frames, u.n_windows, u.n_units)),
        equal_to([("good", 44100, 3, 1)]),
        label="units",
    )
    assert_that(
        out.windows | "Shape" >> beam.Map(lambda b: (b.source.clip_id, b.features.shape, b.n_windows)),
        equal_to([("good", (3, 60, 41), 3)]),
        label="windows",
    )
    assert_that(
        out.dead_letters | "Why" >> beam.Map(lambda d: (d.clip_id, d.stage, d.reason)),
        equal_to([]),
        label="dead_letters",
    )
    assert_that(
        planned.dead_letters | "PlanWhy" >> beam.Map(lambda d: (d.clip_id, d.stage, d.reason)),
        equal_to(
            [
                ("short", "plan", "audio_too_short"),
                ("text", "plan", "decode_error"),
                ("empty", "plan", "empty_file"),
            ]
        ),
        label="plan_dead_letters",
    )
    assert_that(
        out.summaries
        | "Sum" >> beam.Map(lambda s: (s.clip_id, s.n_windows, round(s.duration_s, 3), s.silent)),
        equal_to([("good", 3, 2.0, False)]),
        label="summaries",
    )
    result = p.run()
    result.wait_until_finish()
    counters = collections.Counter()  # the same counter name is reported per step: add them up
    for c in result.metrics().query(MetricsFilter().with_namespace("soundshard"))["counters"]:
        counters[c.key.metric.name] += c.committed
    assert counters["files_processed"] == 1
    assert counters["windows"] == 3
    assert counters["audio_ms"] == 2000
    assert counters["audio_too_short"] == 1
    assert counters["decode_error"] == 1
    assert counters["empty_file"] == 1
    assert counters["dead_letters"] == 3


def test_window_batch_values_equal_the_pure_function(tmp_path, beam_runner):
    config = FeatureConfig()
    path = write_audio(tmp_path / "a.flac", tone(sample_rate_hz=16000, duration_s=1.5), 16000)
    import threadpoolctl

    from soundshard.transforms.audio.decode import decode_audio

    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):  # as the DoFn computes
        expected = melspec.log_mel_windows(decode_audio(str(path), sample_rate_hz=22050).samples, config)
    with BeamTestPipeline(runner=beam_runner) as p:
        units = p | beam.Create([SourceItem(str(path), "a")]) | PlanUnits(config)
        out = units.units | ComputeLogMel(config)
        assert_that(
            out.windows | beam.Map(lambda b: bool(np.array_equal(b.features, expected))), equal_to([True])
        )
