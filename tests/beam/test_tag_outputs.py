"""`soundshard tag --plot` and `--snippets`: the maths and file writing, then the pipeline."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile

from soundshard.pipelines import tag
from soundshard.pipelines.demo import make_long_recording
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.errors import ConfigError, DataError
from soundshard.schemas.records import SourceItem
from soundshard.transforms.tagging import events as ev
from soundshard.transforms.tagging import plots
from soundshard.transforms.tagging import snippets as snip

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- spectrogram columns, score pooling, drawing ----------------------------------------------------


def windows_of(frames: np.ndarray, *, first: int, n: int, hop: int, width: int) -> np.ndarray:
    """Window features ``[n, n_mels, width]`` cut from a recording's frames ``[n_mels, n_frames]``."""
    return np.stack([frames[:, k * hop : k * hop + width] for k in range(first, first + n)])


@pytest.mark.parametrize("max_columns", [10_000, 37])
def test_unit_columns_take_every_frame_once_and_split_units_agree(max_columns):
    grid = plots.SpectrogramGrid(
        frame_s=0.01, window_frames=41, window_hop_frames=20, band_hz=tuple(range(8)), max_columns=max_columns
    )
    total = 23
    n_frames = grid.recording_frames(total)
    frames = np.random.default_rng(0).normal(size=(8, n_frames)).astype(np.float32)
    q = grid.frames_per_column(total)
    padded = np.full((8, grid.n_columns(total) * q), -np.inf, np.float32)
    padded[:, :n_frames] = frames
    expected = padded.reshape(8, -1, q).max(axis=2)  # every frame once, max over each column
    for cuts in ([0, total], [0, 7, 16, total], [0, 1, 2, 22, total]):
        parts = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            feats = windows_of(frames, first=a, n=b - a, hop=20, width=41)
            columns, values = plots.unit_columns(feats, first_window=a, total_windows=total, grid=grid)
            parts.append(plots.UnitImage("x", columns, values, q, grid.n_columns(total)))
        image = plots.assemble_image(parts, n_mels=8)
        np.testing.assert_array_equal(image, expected)
    assert (grid.n_columns(total) <= max_columns) and (max_columns > n_frames or q > 1)


def test_a_day_long_recording_is_capped_unit_by_unit():
    """A 24 h recording: each unit gives a few columns, the image at most MAX_COLUMNS."""
    grid = plots.SpectrogramGrid.from_config(FeatureConfig())
    total = int(24 * 3600 / FeatureConfig().window_hop_s)
    assert grid.n_columns(total) <= plots.MAX_COLUMNS < grid.recording_frames(total)
    feats = np.zeros((130, grid.n_mels, grid.window_frames), np.float32)  # one 60 s unit
    columns, values = plots.unit_columns(feats, first_window=90_000, total_windows=total, grid=grid)
    q = grid.frames_per_column(total)  # about 930 frames (21.6 s) per column
    assert values.shape == (grid.n_mels, len(columns)) and len(columns) <= 130 * 20 // q + 2
    assert columns.min() >= 90_000 * 20 // q


def test_pool_scores_keeps_peaks_and_troughs():
    t = np.arange(10_000) * 0.5
    s = np.full((10_000, 2), 0.1, np.float32)
    s[4321, 0] = 0.99
    s[777, 1] = 0.0
    time, high, low = plots.pool_scores(t, s, max_points=1000)
    assert len(time) == 1000 and high[:, 0].max() == pytest.approx(0.99) and low[:, 1].min() == 0.0
    same = plots.pool_scores(t[:50], s[:50], max_points=1000)
    assert same[2] is None and len(same[0]) == 50


def make_plot(**overrides) -> plots.RecordingPlot:
    names = ("chirp", "hum", "rain")
    n = 200
    start = np.arange(n) * 0.5
    scores = np.random.default_rng(1).uniform(size=(n, 3)).astype(np.float32)
    found = [ev.Event("hum", 10.0, 20.0, 0.8, 0.9, 20), ev.Event("chirp", 30.0, 31.0, 0.7, 0.7, 2)]
    values = dict(
        clip_id="site/rec",
        source_uri="gs://bucket/site/rec.flac",
        recording_start_us=1_795_000_000_000_000,
        start_s=start,
        end_s=start + 1.0,
        scores=scores,
        found=found,
        label_names=names,
        thresholds=(0.5, 0.6, 0.7),
        duration_s=100.5,
        complete=True,
        max_classes=2,
    )
    values.update(overrides)
    return plots.recording_plot(**values)


def test_plot_png_panels_and_class_choice():
    plot = make_plot()
    assert [plot.label_names[c] for c in plot.shown] == ["chirp", "hum"]  # the classes with events
    plain = png_size(plots.plot_png(plot))
    with_reference = plots.plot_png(plot.__class__(**{**plot.__dict__, "reference": ((9.0, 21.0, "hum"),)}))
    assert 1200 <= plain[0] <= 4400 and with_reference[:8] == PNG_SIGNATURE
    assert png_size(with_reference)[1] > plain[1]  # a lane more


# -- snippets: names, choice, ranges, copies ----------------------------------------------------------


def test_snippet_names_choice_and_ranges():
    assert snip.safe_label("Dog bark/../x") == "Dog_bark_.._x"
    assert snip.safe_label("...") == "unlabelled" and snip.safe_label("") == "unlabelled"
    assert snip.time_token(12.5, recording_start_us=None) == "12.500"
    assert snip.time_token(1.25, recording_start_us=1_795_000_000_000_000) == "20261118T110641.250Z"
    events = [
        ev.Event("a b", 1.0, 2.0, 0.6, 0.7, 2),
        ev.Event("a/b", 1.0, 2.0, 0.9, 0.9, 2),
        ev.Event("c", 5.0, 9.0, 0.5, 0.6, 8),
        ev.Event("c", 0.2, 0.8, 0.8, 0.8, 1),
    ]
    assert snip.snippet_names(events[:2], recording_start_us=None) == [
        "1.000_2.000_a_b.flac",
        "1.000_2.000_a_b-2.flac",
    ]
    kept = snip.select_events(events, max_per_label=1)
    assert [(e.label, e.start_s) for e in kept] == [("c", 0.2), ("a b", 1.0), ("a/b", 1.0)]
    assert len(snip.select_events(events, max_per_label=None)) == 4
    assert snip.frame_range(events[3], margin_s=0.5, sample_rate_hz=1000, n_frames=10_000) == (0, 1300)
    assert snip.frame_range(events[2], margin_s=0.5, sample_rate_hz=1000, n_frames=9_200) == (4500, 9200)
    assert snip.flac_format("PCM_16") == ("PCM_16", "int16")
    assert snip.flac_format("PCM_24") == ("PCM_24", "int32")
    assert snip.flac_format("FLOAT") == ("PCM_24", "float32")
    assert snip.flac_format("ULAW") == ("PCM_16", "int16")
    with pytest.raises(ConfigError, match="--snippet-margin-s=-1"):
        snip.SnippetOptions(margin_s=-1)
    with pytest.raises(ConfigError, match="--snippet-max-per-label=0"):
        snip.SnippetOptions(max_per_label=0)


def test_write_snippets_copies_source_frames_in_blocks(tmp_path):
    rate = 48_000
    data = np.random.default_rng(2).integers(-(2**23), 2**23, size=(rate * 3, 2), dtype=np.int32) << 8
    source = tmp_path / "rec.wav"
    soundfile.write(source, data, rate, subtype="PCM_24")
    item = SourceItem(uri=str(source), clip_id="rec")
    events = [ev.Event("x", 0.2, 1.0, 0.9, 0.9, 2), ev.Event("y", 2.5, 2.9, 0.8, 0.8, 1)]
    options = snip.SnippetOptions(margin_s=0.25, block_frames=1000)  # many blocks per snippet
    out = list(snip.write_snippets(item, events, options=options, temp_dir=str(tmp_path / "t"), folder="s"))
    assert [e is None for _, _, e in out] == [True, True]
    for event, snippet, _ in out:
        got, got_rate = soundfile.read(tmp_path / "t" / snippet.relative, dtype="int32", always_2d=True)
        start, end = snip.frame_range(event, margin_s=0.25, sample_rate_hz=rate, n_frames=len(data))
        assert got_rate == rate and got.shape == (end - start, 2)
        np.testing.assert_array_equal(got, data[start:end])
    assert out[1][1].end_s == pytest.approx(3.0)  # clipped at the recording's end
    table = snip.index_table(item, [s for _, s, _ in out])
    assert table.column("snippet_duration_s").to_pylist() == pytest.approx(
        [1.25, 0.75]
    )  # clipped at both ends
    # a source that is gone fails every event, each named
    gone = SourceItem(uri=str(tmp_path / "gone.wav"), clip_id="gone")
    failed = list(
        snip.write_snippets(gone, events, options=options, temp_dir=str(tmp_path / "t"), folder="g")
    )
    assert [s for _, s, _ in failed] == [None, None]
    error = snip.snippet_error(gone, events[1], failed[1][2])
    assert isinstance(error, DataError) and "y 2.500-2.900 s" in str(error)


def test_float_sources_become_24_bit(tmp_path):
    y = np.linspace(-1.5, 1.5, 8000, dtype=np.float32)  # beyond full scale: clipped, not wrapped
    soundfile.write(tmp_path / "f.wav", y, 8000, subtype="FLOAT")
    item = SourceItem(uri=str(tmp_path / "f.wav"), clip_id="f")
    options = snip.SnippetOptions(margin_s=0.0)
    [(_, snippet, error)] = snip.write_snippets(
        item, [ev.Event("x", 0.0, 1.0, 1, 1, 1)], options=options, temp_dir=str(tmp_path), folder="s"
    )
    assert error is None
    got, _ = soundfile.read(tmp_path / snippet.relative, dtype="float32")
    assert soundfile.info(tmp_path / snippet.relative).subtype == "PCM_24"
    np.testing.assert_allclose(got, np.clip(y, -1, 1 - 2**-23), atol=2**-22)


# -- the pipeline -----------------------------------------------------------------------------------


def run_tag(*argv) -> int:
    return tag.run([str(a) for a in argv])


def read_index(out: Path, name: str = "snippets/index.parquet") -> pd.DataFrame:
    return pd.read_parquet(out / name)


def check_snippets_match_sources(
    out: Path, events: pd.DataFrame, index: pd.DataFrame, sources: dict, margin_s
):
    """Every event has a snippet holding exactly the source's frames over the event ± margin."""
    assert len(index) == len(events) > 0
    key = ["clip_id", "label", "start_s", "end_s"]
    merged = events.merge(index, on=key, suffixes=("", "_index"), validate="one_to_one")
    assert len(merged) == len(events)
    np.testing.assert_allclose(merged["confidence_index"], merged["confidence"])
    for row in merged.itertuples():
        data, rate = sources[row.clip_id]
        start = min(max(round((row.start_s - margin_s) * rate), 0), len(data))
        end = min(round((row.end_s + margin_s) * rate), len(data))
        got, got_rate = soundfile.read(out / row.path, dtype="int16", always_2d=True)
        assert got_rate == rate
        np.testing.assert_array_equal(got, data[start:end])
        assert row.snippet_duration_s == pytest.approx((end - start) / rate)
        expected_s = min(row.end_s + margin_s, len(data) / rate) - max(row.start_s - margin_s, 0.0)
        assert row.snippet_duration_s == pytest.approx(expected_s, abs=1.0 / rate)


@pytest.mark.slow
def test_plots_and_snippets_with_reference_and_a_failing_snippet(demo_model, tmp_path):
    path, truth = make_long_recording(str(tmp_path / "in"))
    data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    # FLAC holds at most 8 channels: this recording is tagged, but its snippets fail
    nine = np.repeat(data[: 10 * rate], 9, axis=1)
    soundfile.write(tmp_path / "in" / "nine.wav", nine, rate, subtype="PCM_16")
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "20261124_005945.txt").write_text("".join(f"{a}\t{b}\t{label}\n" for label, a, b in truth))
    out = tmp_path / "tags"
    code = run_tag(
        "--input", tmp_path / "in", "--model-dir", demo_model, "--output", out, "--unit_s", 7,
        "--plot-reference", refs, "--snippets", "--snippet-margin-s", 0.75,
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "run.json").read_text())
    fig = manifest["figures"]
    assert (fig["files_processed"], fig["dead_letter_inputs"], fig["accounted_for"]) == (2, 0, True)
    assert manifest["plots"] == ["plots/20261124_005945.png", "plots/nine.png"] and fig["plots"] == 2
    assert manifest["outputs_config"]["plot"]["reference"]["recordings_matched"] == 1
    sizes = {}
    for name in manifest["plots"]:
        sizes[name] = png_size((out / name).read_bytes())
        assert 1200 <= sizes[name][0] <= 4400 and 400 <= sizes[name][1] <= 2000
    assert sizes["plots/20261124_005945.png"][1] > sizes["plots/nine.png"][1]  # the reference lane
    events = pd.read_parquet(out / "parquet" / "events")
    long_events = events[events["clip_id"] == "20261124_005945"]
    index = read_index(out)
    assert (out / "snippets" / "index.csv").is_file()
    check_snippets_match_sources(out, long_events, index, {"20261124_005945": (data, rate)}, 0.75)
    assert all(p.startswith("snippets/20261124_005945/20261124T") for p in index["path"])
    assert manifest["snippets"]["files"] == len(index) == fig["snippets"]
    # every event of the 9-channel recording is a snippets dead letter; the input is not failed
    dead = pq.read_table(out / "dead_letters.parquet").to_pandas()
    failed = dead[dead["stage"] == "snippets"]
    n_nine = int((events["clip_id"] == "nine").sum())
    assert n_nine > 0 and len(failed) == n_nine == fig["output_dead_letters"]
    assert set(failed["reason"]) == {"snippet_too_many_channels"} and set(failed["clip_id"]) == {"nine"}
    assert "9 channels" in failed["message"].iloc[0]
    assert not list(out.glob("_tmp-*"))


@pytest.mark.slow
def test_archive_member_snippets_incremental_and_max_per_label(demo_model, tmp_path):
    path, _ = make_long_recording(str(tmp_path / "rec"))
    data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    inputs = tmp_path / "in"
    inputs.mkdir()
    with zipfile.ZipFile(inputs / "night.zip", "w") as archive:
        archive.write(path, "site/20261124_005945.WAV")
    out = tmp_path / "tags"
    base = ["--input", inputs, "--model-dir", demo_model, "--output", out, "--incremental"]
    code = run_tag(*base, "--run_date", "2026-11-24", "--plot", "--snippets", "--snippet-max-per-label", 1)
    assert code == 0
    manifest = json.loads((out / "run.json").read_text())
    run_id = manifest["run"]["run_id"]
    clip = "night/site/20261124_005945"
    assert manifest["plots"] == [f"plots/run_date=2026-11-24/{clip}.png"]
    assert (out / manifest["plots"][0]).read_bytes()[:8] == PNG_SIGNATURE
    index_name = f"snippets/run_date=2026-11-24/index-{run_id}.parquet"
    assert manifest["snippets"]["index"] == [index_name, index_name.replace(".parquet", ".csv")]
    index = read_index(out, index_name)
    events = pd.read_parquet(out / "parquet" / "events")
    assert index["label"].is_unique and set(index["label"]) == set(events["label"])
    best = events.sort_values(["confidence", "start_s"], ascending=[False, True]).drop_duplicates("label")
    check_snippets_match_sources(out, best, index, {clip: (data, rate)}, 0.5)
    assert all(p.startswith(f"snippets/run_date=2026-11-24/{clip}/") for p in index["path"])
    assert index["archive_member"].unique().tolist() == ["site/20261124_005945.WAV"]


@pytest.mark.slow
def test_plot_of_a_twenty_minute_recording_is_capped(demo_model, tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from soundshard.pipelines import runner as runners

    path, _ = make_long_recording(str(tmp_path / "rec"), sample_rate_hz=8000)
    y, rate = soundfile.read(path, dtype="int16")
    long_path = tmp_path / "in" / "long.wav"
    long_path.parent.mkdir()
    soundfile.write(long_path, np.tile(y, 30), rate, subtype="PCM_16")  # 20 minutes
    args, _ = tag.make_parser().parse_known_args(
        ["--input", str(long_path), "--model-dir", str(demo_model), "--output", str(tmp_path / "t"), "--plot"]
    )
    run = tag.prepare(args)

    def capped(tagged):
        [recording] = tagged
        image = recording.plot.image
        assert image.shape[0] == 60 and 3000 < image.shape[1] <= plots.MAX_COLUMNS
        assert np.isfinite(image).all()  # every column got frames
        assert len(recording.plot.score_time_s) <= plots.MAX_COLUMNS

    with runners.make_pipeline(beam.options.pipeline_options.PipelineOptions([]), local=True) as p:
        out = tag.build(p, run)
        assert_that(out.tagged, capped)
    manifest = json.loads((tmp_path / "t" / "run.json").read_text())
    assert manifest["figures"]["audio_s"] == pytest.approx(1200.0)
    width, height = png_size((tmp_path / "t" / "plots" / "long.png").read_bytes())
    assert 4000 <= width <= 4400 and height <= 2000


def test_plot_and_snippet_flags_are_checked(demo_model, tmp_path, capsys):
    path, _ = make_long_recording(str(tmp_path / "in"))
    base = ["--input", Path(path).parent, "--model-dir", demo_model, "--output", tmp_path / "t"]
    assert run_tag(*base, "--snippet-margin-s", 1) == 2
    assert "--snippet-margin-s=1.0 needs --snippets" in capsys.readouterr().err
    assert run_tag(*base, "--snippets", "--snippet-max-per-label", 0) == 2
    assert "--snippet-max-per-label=0 must be at least 1" in capsys.readouterr().err
    assert run_tag(*base, "--plot-reference", tmp_path / "nowhere") == 2
    assert "no such file or folder" in capsys.readouterr().err
    bad = tmp_path / "20261124_005945.txt"
    bad.write_text("1.0\tnot a time\tdog\n")
    assert run_tag(*base, "--plot-reference", bad) == 2
    assert "20261124_005945.txt:1" in capsys.readouterr().err
    assert not (tmp_path / "t" / "run.json").exists()


def test_a_plot_that_fails_is_a_dead_letter_of_stage_plots(tmp_path):
    from soundshard.transforms.tagging import classify as tagging

    blocked = tmp_path / "file"
    blocked.write_text("a file where the temporary folder should be")
    fn = tagging._DrawPlotFn(plots.PlotOptions(), temp_dir=str(blocked), partition="")
    fn.setup()
    item = SourceItem(uri="x.wav", clip_id="x")
    [out] = list(fn.process(tagging.TaggedRecording(item, (), 100.5, make_plot())))
    dead = out.value
    assert out.tag == "dead_letters" and (dead.stage, dead.reason) == ("plots", "plot_error")
    assert "x.wav: plots failed" in dead.message


@pytest.mark.slow
def test_plots_and_snippets_from_and_to_gcs(gcs_env, demo_model, tmp_path):
    import io
    import uuid

    import fsspec

    fs, _ = fsspec.core.url_to_fs("gs://")
    bucket = f"tag-out-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    path, _ = make_long_recording(str(tmp_path / "rec"))
    data, rate = soundfile.read(path, dtype="int16", always_2d=True)
    fs.put(path, f"{bucket}/in/20261124_005945.WAV")
    out = f"gs://{bucket}/tags"
    code = run_tag(
        "--input", f"gs://{bucket}/in", "--model-dir", demo_model, "--output", out, "--plot", "--snippets"
    )
    assert code == 0
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{out}/run.json"))
    assert fs.cat_file(f"{out}/{manifest['plots'][0]}")[:8] == PNG_SIGNATURE
    index = pd.read_parquet(io.BytesIO(fs.cat_file(f"{out}/snippets/index.parquet")))
    assert len(index) == manifest["figures"]["events"] > 0
    row = index.iloc[0]
    got, got_rate = soundfile.read(
        io.BytesIO(fs.cat_file(f"{out}/{row['path']}")), dtype="int16", always_2d=True
    )
    start = round(row["snippet_start_s"] * rate)
    np.testing.assert_array_equal(got, data[start : start + len(got)])
    assert got_rate == rate and len(got) == round(row["snippet_duration_s"] * rate)
    assert not [p for p in fs.find(bucket) if "_tmp-" in p]
