"""Beam layer of the log-mel stage: decode → window → features per work unit, with dead letters."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.errors import DataError
from soundshard.schemas.records import DeadLetter, FileSummary, SourceItem, WindowBatch
from soundshard.transforms import melspec
from soundshard.transforms.audio import decode_audio
from soundshard.transforms.sources import open_source

NAMESPACE = "soundshard"
DEAD_LETTERS = "dead_letters"
SUMMARIES = "summaries"
_LOG = logging.getLogger(__name__)


def count(reason: str, n: int = 1) -> None:
    """Increments the Beam counter ``soundshard/<reason>``."""
    Metrics.counter(NAMESPACE, reason).inc(n)


def dead_letter(item: SourceItem, stage: str, exc: BaseException) -> DeadLetter:
    """A dead letter for ``item`` failing at ``stage``; counts it under its reason."""
    reason = exc.reason if isinstance(exc, DataError) else "unexpected_error"
    if not isinstance(exc, DataError):
        _LOG.warning("unexpected %s in stage %s for %s", type(exc).__name__, stage, item.uri, exc_info=exc)
    count(reason)
    count("dead_letters")
    return DeadLetter(item.uri, item.clip_id, stage, reason, type(exc).__name__, str(exc))


class ProgressReporter:
    """Writes this process's files/windows done to ``<dir>/<pid>.json`` at most twice a second.

    The launcher of a local run sums these files for its progress line; remote runs pass no
    directory and this does nothing.
    """

    def __init__(self, directory: str | None):
        self._path = os.path.join(directory, f"{os.getpid()}.json") if directory else None
        self._files = 0
        self._windows = 0
        self._last = 0.0

    def add(self, *, files: int, windows: int) -> None:
        """Adds work done and writes it out if the last write is 0.5 s old."""
        self._files += files
        self._windows += windows
        if self._path and time.monotonic() - self._last > 0.5:
            self.flush()

    def flush(self) -> None:
        """Writes the totals now (atomic replace, so readers never see half a file)."""
        if not self._path:
            return
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"files": self._files, "windows": self._windows}, f)
        os.replace(tmp, self._path)
        self._last = time.monotonic()


class _LogMelFn(beam.DoFn):
    """Decodes one recording and emits all its windows as one vectorised WindowBatch."""

    def __init__(self, config: FeatureConfig, progress_dir: str | None = None):
        self._config = config
        self._progress_dir = progress_dir

    def setup(self):
        melspec.mel_filterbank(self._config)  # build the filterbank once per worker
        self._progress = ProgressReporter(self._progress_dir)

    def process(self, item: SourceItem):
        config = self._config
        try:
            with contextlib.ExitStack() as stack:
                source = open_source(item.uri)
                if not isinstance(source, str):
                    stack.enter_context(source)
                elif item.size_bytes == 0 or (item.size_bytes is None and os.path.getsize(source) == 0):
                    raise _empty_file(item)
                audio = decode_audio(
                    source,
                    sample_rate_hz=config.sample_rate_hz,
                    channel=config.channel,
                    resample_quality=config.resample_quality,
                    name=item.uri,
                )
        except Exception as exc:  # noqa: BLE001 - every failure becomes a dead letter
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(item, "decode", exc))
            self._progress.add(files=1, windows=0)
            return
        try:
            n_windows = melspec.window_count(len(audio.samples), config)
            if n_windows == 0:
                raise DataError(
                    f"{item.uri} lasts {audio.duration_s:.3f} s, shorter than one window "
                    f"({config.window_s:.3f} s) and last_window='drop'",
                    reason="audio_too_short",
                )
            features = melspec.log_mel_windows(audio.samples, config)
            if not np.isfinite(features).all():
                raise DataError(
                    f"{item.uri}: features contain non-finite values", reason="non_finite_features"
                )
        except Exception as exc:  # noqa: BLE001
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(item, "features", exc))
            self._progress.add(files=1, windows=0)
            return
        starts, ends = melspec.window_bounds_s(n_windows, config)
        silent = not audio.samples.any()
        count("files_processed")
        count("windows", n_windows)
        count("audio_ms", round(audio.duration_s * 1000))
        if silent:
            count("digital_silence")
        self._progress.add(files=1, windows=n_windows)
        yield WindowBatch(item, features, starts, ends)
        yield beam.pvalue.TaggedOutput(
            SUMMARIES,
            FileSummary(item.clip_id, item.label, item.fold, item.split, n_windows, audio.duration_s, silent),
        )

    def finish_bundle(self):
        self._progress.flush()


def _empty_file(item: SourceItem) -> DataError:
    from soundshard.schemas.errors import AudioDecodeError

    return AudioDecodeError(f"{item.uri} is empty (0 bytes)", reason="empty_file")


class ComputeLogMel(beam.PTransform):
    """SourceItems → WindowBatches (one per recording), dead letters and per-file summaries.

    ``expand`` returns Beam's outputs tuple: ``.windows`` (WindowBatch), ``.dead_letters``
    (DeadLetter) and ``.summaries`` (FileSummary).

    Args:
        config: Feature configuration (validated).
        progress_dir: Local folder for progress files of local runs, or ``None``.
    """

    def __init__(self, config: FeatureConfig, *, progress_dir: str | None = None):
        super().__init__()
        self._config = config
        self._progress_dir = progress_dir

    def expand(self, items):
        results = items | "DecodeAndFeaturize" >> beam.ParDo(
            _LogMelFn(self._config, self._progress_dir)
        ).with_outputs(DEAD_LETTERS, SUMMARIES, main="windows")
        return results
