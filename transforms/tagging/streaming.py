"""Streaming: audio blocks in, feature windows, scores and events out, as they become final
(``soundshard listen``; no Beam).

- :class:`StreamingFeatures` resamples blocks with a soxr stream (bit-equal to resampling the
  whole recording at once), computes each STFT frame once, when its last sample has arrived, and
  emits each window when its last frame has: the windows, values and grid of
  :func:`melspec.log_mel_windows` on the whole recording (the recording's end, known at
  :meth:`StreamingFeatures.finish`, gives the zero-padded last frames and window as in batch).
- :class:`StreamingEvents` turns window scores into events with :func:`events.find_events`, the
  rules of ``tag``, on a bounded tail of windows. An event is final once a stretch of windows in
  which no class holds (and that is longer than the merging gap) follows it: nothing later can
  extend or merge it, so the events are the batch events. The floor gate needs the whole
  recording's level percentile; online it uses the windows heard so far (the same once the
  stream ends).
- :class:`StreamingLevels` measures each second as it completes, as the levels stage measures a
  work unit (the two seconds before it settle the weighting filters and the F time weighting):
  the per-second LAeq, LCeq, LZeq, LAFmax and LAFmin of ``levels_second``.

- :class:`CaptureBuffer` carries a sound card's blocks from its audio thread to the listener: a
  bounded queue that never blocks the audio thread; what does not fit is dropped, counted and
  replaced by silence of the same length, so the stream's clock stays true.

Memory is bounded by the frames of one window, the tail of undecided windows and the soxr state.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

import numpy as np
import soxr

from soundshard.schemas import melscale
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.tagging import ONSET_RISE_SPAN_S, ONSET_SEARCH_BEFORE_S, TagConfig
from soundshard.transforms.features import melspec
from soundshard.transforms.levels import meter
from soundshard.transforms.models import training
from soundshard.transforms.tagging import events as ev


@dataclasses.dataclass(frozen=True)
class Windows:
    """Consecutive windows of a stream.

    Attributes:
        first_index: Index of the first window on the recording's grid.
        features: float32 ``[n, *feature_shape]``.
        start_s: float64 ``[n]`` window starts, seconds from the stream's start.
        end_s: float64 ``[n]`` window ends.
    """

    first_index: int
    features: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray

    def __len__(self) -> int:
        return len(self.features)


class StreamingFeatures:
    """Feature windows of a stream of audio blocks, on the batch pipeline's grid.

    Args:
        config: The model's feature config (window-scope normalisation only).
        source_rate_hz: Rate of the blocks pushed.
        on_samples: Called with each run of samples at the feature rate (the analysis signal,
            which the levels stage measures), in order.
    """

    def __init__(
        self,
        config: FeatureConfig,
        *,
        source_rate_hz: int,
        on_samples: Callable[[np.ndarray], None] | None = None,
    ):
        if config.normalization != "none" and config.normalization_scope == "recording":
            raise ValueError("recording-scope normalisation needs the whole recording; a stream has not")
        self.config = config
        self._resampler = (
            None
            if source_rate_hz == config.sample_rate_hz
            else soxr.ResampleStream(
                source_rate_hz, config.sample_rate_hz, 1, dtype="float32", quality=config.resample_quality
            )
        )
        self._samples = np.zeros(0, np.float32)  # resampled samples from _offset on
        self._offset = 0  # recording index of _samples[0]
        self._total = 0  # resampled samples so far
        self._frames = np.zeros((config.n_mels, 0), np.float32)  # compressed frames from _frame0 on
        self._frame0 = 0
        self._next_frame = 0
        self._next_window = 0
        self._on_samples = on_samples
        self.finished = False

    @property
    def samples_in(self) -> int:
        """Samples at the feature rate received so far."""
        return self._total

    def push(self, block: np.ndarray) -> Windows:
        """Adds mono float32 samples at the source rate; returns the windows now complete."""
        block = np.ascontiguousarray(block, np.float32).reshape(-1)
        if self._resampler is not None:
            block = self._resampler.resample_chunk(block, last=False).astype(np.float32, copy=False)
        self._append(block)
        last = self._frames_ready(final=False)
        return self._windows(frames_until=last, total=None)

    def finish(self) -> Windows:
        """Ends the stream: the last frames (zero padding past the end) and the last window(s)."""
        if self.finished:
            return self._empty()
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        self.finished = True
        total = self._total
        n_windows = melspec.window_count(total, self.config)
        wf, wh = self.config.window_frames, self.config.window_hop_frames
        frames_needed = (n_windows - 1) * wh + wf if n_windows else 0
        return self._windows(frames_until=frames_needed, total=total, n_windows=n_windows)

    # -- internals ------------------------------------------------------------------------------

    def _empty(self) -> Windows:
        shape = (0, *self.config.feature_shape)
        return Windows(self._next_window, np.zeros(shape, np.float32), np.zeros(0), np.zeros(0))

    def _append(self, block: np.ndarray) -> None:
        if len(block):
            self._samples = np.concatenate([self._samples, block])
            self._total += len(block)
            if self._on_samples is not None:
                self._on_samples(block)

    def _frames_ready(self, *, final: bool) -> int:
        """Frames whose every sample has arrived (all frames up to the end when ``final``)."""
        c = self.config
        # frame j reads samples up to j * hop + n_fft - n_fft // 2 (exclusive)
        return max(0, (self._total - (c.n_fft - c.n_fft // 2)) // c.hop_length + 1)

    def _compute_frames(self, until: int, total: int | None) -> None:
        """Computes frames ``[_next_frame, until)`` (``total``: the recording's length, or ``None``
        while unknown: the frames computed then read no sample past the end)."""
        n = until - self._next_frame
        if n <= 0:
            return
        power = melspec.power_mel_frames(
            self._samples,
            self.config,
            n_frames=n,
            first_frame=self._next_frame,
            y_offset=self._offset,
            total_samples=self._total if total is None else total,
        )
        self._frames = np.concatenate([self._frames, melspec.compress(power, self.config)], axis=1)
        self._next_frame = until

    def _windows(self, *, frames_until: int, total: int | None, n_windows: int | None = None) -> Windows:
        c = self.config
        wf, wh = c.window_frames, c.window_hop_frames
        self._compute_frames(frames_until, total)
        if n_windows is None:  # windows whose frames are all here
            n_windows = (self._next_frame - wf) // wh + 1 if self._next_frame >= wf else 0
        k0 = self._next_window
        count = max(0, n_windows - k0)
        if count == 0:
            self._trim()
            return self._empty()
        first = k0 * wh - self._frame0
        frames = self._frames[:, first : first + (count - 1) * wh + wf]
        views = np.lib.stride_tricks.sliding_window_view(frames, wf, axis=1)[:, ::wh]
        windows = views.transpose(1, 0, 2).copy()
        if c.log_compression == "db" and c.top_db is not None:
            peak = windows.max(axis=(1, 2), keepdims=True)
            np.maximum(windows, peak - np.float32(c.top_db), out=windows)
        if c.feature_type == "mfcc":
            windows = melspec.mfcc_windows(windows, c)
        windows = melspec.normalize(windows, c)
        starts, ends = melspec.window_bounds_s(count, c, first_window=k0)
        self._next_window = k0 + count
        self._trim()
        return Windows(k0, windows, starts, ends)

    def _trim(self) -> None:
        """Drops the frames no later window needs and the samples no later frame reads."""
        c = self.config
        keep_frame = self._next_window * c.window_hop_frames
        if keep_frame > self._frame0:
            self._frames = self._frames[:, keep_frame - self._frame0 :]
            self._frame0 = keep_frame
        start, _ = melscale.frame_span(
            first_frame=self._next_frame, n_frames=1, hop_length=c.hop_length, n_fft=c.n_fft
        )
        if start > self._offset:
            self._samples = self._samples[start - self._offset :]
            self._offset = start


class CaptureBuffer:
    """Blocks from a capture callback (another thread) to a consumer, bounded, never blocking.

    ``put`` (the audio thread) appends a block, or, when ``max_blocks`` are waiting, drops it and
    counts it: a run of dropped blocks is one gap entry, given to the consumer as zeros of the
    same length, so the times of everything later stay right. Iterating (the consumer) yields the
    blocks ``[n, channels]`` in order and ends after :meth:`close` once the queue is empty.

    Attributes:
        dropped_samples: Samples dropped (and replaced by silence) so far.
        overflows: Times the capture reported it lost input itself (its own buffer overran).
    """

    def __init__(self, *, max_blocks: int, channels: int):
        if max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks} must be at least 1")
        self.max_blocks, self.channels = max_blocks, channels
        self._entries: collections.deque = collections.deque()  # arrays, or ints (gap lengths)
        self._blocks = 0
        self._ready = threading.Condition()
        self._closed = False
        self.dropped_samples = 0
        self.overflows = 0

    def put(self, block: np.ndarray, *, overflow: bool = False) -> None:
        """Adds a block ``[n, channels]`` (copied by the caller); never waits."""
        with self._ready:
            self.overflows += bool(overflow)
            if self._blocks < self.max_blocks:
                self._entries.append(block)
                self._blocks += 1
            else:
                self.dropped_samples += len(block)
                if self._entries and isinstance(self._entries[-1], int):
                    self._entries[-1] += len(block)
                else:  # one gap entry beyond max_blocks at most: bounded
                    self._entries.append(len(block))
            self._ready.notify()

    def close(self) -> None:
        """No more blocks: iteration ends once the queue is empty."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def __iter__(self):
        while True:
            with self._ready:
                while not self._entries and not self._closed:
                    self._ready.wait(0.5)
                if not self._entries:
                    return
                entry = self._entries.popleft()
                if not isinstance(entry, int):
                    self._blocks -= 1
            yield np.zeros((entry, self.channels), np.float32) if isinstance(entry, int) else entry


class StreamingLevels:
    """Per-second sound levels of a stream, as ``levels_second`` gives them for a recording.

    Each second is measured when its last sample has arrived, as the levels stage measures a
    work unit (:func:`meter.unit_blocks`): the ``PREROLL_S`` before it settle the filters, so the
    levels equal those of the whole recording within the tolerance that splitting a recording into
    units has. The stream's end measures its last, partial second.

    Args:
        sample_rate_hz: Rate of the samples pushed (the feature rate).
        offset_db: Calibration (dB SPL of 0 dBFS), added to every level; ``None``: dBFS.
    """

    COLUMNS = ("start_s", "duration_s", "laeq", "lceq", "lzeq", "lafmax", "lafmin")

    def __init__(self, *, sample_rate_hz: int, offset_db: float | None = None):
        self.sample_rate_hz = sample_rate_hz
        self.offset_db = offset_db
        self.unit = "dB SPL" if offset_db is not None else "dBFS"
        self._samples = np.zeros(0, np.float64)
        self._offset = 0  # recording index of _samples[0]
        self._total = 0
        self._measured = 0  # first sample not yet measured
        self._sum_sq = np.zeros(3)  # A, C, Z energy of everything measured
        self._preroll = round(meter.PREROLL_S * sample_rate_hz)

    def push(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """Adds samples; returns the levels of the seconds they complete (``COLUMNS``)."""
        samples = np.asarray(samples, np.float64).reshape(-1)
        self._samples = np.concatenate([self._samples, samples])
        self._total += len(samples)
        return self._measure(self._total // self.sample_rate_hz * self.sample_rate_hz)

    def finish(self) -> dict[str, np.ndarray]:
        """Ends the stream: the levels of its last, partial second (if any)."""
        return self._measure(self._total)

    @property
    def laeq_db(self) -> float | None:
        """LAeq of everything measured so far (``None`` before the first second)."""
        if self._measured == 0:
            return None
        return float(meter.db(self._sum_sq[0] / self._measured)) + (self.offset_db or 0.0)

    def _measure(self, until: int) -> dict[str, np.ndarray]:
        if until <= self._measured:
            return {name: np.zeros(0) for name in self.COLUMNS}
        blocks = meter.unit_blocks(
            self._samples,
            sample_rate_hz=self.sample_rate_hz,
            offset=self._offset,
            own_start=self._measured,
            own_end=until,
        )
        self._sum_sq += blocks.sum_sq.sum(axis=0)
        self._measured = until
        keep = max(self._offset, until - self._preroll)
        self._samples = self._samples[keep - self._offset :]
        self._offset = keep
        spans = meter.span_levels(
            blocks,
            span_s=1.0,
            sample_rate_hz=self.sample_rate_hz,
            offset_db=self.offset_db or 0.0,
            statistics=False,
        )
        return {name: spans[name] for name in self.COLUMNS}


class StreamingEvents:
    """Events of a stream of window scores, each emitted once it is final (see the module).

    Args:
        config: Thresholds and event rules (``tag``'s, from the model folder).
        window_hop_s: Seconds between window starts.
    """

    def __init__(self, config: TagConfig, *, window_hop_s: float):
        self.config = config
        self._hop_s = window_hop_s
        self._half = max(0, config.median_filter_windows // 2)
        self._tail: dict[str, list] = {
            k: [] for k in ("index", "start", "end", "scores", "level", "silent", "frames")
        }
        # windows kept before a cut: the running median's context, and the frames an onset after
        # the cut may be looked for in (as far back as tag looks on the whole recording)
        onset = ONSET_SEARCH_BEFORE_S + ONSET_RISE_SPAN_S
        self._keep = max(self._half, int(np.ceil(onset / window_hop_s)) + 2)
        self._ends: dict[str, float] = {}  # per label, the end of its last event emitted
        self._levels = np.zeros(0)  # every sounding window's level, for the running floor
        self._context = 0  # windows at the tail's start kept only as context (smoothing, onsets)
        self.n_emitted = 0  # events emitted so far (not kept: a stream may run for days)

    def push(
        self,
        first_index: int,
        scores: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
        level_db: np.ndarray | None,
        silent: np.ndarray,
        frame_db: np.ndarray | None = None,
    ) -> list[ev.Event]:
        """Adds scored windows (with their frame levels, for the onsets); returns the events that
        became final."""
        n = len(scores)
        tail = self._tail
        tail["index"].extend(range(first_index, first_index + n))
        tail["start"].extend(np.asarray(start_s, np.float64).tolist())
        tail["end"].extend(np.asarray(end_s, np.float64).tolist())
        tail["scores"].extend(np.asarray(scores, np.float32))
        levels = np.full(n, np.nan) if level_db is None else np.asarray(level_db, np.float64)
        tail["level"].extend(levels.tolist())
        tail["silent"].extend(np.asarray(silent, bool).tolist())
        tail["frames"].extend([None] * n if frame_db is None else list(np.asarray(frame_db, np.float32)))
        self._levels = np.concatenate([self._levels, levels[~np.asarray(silent, bool)]])
        return self._settle(final=False)

    def finish(self, *, duration_s: float | None = None) -> list[ev.Event]:
        """Ends the stream: every remaining event."""
        return self._settle(final=True, duration_s=duration_s)

    def _floor(self) -> float | None:
        if self.config.min_level_above_floor_db is None:
            return None
        floor = ev.level_floor(self._levels) if len(self._levels) else None
        return -np.inf if floor is None else floor

    def _find(self, upto: int, *, duration_s: float | None = None) -> list[ev.Event]:
        t = self._tail
        level = np.asarray(t["level"][:upto])
        found = ev.find_events(
            np.asarray(t["scores"][:upto], np.float32).reshape(upto, -1),
            start_s=np.asarray(t["start"][:upto]),
            end_s=np.asarray(t["end"][:upto]),
            window_index=np.asarray(t["index"][:upto]),
            config=self.config,
            level_db=None if np.isnan(level).all() else level,
            duration_s=duration_s,
            silent=np.asarray(t["silent"][:upto]),
            floor_db=self._floor(),
        )
        if self._context:
            # the first windows of the tail are context, quiet where they were decided: their
            # smoothed scores lack their own left neighbours, so nothing found there is an event
            begin = t["start"][self._context]
            found = [e for e in found if e.start_s >= begin]
        return found

    def _onsets(self, found: list[ev.Event], upto: int) -> list[ev.Event]:
        """The events to emit with their starts placed as tag places them (``onset_rise_db``), on
        the frames of the tail's first ``upto`` windows."""
        t = self._tail
        frames = t["frames"][:upto]
        if self.config.onset_rise_db is None or not frames or frames[0] is None:
            return found
        times, levels = ev.frame_track(
            np.stack(frames), start_s=np.asarray(t["start"][:upto]), end_s=np.asarray(t["end"][:upto])
        )
        return ev.refine_onsets(
            found, times=times, levels=levels, rise_db=self.config.onset_rise_db, previous_end=self._ends
        )

    def _settle(self, *, final: bool, duration_s: float | None = None) -> list[ev.Event]:
        t = self._tail
        n = len(t["index"])
        if n == 0:
            return []
        if final:
            found = self._onsets(self._find(n, duration_s=duration_s), n)
            for key in t:
                t[key].clear()
        else:
            cut = self._quiet_cut()
            if cut is None:
                return []
            # the windows up to `cut` are decided: their events, found with the windows after them
            # that their smoothed scores depend on, end before the quiet stretch that ends at `cut`
            upto = min(n, cut + self._half + 1)
            cut_time = t["start"][cut]
            found = self._onsets([e for e in self._find(upto) if e.start_s < cut_time], upto)
            # left context: for smoothing the windows after the cut, and for their onsets
            keep_from = max(0, cut - self._keep)
            for key in t:
                del t[key][:keep_from]
            self._context = cut - keep_from
        self.n_emitted += len(found)
        return found

    def _quiet_cut(self) -> int | None:
        """The last window index (in the tail) after which nothing can change the events before
        it: its smoothed scores are final and it ends a stretch where no class holds, longer than
        the merging gap. ``None`` when there is none."""
        t = self._tail
        n = len(t["index"])
        decided = n - self._half  # windows whose smoothed scores no future window changes
        if decided <= 0:
            return None
        scores = np.asarray(t["scores"], np.float32).reshape(n, -1)
        index = np.asarray(t["index"])
        adjacent = np.concatenate([[False], np.diff(index) == 1])
        smoothed = ev.median_filtered(scores, size=self.config.median_filter_windows, adjacent=adjacent)
        off = np.maximum(np.asarray(self.config.window_thresholds) - self.config.hysteresis, 1e-9)
        quiet = ~(smoothed[:decided] >= off[None, :]).any(axis=1)
        # longer than the merging gap, and than the left context the next tail keeps
        need = max(int(np.ceil((self.config.max_gap_s + 1e-9) / self._hop_s)) + 2, self._half + 2)
        run = 0
        cut = None
        for k in range(self._context, decided):  # the context windows' smoothing is not exact
            run = run + 1 if quiet[k] else 0
            if run >= need:
                cut = k
        return cut


class Int8Classifier:
    """The int8 artifact of ``soundshard compile-edge`` run by LiteRT's builtin kernels (the ones
    TFLite Micro agrees with in the artifact's verification): float features in, float
    probabilities out, as a device computes them.

    Args:
        artifact_dir: The compile-edge output folder.
        feature_fingerprint: The features the stream computes (the model folder's).
        label_names: The model folder's labels.

    Raises:
        ConfigError: not an artifact folder, a model file that changed, or an artifact of other
            features or labels.
    """

    def __init__(self, artifact_dir: str, *, feature_fingerprint: str, label_names: list[str]):
        import hashlib
        import json
        import os

        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        from soundshard.schemas.errors import ConfigError

        try:
            with open(os.path.join(artifact_dir, "manifest.json")) as f:
                manifest = json.load(f)
            with open(os.path.join(artifact_dir, manifest["model_file"]), "rb") as f:
                content = f.read()
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"--int8 {artifact_dir!r} is not a compile-edge artifact ({exc})") from exc
        if hashlib.sha256(content).hexdigest() != manifest.get("model_sha256"):
            raise ConfigError(f"--int8 {artifact_dir!r}: its model file does not have the manifest's SHA-256")
        if manifest.get("feature_fingerprint") != feature_fingerprint:
            raise ConfigError(
                f"--int8 {artifact_dir!r} takes features {manifest.get('feature_fingerprint')}, the model "
                f"folder {feature_fingerprint}"
            )
        if list(manifest.get("labels", [])) != list(label_names):
            raise ConfigError(
                f"--int8 {artifact_dir!r} has labels {manifest.get('labels')}, not {label_names}"
            )
        q = manifest["quantization"]
        self._in = (float(q["input_scale"]), int(q["input_zero_point"]))
        self._out = (float(q["output_scale"]), int(q["output_zero_point"]))
        self._interpreter = Interpreter(
            model_content=content,
            num_threads=1,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        from soundshard.transforms.edge import artifact as edge

        scale, zero = self._in
        inputs = edge.quantize(features, scale=scale, zero_point=zero)
        rows = []
        for x in inputs:
            self._interpreter.set_tensor(self._input, x[None])
            self._interpreter.invoke()
            rows.append(self._interpreter.get_tensor(self._output).reshape(-1).copy())
        if not rows:
            return np.zeros((0, 0), np.float32)
        scale, zero = self._out
        return edge.dequantize(np.stack(rows), scale=scale, zero_point=zero).astype(np.float32)


def silent_of(features: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Digitally silent windows, as training and tagging tell them."""
    return training.silent_windows(features, rule=training.silence_rule(config))
