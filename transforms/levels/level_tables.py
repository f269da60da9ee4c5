"""Levels tables: per second, per interval, per hour, Lden per day; and levels of events.

Work units give :class:`UnitLevels` (100 ms block energies, ``transforms/levels/meter.py``);
:class:`RecordingLevels` gathers each recording's units, and the functions here turn a
recording's blocks into table rows:

- ``levels_second``: one row per second: LAeq, LCeq, LZeq, LAFmax, LAFmin.
- ``levels_interval``: one row per interval (``LevelConfig.interval_s``, aligned to the
  recording start): the same plus LA10/LA50/LA90 (from 100 ms LAeq), SEL (``lae``) and, with
  bands, ``lzeq_<nominal Hz>`` per band.
- ``levels_hourly`` (recordings with a known start): per site and UTC hour, the energies of every
  recording combined (never decibels averaged), with L10/L50/L90 from a 0.1 dB histogram of the
  hour's 100 ms levels, so parts from any number of recordings and workers combine exactly.
- ``lden``: per site and day (from 07:00 local time), Lday, Levening, Lnight and Lden.

Every row says what its decibels are: ``level_unit`` is ``dBFS`` for uncalibrated recordings and
``dB SPL`` for those with a calibration offset (``level_offset_db``).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import zoneinfo
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa

from soundshard.schemas.levels import UNIT_DBFS, UNIT_SPL, LevelConfig, check_offset_db
from soundshard.schemas.records import LevelBlocks, SourceItem, UnitLevels
from soundshard.transforms.levels import meter as levels
from soundshard.transforms.outputs.tables import TableRows, source_columns, utc_column

#: Formats of the levels tables.
FORMATS = ("parquet", "csv")
#: Manifest column of a recording's calibration offset (dB SPL of 0 dBFS).
OFFSET_COLUMN = "level_offset_db"
#: Tables written per recording, and those the commit writes from combined parts.
RECORDING_TABLES = ("levels_second", "levels_interval")
COMBINED_TABLES = ("levels_hourly", "lden")
_HOUR_US = 3_600_000_000
_HISTOGRAM_DB = 0.1


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How a recording's decibels are referenced.

    Attributes:
        offset_db: Added to dBFS levels (0 when uncalibrated).
        unit: ``dBFS`` or ``dB SPL``.
        source: Where the offset came from: ``manifest``, ``site``, ``config`` or ``none``.
    """

    offset_db: float
    unit: str
    source: str


def manifest_offset_db(item: SourceItem) -> float | None:
    """The recording's manifest ``level_offset_db``, or ``None`` when it has none.

    Raises:
        ConfigError: the value is not a number of dB in [-50, 250] (naming the recording).
    """
    text = dict(item.extra).get(OFFSET_COLUMN, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    name = f"manifest column of {item.public_uri}: {OFFSET_COLUMN}"
    return check_offset_db(value, name=name, text=repr(text))


def calibration(item: SourceItem, config: LevelConfig) -> Calibration:
    """The recording's calibration: its manifest's ``level_offset_db``, else its site's (or
    site/deployment's) entry in ``config.site_offsets_db``, else ``config.offset_db``, else none.
    (Manifest values are checked on the launcher by :func:`check_offsets`.)
    """
    offset = manifest_offset_db(item)
    if offset is not None:
        return Calibration(offset, UNIT_SPL, "manifest")
    sites = dict(config.site_offsets_db)
    for key in (f"{item.site}/{item.deployment}", f"{item.site}"):
        if key in sites and item.site is not None:
            return Calibration(sites[key], UNIT_SPL, "site")
    if config.offset_db is not None:
        return Calibration(config.offset_db, UNIT_SPL, "config")
    return Calibration(0.0, UNIT_DBFS, "none")


def check_offsets(items: Iterable[SourceItem]) -> None:
    """Raises ConfigError naming the first recording whose manifest ``level_offset_db`` is not a
    number of dB (checked on the launcher: a run must not measure half its files in dBFS)."""
    for item in items:
        manifest_offset_db(item)


def _level_columns(item: SourceItem, spans: dict) -> dict:
    n = len(spans["start_s"])
    columns = source_columns(item, n)
    columns["start_s"] = pa.array(spans["start_s"], pa.float64())
    columns["duration_s"] = pa.array(spans["duration_s"], pa.float64())
    columns["start_utc"] = utc_column(item.recording_start_us, spans["start_s"])
    return columns


def _finish(columns: dict, cal: Calibration, n: int) -> pa.Table:
    columns["level_unit"] = pa.array([cal.unit] * n, pa.string())
    columns["level_offset_db"] = pa.array([cal.offset_db if cal.unit == UNIT_SPL else None] * n, pa.float32())
    return pa.table(columns)


def second_table(item: SourceItem, blocks: LevelBlocks, *, sample_rate_hz: int, cal: Calibration) -> pa.Table:
    """Rows of ``levels_second`` for a recording's blocks."""
    spans = levels.span_levels(
        blocks, span_s=1.0, sample_rate_hz=sample_rate_hz, offset_db=cal.offset_db, statistics=False
    )
    columns = _level_columns(item, spans)
    for name in ("laeq", "lceq", "lzeq", "lafmax", "lafmin"):
        columns[name] = pa.array(spans[name], pa.float32())
    return _finish(columns, cal, len(spans["start_s"]))


def interval_table(
    item: SourceItem, blocks: LevelBlocks, *, sample_rate_hz: int, cal: Calibration, config: LevelConfig
) -> pa.Table:
    """Rows of ``levels_interval`` for a recording's blocks."""
    spans = levels.span_levels(
        blocks, span_s=config.interval_s, sample_rate_hz=sample_rate_hz, offset_db=cal.offset_db
    )
    columns = _level_columns(item, spans)
    for name in ("laeq", "lceq", "lzeq", "lafmax", "lafmin", "la10", "la50", "la90", "lae"):
        columns[name] = pa.array(spans[name], pa.float32())
    if "band_lzeq" in spans:
        for j, centre in enumerate(levels.band_centres_hz(config.bands, sample_rate_hz)):
            columns[f"lzeq_{levels.nominal_hz(centre)}hz"] = pa.array(spans["band_lzeq"][:, j], pa.float32())
    return _finish(columns, cal, len(spans["start_s"]))


# -- hours ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HourSums:
    """What one recording (or many, combined) holds of one site's hour; energies calibrated.

    Attributes:
        exposure_a: A-weighted exposure, (reference units)^2 s: ``sum_sq * 10^(offset/10) / rate``.
        exposure_c: C-weighted exposure.
        seconds: Audio seconds.
        fast_max: Largest F-weighted A mean square (calibrated).
        histogram: ``(0.1 dB bin, blocks)`` pairs of the 100 ms LAeq values, sorted.
    """

    exposure_a: float
    exposure_c: float
    seconds: float
    fast_max: float
    histogram: tuple[tuple[int, int], ...]


def combine_hours(parts: Iterable[HourSums]) -> HourSums:
    """Sum of exposures, seconds and histograms; the largest maximum."""
    a = c = s = 0.0
    fast = 0.0
    histogram: collections.Counter = collections.Counter()
    for p in parts:
        a, c, s, fast = a + p.exposure_a, c + p.exposure_c, s + p.seconds, max(fast, p.fast_max)
        histogram.update(dict(p.histogram))
    return HourSums(a, c, s, fast, tuple(sorted(histogram.items())))


def _hour_of_blocks(item: SourceItem, blocks: LevelBlocks) -> np.ndarray:
    start = item.recording_start_us + np.round(
        np.arange(blocks.first_block, blocks.first_block + blocks.n_blocks) * levels.BLOCK_S * 1e6
    ).astype(np.int64)
    return start // _HOUR_US * _HOUR_US


def hour_parts(
    item: SourceItem, blocks: LevelBlocks, *, sample_rate_hz: int, cal: Calibration
) -> list[tuple[tuple, HourSums]]:
    """``((site, hour_us, level_unit), HourSums)`` of each UTC hour a recording touches (none
    when its start time is unknown)."""
    if item.recording_start_us is None or blocks.n_blocks == 0:
        return []
    hours = _hour_of_blocks(item, blocks)
    gain = 10 ** (cal.offset_db / 10)
    block_db = levels.db(blocks.sum_sq[:, 0] / np.maximum(blocks.n_samples, 1)) + cal.offset_db
    bins = np.round(block_db / _HISTOGRAM_DB).astype(np.int64)
    out = []
    for hour in np.unique(hours):
        sel = hours == hour
        values, counts = np.unique(bins[sel], return_counts=True)
        sums = HourSums(
            exposure_a=float(blocks.sum_sq[sel, 0].sum()) * gain / sample_rate_hz,
            exposure_c=float(blocks.sum_sq[sel, 1].sum()) * gain / sample_rate_hz,
            seconds=float(blocks.n_samples[sel].sum()) / sample_rate_hz,
            fast_max=float(blocks.fast_max[sel].max()) * gain,
            histogram=tuple(zip(values.tolist(), counts.tolist(), strict=True)),
        )
        out.append(((item.site, int(hour), cal.unit), sums))
    return out


def label_energy_parts(
    item: SourceItem,
    blocks: LevelBlocks,
    events: Sequence,
    *,
    sample_rate_hz: int,
    cal: Calibration,
) -> list[tuple[tuple, float]]:
    """``((site, hour_us, level_unit, label), exposure_a)``: per UTC hour and label, the
    A-weighted exposure inside the union of that label's events (``events``: objects with
    ``label``, ``start_s``, ``end_s``)."""
    if item.recording_start_us is None or blocks.n_blocks == 0 or not events:
        return []
    hours = _hour_of_blocks(item, blocks)
    gain = 10 ** (cal.offset_db / 10) / sample_rate_hz
    by_label = collections.defaultdict(list)
    for e in events:
        by_label[e.label].append((e.start_s, e.end_s))
    out = []
    for hour in np.unique(hours):
        sel = np.flatnonzero(hours == hour)
        part = LevelBlocks(
            blocks.first_block + int(sel[0]),
            blocks.sum_sq[sel[0] : sel[-1] + 1],
            blocks.n_samples[sel[0] : sel[-1] + 1],
            blocks.fast_max[sel[0] : sel[-1] + 1],
            blocks.fast_min[sel[0] : sel[-1] + 1],
        )
        for label, spans in sorted(by_label.items()):
            energy = levels.energy_inside(part, spans)
            if energy > 0:
                out.append(((item.site, int(hour), cal.unit, label), energy * gain))
    return out


def _db(value: float) -> float:
    return float(levels.db(value))


def _percentiles(histogram: Sequence[tuple[int, int]]) -> tuple[float, float, float]:
    """L10, L50, L90 of a histogram of 0.1 dB bins."""
    values = np.array([b for b, _ in histogram], np.float64) * _HISTOGRAM_DB
    counts = np.array([n for _, n in histogram], np.float64)
    cumulative = np.cumsum(counts) / counts.sum()
    return tuple(float(values[np.searchsorted(cumulative, q)]) for q in (0.9, 0.5, 0.1))


def hourly_levels_table(keyed: Iterable[tuple[tuple, HourSums]]) -> pa.Table:
    """``levels_hourly`` from combined ``((site, hour_us, level_unit), HourSums)`` pairs."""
    rows = sorted(keyed, key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2]))
    columns = collections.defaultdict(list)
    for (site, hour, unit), sums in rows:
        l10, l50, l90 = _percentiles(sums.histogram)
        seconds = max(sums.seconds, 1e-9)
        columns["site"].append(site)
        columns["hour_utc"].append(hour)
        columns["level_unit"].append(unit)
        columns["seconds"].append(sums.seconds)
        columns["laeq"].append(_db(sums.exposure_a / seconds))
        columns["lceq"].append(_db(sums.exposure_c / seconds))
        columns["lafmax"].append(_db(sums.fast_max))
        columns["la10"].append(l10)
        columns["la50"].append(l50)
        columns["la90"].append(l90)
        columns["lae"].append(_db(sums.exposure_a))
    types = {"site": pa.string(), "hour_utc": pa.timestamp("us", tz="UTC"), "level_unit": pa.string()}
    types["seconds"] = pa.float64()
    return pa.table(
        {
            name: pa.array(columns.get(name, []), types.get(name, pa.float32()))
            for name in ("site", "hour_utc", "level_unit", "seconds", "laeq", "lceq", "lafmax")
            + ("la10", "la50", "la90", "lae")
        }
    )


def energy_shares(
    label_parts: Iterable[tuple[tuple, float]], hours: Iterable[tuple[tuple, HourSums]]
) -> dict[tuple, float]:
    """``(site, hour_us, label)`` → share of the hour's A-weighted energy inside that label's
    events (summed over level units, each share taken against its own unit's hour)."""
    totals = {key: sums.exposure_a for key, sums in hours}
    shares: dict[tuple, float] = collections.defaultdict(float)
    for (site, hour, unit, label), exposure in label_parts:
        total = totals.get((site, hour, unit), 0.0)
        if total > 0:
            shares[(site, hour, label)] += min(1.0, exposure / total)
    return dict(shares)


# -- days: Lden ------------------------------------------------------------------------------------

#: Periods of the day (EU Directive 2002/49/EC), by local hour: day 07-19, evening 19-23, night 23-07.
_PERIOD = {h: "day" if 7 <= h < 19 else "evening" if 19 <= h < 23 else "night" for h in range(24)}


def lden_table(keyed: Iterable[tuple[tuple, HourSums]], *, timezone: str) -> pa.Table:
    """``lden``: per site, level unit and day (07:00 local to 07:00 the next day), the energy
    means of the day, evening and night hours recorded, their hours, and Lden when all three
    periods have audio. UTC hours are put in the period of their local start time."""
    zone = zoneinfo.ZoneInfo(timezone)
    energy: dict[tuple, dict[str, list[float]]] = collections.defaultdict(
        lambda: {p: [0.0, 0.0] for p in ("day", "evening", "night")}
    )
    for (site, hour_us, unit), sums in keyed:
        local = datetime.datetime.fromtimestamp(hour_us / 1e6, tz=datetime.UTC).astimezone(zone)
        day = (local - datetime.timedelta(hours=7)).date()
        period = energy[(site, day, unit)][_PERIOD[local.hour]]
        period[0] += sums.exposure_a
        period[1] += sums.seconds
    columns = collections.defaultdict(list)
    for (site, day, unit), periods in sorted(
        energy.items(), key=lambda kv: (kv[0][0] or "", kv[0][1], kv[0][2])
    ):
        values = {p: (_db(e / s) if s > 0 else None) for p, (e, s) in periods.items()}
        columns["site"].append(site)
        columns["date"].append(day)
        columns["level_unit"].append(unit)
        for p in ("day", "evening", "night"):
            columns[f"l{p}"].append(values[p])
            columns[f"{p}_hours"].append(periods[p][1] / 3600)
        columns["lden"].append(levels.lden(values["day"], values["evening"], values["night"]))
    names = ("site", "date", "level_unit", "lday", "levening", "lnight", "lden")
    names += ("day_hours", "evening_hours", "night_hours")
    types = {"site": pa.string(), "date": pa.date32(), "level_unit": pa.string()}
    return pa.table(
        {
            n: pa.array(
                columns.get(n, []), types.get(n, pa.float64() if n.endswith("_hours") else pa.float32())
            )
            for n in names
        }
    )


# -- Beam -----------------------------------------------------------------------------------------


def recording_blocks(parts: Iterable[UnitLevels]) -> tuple[SourceItem, int, LevelBlocks] | None:
    """``(item, sample_rate_hz, blocks)`` of a recording from its units' levels."""
    parts = list(parts)
    if not parts:
        return None
    return parts[0].source, parts[0].sample_rate_hz, levels.merge_blocks(p.blocks for p in parts)


def recording_rows(
    item: SourceItem, blocks: LevelBlocks, *, sample_rate_hz: int, cal: Calibration, config: LevelConfig
) -> list[TableRows]:
    """A recording's rows of ``levels_second`` and ``levels_interval``."""
    return [
        TableRows("levels_second", second_table(item, blocks, sample_rate_hz=sample_rate_hz, cal=cal)),
        TableRows(
            "levels_interval",
            interval_table(item, blocks, sample_rate_hz=sample_rate_hz, cal=cal, config=config),
        ),
    ]


class _RecordingLevelsFn(beam.DoFn):
    """A recording's units' levels → its ``levels_second`` and ``levels_interval`` rows, and
    its hourly parts (output ``hours``)."""

    def __init__(self, config: LevelConfig):
        self._config = config

    def process(self, keyed):
        _, parts = keyed
        merged = recording_blocks(parts)
        if merged is None:
            return
        item, rate, blocks = merged
        cal = calibration(item, self._config)
        yield from recording_rows(item, blocks, sample_rate_hz=rate, cal=cal, config=self._config)
        for part in hour_parts(item, blocks, sample_rate_hz=rate, cal=cal):
            yield beam.pvalue.TaggedOutput("hours", part)


class RecordingLevelTables(NamedTuple):
    """The outputs of :class:`RecordingLevels`.

    Attributes:
        rows: Per-recording level rows (TableRows of every level table).
        hours: ``((site, hour_us, level_unit), HourSums)``, combined over the run's recordings.
    """

    rows: beam.PCollection[TableRows]
    hours: beam.PCollection[tuple[tuple, HourSums]]


class RecordingLevels(beam.PTransform[beam.PCollection[UnitLevels], RecordingLevelTables]):
    """UnitLevels → per-recording level rows and combined hours (:class:`RecordingLevelTables`),
    for the features run.

    Args:
        config: What the levels stage reports.
    """

    def __init__(self, config: LevelConfig):
        super().__init__()
        self._config = config

    def expand(self, unit_levels: beam.PCollection[UnitLevels]):
        out = (
            unit_levels
            | "KeyLevels" >> beam.Map(lambda u: (u.source.clip_id, u))
            | "LevelsByRecording" >> beam.GroupByKey()
            | "LevelRows"
            >> beam.ParDo(_RecordingLevelsFn(self._config))
            .with_output_types(TableRows)
            .with_outputs("hours", main="rows")
        )
        hours = out.hours | "CombineHours" >> beam.CombinePerKey(combine_hours)
        return RecordingLevelTables(rows=out.rows, hours=hours)


def summary_line(rows: dict, levels: dict) -> str:
    """The run summary's line on levels: rows written and how the decibels are referenced."""
    config = levels.get("config") or {}
    calibrated = config.get("offset_db") is not None or config.get("site_offsets_db")
    return (
        f"levels           {rows.get('levels_second', 0)} seconds, {rows.get('levels_hourly', 0)} hours, "
        f"{rows.get('lden', 0)} days (Lden)  "
        + (
            "dB SPL where a calibration applies, else dBFS (column level_unit)"
            if calibrated
            else "dBFS, or dB SPL where the manifest gives level_offset_db (column level_unit)"
        )
    )


def summary(config: LevelConfig, *, sample_rate_hz: int | None) -> dict:
    """What run manifests record of the levels stage."""
    return {
        "config": config.to_dict(),
        "measured_at_hz": sample_rate_hz,
        "top_hz": None if sample_rate_hz is None else round(levels.passband_hz(sample_rate_hz)),
        "weighting": "IEC 61672-1 A, C, Z; F time weighting 125 ms; L10/L50/L90 from 100 ms LAeq",
        "reference": "dBFS: 10 log10 of the mean square re digital full scale (a full-scale sine reads "
        "-3.01 dBFS); dB SPL where a calibration offset applies (level_unit, level_offset_db)",
    }
