"""Recording start times and sites from file names, manifest values and path patterns (no Beam).

Recorders name their files after the start of the recording: AudioMoth ``20261124_013000.WAV``
(UTC unless configured otherwise), Song Meter ``SMA01234_20261124_013000.wav`` (the recorder's
local time). A start time makes absolute UTC times of every window possible; a site (and
deployment) taken from the path lets nightly outputs and summaries be split by sensor.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import posixpath
import re
import zoneinfo

from soundshard.schemas.config import RecordingConfig
from soundshard.schemas.records import SourceItem

#: ``YYYYMMDD_HHMMSS`` at the end of a file stem, alone (AudioMoth) or after a prefix and ``_``
#: (Song Meter and most recorders that follow it).
_RECORDER_STEM = re.compile(r"(?:^|_)(?P<date>\d{8})_(?P<time>\d{6})$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@functools.lru_cache(maxsize=8)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


@functools.lru_cache(maxsize=8)
def _site_regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def epoch_us(moment: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


def start_from_filename(path: str, *, timezone: str = "UTC") -> dt.datetime | None:
    """Start time encoded in a recorder file name, as an aware datetime; ``None`` if none.

    Args:
        path: File path or URL (only the last component is looked at; an archive member's
            chained URL ``tar://dir/name.wav::...`` is understood).
        timezone: Zone of the (offset-less) time in the name.
    """
    name = path.split("::", 1)[0].rstrip("/")
    stem = posixpath.splitext(posixpath.basename(name))[0]
    match = _RECORDER_STEM.search(stem)
    if not match:
        return None
    try:
        naive = dt.datetime.strptime(match["date"] + match["time"], "%Y%m%d%H%M%S")
    except ValueError:  # 20261399_250000: digits in the right place, but no date
        return None
    return naive.replace(tzinfo=_zone(timezone))


def parse_start_time(text: str, *, timezone: str = "UTC") -> dt.datetime:
    """An ISO 8601 date-time (``2026-11-24T01:30:00Z``, ``2026-11-24 02:30:00+01:00``, or without
    an offset, then in ``timezone``) as an aware datetime.

    Raises:
        ValueError: naming the text when it is no ISO 8601 date-time.
    """
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 date-time (e.g. 2026-11-24T01:30:00Z)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_zone(timezone))
    return moment


def site_from_uri(uri: str, pattern: str | None) -> tuple[str | None, str | None]:
    """``(site, deployment)`` from the named groups of ``pattern`` searched in ``uri``."""
    if not pattern:
        return None, None
    match = _site_regex(pattern).search(uri)
    if not match:
        return None, None
    groups = match.groupdict()
    return groups.get("site") or None, groups.get("deployment") or None


def annotate(item: SourceItem, config: RecordingConfig, *, start_time: str | None = None) -> SourceItem:
    """``item`` with its recording start (UTC microseconds), site and deployment filled in.

    Args:
        item: The source.
        config: Where times and sites come from.
        start_time: The manifest's start-time value for this item, if any (wins over the name).

    Raises:
        ValueError: ``start_time`` is given but is no ISO 8601 date-time.
    """
    if start_time:
        moment = parse_start_time(start_time, timezone=config.timezone)
    elif config.time_from_filename:
        moment = start_from_filename(item.archive_member or item.uri, timezone=config.timezone)
    else:
        moment = None
    site, deployment = site_from_uri(item.uri, config.site_pattern)
    return dataclasses.replace(
        item,
        recording_start_us=epoch_us(moment) if moment is not None else None,
        site=site,
        deployment=deployment,
    )
