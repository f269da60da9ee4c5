"""Sound-level configuration: intervals, bands and calibration (frozen, validated)."""

from __future__ import annotations

import dataclasses
import math

from soundshard.schemas.config import ConfigSerialization
from soundshard.schemas.errors import ConfigError

#: Fractional-octave band sets of the interval table: none, octaves (1/1) or thirds (1/3).
BANDS = ("none", "octave", "third")
#: How levels are labelled: uncalibrated levels are relative to digital full scale.
UNIT_DBFS = "dBFS"
UNIT_SPL = "dB SPL"


def check_offset_db(value: float, *, name: str, text: str | None = None) -> float:
    """``value`` as a calibration offset (dB SPL of 0 dBFS), or ConfigError naming ``name`` and
    the value as given (``text``, default ``value``)."""
    if not (math.isfinite(value) and -50 <= value <= 250):
        raise ConfigError(f"{name}={text or value} must be a finite number of dB in [-50, 250]")
    return value


@dataclasses.dataclass(frozen=True)
class LevelConfig(ConfigSerialization):
    """What the levels stage reports and how its decibels are referenced.

    Attributes:
        interval_s: Length of the rows of the interval table (LAeq, L10/L50/L90, SEL, bands),
            seconds; a whole number of seconds.
        bands: Band levels (LZeq per band) in the interval table: ``none``, ``octave`` (IEC 61260
            base-10 1/1-octave bands) or ``third`` (1/3-octave bands).
        offset_db: Calibration: added to every level to turn dBFS into dB SPL (the level a 94 dB
            calibrator reads in dBFS, subtracted from 94). ``None``: uncalibrated, levels are
            labelled dBFS. A recording's ``level_offset_db`` manifest column or its site's entry
            in a calibration table takes precedence.
        timezone: IANA time zone of the day/evening/night periods of Lden (07-19, 19-23, 23-07
            local time).
        site_offsets_db: Calibration per sensor: ``(key, offset_db)`` pairs, ``key`` a site or
            ``site/deployment`` (from a calibration table); a deployment's entry wins over its
            site's.
    """

    _WHAT = "level"

    interval_s: float = 60.0
    bands: str = "none"
    offset_db: float | None = None
    timezone: str = "UTC"
    site_offsets_db: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "site_offsets_db", tuple((str(k), float(v)) for k, v in self.site_offsets_db)
        )
        for key, value in self.site_offsets_db:
            check_offset_db(value, name=f"calibration of {key!r}")
        if not (
            math.isfinite(self.interval_s) and self.interval_s >= 1 and float(self.interval_s).is_integer()
        ):
            raise ConfigError(f"interval_s={self.interval_s} must be a whole number of seconds >= 1")
        if self.bands not in BANDS:
            raise ConfigError(f"bands={self.bands!r} is not one of {BANDS}")
        if self.offset_db is not None:
            check_offset_db(self.offset_db, name="offset_db")
        try:
            import zoneinfo

            zoneinfo.ZoneInfo(self.timezone)
        except Exception as exc:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError on bad names
            raise ConfigError(f"timezone={self.timezone!r} is not an IANA time zone name") from exc

    def to_dict(self) -> dict:
        """Plain dict (lists for the pairs)."""
        values = dataclasses.asdict(self)
        values["site_offsets_db"] = [list(pair) for pair in self.site_offsets_db]
        return values
