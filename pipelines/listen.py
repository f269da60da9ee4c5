"""``soundshard listen``: tag a live stream with a trained model, events printed as they close.

Examples::

    arecord -f S16_LE -r 16000 -c 1 | soundshard listen --model-dir models/f4 --stdin-format s16le \\
        --rate 16000
    ffmpeg -i rtsp://camera/stream -f wav - | soundshard listen --model-dir models/esc10-f4
    soundshard listen --model-dir models/esc10-f4 --input site.flac --realtime --events events.csv

The same features and model as ``soundshard tag`` (``transforms/tagging/streaming.py``): each window is
computed once, when its last sample has arrived, with the values and grid of the batch pipeline,
and scored by the model folder's Keras model; events follow the model's thresholds and event rules
and are printed when no later window can change them (see ``StreamingEvents``). The floor gate uses
the levels heard so far (``tag`` uses the whole recording's). Input is read in blocks; from a pipe
or a file it is never dropped (a producer faster than the model waits on the pipe; ``--realtime``
paces a file at its own speed); from a sound card (``--device``) what a slow model cannot keep up
with is dropped, counted, reported and replaced by silence (``CaptureBuffer``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import wave
from collections.abc import Iterator, Sequence

import numpy as np

from soundshard.pipelines import arguments
from soundshard.pipelines.arguments import db_or_off
from soundshard.schemas.config import FeatureConfig
from soundshard.schemas.errors import ConfigError

PROG = "soundshard listen"
STDIN_FORMATS = ("wav", "s16le", "f32le")
#: Seconds read at a time from a live input (its latency), and from a file read as fast as possible.
LIVE_BLOCK_S, FILE_BLOCK_S = 0.1, 5.0
#: Seconds between two "falling behind" lines while a sound card's audio is being dropped.
DROP_REPORT_S = 10.0
EVENT_FIELDS = ("start_s", "end_s", "label", "confidence", "peak", "n_windows")


def make_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Argument parser of ``soundshard listen``."""
    parser = arguments.Parser(prog=prog, description=__doc__.split("\n\n")[0])
    arguments.add_model_dir(
        parser, required=False, help="Model folder written by `soundshard train`. Required."
    )
    parser.add_argument(
        "--int8",
        metavar="ARTIFACT_DIR",
        help="Score with the model's int8 artifact (soundshard compile-edge output) through LiteRT, as "
        "a device would, instead of the float Keras model. Default: the float model.",
    )
    parser.add_argument(
        "--input",
        default="-",
        help="An audio file (any format libsndfile reads), or - for standard input. Default: -.",
    )
    parser.add_argument(
        "--stdin-format",
        choices=STDIN_FORMATS,
        default="wav",
        help="What standard input carries: a WAV stream, or raw little-endian 16-bit or float32 PCM "
        "(with --rate and --channels). Default: %(default)s.",
    )
    parser.add_argument(
        "--device",
        nargs="?",
        const="default",
        help="Listen to a sound card (PortAudio through the sounddevice package: pip install "
        "'soundshard[device]') instead of --input: its name or index (soundshard listen "
        "--list-devices), or the default input without a value. Default: none.",
    )
    parser.add_argument("--list-devices", action="store_true", help="List the sound cards' inputs and exit.")
    parser.add_argument(
        "--max-queue-s",
        type=float,
        default=10.0,
        help="With --device: seconds of audio that may wait for the model; beyond them audio is "
        "dropped, counted, reported and replaced by silence (so later times stay right). "
        "Default: %(default)s.",
    )
    parser.add_argument(
        "--rate",
        type=int,
        help="Sample rate of raw PCM on standard input, or of the sound card (default: its own), Hz.",
    )
    parser.add_argument(
        "--channels", type=int, default=1, help="Channels of raw PCM on standard input. Default: %(default)s."
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="Play a file at its own speed (as a live input would arrive) instead of as fast as possible.",
    )
    parser.add_argument(
        "--block-s",
        type=float,
        help="Seconds of audio read at a time. Default: 0.1 from standard input or with --realtime "
        "(the latency), 5 from a file as fast as possible.",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="One window threshold for every class instead of the model's. Default: the model's.",
    )
    parser.add_argument(
        "--min-level-above-floor-db",
        type=db_or_off,
        help="Floor gate, dB above the levels heard so far, or off. Default: the model's.",
    )
    parser.add_argument("--events", metavar="FILE", help="CSV file the events are appended to as they close.")
    parser.add_argument(
        "--window-scores",
        metavar="FILE",
        help="CSV file of every window's scores (start, end, one column a class).",
    )
    parser.add_argument(
        "--levels",
        metavar="FILE",
        help="CSV file of the sound level of every second (LAeq, LCeq, LZeq, LAFmax, LAFmin; the "
        "columns of levels_second), appended as each second completes. Default: none.",
    )
    parser.add_argument(
        "--level-offset-db",
        type=float,
        help="Calibration: dB SPL that 0 dBFS stands for (soundshard calibrate). Default: none "
        "(levels in dBFS).",
    )
    parser.add_argument("--quiet", action="store_true", help="No event lines on standard output.")
    return parser


def file_blocks(path: str, *, block_s: float, realtime: bool) -> tuple[int, int, Iterator[np.ndarray]]:
    """``(rate, channels, blocks [n, channels] float32)`` of an audio file."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"--input {path!r} cannot be read as audio: {exc}") from exc
    frames = max(1, int(round(block_s * info.samplerate)))

    def blocks():
        started = time.monotonic()
        done = 0
        for block in sf.blocks(path, blocksize=frames, dtype="float32", always_2d=True):
            if realtime:
                ahead = done / info.samplerate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            done += len(block)
            yield block

    return info.samplerate, info.channels, blocks()


def _sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: the package is there, PortAudio is not
        raise ConfigError(
            "--device needs the sounddevice package and the PortAudio library: pip install "
            f"'soundshard[device]' (and e.g. apt install libportaudio2) ({exc})"
        ) from None
    return sounddevice


def input_devices() -> list[str]:
    """The sound cards' inputs, one line each: index, name, channels, default rate."""
    sd = _sounddevice()
    return [
        f"{d['index']:3d}  {d['name']}  ({d['max_input_channels']} ch, {d['default_samplerate']:g} Hz)"
        for d in sd.query_devices()
        if d["max_input_channels"] > 0
    ]


def device_blocks(
    device: str, *, rate: int | None, channels: int, block_s: float, max_queue_s: float
) -> tuple[int, int, Iterator[np.ndarray], object]:
    """``(rate, channels, blocks, buffer)`` of a sound card's input; ``buffer`` (a
    :class:`CaptureBuffer`) counts what a slow consumer made it drop."""
    from soundshard.transforms.tagging.streaming import CaptureBuffer

    sd = _sounddevice()
    which = None if device == "default" else int(device) if device.isdigit() else device
    try:
        info = sd.query_devices(which, kind="input")
    except (ValueError, sd.PortAudioError) as exc:
        listed = "; ".join(input_devices()) or "none"
        raise ConfigError(f"--device {device!r}: no such input ({exc}); inputs: {listed}") from None
    rate = rate or int(info["default_samplerate"])
    if channels < 1 or channels > info["max_input_channels"]:
        raise ConfigError(
            f"--channels={channels}: {info['name']!r} has {info['max_input_channels']} input(s)"
        )
    if not max_queue_s > 0:
        raise ConfigError(f"--max-queue-s={max_queue_s} must be positive")
    frames = max(1, int(round(block_s * rate)))
    buffer = CaptureBuffer(max_blocks=max(1, int(max_queue_s * rate / frames)), channels=channels)

    def callback(indata, n_frames, when, status):
        buffer.put(indata.copy(), overflow=bool(status.input_overflow))

    try:
        stream = sd.InputStream(
            device=which,
            samplerate=rate,
            channels=channels,
            dtype="float32",
            blocksize=frames,
            callback=callback,
        )
    except sd.PortAudioError as exc:
        raise ConfigError(
            f"--device {device!r} cannot record at {rate} Hz, {channels} channel(s): {exc}"
        ) from None

    def blocks():
        with stream:
            try:
                yield from buffer
            finally:
                buffer.close()

    return rate, channels, blocks(), buffer


def stdin_blocks(
    stream, *, fmt: str, rate: int | None, channels: int, block_s: float
) -> tuple[int, int, Iterator[np.ndarray]]:
    """``(rate, channels, blocks)`` of a WAV or raw PCM byte stream (read sequentially)."""
    if fmt == "wav":
        try:
            reader = wave.open(stream, "rb")
        except (wave.Error, EOFError) as exc:
            raise ConfigError(
                f"standard input is not a WAV stream ({exc}); raw PCM needs --stdin-format"
            ) from exc
        rate, channels, width = reader.getframerate(), reader.getnchannels(), reader.getsampwidth()
        if width != 2:
            raise ConfigError(f"the WAV stream has {8 * width}-bit samples; 16-bit PCM is read")
        dtype, read = np.dtype("<i2"), reader.readframes
    else:
        if not rate or rate <= 0:
            raise ConfigError(f"--stdin-format {fmt} needs --rate (the sample rate in Hz)")
        dtype = np.dtype("<i2" if fmt == "s16le" else "<f4")
        width = dtype.itemsize

        def read(n):
            return stream.read(n * width * channels)

    if channels < 1:
        raise ConfigError(f"--channels={channels} must be at least 1")
    frames = max(1, int(round(block_s * rate)))

    def blocks():
        pending = b""
        while True:
            data = read(frames)
            if not data:
                break
            data = pending + data
            usable = len(data) // (dtype.itemsize * channels) * dtype.itemsize * channels
            pending = data[usable:]
            samples = np.frombuffer(data[:usable], dtype=dtype).reshape(-1, channels)
            if dtype.kind == "i":
                yield samples.astype(np.float32) / 32768.0
            else:
                yield samples.astype(np.float32)

    return rate, channels, blocks()


def mono(block: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """The channel mix (or channel) the batch decoder makes of ``block`` ``[n, channels]``."""
    if config.channel is not None:
        if config.channel >= block.shape[1]:
            raise ConfigError(f"channel={config.channel} but the input has {block.shape[1]} channel(s)")
        return block[:, config.channel]
    return block[:, 0] if block.shape[1] == 1 else block.mean(axis=1)


class Listener:
    """A model folder listening to one stream: blocks in, scored windows and final events out."""

    def __init__(
        self,
        model_dir: str,
        *,
        source_rate_hz: int,
        threshold=None,
        floor_db=None,
        int8: str | None = None,
        levels: bool = False,
        level_offset_db: float | None = None,
    ):
        from soundshard.pipelines import tag
        from soundshard.pipelines.arguments import tag_parser
        from soundshard.transforms.models import architectures as models
        from soundshard.transforms.tagging import classify as tagging
        from soundshard.transforms.tagging import streaming

        description = models.read_description(model_dir)
        config = tag.model_config(description, model_uri=model_dir)
        if not isinstance(config, FeatureConfig):
            raise ConfigError(
                f"--model-dir {model_dir!r} takes embeddings; listen runs log-mel and MFCC models"
            )
        defaults = ["--input", "-", "--model-dir", model_dir, "--output", "-"]
        if threshold is not None:
            defaults += ["--threshold", str(threshold)]
        if floor_db is not None:
            defaults += ["--min-level-above-floor-db", str(floor_db)]
        args, _ = tag_parser().parse_known_args(defaults)
        self.tag_config = tag.tag_config_from_args(args, description)
        self.config = config
        self.label_names = list(description["label_names"])
        if int8:
            self.classifier = streaming.Int8Classifier(
                int8, feature_fingerprint=config.fingerprint, label_names=self.label_names
            )
        else:  # a few windows a call: a block of live audio completes one or two windows
            self.classifier = tagging.Classifier(
                models.load_verified_model(model_dir, description), chunk_windows=8
            )
        self.levels = (
            streaming.StreamingLevels(sample_rate_hz=config.sample_rate_hz, offset_db=level_offset_db)
            if levels
            else None
        )
        self._level_rows: list[dict] = []
        self.features = streaming.StreamingFeatures(
            config,
            source_rate_hz=source_rate_hz,
            on_samples=None
            if self.levels is None
            else lambda y: self._level_rows.append(self.levels.push(y)),
        )
        self.events = streaming.StreamingEvents(self.tag_config, window_hop_s=config.window_hop_s)
        self._source_rate = source_rate_hz
        self._source_samples = 0
        self._streaming = streaming
        self.windows_scored = 0
        self.invalid_samples = 0

    def _score(self, windows):
        from soundshard.transforms.features import melspec

        if not len(windows):
            return None, []
        scores = self.classifier(windows.features)
        level = (
            melspec.window_level_db(windows.features, self.config)
            if self.config.log_compression == "db"
            else None
        )
        silent = self._streaming.silent_of(windows.features, self.config)
        frames = melspec.frame_levels_db(windows.features, self.config) if level is not None else None
        self.windows_scored += len(windows)
        return scores, (windows, scores, level, silent, frames)

    def push(self, block: np.ndarray):
        """``(windows, scores, events)`` of one block ``[n, channels]``; samples that are not
        finite numbers (NaN, infinity) count as silence and are counted in ``invalid_samples``."""
        invalid = ~np.isfinite(block)
        if invalid.any():
            self.invalid_samples += int(invalid.any(axis=-1).sum()) if block.ndim > 1 else int(invalid.sum())
            block = np.where(invalid, np.float32(0), block)
        self._source_samples += len(block)
        windows = self.features.push(mono(block, self.config))
        scores, part = self._score(windows)
        found = (
            self.events.push(windows.first_index, scores, windows.start_s, windows.end_s, *part[2:])
            if part
            else []
        )
        return windows, scores, found

    def _measure(self, samples: np.ndarray) -> None:
        self._level_rows.append(self.levels.push(samples))

    def take_levels(self) -> list[dict]:
        """The per-second levels measured since the last call (``StreamingLevels.COLUMNS``)."""
        rows, self._level_rows = self._level_rows, []
        return rows

    def finish(self):
        """The last windows and every remaining event."""
        windows = self.features.finish()
        if self.levels is not None:
            self._level_rows.append(self.levels.finish())
        scores, part = self._score(windows)
        found = (
            self.events.push(windows.first_index, scores, windows.start_s, windows.end_s, *part[2:])
            if part
            else []
        )
        found += self.events.finish(duration_s=self._source_samples / self._source_rate)
        return windows, scores, found


def event_line(event) -> str:
    return (
        f"{event.start_s:9.2f} {event.end_s:9.2f}  {event.label:<20} peak {event.peak:.2f} "
        f"confidence {event.confidence:.2f}"
    )


def run(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Runs ``soundshard listen``; returns the exit code (2 on a configuration error)."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    if args.model is None and not args.list_devices:
        parser.error("the following arguments are required: --model-dir")
    try:
        live = args.input == "-" or args.realtime or args.device is not None
        block_s = args.block_s if args.block_s is not None else (LIVE_BLOCK_S if live else FILE_BLOCK_S)
        if not block_s > 0:
            raise ConfigError(f"--block-s={block_s} must be positive")
        if args.list_devices:
            print("\n".join(input_devices()) or "no sound card inputs")
            return 0
        capture = None
        if args.device is not None:
            rate, _, blocks, capture = device_blocks(
                args.device,
                rate=args.rate,
                channels=args.channels,
                block_s=block_s,
                max_queue_s=args.max_queue_s,
            )
        elif args.input == "-":
            rate, _, blocks = stdin_blocks(
                sys.stdin.buffer,
                fmt=args.stdin_format,
                rate=args.rate,
                channels=args.channels,
                block_s=block_s,
            )
        else:
            if not os.path.exists(args.input):
                raise ConfigError(f"--input {args.input!r} does not exist")
            rate, _, blocks = file_blocks(args.input, block_s=block_s, realtime=args.realtime)
        listener = Listener(
            args.model,
            source_rate_hz=rate,
            threshold=args.threshold,
            floor_db=args.min_level_above_floor_db,
            int8=args.int8,
            levels=bool(args.levels),
            level_offset_db=args.level_offset_db,
        )
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    events_file = open(args.events, "a", newline="") if args.events else None  # noqa: SIM115
    scores_file = open(args.window_scores, "w", newline="") if args.window_scores else None  # noqa: SIM115
    levels_file = open(args.levels, "a", newline="") if args.levels else None  # noqa: SIM115
    levels_csv = csv.writer(levels_file) if levels_file else None
    if levels_csv and levels_file.tell() == 0:
        levels_csv.writerow([*listener.levels.COLUMNS, "level_unit"])
    events_csv = csv.writer(events_file) if events_file else None
    scores_csv = csv.writer(scores_file) if scores_file else None
    if events_csv and events_file.tell() == 0:
        events_csv.writerow(EVENT_FIELDS)
    if scores_csv:
        scores_csv.writerow(["window_index", "start_s", "end_s", *listener.label_names])
    started = time.monotonic()

    def emit(windows, scores, found):
        for rows in listener.take_levels() if levels_csv else ():
            for k in range(len(rows["start_s"])):
                values = [f"{rows[name][k]:.3f}" for name in listener.levels.COLUMNS]
                levels_csv.writerow([*values, listener.levels.unit])
            levels_file.flush()
        if scores_csv and scores is not None:
            for k in range(len(windows)):
                scores_csv.writerow(
                    [windows.first_index + k, f"{windows.start_s[k]:.6f}", f"{windows.end_s[k]:.6f}"]
                    + [f"{v:.7g}" for v in scores[k]]
                )
        for event in found:
            if not args.quiet:
                print(event_line(event), flush=True)
            if events_csv:
                events_csv.writerow(
                    [
                        f"{event.start_s:.3f}",
                        f"{event.end_s:.3f}",
                        event.label,
                        f"{event.confidence:.4f}",
                        f"{event.peak:.4f}",
                        event.n_windows,
                    ]
                )
                events_file.flush()

    reported, reported_at = 0, -DROP_REPORT_S

    def report_drops():
        nonlocal reported, reported_at
        if (
            capture is not None
            and capture.dropped_samples > reported
            and time.monotonic() - reported_at >= DROP_REPORT_S
        ):
            print(
                f"[listen] falling behind: {capture.dropped_samples / rate:.1f} s of audio dropped so far "
                "(replaced by silence)",
                file=sys.stderr,
                flush=True,
            )
            reported, reported_at = capture.dropped_samples, time.monotonic()

    try:
        for block in blocks:
            emit(*listener.push(block))
            report_drops()
        emit(*listener.finish())
    except KeyboardInterrupt:
        emit(*listener.finish())
    finally:
        for f in (events_file, scores_file, levels_file):
            if f:
                f.close()
    audio_s = listener.features.samples_in / listener.config.sample_rate_hz
    wall_s = time.monotonic() - started
    if capture is not None and (capture.dropped_samples or capture.overflows):
        print(
            f"[listen] dropped {capture.dropped_samples / rate:.1f} s of audio the model could not keep "
            f"up with (replaced by silence), {capture.overflows} capture overrun(s)",
            file=sys.stderr,
        )
    if listener.invalid_samples:
        print(
            f"[listen] {listener.invalid_samples} sample(s) were not finite numbers (NaN or infinity): "
            "taken as silence",
            file=sys.stderr,
        )
    laeq = listener.levels.laeq_db if listener.levels is not None else None
    level = f", LAeq {laeq:.1f} {listener.levels.unit}" if laeq is not None else ""
    print(
        f"[listen] {audio_s:.1f} s of audio, {listener.windows_scored} windows, "
        f"{listener.events.n_emitted} events{level}, {audio_s / max(wall_s, 1e-9):.0f}x real time",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run())
