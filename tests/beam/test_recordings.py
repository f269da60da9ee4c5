"""Recording start times and sites: recorder file names, manifest values, path patterns."""

import datetime as dt
import re

import pyarrow.parquet as pq
import pytest

from soundshard.pipelines import features
from soundshard.schemas.config import RecordingConfig
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.records import SourceItem
from soundshard.transforms.audio import recordings
from soundshard.transforms.io import listing

from ..helpers import tone, write_audio

UTC = dt.timezone.utc


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/data/20261124_013000.WAV", dt.datetime(2026, 11, 24, 1, 30, tzinfo=UTC)),  # AudioMoth
        ("gs://b/site=a/SMA01234_20261124_235959.wav", dt.datetime(2026, 11, 24, 23, 59, 59, tzinfo=UTC)),
        ("tar://night/20250101_000000.wav::gs://b/n.tar.gz", dt.datetime(2025, 1, 1, tzinfo=UTC)),
        ("/data/dog-20261124_013000-x.wav", None),  # digits not at the end of the stem
        ("/data/20261399_013000.wav", None),  # no such date
        ("/data/2026112_013000.wav", None),
        ("/data/1-100032-A-0.flac", None),
    ],
)
def test_start_from_recorder_file_names(path, expected):
    assert recordings.start_from_filename(path) == expected


def test_file_name_times_in_a_local_zone():
    # Song Meter names are the recorder's local time: 01:30 in Berlin in winter is 00:30 UTC.
    moment = recordings.start_from_filename("/x/SM4_20261124_013000.wav", timezone="Europe/Berlin")
    assert moment.astimezone(UTC) == dt.datetime(2026, 11, 24, 0, 30, tzinfo=UTC)
    assert recordings.epoch_us(moment) == 1795480200 * 10**6


def test_parse_start_time_offsets_and_errors():
    assert recordings.parse_start_time("2026-11-24T01:30:00Z") == dt.datetime(2026, 11, 24, 1, 30, tzinfo=UTC)
    plus_one = recordings.parse_start_time("2026-11-24 02:30:00.5+01:00")
    assert plus_one.astimezone(UTC) == dt.datetime(2026, 11, 24, 1, 30, 0, 500000, tzinfo=UTC)
    naive = recordings.parse_start_time("2026-07-01T12:00:00", timezone="America/New_York")
    assert naive.astimezone(UTC).hour == 16
    with pytest.raises(ValueError, match="'yesterday' is not an ISO 8601"):
        recordings.parse_start_time("yesterday")


def test_site_pattern():
    pattern = r"sites/(?P<site>[^/]+)/(?P<deployment>[^/]+)/"
    assert recordings.site_from_uri("gs://b/sites/north/d2/x.wav", pattern) == ("north", "d2")
    assert recordings.site_from_uri("gs://b/other/x.wav", pattern) == (None, None)
    assert recordings.site_from_uri("gs://b/sites/north/d2/x.wav", None) == (None, None)
    item = recordings.annotate(
        SourceItem("/r/sites/s1/dep/20261124_013000.wav", "x"), RecordingConfig(site_pattern=pattern)
    )
    assert (item.site, item.deployment) == ("s1", "dep")
    assert item.recording_start_us == 1795483800 * 10**6
    off = recordings.annotate(
        SourceItem("/r/20261124_013000.wav", "x"), RecordingConfig(time_from_filename=False)
    )
    assert off.recording_start_us is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timezone": "Mars/Olympus"}, "timezone='Mars/Olympus' is not an IANA time zone"),
        ({"site_pattern": "site=(?P<site>[^/]+"}, "site_pattern='site=(?P<site>[^/]+' is not a regular"),
        ({"site_pattern": "site=([^/]+)/"}, "has no named group 'site' or 'deployment'"),
    ],
)
def test_recording_config_errors_name_the_value(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RecordingConfig(**changes)


def test_manifest_start_times_and_bad_values(tmp_path):
    audio = tmp_path / "audio"
    for name in ("a.wav", "b.wav", "20261124_020000.wav"):
        write_audio(audio / name, tone(duration_s=0.2), 22050)
    manifest = tmp_path / "meta.csv"
    manifest.write_text(
        "filename,start_time,note\n"
        "a.wav,2026-11-24T01:00:00Z,x\n"
        "b.wav,last tuesday,y\n"
        "20261124_020000.wav,,z\n"
    )
    found = listing.from_manifest(str(manifest), input_uri=str(audio))
    starts = {i.clip_id: i.recording_start_us for i in found.items}
    assert starts == {"a": 1795482000 * 10**6, "20261124_020000": 1795485600 * 10**6}
    assert [(d.clip_id, d.reason) for d in found.dead_letters] == [("b", "bad_start_time")]
    assert "'last tuesday' is not an ISO 8601" in found.dead_letters[0].message
    assert found.extra_columns == ("note",)  # the start column is not copied as meta_


def test_windows_carry_absolute_times_and_sites(tmp_path):
    root = tmp_path / "in"
    write_audio(root / "sites" / "north" / "d1" / "20261124_013000.wav", tone(duration_s=2.0), 22050)
    write_audio(root / "sites" / "south" / "d7" / "clip.wav", tone(duration_s=1.0), 22050)
    out = tmp_path / "out"
    code = features.run(
        [
            "--input",
            str(root),
            "--output",
            str(out),
            "--format",
            "parquet",
            "--site_pattern",
            "sites/(?P<site>[^/]+)/(?P<deployment>[^/]+)/",
        ]
    )
    assert code == 0
    rows = pq.read_table(out / "parquet").to_pylist()
    north = sorted((r for r in rows if r["site"] == "north"), key=lambda r: r["window_index"])
    south = [r for r in rows if r["site"] == "south"]
    assert len(north) == 4 and len(south) == 2
    assert {r["deployment"] for r in north} == {"d1"} and {r["deployment"] for r in south} == {"d7"}
    start = dt.datetime(2026, 11, 24, 1, 30, tzinfo=UTC)
    for row in north:
        assert row["start_utc"] == start + dt.timedelta(microseconds=round(row["start_s"] * 1e6))
        assert row["end_utc"] == start + dt.timedelta(microseconds=round(row["end_s"] * 1e6))
    assert north[1]["start_utc"] - north[0]["start_utc"] == dt.timedelta(microseconds=464399)
    assert all(r["start_utc"] is None and r["end_utc"] is None for r in south)


def test_bad_recording_options_stop_the_run(tmp_path, capsys):
    write_audio(tmp_path / "a.wav", tone(duration_s=0.5), 22050)
    code = features.run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--timezone", "CET+1"])
    assert code == 2
    assert "timezone='CET+1'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
