"""soundshard listen: streaming features equal to the batch pipeline's, events that become final
equal to tag's, standard input as WAV or raw PCM, and the same scores and events as `tag` on the
shared longform recording."""

import csv
import glob
import io
import json
import types
import wave

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from soundshard.pipelines import listen, tag
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.tagging import TagConfig
from soundshard.transforms.features import melspec
from soundshard.transforms.tagging import events as ev
from soundshard.transforms.tagging import streaming

from ..helpers import SHARED_DATA

LONGFORM = SHARED_DATA / "longform" / "esc10_longform_10min_seed0.flac"


@pytest.mark.parametrize(
    "config",
    [
        FeatureConfig(),
        FeatureConfig(feature_type="mfcc", n_mfcc=13, mfcc_deltas=2, normalization="standardize"),
    ],
    ids=["logmel", "mfcc"],
)
def test_streamed_windows_are_the_batch_windows(config):
    rng = np.random.default_rng(4)
    audio = (rng.standard_normal(44100 * 7 + 1234) * np.linspace(0, 0.3, 44100 * 7 + 1234)).astype(np.float32)
    stream = streaming.StreamingFeatures(config, source_rate_hz=44100)
    parts, position = [], 0
    while position < len(audio):  # blocks of uneven sizes, some shorter than a frame
        size = int(rng.integers(1, 9000))
        parts.append(stream.push(audio[position : position + size]))
        position += size
    parts.append(stream.finish())
    got = np.concatenate([p.features for p in parts if len(p)])
    first = [p.first_index for p in parts if len(p)]
    assert first == sorted(first) and first[0] == 0
    resampled = soxr.resample(audio, 44100, config.sample_rate_hz, quality=config.resample_quality)
    expected = melspec.log_mel_windows(resampled.astype(np.float32), config)
    assert got.shape == expected.shape  # the padded last window too
    np.testing.assert_allclose(got, expected, atol=2e-4)
    starts = np.concatenate([p.start_s for p in parts if len(p)])
    np.testing.assert_allclose(starts, melspec.window_bounds_s(len(expected), config)[0])


def test_events_settled_online_are_the_events_of_the_whole_recording():
    rng = np.random.default_rng(2)
    n, hop = 600, 0.5
    scores = np.clip(rng.normal(0.1, 0.1, (n, 3)), 0, 1).astype(np.float32)
    for c, begin in ((0, 40), (1, 45), (2, 300), (0, 310), (1, 520)):  # sounds, some overlapping
        scores[begin : begin + int(rng.integers(3, 25)), c] = rng.uniform(0.6, 1.0)
    scores[200, 2] = 0.95  # a one-window blip that smoothing removes
    level = rng.normal(-40, 5, n)
    config = TagConfig(
        label_names=("a", "b", "c"),
        window_thresholds=(0.5, 0.5, 0.5),
        file_thresholds=(0.5, 0.5, 0.5),
        median_filter_windows=3,
        hysteresis=0.2,
        max_gap_s=1.0,
        min_level_above_floor_db=None,  # the floor of a stream is that of the windows heard so far
    )
    start = np.arange(n) * hop
    index = np.arange(n)
    # frame levels (50 frames of 20 ms a window): a bed with a rise 0.3 s into each sound, whose
    # starts move there (as far back as a cut's kept windows must reach)
    track = rng.normal(-40, 1, (n - 1) * 25 + 50)
    for begin in (40, 45, 300, 310, 520):
        track[begin * 25 + 15 : begin * 25 + 200] += 20
    frames = np.stack([track[k * 25 : k * 25 + 50] for k in range(n)])
    batch = ev.find_events(
        scores,
        start_s=start,
        end_s=start + 1.0,
        window_index=index,
        config=config,
        level_db=level,
        frame_db=frames,
    )
    grid = ev.find_events(
        scores, start_s=start, end_s=start + 1.0, window_index=index, config=config, level_db=level
    )
    assert sum(a.start_s != b.start_s for a, b in zip(batch, grid, strict=True)) >= 3
    online = streaming.StreamingEvents(config, window_hop_s=hop)
    found, k, settled_before_end = [], 0, 0
    while k < n:
        m = int(rng.integers(1, 7))
        found += online.push(
            k,
            scores[k : k + m],
            start[k : k + m],
            start[k : k + m] + 1.0,
            level[k : k + m],
            np.zeros(min(m, n - k), bool),
            frames[k : k + m],
        )
        k += m
        settled_before_end = len(found)
    found += online.finish()
    assert found == batch and len(batch) >= 5
    assert settled_before_end >= len(batch) - 1  # all but the last were final before the stream ended


def _write_wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    sink = io.BytesIO()
    with wave.open(sink, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return sink.getvalue()


def _tag_argv(source, model, out) -> list[str]:
    return [
        "--input",
        str(source),
        "--model-dir",
        str(model),
        "--output",
        str(out),
        "--runner",
        "DirectRunner",
    ]


def _scores(path) -> np.ndarray:
    with open(path) as f:
        rows = list(csv.reader(f))
    return np.array(rows[1:], dtype=np.float64)


def test_standard_input_as_raw_pcm_or_wav_gives_the_scores_of_the_file(
    demo_model, tmp_path, monkeypatch, capsys
):
    rng = np.random.default_rng(0)
    rate = 16000
    t = np.arange(rate * 12) / rate
    audio = (0.2 * np.sin(2 * np.pi * 880 * t) * (np.sin(2 * np.pi * 0.3 * t) > 0)).astype(np.float32)
    audio += (0.01 * rng.standard_normal(len(t))).astype(np.float32)
    pcm = np.round(audio * 32767).astype("<i2")  # 16-bit PCM, written and sent as these integers
    wav = tmp_path / "a.wav"
    sf.write(wav, pcm, rate, subtype="PCM_16")
    base = ["--model-dir", str(demo_model), "--quiet"]
    assert listen.run([*base, "--input", str(wav), "--window-scores", str(tmp_path / "file.csv")]) == 0
    from_file = _scores(tmp_path / "file.csv")
    for name, data, flags in (
        ("raw", pcm.tobytes(), ["--stdin-format", "s16le", "--rate", str(rate)]),
        ("wav", _write_wav_bytes(pcm, rate), []),
    ):
        monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))
        assert listen.run([*base, *flags, "--window-scores", str(tmp_path / f"{name}.csv")]) == 0
        np.testing.assert_allclose(_scores(tmp_path / f"{name}.csv"), from_file, atol=1e-6)
    assert len(from_file) == melspec.window_count(rate * 12 * 22050 // rate, FeatureConfig())
    assert "[listen] 12.0 s of audio" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(b"")))
    assert listen.run([*base, "--stdin-format", "s16le"]) == 2
    assert "--stdin-format s16le needs --rate" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(b"not a wav")))
    assert listen.run(base) == 2
    assert "standard input is not a WAV stream" in capsys.readouterr().err


@pytest.mark.skipif(not LONGFORM.is_file(), reason="needs ../shared/data/longform")
def test_listen_gives_the_window_scores_and_events_of_tag_on_the_longform(demo_model, tmp_path):
    out = tmp_path / "tags"
    argv = _tag_argv(LONGFORM, demo_model, out)
    assert tag.run(argv) == 0
    windows = pq.read_table(glob.glob(str(out / "parquet" / "windows" / "*.parquet"))).to_pandas()
    windows = windows.sort_values("window_index")
    tagged_events = pq.read_table(glob.glob(str(out / "parquet" / "events" / "*.parquet"))).to_pandas()
    scores_csv, events_csv, levels_csv = tmp_path / "scores.csv", tmp_path / "events.csv", tmp_path / "l.csv"
    argv = ["--model-dir", str(demo_model), "--input", str(LONGFORM), "--quiet", "--levels", str(levels_csv)]
    assert listen.run([*argv, "--window-scores", str(scores_csv), "--events", str(events_csv)]) == 0
    streamed = _scores(scores_csv)
    labels = ["chirp", "click_train", "hum", "noise_burst"]
    expected = np.stack([windows[f"score_{label}"].to_numpy() for label in labels], axis=1)
    assert streamed.shape == (len(windows), 3 + len(labels))
    np.testing.assert_array_equal(streamed[:, 0], windows["window_index"].to_numpy())
    np.testing.assert_allclose(streamed[:, 3:], expected, atol=1e-5)
    with open(events_csv) as f:
        listened = sorted((float(r["start_s"]), float(r["end_s"]), r["label"]) for r in csv.DictReader(f))
    batch = sorted((round(r.start_s, 3), round(r.end_s, 3), r.label) for r in tagged_events.itertuples())
    assert listened == batch and len(batch) > 10
    # the levels of every second, as tag's levels_second has them
    seconds = pq.read_table(glob.glob(str(out / "parquet" / "levels_second" / "*.parquet"))).to_pandas()
    seconds = seconds.sort_values("start_s")
    with open(levels_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(seconds) > 500 and {r["level_unit"] for r in rows} == {"dBFS"}
    for name in ("start_s", "duration_s", "laeq", "lceq", "lzeq"):
        streamed = np.array([float(r[name]) for r in rows])
        np.testing.assert_allclose(streamed, seconds[name].to_numpy(), atol=0.01, err_msg=name)
    # LAFmax/LAFmin above -80 dBFS: in digital silence (the clips' padding) they read the decaying
    # tail of the F weighting, which a second of the stream, like a work unit of tag, starts from
    # the mean square of its pre-roll's first 125 ms
    for name in ("lafmax", "lafmin"):
        streamed, batch = np.array([float(r[name]) for r in rows]), seconds[name].to_numpy()
        heard = (batch > -80) & (seconds["laeq"].to_numpy() > -80)  # a level, not a tail in silence
        assert heard.mean() > 0.8
        np.testing.assert_allclose(streamed[heard], batch[heard], atol=0.01, err_msg=name)


def test_listen_with_the_int8_artifact(demo_model, demo_features, tmp_path, capsys):
    """--int8 scores with compile-edge's artifact through LiteRT: the float model's scores to a few
    int8 steps, the same top class on nearly every window; an artifact of other features is refused."""
    from soundshard.pipelines import compile_edge

    artifact = tmp_path / "edge"
    argv = [
        "--model-dir",
        demo_model,
        "--features",
        demo_features,
        "--target",
        "cortex-m4-256k",
        "--output",
        artifact,
    ]
    assert compile_edge.run([str(a) for a in [*argv, "--max-accuracy-drop", 100, "--quiet"]]) == 0
    rate = 22050
    t = np.arange(rate * 10) / rate
    audio = (0.3 * np.sign(np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wav = tmp_path / "a.wav"
    sf.write(wav, audio, rate, subtype="FLOAT")
    base = ["--model-dir", str(demo_model), "--input", str(wav), "--quiet"]
    assert listen.run([*base, "--window-scores", str(tmp_path / "float.csv")]) == 0
    assert listen.run([*base, "--int8", str(artifact), "--window-scores", str(tmp_path / "int8.csv")]) == 0
    float_scores, int8_scores = _scores(tmp_path / "float.csv")[:, 3:], _scores(tmp_path / "int8.csv")[:, 3:]
    assert float_scores.shape == int8_scores.shape and len(float_scores) > 15
    assert np.abs(float_scores - int8_scores).max() < 0.1
    # int8 outputs: multiples of the output scale above the zero point, unlike the float model's
    out = json.loads((artifact / "manifest.json").read_text())["quantization"]
    steps = int8_scores / out["output_scale"] + out["output_zero_point"]
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert not np.allclose(float_scores / out["output_scale"], np.round(float_scores / out["output_scale"]))
    assert np.mean(float_scores.argmax(axis=1) == int8_scores.argmax(axis=1)) >= 0.9
    manifest = artifact / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["feature_fingerprint"] = "0" * 16
    manifest.write_text(json.dumps(edited))
    capsys.readouterr()
    assert listen.run([*base, "--int8", str(artifact)]) == 2
    assert "takes features 0000000000000000, the model folder" in capsys.readouterr().err


def test_tag_watch_tags_each_arriving_file_once(demo_model, tmp_path, capsys):
    """A folder receives recordings while `tag --watch` runs: each is tagged by exactly one run, and
    a restart finds nothing new."""
    import threading
    import time

    folder, out = tmp_path / "incoming", tmp_path / "tags"
    folder.mkdir()
    rate = 22050
    t = np.arange(rate * 3) / rate

    def arrive():
        for k in range(5):
            audio = (0.2 * np.sin(2 * np.pi * (300 + 200 * k) * t)).astype(np.float32)
            sf.write(folder / f".part-{k}.wav", audio, rate)
            (folder / f".part-{k}.wav").rename(folder / f"rec-{k}.wav")  # lands whole, as an upload
            time.sleep(1.5)

    writer = threading.Thread(target=arrive)
    writer.start()
    argv = _tag_argv(folder, demo_model, out)
    argv += ["--no-levels", "--format", "parquet", "--watch-interval-s", "2"]
    assert tag.run([*argv, "--watch", "--watch-for-s", "11"]) == 0
    writer.join()
    assert tag.run([*argv, "--watch", "--watch-for-s", "0"]) == 0  # what landed after the last run
    printed = capsys.readouterr().out
    assert "[tag] watched for" in printed
    windows = pq.read_table(str(out / "parquet" / "windows")).to_pandas()
    per_clip = windows.groupby("clip_id").size()
    assert sorted(per_clip.index) == [f"rec-{k}" for k in range(5)]
    expected = melspec.window_count(rate * 3, FeatureConfig())
    assert (per_clip == expected).all()  # every file once, whole
    ledger = pq.read_table(str(out / "ledger")).to_pandas()
    assert sorted(ledger["clip_id"]) == [f"rec-{k}" for k in range(5)]  # one entry per file
    assert set(ledger["status"]) == {"processed"} and (ledger["windows"] == expected).all()
    assert len(list((out / "ledger").glob("*.parquet"))) >= 2  # files arrived across several runs
    assert tag.run([*argv, "--watch", "--watch-for-s", "0"]) == 0
    assert "nothing new" in capsys.readouterr().out


def test_capture_buffer_drops_what_does_not_fit_counts_it_and_keeps_the_clock():
    """A sound card's audio thread must never wait on the model: blocks beyond the bound are
    dropped, counted and handed on as silence of their length, so later times stay right."""
    import threading

    from soundshard.transforms.tagging.streaming import CaptureBuffer

    buffer = CaptureBuffer(max_blocks=3, channels=1)
    blocks = [np.full((160, 1), k + 1, np.float32) for k in range(10)]

    def produce():  # faster than the consumer: all ten blocks before it reads one
        for block in blocks:
            buffer.put(block)
        buffer.close()

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=10)
    assert not producer.is_alive()  # put never waited
    got = list(buffer)
    assert [int(b[0, 0]) for b in got] == [1, 2, 3, 0]  # three kept, then the gap as zeros
    assert len(got[-1]) == 7 * 160 and buffer.dropped_samples == 7 * 160
    assert sum(len(b) for b in got) == 10 * 160  # the stream's length, and so its clock, is kept
    with pytest.raises(ValueError):
        CaptureBuffer(max_blocks=0, channels=1)


def test_sound_card_errors_are_clear_and_bad_samples_are_silence(demo_model, tmp_path, monkeypatch, capsys):
    base = ["--model-dir", str(demo_model), "--quiet"]
    assert listen.run([*base, "--device", "no-such-card"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and ("needs the sounddevice package" in err or "no such input" in err)
    rate = 16000
    audio = (0.1 * np.sin(2 * np.pi * 440 * np.arange(rate * 3) / rate)).astype("<f4")
    audio[rate : rate + 100] = np.nan
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(audio.tobytes())))
    levels_csv = tmp_path / "levels.csv"
    flags = ["--stdin-format", "f32le", "--rate", str(rate), "--levels", str(levels_csv)]
    assert listen.run([*base, *flags]) == 0
    assert "100 sample(s) were not finite numbers" in capsys.readouterr().err
    with open(levels_csv) as f:
        laeq = [float(r["lzeq"]) for r in csv.DictReader(f)]
    # a 0.1 full-scale sine reads -23.0 dBFS (Z); the second with 100 silent samples a little less
    assert len(laeq) == 3 and all(np.isfinite(laeq))
    assert laeq[0] == pytest.approx(-23.0, abs=0.2) and laeq[2] == pytest.approx(-23.0, abs=0.1)
