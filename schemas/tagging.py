"""Tagging configuration: how window scores become file labels and events (frozen, validated)."""

from __future__ import annotations

import dataclasses
import math

from soundshard.schemas.config import ConfigSerialization
from soundshard.schemas.errors import ConfigError

AGGREGATIONS = ("mean", "max", "majority")
#: Most time columns of a recording's picture (``--plot``: spectrogram and score curves).
PLOT_MAX_COLUMNS = 4000
#: Most classes whose score curves a picture draws (those with events first, then the highest).
PLOT_MAX_CLASSES = 6
#: Seconds of audio kept before and after each event's snippet by default (``--snippets``).
SNIPPET_MARGIN_S = 0.5


@dataclasses.dataclass(frozen=True)
class TagConfig(ConfigSerialization):
    """How a recording's window scores are turned into labels and events.

    Attributes:
        label_names: Class names, in the model's output order.
        window_thresholds: Per class, the window score at which an event starts.
        file_thresholds: Per class, the aggregated file score at which a file gets the label.
        aggregation: ``mean`` (default), ``max`` or ``majority`` over a file's windows.
        hysteresis: An event, once started, goes on while the score stays at or above the start
            threshold minus this much.
        min_duration_s: Events shorter than this are dropped (after merging).
        max_gap_s: Events of one label separated by at most this much are merged into one.
        min_level_db: Windows whose loudest log-mel value is below this (dB) cannot start or
            continue an event (an activity gate against background noise); ``None`` for no gate.
        min_level_above_floor_db: Windows less than this many dB above the recording's background
            level (its floor: the 10th percentile of its sounding windows' loudest log-mel values,
            as L90 is of a sound level) cannot start or continue an event; ``None`` for no gate.
            Recordings of fewer than ``FLOOR_MIN_WINDOWS`` sounding windows have no floor (a clip
            may be one sound throughout) and are not gated.
        top_k: Classes per window in the window table: ``0`` writes every class's score.
        median_filter_windows: Each class's scores are smoothed over this many consecutive windows
            (a running median, as the DCASE baselines do) before events are found; ``1`` is off.
            Odd.
        onset_rise_db: Each event's start moves to where the sound rises: within
            ``ONSET_SEARCH_BEFORE_S`` before and ``ONSET_SEARCH_AFTER_S`` after the start its
            windows give, the frame where the recording's broadband level climbs most within
            ``ONSET_RISE_SPAN_S``, if it climbs by at least this many dB (else the start stays);
            ``None``: starts stay on the window grid. Needs the windows' frame levels (log-mel or
            MFCC models).
    """

    _WHAT = "tag"

    label_names: tuple[str, ...]
    window_thresholds: tuple[float, ...]
    file_thresholds: tuple[float, ...]
    aggregation: str = "mean"
    hysteresis: float = 0.1
    min_duration_s: float = 0.0
    max_gap_s: float = 0.5
    min_level_db: float | None = None
    min_level_above_floor_db: float | None = 6.0
    top_k: int = 0
    median_filter_windows: int = 1
    onset_rise_db: float | None = 6.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "window_thresholds", tuple(float(t) for t in self.window_thresholds))
        object.__setattr__(self, "file_thresholds", tuple(float(t) for t in self.file_thresholds))
        n = len(self.label_names)
        if n < 1:
            raise ConfigError("label_names is empty: the model has no classes")
        for name in ("window_thresholds", "file_thresholds"):
            values = getattr(self, name)
            if len(values) != n:
                raise ConfigError(f"{name} has {len(values)} values for {n} classes")
            bad = [
                (label, t) for label, t in zip(self.label_names, values, strict=True) if not 0.0 < t <= 1.0
            ]
            if bad:
                raise ConfigError(f"{name}: {bad[0][0]}={bad[0][1]} must be in (0, 1]")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={self.aggregation!r} is not one of {AGGREGATIONS}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ConfigError(f"hysteresis={self.hysteresis} must be in [0, 1)")
        for name in ("min_duration_s", "max_gap_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value} must be a finite number >= 0")
        if self.min_level_db is not None and not math.isfinite(self.min_level_db):
            raise ConfigError(f"min_level_db={self.min_level_db} must be finite")
        floor = self.min_level_above_floor_db
        if floor is not None and not (math.isfinite(floor) and floor >= 0):
            raise ConfigError(f"min_level_above_floor_db={floor} must be a finite number >= 0 (or off)")
        rise = self.onset_rise_db
        if rise is not None and not (math.isfinite(rise) and rise > 0):
            raise ConfigError(f"onset_rise_db={rise} must be a positive number (or off)")
        if not 0 <= self.top_k <= n:
            raise ConfigError(f"top_k={self.top_k} must be between 0 (all classes) and {n}")
        if self.median_filter_windows < 1 or self.median_filter_windows % 2 == 0:
            raise ConfigError(
                f"median_filter_windows={self.median_filter_windows} must be an odd number (1: off)"
            )

    def to_dict(self) -> dict:
        """Plain dict (lists for the tuples)."""
        values = dataclasses.asdict(self)
        for name in ("label_names", "window_thresholds", "file_thresholds"):
            values[name] = list(values[name])
        return values


def parse_thresholds(text: str, label_names: tuple[str, ...]) -> dict[str, float]:
    """``'dog=0.6,rain=0.4'`` → ``{'dog': 0.6, 'rain': 0.4}`` (labels checked against the model).

    Raises:
        ConfigError: naming a malformed entry or an unknown label.
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--thresholds entry {part!r} is not LABEL=VALUE")
        if label not in label_names:
            raise ConfigError(
                f"--thresholds: unknown label {label!r}; the model's labels are {list(label_names)}"
            )
        try:
            out[label] = float(value)
        except ValueError as exc:
            raise ConfigError(f"--thresholds: {part!r} has no number after '='") from exc
    return out


#: The event rules a model folder may carry (``model.json`` → ``postprocessing``, chosen with its
#: training) and ``soundshard tag``'s flags override.
EVENT_RULES = (
    "hysteresis",
    "min_duration_s",
    "max_gap_s",
    "median_filter_windows",
    "min_level_above_floor_db",
    "onset_rise_db",
)
#: Where an event's start is looked for (``onset_rise_db``): this long before the start its
#: windows give (a window scores high once enough of a sound is in it, so the sound may have begun
#: up to a window earlier) and after it (a window that starts on the background scores high if its
#: end holds the sound); chosen on annotated validation recordings (docs/benchmarks.md).
ONSET_SEARCH_BEFORE_S = 1.0
ONSET_SEARCH_AFTER_S = 0.7
#: A rise is the level of a frame over the lowest level of the frames this long before it.
ONSET_RISE_SPAN_S = 0.3
#: The start is the last of those frames within this many dB of the lowest: where the climb
#: begins, not wherever a flat background happens to dip lowest.
ONSET_BASE_DB = 1.0
#: Frame levels are smoothed over this many frames (a running mean) before rises are measured.
ONSET_SMOOTH_FRAMES = 3
#: A recording's floor (``min_level_above_floor_db``) is its windows' level at this percentile.
FLOOR_PERCENTILE = 10.0
#: Recordings with fewer sounding windows than this (about 30 s at the default hop) have no floor.
FLOOR_MIN_WINDOWS = 64
#: Their values when neither the model nor a flag gives one (TagConfig's defaults).
RULE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TagConfig) if f.name in EVENT_RULES}
