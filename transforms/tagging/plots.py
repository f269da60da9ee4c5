"""Per-recording tag plots: log-mel spectrogram, class scores, thresholds, events, references.

Pure numpy and matplotlib (no Beam). The picture of a recording is built from what the tag
pipeline already has, in bounded memory whatever the recording's length:

- the spectrogram comes from the windows' own log-mel features: each window gives the frames of
  its own share of time (the middle ``window_hop_frames`` of its frames; the first window also its
  head, the last its tail), and those frames are max-pooled over time onto at most
  ``max_columns`` columns per recording (:func:`unit_columns`, per work unit, so a 24-hour
  recording is never held at full resolution; :func:`assemble_image` puts the units' columns
  together where the recording's units meet);
- the score curves are the window scores, max-pooled (with the minimum as a band) to at most
  ``max_columns`` points (:func:`pool_scores`);
- events and reference annotations are drawn as lanes of coloured spans.

:func:`plot_png` draws one :class:`RecordingPlot` with matplotlib's Agg canvas (no display, no
pyplot state, so worker threads can draw at the same time).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import math
from collections.abc import Sequence

import numpy as np

from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.tagging import PLOT_MAX_CLASSES, PLOT_MAX_COLUMNS
from soundshard.transforms.features import melspec
from soundshard.transforms.tagging import events as ev

#: Most time columns of a recording's spectrogram image (and points of its score curves).
MAX_COLUMNS = PLOT_MAX_COLUMNS
#: Most classes whose score curves are drawn (those with events first, then the highest scores).
MAX_CLASSES = PLOT_MAX_CLASSES
#: Most lanes of events or reference labels; the rest share one ``other`` lane.
MAX_LANES = 12
#: Events labelled with text on their span (more would overlap into an unreadable smear).
MAX_EVENT_TEXTS = 40


@dataclasses.dataclass(frozen=True)
class SpectrogramGrid:
    """Where a log-mel model's window features lie in time, for the spectrogram image.

    Attributes:
        frame_s: Seconds between STFT frames (``hop_length / sample_rate_hz``).
        window_frames: Frames per analysis window.
        window_hop_frames: Frames between window starts.
        band_hz: Centre frequency of each mel band, Hz (``n_mels`` values); for MFCC the row
            index of each coefficient (and delta).
        value_name: What the feature values are (colour bar label).
        max_columns: Most time columns of a recording's image.
        row_name: What the rows are (``Hz``: mel bands by centre frequency; ``coefficient``).
    """

    frame_s: float
    window_frames: int
    window_hop_frames: int
    band_hz: tuple[float, ...]
    value_name: str = "log-mel (dB)"
    max_columns: int = MAX_COLUMNS
    row_name: str = "Hz"

    def __post_init__(self) -> None:
        if self.max_columns < 1:
            raise ConfigError(f"max_columns={self.max_columns} must be at least 1")

    @classmethod
    def from_config(cls, config: FeatureConfig, *, max_columns: int = MAX_COLUMNS) -> SpectrogramGrid:
        """The grid of a feature config's windows."""
        if config.feature_type == "mfcc":
            deltas = {0: "", 1: ", then deltas", 2: ", then deltas and delta-deltas"}[config.mfcc_deltas]
            return cls(
                frame_s=config.hop_length / config.sample_rate_hz,
                window_frames=config.window_frames,
                window_hop_frames=config.window_hop_frames,
                band_hz=tuple(float(i) for i in range(config.feature_rows)),
                value_name=f"MFCC ({config.n_mfcc} coefficients{deltas})",
                max_columns=max_columns,
                row_name="coefficient",
            )
        edges = melspec.mel_band_edges_hz(config)
        if config.normalization != "none":
            value = f"log-mel ({config.normalization}, per {config.normalization_scope})"
        else:
            value = {"db": "log-mel (dB)", "log": "log-mel (ln)"}.get(config.log_compression, "mel power")
        return cls(
            frame_s=config.hop_length / config.sample_rate_hz,
            window_frames=config.window_frames,
            window_hop_frames=config.window_hop_frames,
            band_hz=tuple(float(f) for f in edges[1:-1]),
            value_name=value,
            max_columns=max_columns,
        )

    @property
    def n_mels(self) -> int:
        """Mel bands."""
        return len(self.band_hz)

    def recording_frames(self, total_windows: int) -> int:
        """Frames a recording's windows span: ``(total_windows - 1) * hop + window_frames``."""
        return (max(total_windows, 1) - 1) * self.window_hop_frames + self.window_frames

    def frames_per_column(self, total_windows: int) -> int:
        """Frames max-pooled into one image column, so the image has at most ``max_columns``."""
        return max(1, math.ceil(self.recording_frames(total_windows) / self.max_columns))

    def n_columns(self, total_windows: int) -> int:
        """Image columns of a recording of ``total_windows`` windows."""
        return math.ceil(self.recording_frames(total_windows) / self.frames_per_column(total_windows))


@dataclasses.dataclass(frozen=True)
class PlotOptions:
    """What ``tag --plot`` draws.

    Attributes:
        grid: The spectrogram grid of a log-mel model, or ``None`` (embedding models: no
            spectrogram panel).
        max_classes: Most classes whose score curves are drawn.
        references: Reference annotations per recording: ``(clip_id, ((start_s, end_s, label),
            ...))`` pairs (``--plot-reference``); a recording without a pair has no reference lane.
    """

    grid: SpectrogramGrid | None = None
    max_classes: int = MAX_CLASSES
    references: tuple[tuple[str, tuple[tuple[float, float, str], ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.max_classes < 1:
            raise ConfigError(f"max_classes={self.max_classes} must be at least 1")

    def reference_map(self) -> dict[str, tuple[tuple[float, float, str], ...]]:
        """``{clip_id: annotations}`` of the recordings that have a reference file."""
        return dict(self.references)


@dataclasses.dataclass(frozen=True, eq=False)
class UnitImage:
    """A work unit's part of its recording's spectrogram image.

    Attributes:
        clip_id: The recording.
        columns: int64 ``[k]`` image column of each value column (increasing; a unit's first and
            last column may be shared with its neighbours, which max-combine them).
        values: float32 ``[n_mels, k]`` the largest feature value of the column's frames.
        frames_per_column: Frames pooled into one column.
        n_columns: Columns of the whole recording's image.
    """

    clip_id: str
    columns: np.ndarray
    values: np.ndarray
    frames_per_column: int
    n_columns: int


def unit_columns(
    features: np.ndarray, *, first_window: int, total_windows: int, grid: SpectrogramGrid
) -> tuple[np.ndarray, np.ndarray]:
    """Image columns of one work unit's windows: each window's own frames, max-pooled over time.

    A window's own frames are the middle ``window_hop_frames`` of its frames (where it is the
    window nearest in time), plus, for the recording's first window, the frames before them and,
    for its last window, those after; so every frame of the recording is taken once.

    Args:
        features: float32 ``[n_windows, n_mels, window_frames]`` the unit's window features.
        first_window: Index of the unit's first window on the recording's grid.
        total_windows: Windows of the whole recording.
        grid: Where the windows lie.

    Returns:
        ``(columns [k], values [n_mels, k])``: image column indices and their pooled values.
    """
    n, n_mels, wf = features.shape
    if wf != grid.window_frames:
        raise ValueError(f"features of {wf} frames per window for a grid of {grid.window_frames}")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((n_mels, 0), np.float32)
    hop = grid.window_hop_frames
    width = min(hop, wf)  # hop > window: windows leave gaps, a window owns all its frames
    offset = max(0, (wf - width) // 2)
    windows = np.arange(first_window, first_window + n, dtype=np.int64)
    frame_index = [(windows[:, None] * hop + np.arange(offset, offset + width)[None, :]).ravel()]
    values = [features[:, :, offset : offset + width].transpose(1, 0, 2).reshape(n_mels, n * width)]
    if first_window == 0 and offset > 0:
        frame_index.insert(0, np.arange(offset, dtype=np.int64))
        values.insert(0, features[0, :, :offset])
    if first_window + n == total_windows and offset + width < wf:
        frame_index.append(windows[-1] * hop + np.arange(offset + width, wf))
        values.append(features[-1, :, offset + width :])
    frames = np.concatenate(frame_index)
    columns = frames // grid.frames_per_column(total_windows)
    starts = np.flatnonzero(np.concatenate([[True], columns[1:] != columns[:-1]]))
    pooled = np.maximum.reduceat(
        np.concatenate(values, axis=1).astype(np.float32, copy=False), starts, axis=1
    )
    return columns[starts], pooled


def assemble_image(parts: Sequence[UnitImage], *, n_mels: int) -> np.ndarray | None:
    """A recording's spectrogram image from its units' columns (max where units share one).

    Returns:
        float32 ``[n_mels, n_columns]`` (NaN where no unit gave values: failed units), or ``None``
        without parts.
    """
    if not parts:
        return None
    image = np.full((n_mels, parts[0].n_columns), np.nan, np.float32)
    for part in parts:
        image[:, part.columns] = np.fmax(image[:, part.columns], part.values)
    return image


def pool_scores(
    time_s: np.ndarray, scores: np.ndarray, *, max_points: int = MAX_COLUMNS
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Score curves of at most ``max_points`` points: consecutive windows max-pooled (peaks kept).

    Args:
        time_s: ``[n]`` window centres, seconds (sorted).
        scores: ``[n, n_classes]`` window scores.
        max_points: Most points per curve.

    Returns:
        ``(time_s [p], high [p, n_classes], low [p, n_classes] or None)``: the bins' mean time,
        largest and smallest score (``low`` is ``None`` when nothing was pooled).
    """
    n = len(time_s)
    if n <= max_points:
        return np.asarray(time_s, np.float64), np.asarray(scores, np.float32), None
    per_bin = math.ceil(n / max_points)
    starts = np.arange(0, n, per_bin)
    sizes = np.diff(np.append(starts, n))
    time = np.add.reduceat(np.asarray(time_s, np.float64), starts) / sizes
    high = np.maximum.reduceat(scores, starts, axis=0).astype(np.float32)
    low = np.minimum.reduceat(scores, starts, axis=0).astype(np.float32)
    return time, high, low


def shown_classes(
    scores: np.ndarray, found: Sequence[ev.Event], label_names: Sequence[str], *, max_classes: int
) -> list[int]:
    """Classes whose curves are drawn: those with events (most event time first), then the
    highest-scoring ones, at most ``max_classes``, in the model's order."""
    event_s = dict.fromkeys(label_names, 0.0)
    for e in found:
        event_s[e.label] += e.duration_s
    peak = scores.max(axis=0) if len(scores) else np.zeros(len(label_names))
    ranked = sorted(range(len(label_names)), key=lambda c: (-event_s[label_names[c]], -float(peak[c]), c))
    return sorted(ranked[:max_classes])


@dataclasses.dataclass(frozen=True, eq=False)
class RecordingPlot:
    """Everything one recording's picture shows (small: pooled to ``max_columns``).

    Attributes:
        clip_id: The recording's clip id.
        source_uri: The recording (credentials removed).
        recording_start_us: Start, microseconds since the Unix epoch (UTC), or ``None``.
        duration_s: Length of the recording, seconds.
        label_names: The model's classes.
        shown: Indices of the classes whose curves are drawn.
        thresholds: Window threshold of each class.
        score_time_s: float64 ``[p]`` time of each curve point.
        score_high: float32 ``[p, len(shown)]`` score (the largest of a pooled bin).
        score_low: float32 ``[p, len(shown)]`` smallest score of a pooled bin, or ``None``.
        events: The detected events.
        image: float32 ``[n_mels, n_columns]`` spectrogram (NaN: not computed), or ``None``
            (embedding models have no log-mel).
        image_span_s: ``(start, end)`` seconds the image's columns cover.
        band_hz: Centre frequency of each mel band (or row index, see ``row_name``).
        value_name: What the image values are.
        row_name: What the image rows are (``Hz`` or ``coefficient``).
        n_windows: Windows scored.
        complete: Every unit of the recording was scored.
        reference: Reference annotations ``(start_s, end_s, label)``, or ``None`` for none given.
    """

    clip_id: str
    source_uri: str
    recording_start_us: int | None
    duration_s: float
    label_names: tuple[str, ...]
    shown: tuple[int, ...]
    thresholds: tuple[float, ...]
    score_time_s: np.ndarray
    score_high: np.ndarray
    score_low: np.ndarray | None
    events: tuple[ev.Event, ...]
    image: np.ndarray | None = None
    image_span_s: tuple[float, float] = (0.0, 0.0)
    band_hz: tuple[float, ...] = ()
    value_name: str = ""
    n_windows: int = 0
    complete: bool = True
    reference: tuple[tuple[float, float, str], ...] | None = None
    row_name: str = "Hz"


def recording_plot(
    *,
    clip_id: str,
    source_uri: str,
    recording_start_us: int | None,
    start_s: np.ndarray,
    end_s: np.ndarray,
    scores: np.ndarray,
    found: Sequence[ev.Event],
    label_names: Sequence[str],
    thresholds: Sequence[float],
    duration_s: float,
    complete: bool,
    images: Sequence[UnitImage] = (),
    grid: SpectrogramGrid | None = None,
    max_classes: int = MAX_CLASSES,
) -> RecordingPlot:
    """Pools a recording's scores and image into a :class:`RecordingPlot`.

    Args:
        clip_id: The recording's clip id.
        source_uri: The recording, as it may be shown.
        recording_start_us: Start, microseconds since the Unix epoch (UTC), or ``None``.
        start_s: ``[n]`` window starts, seconds (sorted).
        end_s: ``[n]`` window ends.
        scores: ``[n, n_classes]`` window scores.
        found: The recording's events.
        label_names: The model's classes.
        thresholds: ``[n_classes]`` window thresholds.
        duration_s: Length of the recording, seconds.
        complete: Every unit was scored.
        images: The units' spectrogram columns (none: no spectrogram panel).
        grid: The spectrogram grid (needed with ``images``).
        max_classes: Most classes whose curves are drawn.

    Returns:
        The plot's contents.
    """
    shown = shown_classes(scores, found, label_names, max_classes=max_classes)
    max_points = grid.max_columns if grid is not None else MAX_COLUMNS
    time_s, high, low = pool_scores((start_s + end_s) / 2, scores[:, shown], max_points=max_points)
    image, span = None, (0.0, 0.0)
    if images and grid is not None:
        image = assemble_image(images, n_mels=grid.n_mels)
        width_s = images[0].frames_per_column * grid.frame_s
        # frame f is centred at f * frame_s, so column c spans [c * width - frame / 2, ...)
        span = (-grid.frame_s / 2, image.shape[1] * width_s - grid.frame_s / 2)
    return RecordingPlot(
        clip_id=clip_id,
        source_uri=source_uri,
        recording_start_us=recording_start_us,
        duration_s=float(duration_s),
        label_names=tuple(label_names),
        shown=tuple(shown),
        thresholds=tuple(float(t) for t in thresholds),
        score_time_s=time_s,
        score_high=high,
        score_low=low,
        events=tuple(found),
        image=image,
        image_span_s=span,
        band_hz=grid.band_hz if grid is not None else (),
        value_name=grid.value_name if grid is not None else "",
        n_windows=len(scores),
        complete=complete,
        row_name=grid.row_name if grid is not None else "Hz",
    )


# -- drawing --------------------------------------------------------------------------------------


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _lanes(names: Sequence[str], *, max_lanes: int) -> tuple[list[str], dict[str, int]]:
    """Lane titles and each name's lane (names past ``max_lanes - 1`` share an ``other`` lane)."""
    unique = list(dict.fromkeys(names))
    if len(unique) <= max_lanes:
        return unique, {n: i for i, n in enumerate(unique)}
    kept = unique[: max_lanes - 1]
    lane = {n: i for i, n in enumerate(kept)}
    for name in unique[max_lanes - 1 :]:
        lane[name] = max_lanes - 1
    return [*kept, f"other ({len(unique) - len(kept)})"], lane


def _time_formatter(start_us: int | None, duration_s: float):
    from matplotlib.ticker import FuncFormatter

    if start_us is None:
        return None, "seconds from the recording start"
    start = datetime.datetime.fromtimestamp(start_us / 1e6, tz=datetime.timezone.utc)
    pattern = "%H:%M:%S" if duration_s < 86_400 else "%m-%d %H:%M"

    def label(x, _pos):
        return (start + datetime.timedelta(seconds=float(x))).strftime(pattern)

    return FuncFormatter(label), f"UTC from {start:%Y-%m-%d %H:%M:%S}"


def _span_lane(axes, spans, *, titles: list[str], colours: list, texts: list[str] | None = None) -> None:
    """Draws ``[(lane, start_s, end_s), ...]`` as coloured bars, one row per lane title."""
    by_lane: dict[int, list[tuple[float, float]]] = {}
    for lane, start, end in spans:
        by_lane.setdefault(lane, []).append((start, max(end - start, 0.0)))
    for lane, bars in by_lane.items():
        axes.broken_barh(bars, (lane - 0.4, 0.8), facecolors=colours[lane % len(colours)], alpha=0.85)
    if texts is not None:
        for (lane, start, _), text in zip(spans, texts, strict=True):
            axes.text(start, lane, f" {text}", va="center", ha="left", fontsize=7, clip_on=True)
    axes.set_yticks(range(len(titles)), titles, fontsize=8)
    axes.set_ylim(len(titles) - 0.5, -0.5)
    axes.grid(axis="x", alpha=0.3)


def plot_png(plot: RecordingPlot, *, dpi: int = 100) -> bytes:
    """Draws a recording's picture as PNG bytes (matplotlib's Agg canvas; no pyplot).

    Panels, sharing the time axis (seconds, or UTC when the recording's start is known): the
    log-mel spectrogram (log-mel models), the score curves of the shown classes with their
    thresholds dashed, the detected events (one lane per label), and the reference annotations
    when given.

    Args:
        plot: What to draw.
        dpi: Resolution; the width grows with the image's columns, to about 44 inches at most.

    Returns:
        The PNG file's bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = _colours(len(plot.label_names))
    class_colour = dict(zip(plot.label_names, colours, strict=True))
    # lanes in the model's class order (references: its classes first, then others by name)
    order = {label: i for i, label in enumerate(plot.label_names)}
    by_class = sorted({e.label for e in plot.events}, key=lambda label: order.get(label, len(order)))
    event_titles, event_lane = _lanes(by_class, max_lanes=MAX_LANES)
    reference = plot.reference
    ref_titles, ref_lane = [], {}
    if reference is not None:
        ref_labels = {r[2] or "<empty>" for r in reference}
        ref_sorted = sorted(ref_labels, key=lambda label: (order.get(label, len(order)), label))
        ref_titles, ref_lane = _lanes(ref_sorted, max_lanes=MAX_LANES)
    panels = []  # (name, height in inches)
    if plot.image is not None:
        panels.append(("spectrogram", 3.0))
    panels.append(("scores", 2.2))
    panels.append(("events", 0.45 + 0.28 * max(len(event_titles), 1)))
    if reference is not None:
        panels.append(("reference", 0.45 + 0.28 * max(len(ref_titles), 1)))
    columns = plot.image.shape[1] if plot.image is not None else len(plot.score_time_s)
    width_in = min(max(12.0, columns / dpi + 3.0), (MAX_COLUMNS + 400) / dpi)
    height_in = sum(h for _, h in panels) + 1.4
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [h for _, h in panels]}
    )[:, 0]
    fig.subplots_adjust(
        left=1.5 / width_in,
        right=1 - 0.4 / width_in,
        top=1 - 0.6 / height_in,
        bottom=0.7 / height_in,
        hspace=0.12,
    )
    ax = dict(zip([name for name, _ in panels], axes, strict=True))
    end_s = max(plot.duration_s, 1e-3)
    if plot.image is not None:
        _draw_spectrogram(ax["spectrogram"], plot)
    _draw_scores(ax["scores"], plot, class_colour)
    lane_colours = [class_colour.get(t, (0.4, 0.4, 0.4, 1.0)) for t in event_titles]
    texts = [e.label for e in plot.events] if len(plot.events) <= MAX_EVENT_TEXTS else None
    _span_lane(
        ax["events"],
        [(event_lane[e.label], e.start_s, e.end_s) for e in plot.events],
        titles=event_titles or ["(no events)"],
        colours=lane_colours or [(0.4, 0.4, 0.4, 1.0)],
        texts=texts,
    )
    ax["events"].set_ylabel("events", fontsize=8)
    if reference is not None:
        ref_colours = [class_colour.get(t, (0.45, 0.45, 0.45, 1.0)) for t in ref_titles]
        spans = [(ref_lane[r[2] or "<empty>"], r[0], r[1]) for r in reference]
        _span_lane(
            ax["reference"],
            spans,
            titles=ref_titles or ["(none)"],
            colours=ref_colours or [(0.45, 0.45, 0.45, 1.0)],
            texts=[r[2] for r in reference] if len(reference) <= MAX_EVENT_TEXTS else None,
        )
        ax["reference"].set_ylabel("reference", fontsize=8)
    bottom = axes[-1]
    bottom.set_xlim(0.0, end_s)
    formatter, xlabel = _time_formatter(plot.recording_start_us, plot.duration_s)
    if formatter is not None:
        bottom.xaxis.set_major_formatter(formatter)
    bottom.set_xlabel(xlabel)
    status = "" if plot.complete else ", incomplete: some units failed"
    fig.suptitle(
        f"{plot.clip_id}  ({plot.duration_s:.1f} s, {plot.n_windows} windows, {len(plot.events)} events"
        f"{status})\n{plot.source_uri}",
        fontsize=9,
    )
    sink = io.BytesIO()
    fig.savefig(sink, format="png", dpi=dpi)
    return sink.getvalue()


def _draw_spectrogram(axes, plot: RecordingPlot) -> None:
    image = plot.image
    finite = image[np.isfinite(image)]
    low, high = np.percentile(finite, [1.0, 99.9]) if finite.size else (0.0, 1.0)
    axes.imshow(
        np.ma.masked_invalid(image),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap="magma",
        vmin=float(low),
        vmax=float(max(high, low + 1e-6)),
        extent=(plot.image_span_s[0], plot.image_span_s[1], 0, image.shape[0]),
    )
    n_mels = image.shape[0]
    ticks = np.unique(np.linspace(0, n_mels - 1, min(n_mels, 6)).round().astype(int))
    axes.set_yticks(ticks + 0.5, [f"{plot.band_hz[t]:.0f}" for t in ticks], fontsize=8)
    axes.set_ylabel(f"{plot.row_name}\n{plot.value_name}", fontsize=8)


def _draw_scores(axes, plot: RecordingPlot, class_colour: dict) -> None:
    for j, c in enumerate(plot.shown):
        label = plot.label_names[c]
        colour = class_colour[label]
        if plot.score_low is not None:
            axes.fill_between(
                plot.score_time_s, plot.score_low[:, j], plot.score_high[:, j], color=colour, alpha=0.15, lw=0
            )
        axes.plot(
            plot.score_time_s, plot.score_high[:, j], color=colour, lw=1.0, drawstyle="steps-mid", label=label
        )
        axes.axhline(plot.thresholds[c], color=colour, lw=0.9, ls="--")
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("score" + (" (max per bin)" if plot.score_low is not None else ""), fontsize=8)
    axes.grid(alpha=0.3)
    hidden = len(plot.label_names) - len(plot.shown)
    title = "dashed: thresholds" + (f"; not drawn: {hidden} other class(es)" if hidden else "")
    axes.legend(loc="upper right", fontsize=7, ncol=min(len(plot.shown), 6), title=title, title_fontsize=7)
