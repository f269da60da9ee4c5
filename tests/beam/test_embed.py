"""soundshard embed: config, window grid, models, RunInference handler, TestPipeline, end to end.

The "other model" is a tiny SavedModel / TFLite export built here (log energy of parts of each
window, recomputed in numpy by ``embedding_fixtures.tiny_embedding``); OpenL3 runs on weight files
in the official layout written from randomly initialised networks, on a handful of windows.
"""

import collections
import json

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from soundshard.pipelines import embed
from soundshard.schemas import fields
from soundshard.schemas.embedding import EmbeddingConfig, EmbeddingInput, load_embedding_config
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.records import SourceItem, WorkUnit
from soundshard.transforms.audio import framing
from soundshard.transforms.audio.decode import decode_audio
from soundshard.transforms.features import embeddings
from soundshard.transforms.features.compute import PlanUnits

from .. import embedding_fixtures as fx
from ..helpers import require_esc10, tone, write_audio

TINY = {"sample_rate_hz": 16000, "window_s": 1.0, "hop_s": 0.5, "embedding_size": fx.EMBEDDING_SIZE}


# -- config ---------------------------------------------------------------------------------------


def test_openl3_defaults_and_every_variant():
    config = EmbeddingConfig()
    assert (config.input_repr, config.content_type, config.embedding_size, config.frontend) == (
        "mel256",
        "music",
        6144,
        "0.4",
    )
    assert (config.sample_rate_hz, config.window_samples, config.hop_samples, config.center) == (
        48000,
        48000,
        4800,
        True,
    )
    assert config.pad_start_samples == 24000 and config.feature_shape == (6144,)
    assert config.expected_weights_name == "openl3_audio_mel256_music.h5"
    fingerprints = set()
    for input_repr in ("linear", "mel128", "mel256"):
        for content in ("env", "music"):
            for size in (512, 6144):
                for frontend in ("0.4", "0.3"):
                    c = EmbeddingConfig(
                        input_repr=input_repr, content_type=content, embedding_size=size, frontend=frontend
                    )
                    assert EmbeddingConfig.from_json(c.to_json()) == c
                    fingerprints.add(c.fingerprint)
    assert len(fingerprints) == 24


@pytest.mark.parametrize(
    "values, message",
    [
        ({"input_repr": "mel64"}, "input_repr='mel64' must be one of"),
        ({"embedding_size": 128}, "embedding_size=128 must be one of (512, 6144) for OpenL3"),
        ({"sample_rate_hz": 16000}, "OpenL3 takes 48000 Hz"),
        ({"hop_s": 0}, "hop_s=0.0 must be positive"),
        ({"output": "x"}, "output='x' applies to saved_model/tflite only"),
        ({"model": "saved_model", "window_s": 1.0, "embedding_size": 4}, "needs sample_rate_hz"),
        ({"model": "tflite", "input_repr": "linear", **TINY}, "applies to model='openl3' only"),
        ({"model": "onnx"}, "model='onnx' must be one of"),
        ({"model_sha256": "abc"}, "must be 64 hexadecimal digits"),
        ({"embeding_size": 512}, "did you mean 'embedding_size'"),
    ],
)
def test_config_errors_name_the_value(values, message):
    with pytest.raises(ConfigError) as info:
        EmbeddingConfig.from_dict(values)
    assert message in str(info.value)


def test_fingerprint_names_the_model_content_not_its_location(tmp_path):
    digest = "ab" * 32
    a = EmbeddingConfig(model_uri="gs://a/openl3_audio_mel256_music.h5", model_sha256=digest)
    b = EmbeddingConfig(model_uri="/local/openl3_audio_mel256_music.h5", model_sha256=digest)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != a.replace(model_sha256="cd" * 32).fingerprint
    assert a.fingerprint != a.replace(hop_s=0.2).fingerprint
    path = tmp_path / "yamnet.toml"
    path.write_text(
        '[embedding]\nmodel = "saved_model"\nsample_rate_hz = 16000\nwindow_s = 0.96\n'
        "hop_s = 0.48\nembedding_size = 1024\noutput = 1\n"
    )
    config = load_embedding_config(path, model_uri="/m/yamnet")
    assert (config.window_samples, config.hop_samples, config.output, config.center) == (
        15360,
        7680,
        1,
        False,
    )
    assert config.signature == "serving_default"


def test_embedding_schema_matches_golden_and_log_mel_schema_is_unchanged():
    from pathlib import Path

    from soundshard.schemas.config import FeatureConfig

    golden = Path(__file__).parents[1] / "golden"
    config = EmbeddingConfig(content_type="env", embedding_size=512, model_sha256="0" * 64)
    schema = fields.arrow_schema(config, extra_columns=("src_file",))
    assert schema.to_string(show_schema_metadata=True) == (golden / "embedding_schema.arrow.txt").read_text()
    log_mel = fields.arrow_schema(FeatureConfig(), extra_columns=("src_file",))
    assert b"soundshard.feature_column" not in log_mel.metadata
    assert fields.feature_column_in(log_mel) == "log_mel" and fields.feature_shape_of(log_mel) == (60, 41)
    spec = fields.tf_feature_spec(config)
    assert spec["embedding"].shape == [512] and "log_mel" not in spec


# -- window grid ------------------------------------------------------------------------------------


def _openl3_frames(audio, *, window, hop, center):
    """openl3's framing (``_center_audio``, ``_pad_audio``, ``librosa.util.frame``), in numpy."""
    if center:
        audio = np.pad(audio, (window // 2, 0))
    if len(audio) < window:
        pad = window - len(audio)
    else:
        pad = int(np.ceil((len(audio) - window) / float(hop))) * hop - (len(audio) - window)
    audio = np.pad(audio, (0, max(0, pad)))
    n = 1 + (len(audio) - window) // hop
    return np.stack([audio[k * hop : k * hop + window] for k in range(n)])


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("n_samples", [1, 37, 100, 101, 149, 150, 333])
@pytest.mark.parametrize("hop", [10, 30, 120])
def test_frames_match_openl3_framing(center, n_samples, hop):
    grid = framing.FrameGrid(
        sample_rate_hz=8000, window_samples=100, hop_samples=hop, pad_start_samples=50 * center
    )
    y = np.random.default_rng(n_samples).standard_normal(n_samples).astype(np.float32)
    expected = _openl3_frames(y, window=100, hop=hop, center=center)
    assert grid.window_count(n_samples) == len(expected)
    np.testing.assert_array_equal(grid.frames(y), expected)
    # any unit range decoded from the samples it needs gives the same windows
    total = len(expected)
    for first in range(total):
        for n in (1, 2, total - first):
            if first + n > total:
                continue
            lo, hi = grid.sample_range(first, n, n_samples)
            part = grid.frames(
                y[lo:hi], first_window=first, n_windows=n, y_offset=lo, total_samples=n_samples
            )
            np.testing.assert_array_equal(part, expected[first : first + n])
    shares = [grid.share_s(k, 1, total_windows=total, total_samples=n_samples) for k in range(total)]
    assert sum(shares) == pytest.approx(n_samples / 8000)
    assert min(shares) >= 0


def test_units_of_a_long_recording_decode_to_the_unsplit_windows(tmp_path):
    config = EmbeddingConfig(model="saved_model", center=True, **TINY)
    rng = np.random.default_rng(5)
    y = (tone(sample_rate_hz=44100, duration_s=12.0) + 0.05 * rng.standard_normal(12 * 44100)).astype(
        np.float32
    )
    path = write_audio(tmp_path / "long.flac", y, 44100)
    from soundshard.transforms.features.compute import decode_unit, plan

    item = SourceItem(str(path), "long")
    whole = plan(item, config)
    split = plan(item, config, unit_s=2.0)
    assert len(whole) == 1 and len(split) == 6 and split[0].n_windows == 4  # 24 windows
    grid = framing.FrameGrid.from_config(config)

    def windows(unit):
        audio, span = decode_unit(unit, grid)
        offset = 0 if span is None else span.output_offset
        return grid.frames(
            audio.samples,
            first_window=unit.first_window,
            n_windows=unit.n_windows,
            y_offset=offset,
            total_samples=unit.output_samples,
        )

    expected = windows(whole[0])
    got = np.concatenate([windows(u) for u in split])
    assert got.shape == expected.shape == (24, 16000)
    np.testing.assert_allclose(got, expected, atol=2e-5)


# -- models -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "saved_model": fx.make_saved_model(root / "tiny", window_samples=16000),
        "waveform": fx.make_waveform_saved_model(root / "frames", frame_samples=8000),
        "tflite": fx.make_tflite(root / "tiny.tflite", window_samples=16000),
    }


def test_saved_model_and_tflite_give_the_reference_values(tiny_models):
    windows = np.random.default_rng(0).standard_normal((3, 16000)).astype(np.float32)
    expected = fx.tiny_embedding(windows)
    cases = [
        ("saved_model", tiny_models["saved_model"], "embedding"),
        ("saved_model", tiny_models["saved_model"], 0),  # outputs in sorted-name order
        ("tflite", tiny_models["tflite"], None),
    ]
    for kind, path, output in cases:
        config = EmbeddingConfig(model=kind, model_uri=str(path), output=output, **TINY)
        model = embeddings.load_embedding_model(config)
        np.testing.assert_allclose(model.embed(windows), expected, rtol=1e-5, atol=1e-5)
    # a model taking one waveform and returning frame-level outputs: called per window, averaged
    config = EmbeddingConfig(model="saved_model", model_uri=str(tiny_models["waveform"]), output=1, **TINY)
    model = embeddings.load_embedding_model(config)
    halves = np.stack([fx.tiny_embedding(w.reshape(2, 8000)).mean(axis=0) for w in windows])
    np.testing.assert_allclose(model.embed(windows), halves, rtol=1e-5, atol=1e-5)


def test_model_errors_name_the_problem(tiny_models, tmp_path):
    config = EmbeddingConfig(model="saved_model", model_uri=str(tiny_models["saved_model"]), **TINY)
    with pytest.raises(ConfigError, match=r"outputs \['embedding', 'peak'\]: choose one"):
        embeddings.load_embedding_model(config)
    with pytest.raises(ConfigError, match="output='nope' is not an output"):
        embeddings.load_embedding_model(config.replace(output="nope"))
    with pytest.raises(ConfigError, match="has SHA-256 .* not the expected"):
        embeddings.check_model(config.replace(model_sha256="0" * 64))
    with pytest.raises(ConfigError, match="saved_model model not found"):
        embeddings.check_model(config.replace(model_uri=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="needs its weight file openl3_audio_mel256_music.h5"):
        embeddings.check_model(EmbeddingConfig())
    wrong = fx.make_openl3_weights(tmp_path, input_repr="linear", content_type="env")
    with pytest.raises(ConfigError, match="another OpenL3 variant.*expected openl3_audio_mel256_env.h5"):
        embeddings.check_model(EmbeddingConfig(content_type="env", model_uri=str(wrong)))


def test_models_from_an_object_store_uri(tiny_models):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_models["saved_model"]), "/models/tiny", recursive=True)
    fs.put(str(tiny_models["tflite"]), "/models/tiny.tflite")
    windows = np.random.default_rng(1).standard_normal((2, 16000)).astype(np.float32)
    local = embeddings.model_digest(str(tiny_models["saved_model"]))
    for kind, uri, output in (
        ("saved_model", "memory://models/tiny", "embedding"),
        ("tflite", "memory://models/tiny.tflite", None),
    ):
        config = embeddings.check_model(EmbeddingConfig(model=kind, model_uri=uri, output=output, **TINY))
        if kind == "saved_model":
            assert config.model_sha256 == local  # same digest for the folder wherever it lies
        model = embeddings.load_embedding_model(config)
        np.testing.assert_allclose(model.embed(windows), fx.tiny_embedding(windows), rtol=1e-5, atol=1e-5)


class _FakeModel(embeddings.EmbeddingModel):
    """Embeds a window as [its first sample, its batch's size]; fails on a window starting with 99."""

    embedding_size = 2

    def embed(self, windows):
        if (windows[:, 0] == 99).any():
            raise RuntimeError("model failed on this batch")
        return np.stack([windows[:, 0], np.full(len(windows), len(windows))], axis=1).astype(np.float32)


def test_handler_batches_and_returns_one_result_per_window():
    config = EmbeddingConfig(model="tflite", **TINY)
    handler = embeddings.EmbeddingModelHandler(
        config, min_batch_size=2, max_batch_size=5, loader=lambda c: _FakeModel()
    )
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 5}
    assert not handler.share_model_across_processes()
    assert embeddings.EmbeddingModelHandler(config, large_model=True).share_model_across_processes()
    model = handler.load_model()
    unit = WorkUnit(SourceItem("a.wav", "a"), 16000, 16000, 16000, 3, 0, 3)
    batch = [EmbeddingInput(unit, k, np.full(16000, k, np.float32)) for k in range(3)]
    results = list(handler.run_inference(batch, model))
    assert [r.example.index for r in results] == [0, 1, 2]
    np.testing.assert_array_equal(np.stack([r.inference for r in results]), [[0, 3], [1, 3], [2, 3]])
    assert handler.get_num_bytes(batch) == 3 * 16000 * 4
    with pytest.raises(ConfigError, match="need 1 <= min <= max"):
        embeddings.EmbeddingModelHandler(config, min_batch_size=4, max_batch_size=2)


def test_compute_embeddings_outputs_dead_letters_and_counters(tmp_path, beam_runner):
    config = EmbeddingConfig(model="tflite", model_uri="unused", **TINY)
    good = write_audio(tmp_path / "good.wav", tone(sample_rate_hz=16000, duration_s=2.0), 16000)
    y = tone(sample_rate_hz=16000, duration_s=2.0)
    y[8000] = 99.0  # the window starting there makes the fake model fail: an inference dead letter
    poisoned = write_audio(tmp_path / "poisoned.wav", y, 16000, "FLOAT")
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    nan = tone(sample_rate_hz=16000, duration_s=1.0)
    nan[10] = np.nan
    bad_samples = write_audio(tmp_path / "nan.wav", nan, 16000, "FLOAT")
    items = [SourceItem(str(p), p.stem, "x", 1) for p in (good, poisoned, text, bad_samples)]
    handler = embeddings.EmbeddingModelHandler(
        config, min_batch_size=1, max_batch_size=1, loader=lambda c: _FakeModel()
    )
    p = BeamTestPipeline(runner=beam_runner)
    planned = p | beam.Create(items) | PlanUnits(config, unit_s=1.0)
    out = planned.units | embeddings.ComputeEmbeddings(config, model_handler=handler)
    assert_that(
        out.windows
        | "Rows"
        >> beam.FlatMap(
            lambda b: [
                (b.source.clip_id, i, float(b.start_s[k]))
                for k, i in enumerate(range(b.first_window_index, b.first_window_index + b.n_windows))
            ]
        ),
        equal_to([("good", k, 0.5 * k) for k in range(3)] + [("poisoned", 0, 0.0), ("poisoned", 2, 1.0)]),
        label="windows",
    )
    assert_that(
        out.dead_letters | "Why" >> beam.Map(lambda d: (d.clip_id, d.stage, d.reason)),
        equal_to([("poisoned", "embed", "inference_error"), ("nan", "decode", "non_finite_audio")]),
        label="dead_letters",
    )
    assert_that(
        planned.dead_letters | "PlanWhy" >> beam.Map(lambda d: (d.clip_id, d.stage, d.reason)),
        equal_to([("text", "plan", "decode_error")]),
        label="plan_dead_letters",
    )
    assert_that(
        out.summaries
        | "Sum" >> beam.Map(lambda s: (s.clip_id, (s.n_windows, s.duration_s)))
        | "PerClip" >> beam.CombinePerKey(lambda parts: tuple(map(sum, zip(*parts, strict=True))))
        | "Round" >> beam.MapTuple(lambda clip, total: (clip, (total[0], round(total[1], 3)))),
        equal_to([("good", (3, 2.0)), ("poisoned", (2, 1.5))]),
        label="summaries",
    )
    result = p.run()
    result.wait_until_finish()
    counters = collections.Counter()
    for c in result.metrics().query(MetricsFilter().with_namespace("soundshard"))["counters"]:
        counters[c.key.metric.name] += c.committed
    assert counters["windows"] == 5
    assert counters["files_processed"] == 2
    assert counters["inference_error"] == 1 and counters["non_finite_audio"] == 1
    assert counters["audio_ms"] == 3500


# -- the command -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_inputs")
    audio = root / "audio"
    write_audio(audio / "a.wav", tone(duration_s=3.0), 22050)
    write_audio(audio / "b.flac", tone(sample_rate_hz=44100, duration_s=2.2, channels=2), 44100)
    write_audio(audio / "quiet.flac", np.zeros(8000, np.float32), 16000)
    (audio / "text.wav").write_text("not audio")
    (audio / "zero.wav").write_bytes(b"")
    rows = [
        ("a.wav", "tone", 1),
        ("b.flac", "tone", 2),
        ("quiet.flac", "quiet", 1),
        ("text.wav", "tone", 2),
        ("zero.wav", "tone", 1),
        ("missing.wav", "tone", 2),
    ]
    manifest = root / "meta.csv"
    manifest.write_text("filename,label,fold\n" + "".join(f"{f},{lab},{fold}\n" for f, lab, fold in rows))
    (root / "tiny.toml").write_text(
        "[embedding]\n" + "".join(f"{k} = {v}\n" for k, v in TINY.items()) + 'output = "embedding"\n'
    )
    return root


def test_embed_command_writes_embedding_shards(inputs, tiny_models, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--input",
        inputs / "audio",
        "--manifest",
        inputs / "meta.csv",
        "--output",
        out,
        "--embedding-model",
        f"saved_model:{tiny_models['saved_model']}",
        "--embedding-config",
        inputs / "tiny.toml",
        "--max-batch-size",
        "4",
    ]
    assert embed.run([str(a) for a in argv]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    fig = dataset["figures"]
    assert (fig["inputs"], fig["files_processed"], fig["dead_letter_inputs"]) == (6, 3, 3)
    assert fig["accounted_for"] is True
    assert fig["windows"] == 5 + 4 + 1  # 3 s, 2.2 s and 0.5 s at hop 0.5 s, windows of 1 s
    assert fig["audio_s"] == pytest.approx(3.0 + 2.2 + 0.5)
    assert fig["digital_silence_files"] == 1
    assert dataset["feature_column"] == "embedding" and dataset["feature_shape"] == [5]
    config = EmbeddingConfig.from_dict(dataset["feature_config"])
    assert dataset["feature_fingerprint"] == config.fingerprint
    assert config.model_sha256 == embeddings.model_digest(str(tiny_models["saved_model"]))
    assert dataset["embedding"]["hop_samples"] == 8000 and dataset["label_map"] == {"quiet": 0, "tone": 1}
    dead = {
        d["source_uri"].rsplit("/", 1)[-1]: (d["stage"], d["reason"])
        for d in pq.read_table(out / "dead_letters.parquet").to_pylist()
    }
    assert dead == {
        "text.wav": ("plan", "decode_error"),
        "zero.wav": ("plan", "empty_file"),
        "missing.wav": ("source", "missing_file"),
    }
    table, values = fields.read_parquet_windows(sorted(str(p) for p in (out / "parquet").glob("*.parquet")))
    assert values.shape == (10, 5) and values.dtype == np.float32
    schema = pq.read_schema(next((out / "parquet").glob("*.parquet")))
    assert schema.metadata[b"soundshard.feature_column"] == b"embedding"
    rows = table.to_pylist()
    a_rows = [k for k, r in enumerate(rows) if r["clip_id"] == "a"]
    assert [rows[k]["start_s"] for k in a_rows] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert all(rows[k]["end_s"] - rows[k]["start_s"] == 1.0 for k in a_rows)
    # values: the model on the decoded audio's windows
    decoded = decode_audio(str(inputs / "audio" / "a.wav"), sample_rate_hz=16000).samples
    grid = framing.FrameGrid.from_config(config)
    np.testing.assert_allclose(values[a_rows], fx.tiny_embedding(grid.frames(decoded)), rtol=1e-4, atol=1e-4)
    # TFRecords parse with the project's reader, as [embedding_size]
    records = sorted(str(p) for p in (out / "tfrecord").glob("*.tfrecord"))
    first = next(iter(fields.tfrecord_dataset(records, config)))
    assert first["embedding"].shape == (5,)
    # the training code reads embedding shards as they are
    from soundshard.transforms.models import training

    loaded = training.load_windows(str(out), dataset)
    assert loaded.features.shape == (10, 5)


def test_embed_tflite_and_a_split_recording(tiny_models, tmp_path):
    rng = np.random.default_rng(2)
    y = (tone(sample_rate_hz=44100, duration_s=9.0) + 0.05 * rng.standard_normal(9 * 44100)).astype(
        np.float32
    )
    write_audio(tmp_path / "in" / "long.flac", y, 44100)
    tables = {}
    for unit_s in ("0", "2"):
        out = tmp_path / f"out{unit_s}"
        argv = [
            "--input",
            tmp_path / "in",
            "--output",
            out,
            "--embedding-model",
            f"tflite:{tiny_models['tflite']}",
            "--sample-rate-hz",
            "16000",
            "--window-s",
            "1",
            "--hop_s",
            "0.5",
            "--embedding-size",
            "5",
            "--center",
            "true",
            "--unit_s",
            unit_s,
            "--format",
            "parquet",
        ]
        assert embed.run([str(a) for a in argv]) == 0
        dataset = json.loads((out / "dataset.json").read_text())
        assert dataset["figures"]["audio_s"] == pytest.approx(9.0, abs=1e-3)
        tables[unit_s] = (
            dataset,
            fields.read_parquet_windows(str(out / "parquet" / "windows-00000-of-00001.parquet")),
        )
    assert tables["0"][0]["figures"]["work_units"] == 1
    assert tables["2"][0]["figures"]["work_units"] == 5  # 18 windows, 4 per unit
    (whole_table, whole), (split_table, split) = tables["0"][1], tables["2"][1]
    assert whole_table.column("window_index").to_pylist() == list(range(18))
    assert whole_table.column("start_s").to_pylist()[:2] == [-0.5, 0.0]  # centred windows
    assert split_table.select(["window_index", "start_s", "end_s"]).equals(
        whole_table.select(["window_index", "start_s", "end_s"])
    )
    np.testing.assert_allclose(split, whole, atol=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "needs its weight file openl3_audio_mel256_music.h5: pass --weights"),
        (
            [
                "--weights",
                "nowhere/openl3_audio_linear_env.h5",
                "--input-repr",
                "linear",
                "--content-type",
                "env",
            ],
            "weight file (expected openl3_audio_linear_env.h5) not found",
        ),
        (["--embedding-model", "onnx:x"], "--embedding-model='onnx:x' must be"),
        (["--embedding-size", "100", "--weights", "w.h5"], "embedding_size=100 must be one of (512, 6144)"),
        (["--embedding-model", "saved_model:x", "--weights", "w.h5"], "--weights is for OpenL3"),
    ],
)
def test_embed_config_errors_stop_early(inputs, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = embed.run(["--input", str(inputs / "audio"), "--output", str(out), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_incremental_embed_runs_take_on_only_new_inputs(tiny_models, tmp_path, capsys):
    write_audio(tmp_path / "in" / "a.wav", tone(sample_rate_hz=16000, duration_s=1.5), 16000)
    argv = [
        "--input",
        tmp_path / "in",
        "--output",
        tmp_path / "out",
        "--embedding-model",
        f"tflite:{tiny_models['tflite']}",
        "--sample-rate-hz",
        "16000",
        "--window-s",
        "1",
        "--embedding-size",
        "5",
        "--incremental",
        "--run_date",
        "2026-11-25",
    ]
    assert embed.run([str(a) for a in argv]) == 0
    assert embed.run([str(a) for a in argv]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert embed.run([str(a) for a in argv] + ["--hop-s", "0.25"]) == 0  # a new config: all again
    ledgers = sorted((tmp_path / "out" / "ledger").glob("*.parquet"))
    assert len(ledgers) == 2


@pytest.mark.slow
@pytest.mark.data
def test_openl3_on_esc10_clips(tmp_path):
    """soundshard embed with OpenL3 (random weights in the official layout) on three ESC-10 clips,
    values equal to the Keras network on the same windows."""
    esc10 = require_esc10()
    lines = (esc10 / "meta.csv").read_text().splitlines()
    subset = tmp_path / "meta.csv"
    subset.write_text("\n".join(lines[:4]) + "\n")
    weights = fx.make_openl3_weights(tmp_path / "weights", input_repr="mel128", content_type="env")
    out = tmp_path / "out"
    argv = [
        "--input",
        esc10 / "audio",
        "--manifest",
        subset,
        "--output",
        out,
        "--weights",
        weights,
        "--input-repr",
        "mel128",
        "--content-type",
        "env",
        "--embedding-size",
        "512",
        "--hop-s",
        "1.0",
        "--max-batch-size",
        "8",
    ]
    assert embed.run([str(a) for a in argv]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["figures"]["files_processed"] == 3 and dataset["figures"]["windows"] == 18  # 5 s: 6 each
    assert dataset["feature_config"]["input_repr"] == "mel128" and dataset["feature_shape"] == [512]
    table, values = fields.read_parquet_windows(sorted(str(p) for p in (out / "parquet").glob("*.parquet")))
    config = EmbeddingConfig.from_dict(dataset["feature_config"])
    model = embeddings.load_embedding_model(config)
    clip = table.column("clip_id")[0].as_py()
    rows = [k for k, c in enumerate(table.column("clip_id").to_pylist()) if c == clip]
    y = decode_audio(table.column("source_uri")[0].as_py(), sample_rate_hz=48000).samples
    expected = model.embed(np.ascontiguousarray(framing.FrameGrid.from_config(config).frames(y)))
    np.testing.assert_allclose(values[rows], expected, rtol=1e-4, atol=1e-4)
