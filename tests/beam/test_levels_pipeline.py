"""The levels tables of `soundshard features --levels` and `soundshard tag`, and their parts."""

from __future__ import annotations

import datetime
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from soundshard.pipelines import features, tag
from soundshard.pipelines.demo import make_long_recording
from soundshard.schemas.levels import LevelConfig
from soundshard.schemas.records import SourceItem
from soundshard.transforms.audio.decode import decode_audio
from soundshard.transforms.levels import level_tables
from soundshard.transforms.levels import meter as levels
from tests.helpers import ROOT, write_audio

RATE = 44100


def _sine(frequency_hz, amplitude, seconds, rate=RATE):
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * frequency_hz * t)


def _recording(folder: Path) -> Path:
    """50 s from 2026-11-24 23:59:40 UTC (AudioMoth name): 20 s of a 1 kHz tone at 0.1 FS, 15 s
    of 100 Hz at 0.2 FS, 15 s of quiet noise; it crosses midnight."""
    rng = np.random.default_rng(0)
    y = np.concatenate(
        [_sine(1000, 0.1, 20), _sine(100, 0.2, 15), 0.001 * rng.standard_normal(15 * RATE)]
    ).astype(np.float32)
    return write_audio(folder / "20261124_235940.WAV", y, RATE, subtype="FLOAT")


def _table(out: Path, name: str, fmt: str = "parquet") -> pd.DataFrame:
    files = sorted((out / fmt / name).rglob(f"*.{fmt}"))
    assert files, f"no {name} table under {out}"
    read = pd.read_parquet if fmt == "parquet" else pd.read_csv
    return (
        pd.concat([read(f) for f in files], ignore_index=True)
        .sort_values("start_s" if "start_s" in read(files[0]).columns else read(files[0]).columns[0])
        .reset_index(drop=True)
    )


def _features(inp: Path, out: Path, *extra) -> int:
    argv = ["--input", inp, "--output", out, "--format", "parquet", "--levels", *extra]
    return features.run([str(a) for a in argv])


def test_features_levels_are_calibrated_split_invariant_and_hourly(tmp_path):
    _recording(tmp_path / "in")
    common = ["--level-offset-db", "94", "--level-interval-s", "10", "--level-bands", "octave"]
    assert _features(tmp_path / "in", tmp_path / "split", "--unit_s", "8", *common) == 0
    assert _features(tmp_path / "in", tmp_path / "whole", "--unit_s", "0", *common) == 0
    split, whole = (_table(tmp_path / k, "levels_second") for k in ("split", "whole"))
    assert len(split) == len(whole) == 50
    for name in ("laeq", "lceq", "lzeq"):
        np.testing.assert_allclose(split[name], whole[name], atol=1e-3, err_msg=name)
    np.testing.assert_allclose(split["lafmax"], whole["lafmax"], atol=0.01)
    assert set(split["level_unit"]) == {"dB SPL"} and set(split["level_offset_db"]) == {94.0}
    # 0.1 FS sine at 1 kHz: -23.01 dBFS + 94 dB in every weighting; 100 Hz: A is 19.1 dB down
    tone = 20 * math.log10(0.1 / math.sqrt(2)) + 94
    first = split[(split.start_s >= 1) & (split.start_s <= 18)]
    for name in ("laeq", "lceq", "lzeq", "lafmax"):
        np.testing.assert_allclose(first[name], tone, atol=0.1, err_msg=name)
    low = split[(split.start_s >= 21) & (split.start_s <= 33)]
    np.testing.assert_allclose(low["lzeq"] - low["laeq"], 19.1, atol=0.2)
    assert split.start_utc.iloc[0] == pd.Timestamp("2026-11-24 23:59:40", tz="UTC")

    interval = _table(tmp_path / "split", "levels_interval")
    assert list(interval.start_s) == [0, 10, 20, 30, 40] and list(interval.duration_s) == [10.0] * 5
    np.testing.assert_allclose(interval.laeq[0], tone, atol=0.1)
    assert interval.la90[0] == pytest.approx(tone, abs=0.1) and interval.lae[0] == pytest.approx(
        tone + 10, abs=0.1
    )
    assert interval.lzeq_1000hz[0] == pytest.approx(tone, abs=0.3)
    assert interval.lzeq_1000hz[0] - interval.lzeq_250hz[0] > 30  # the tone is in its band only

    hourly = _table(tmp_path / "split", "levels_hourly")
    assert list(hourly.seconds) == [20.0, 30.0]
    assert list(hourly.hour_utc) == [
        pd.Timestamp("2026-11-24 23:00", tz="UTC"),
        pd.Timestamp("2026-11-25 00:00", tz="UTC"),
    ]
    for hour, rows in ((0, split.iloc[:20]), (1, split.iloc[20:])):
        energy = np.sum(10 ** (rows.laeq / 10) * rows.duration_s) / rows.duration_s.sum()
        assert hourly.laeq[hour] == pytest.approx(10 * np.log10(energy), abs=0.01)
    assert hourly.la90[0] == pytest.approx(tone, abs=0.1)
    lden = _table(tmp_path / "split", "lden")
    # 23:59 and 00:00 are the night of the day that began at 07:00 on the 24th
    assert len(lden) == 1 and lden.date[0] == datetime.date(2026, 11, 24) and lden.lden.isna().all()
    night = np.sum(10 ** (hourly.laeq / 10) * hourly.seconds) / hourly.seconds.sum()
    assert lden.lnight[0] == pytest.approx(10 * np.log10(night), abs=0.01)
    assert lden.night_hours[0] == pytest.approx(50 / 3600)

    manifest = json.loads((tmp_path / "split" / "dataset.json").read_text())
    assert manifest["levels"]["rows"] == {
        "levels_second": 50,
        "levels_interval": 5,
        "levels_hourly": 2,
        "lden": 1,
    }
    assert manifest["levels"]["config"]["offset_db"] == 94.0 and manifest["levels"]["measured_at_hz"] == 22050
    from soundshard.pipelines import info

    described = info.describe(str(tmp_path / "split"))["levels"]
    assert described["rows"]["levels_hourly"] == 2 and described["calibration"] == "94 dB SPL at 0 dBFS"
    assert "levels_second 50" in info.summary_text(info.describe(str(tmp_path / "split")))
    csv = _table(tmp_path / "split", "levels_second", fmt="csv")
    np.testing.assert_allclose(csv.laeq, split.laeq, atol=1e-4)

    # a later run without --levels replaces the dataset: no stale levels tables are left
    assert (
        features.run(
            ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "split"), "--format", "parquet"]
        )
        == 0
    )
    assert not list((tmp_path / "split").rglob("levels_*/*"))


def test_uncalibrated_levels_are_dbfs_and_a_manifest_offset_wins(tmp_path):
    path = _recording(tmp_path / "in")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"filename,level_offset_db\n{path.name},100.5\n")
    argv = ["--manifest", str(manifest), "--level-offset-db", "94", "--level-interval-s", "60"]
    assert _features(tmp_path / "in", tmp_path / "m", *argv) == 0
    assert set(_table(tmp_path / "m", "levels_second").level_offset_db) == {100.5}
    assert _features(tmp_path / "in", tmp_path / "raw") == 0
    raw = _table(tmp_path / "raw", "levels_second")
    assert set(raw.level_unit) == {"dBFS"} and raw.level_offset_db.isna().all()
    assert raw.laeq[5] == pytest.approx(20 * math.log10(0.1 / math.sqrt(2)), abs=0.1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--level-interval-s", "0.5"], "--level-interval-s=0.5"),
        (["--level-offset-db", "nan"], "--level-offset-db=nan"),
        (["--calibration-table", "{table}"], "needs columns 'site' and 'level_offset_db'"),
        (["--manifest", "{manifest}"], "level_offset_db='loud'"),
    ],
)
def test_level_configuration_errors_stop_the_run(tmp_path, capsys, argv, message):
    path = _recording(tmp_path / "in")
    (tmp_path / "t.csv").write_text("sensor,offset\na,1\n")
    (tmp_path / "m.csv").write_text(f"filename,level_offset_db\n{path.name},loud\n")
    argv = [a.format(table=tmp_path / "t.csv", manifest=tmp_path / "m.csv") for a in argv]
    assert _features(tmp_path / "in", tmp_path / "out", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_tag_events_carry_levels_and_hours_carry_energy_shares(demo_model, tmp_path):
    path, _ = make_long_recording(str(tmp_path / "in"))  # 40 s from 00:59:45 UTC: crosses an hour
    out = tmp_path / "tags"
    assert (
        tag.run(
            [
                "--input",
                str(tmp_path / "in"),
                "--model-dir",
                str(demo_model),
                "--output",
                str(out),
                "--unit_s",
                "10",
            ]
        )
        == 0
    )
    events = _table(out, "events")
    assert len(events) > 0 and set(events.level_unit) == {"dBFS"}
    np.testing.assert_allclose(events.lae, events.laeq + 10 * np.log10(events.duration_s), atol=1e-3)
    seconds = _table(out, "levels_second")
    assert len(seconds) == 40
    # measured on the analysis signal: the recording decoded and resampled to the model's rate
    rate = json.loads((demo_model / "model.json").read_text())["feature_config"]["sample_rate_hz"]
    x = decode_audio(path, sample_rate_hz=rate).samples.astype(np.float64)
    a2 = levels.weighted(x, weighting="A", sample_rate_hz=rate) ** 2
    per_block = rate // 10
    block_energy = a2[: len(a2) // per_block * per_block].reshape(-1, per_block).sum(axis=1)
    edges = np.arange(len(block_energy) + 1) * 0.1
    whole = levels.recording_blocks(x, sample_rate_hz=rate)
    for e in events.itertuples():
        # 100 ms blocks, those cut by the event counted pro rata
        share = np.clip(np.minimum(edges[1:], e.end_s) - np.maximum(edges[:-1], e.start_s), 0, None) / 0.1
        expected = 10 * np.log10(np.sum(block_energy * share) / (np.sum(share) * per_block))
        assert e.laeq == pytest.approx(expected, abs=0.01)
        if e.laeq > -40:  # a loud event: the blocks' even spread is close to the exact samples
            exact = 10 * np.log10(np.mean(a2[round(e.start_s * rate) : round(e.end_s * rate)]))
            assert e.laeq == pytest.approx(exact, abs=0.5)
        measured = levels.interval_levels(whole, start_s=e.start_s, end_s=e.end_s, sample_rate_hz=rate)
        np.testing.assert_allclose([e.laeq, e.lafmax, e.lae], measured, atol=0.01)  # units = whole
    hourly, level_hours = _table(out, "hourly"), _table(out, "levels_hourly")
    assert list(level_hours.seconds) == [15.0, 25.0]
    # a label's share of an hour: the energy inside its events over the hour's (00:59:45 + 15 s)
    first_hour = hourly.hour_utc.min()
    for row in hourly.itertuples():
        lo, hi = (0.0, 15.0) if row.hour_utc == first_hour else (15.0, 40.0)
        inside = np.zeros(len(block_energy))
        for e in events[events.label == row.label].itertuples():
            a, b = max(e.start_s, lo), min(e.end_s, hi)
            inside = np.maximum(
                inside, np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None) / 0.1
            )
        hour = block_energy[round(lo * 10) : round(hi * 10)].sum()
        assert row.energy_share == pytest.approx(np.sum(block_energy * inside) / hour, abs=1e-3)
    assert hourly.energy_share.max() > 0.5  # the segments are loud against their quiet gaps
    report = readme_hourly_report(out)  # the README's DuckDB query, on these tables
    assert len(report) == len(hourly) and set(report.level_unit) == {"dBFS"}
    np.testing.assert_allclose(sorted(report.share_percent), sorted(100 * hourly.energy_share), atol=0.06)
    np.testing.assert_allclose(sorted(set(report.la90)), sorted(set(level_hours.la90.round(1))), atol=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert run["figures"]["level_rows"]["levels_second"] == 40 and run["levels"]["config"]["interval_s"] == 60

    plain = tmp_path / "plain"
    argv = [
        "--input",
        str(tmp_path / "in"),
        "--model-dir",
        str(demo_model),
        "--output",
        str(plain),
        "--no-levels",
    ]
    assert tag.run(argv) == 0
    assert not (plain / "parquet" / "levels_second").exists()
    assert (
        "laeq" not in _table(plain, "events").columns
        and "energy_share" not in _table(plain, "hourly").columns
    )


def _readme_section() -> str:
    return (ROOT / "README.md").read_text().split("## Noise levels", 1)[1].split("\n## ", 1)[0]


def readme_hourly_report(out: Path) -> pd.DataFrame:
    import duckdb

    query = re.search(r"```sql\n(.*?)```", _readme_section(), re.S).group(1)
    return duckdb.sql(query.replace("out/tags/", f"{out}/")).df()


def test_the_readme_level_commands_parse():
    block = re.search(r"```\n(.*?)```", _readme_section(), re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [
        ["soundshard", "tag"],
        ["soundshard", "features"],
        ["soundshard", "calibrate"],
    ]
    for command in commands[:2]:
        parser = {"tag": tag.make_parser, "features": features.make_parser}[command[1]]()
        args, unknown = parser.parse_known_args(command[2:])
        assert not unknown and args.levels
    assert args.level_offset_db == 118.2 and args.level_bands == "third" and args.level_interval_s == 900
    from soundshard.pipelines import calibrate

    assert calibrate.make_parser().parse_args(commands[2][2:]).reference_db == 94


# -- parts of the tables ------------------------------------------------------------------------------


def _blocks(seconds: float, amplitude: float, rate: int = 16000):
    x = _sine(1000, amplitude, seconds, rate)
    return levels.recording_blocks(x, sample_rate_hz=rate)


def test_hours_of_two_recordings_combine_like_one():
    t0 = int(datetime.datetime(2026, 6, 1, 10, tzinfo=datetime.UTC).timestamp() * 1e6)
    quiet, loud = _blocks(30, 0.01), _blocks(10, 0.3)
    cal = level_tables.Calibration(0.0, "dBFS", "none")
    a = SourceItem(uri="a", clip_id="a", site="s", recording_start_us=t0)
    b = SourceItem(uri="b", clip_id="b", site="s", recording_start_us=t0 + 30_000_000)
    parts = level_tables.hour_parts(a, quiet, sample_rate_hz=16000, cal=cal)
    parts += level_tables.hour_parts(b, loud, sample_rate_hz=16000, cal=cal)
    assert {key for key, _ in parts} == {("s", t0, "dBFS")}
    combined = level_tables.combine_hours(p for _, p in parts)
    table = level_tables.hourly_levels_table([(("s", t0, "dBFS"), combined)])
    whole = levels.span_levels(
        levels.recording_blocks(
            np.concatenate([_sine(1000, 0.01, 30, 16000), _sine(1000, 0.3, 10, 16000)]), sample_rate_hz=16000
        ),
        span_s=40,
        sample_rate_hz=16000,
    )
    assert table.column("seconds")[0].as_py() == 40.0
    assert table.column("laeq")[0].as_py() == pytest.approx(whole["laeq"][0], abs=0.01)
    assert table.column("la90")[0].as_py() == pytest.approx(whole["la90"][0], abs=0.1)
    assert table.column("la10")[0].as_py() == pytest.approx(whole["la10"][0], abs=0.1)


def test_lden_periods_follow_the_local_clock():
    def hour(day, h, zone):
        local = datetime.datetime(2026, 6, day, h, tzinfo=zoneinfo_of(zone))
        return int(local.timestamp() * 1e6)

    def zoneinfo_of(name):
        import zoneinfo

        return zoneinfo.ZoneInfo(name)

    sums = level_tables.HourSums(3600 * 1e-4, 3600 * 1e-4, 3600.0, 1e-4, ((-400, 36000),))
    keyed = [(("s", hour(1, h, "Europe/Berlin"), "dBFS"), sums) for h in range(7, 24)]
    keyed += [(("s", hour(2, h, "Europe/Berlin"), "dBFS"), sums) for h in range(0, 7)]
    table = level_tables.lden_table(keyed, timezone="Europe/Berlin").to_pandas()
    assert len(table) == 1 and table.date[0] == datetime.date(2026, 6, 1)
    assert (table.day_hours[0], table.evening_hours[0], table.night_hours[0]) == (12, 4, 8)
    assert table.lday[0] == pytest.approx(-40.0, abs=1e-3)
    assert table.lden[0] == pytest.approx(levels.lden(-40.0, -40.0, -40.0), abs=1e-3)
    in_utc = level_tables.lden_table(keyed, timezone="UTC").to_pandas()
    assert len(in_utc) == 2  # the same hours cut at 07:00 UTC fall on two days


def test_calibration_precedence():
    config = LevelConfig(offset_db=90.0, site_offsets_db=(("north", 91.0), ("north/mic2", 92.0)))
    item = SourceItem(uri="x", clip_id="x", site="north", deployment="mic2")
    assert level_tables.calibration(item, config) == level_tables.Calibration(92.0, "dB SPL", "site")
    other = SourceItem(uri="x", clip_id="x", site="north", deployment="mic1")
    assert level_tables.calibration(other, config).offset_db == 91.0
    listed = SourceItem(uri="x", clip_id="x", site="north", extra=(("level_offset_db", "93.5"),))
    assert level_tables.calibration(listed, config) == level_tables.Calibration(93.5, "dB SPL", "manifest")
    assert level_tables.calibration(SourceItem(uri="x", clip_id="x"), config).source == "config"
    assert level_tables.calibration(SourceItem(uri="x", clip_id="x"), LevelConfig()).unit == "dBFS"
    assert LevelConfig.from_json(config.to_json()) == config


def test_calibrate_prints_the_offset_and_a_table_row(tmp_path, capsys):
    from soundshard.pipelines import calibrate

    rate = 48000
    quiet = 0.001 * np.random.default_rng(0).standard_normal(rate)
    tone = _sine(1000, 0.5, 5, rate)
    path = write_audio(tmp_path / "cal.wav", np.concatenate([quiet, tone, quiet]), rate, subtype="PCM_24")
    assert calibrate.run([str(path), "--reference-db", "94", "--site", "north", "--deployment", "mic2"]) == 0
    expected = 94 - 20 * math.log10(0.5 / math.sqrt(2))
    out = capsys.readouterr().out
    assert f"north,mic2,{expected:.2f}" in out.splitlines()
    assert calibrate.run([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["offset_db"] == pytest.approx(expected, abs=0.01)
    noise = write_audio(tmp_path / "noise.wav", np.tile(quiet, 5) * np.repeat([1, 9, 1, 9, 1], rate), rate)
    assert calibrate.run([str(noise)]) == 2
    assert "is the calibrator on the microphone" in capsys.readouterr().err
