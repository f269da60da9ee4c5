"""Feature configuration: a frozen, validated dataclass with JSON round trip and a fingerprint.

Defaults follow the environmental-sound literature this project targets (Piczak's ESC CNN, SB-CNN
by Salamon & Bello, and the ESC-CNN-microcontroller models): audio resampled to 22050 Hz, 60 mel
bands, ``n_fft`` 1024, ``hop_length`` 512, and analysis windows of 41 frames (0.95 s, a bit under
one second) taken every 20 frames (about 50 % overlap).

Windows lie on the frame grid of the whole recording: frame ``j`` is centred on sample
``j * hop_length`` (librosa's ``center=True`` with zero padding), and window ``k`` covers frames
``[k * window_hop_frames, k * window_hop_frames + window_frames)``. So a window's values never
depend on how a recording is split into work units.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import tomllib

from soundshard.schemas import melscale
from soundshard.schemas.errors import ConfigError

#: Bumped whenever the feature maths change in a way that alters values for the same config.
FEATURE_VERSION = 1

_LAST_WINDOW = ("pad", "drop")
_LOG_COMPRESSION = ("db", "log", "none")
_NORMALIZATION = ("none", "mean", "standardize")
_NORMALIZATION_SCOPE = ("window", "recording")
_RESAMPLE_QUALITY = ("QQ", "LQ", "MQ", "HQ", "VHQ")
_MEL_NORM = ("slaney", "none")
_FEATURE_TYPES = ("logmel", "mfcc")
#: Frames of the Savitzky-Golay window of MFCC deltas (librosa.feature.delta's default width).
DELTA_WIDTH = 9
#: Fields added after FEATURE_VERSION 1 with their defaults: at these values they stay out of the
#: fingerprint, so configs (and the datasets and models made with them) written before the fields
#: existed keep their fingerprints.
_LATER_FIELDS = {"feature_type": "logmel", "n_mfcc": 20, "mfcc_deltas": 0}


#: Sample rates a header may declare, in Hz (``--source-rates-hz``): outside them the header is
#: taken for damaged or hostile (a 3.6 KB WAV declaring 1 Hz would make 30 minutes of windows).
SOURCE_RATES_HZ = (1_000, 2_000_000)


def attribute_docs(cls: type) -> dict[str, str]:
    """Each attribute's description in ``cls``'s Google-style ``Attributes:`` docstring section, as
    one line of plain text (double backquotes dropped): the help of the flags made from it."""
    docs: dict[str, list[str]] = {}
    inside = False
    current = None
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not text:
            break
        name, sep, rest = text.partition(": ")
        if sep and line.startswith(" " * 8) and not line.startswith(" " * 12) and name.isidentifier():
            current = name
            docs[current] = [rest]
        elif current is not None:
            docs[current].append(text)
    return {name: " ".join(parts).replace("``", "") for name, parts in docs.items()}


class ConfigSerialization:
    """JSON round trip of a frozen config dataclass; unknown keys are rejected by name.

    Subclasses set ``_WHAT`` (e.g. ``"feature"``) for the messages.
    """

    _WHAT = "config"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); ``from_json(to_json())`` gives an equal config."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Builds a config from a dict, rejecting unknown keys by name.

        Raises:
            ConfigError: on an unknown key or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown {cls._WHAT} config key(s): {', '.join(hints)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str):
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied."""
        return self.from_dict({**self.to_dict(), **changes})


@dataclasses.dataclass(frozen=True)
class FeatureConfig(ConfigSerialization):
    """How audio becomes log-mel (or MFCC) windows. Validated on construction.

    Attributes:
        sample_rate_hz: Rate every input is resampled to (soxr) before analysis.
        n_fft: FFT length in samples; the analysis window (periodic Hann) has the same length.
        hop_length: Samples between STFT frames.
        n_mels: Number of mel bands.
        fmin_hz: Lowest mel band edge in Hz.
        fmax_hz: Highest mel band edge in Hz; ``None`` means the Nyquist frequency.
        power: Exponent of the magnitude spectrogram (2.0 power, 1.0 magnitude).
        mel_htk: Use the HTK mel formula instead of Slaney's.
        mel_norm: ``"slaney"`` (area normalisation, librosa's default) or ``"none"``.
        window_frames: Frames per analysis window; the feature array is ``[n_mels, window_frames]``.
        window_hop_frames: Frames between the starts of consecutive windows.
        last_window: ``"pad"`` keeps a last partial window padded with silence; ``"drop"`` drops
            it (a recording shorter than one window is then a dead letter, ``audio_too_short``).
        log_compression: ``"db"`` (``10 * log10(max(S, amin) / db_ref)``), ``"log"`` (natural
            log of ``S + amin``) or ``"none"``.
        db_ref: Reference power for ``"db"``; 1.0 keeps absolute levels.
        amin: Floor applied before the logarithm.
        top_db: With ``"db"``, values are clamped at ``max - top_db`` per window; ``None`` off.
        normalization: ``"none"``, ``"mean"`` (subtract the mean) or ``"standardize"`` (zero
            mean, unit variance).
        normalization_scope: Statistics over each ``"window"`` or over the whole ``"recording"``.
        channel: ``None`` mixes all channels down to mono; an index keeps that channel only.
        resample_quality: soxr quality preset (``QQ``, ``LQ``, ``MQ``, ``HQ``, ``VHQ``).
        feature_type: ``"logmel"`` (the log-mel window) or ``"mfcc"``: the orthonormal DCT-II of
            each frame of the log-mel window (after ``top_db``; ``log_compression="db"``), its
            first ``n_mfcc`` coefficients, as ``librosa.feature.mfcc``; normalisation follows.
        n_mfcc: MFCC coefficients per frame (``feature_type="mfcc"``).
        mfcc_deltas: With MFCC, 0 (none), 1 (first derivative) or 2 (first and second) deltas over
            each window's frames, stacked below the coefficients (``librosa.feature.delta``, width
            9, ``mode="interp"``): windows of ``[n_mfcc * (1 + mfcc_deltas), window_frames]``.
    """

    sample_rate_hz: int = 22050
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 60
    fmin_hz: float = 0.0
    fmax_hz: float | None = None
    power: float = 2.0
    mel_htk: bool = False
    mel_norm: str = "slaney"
    window_frames: int = 41
    window_hop_frames: int = 20
    last_window: str = "pad"
    log_compression: str = "db"
    db_ref: float = 1.0
    amin: float = 1e-10
    top_db: float | None = 80.0
    normalization: str = "none"
    normalization_scope: str = "window"
    channel: int | None = None
    resample_quality: str = "HQ"
    feature_type: str = "logmel"
    n_mfcc: int = 20
    mfcc_deltas: int = 0
    _WHAT = "feature"

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    # -- derived values ---------------------------------------------------------------------

    @property
    def fmax_resolved_hz(self) -> float:
        """``fmax_hz``, or the Nyquist frequency when it is ``None``."""
        return self.sample_rate_hz / 2 if self.fmax_hz is None else float(self.fmax_hz)

    @property
    def filterbank_args(self) -> dict[str, Any]:
        """The keyword arguments of ``melscale.filterbank`` for this config's mel bands."""
        return {
            "sample_rate_hz": self.sample_rate_hz,
            "n_fft": self.n_fft,
            "n_mels": self.n_mels,
            "fmin_hz": float(self.fmin_hz),
            "fmax_hz": self.fmax_resolved_hz,
            "htk": self.mel_htk,
            "norm": self.mel_norm,
        }

    @property
    def feature_rows(self) -> int:
        """Rows of one window: ``n_mels``, or ``n_mfcc * (1 + mfcc_deltas)`` for MFCC."""
        if self.feature_type == "mfcc":
            return self.n_mfcc * (1 + self.mfcc_deltas)
        return self.n_mels

    @property
    def feature_shape(self) -> tuple[int, int]:
        """Shape of one window's features, ``[feature_rows, window_frames]``."""
        return (self.feature_rows, self.window_frames)

    @property
    def window_s(self) -> float:
        """Duration a window stands for: ``window_frames * hop_length / sample_rate_hz``."""
        return self.window_frames * self.hop_length / self.sample_rate_hz

    @property
    def window_hop_s(self) -> float:
        """Seconds between the starts of consecutive windows."""
        return self.window_hop_frames * self.hop_length / self.sample_rate_hz

    # -- serialisation ----------------------------------------------------------------------

    @functools.cached_property
    def fingerprint(self) -> str:
        """Stable 16-hex-digit digest of every field and the feature-maths version."""
        values = {k: v for k, v in self.to_dict().items() if k not in _LATER_FIELDS or _LATER_FIELDS[k] != v}
        payload = json.dumps({"feature_version": FEATURE_VERSION, **values}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_config_file(path: str | Path, *, table: str, what: str) -> dict[str, Any]:
    """The keys of a TOML or JSON config file, at its top level or under ``[<table>]``.

    Raises:
        ConfigError: unreadable or invalid file (``what`` names the kind of config).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} config {str(path)!r}: {exc}") from exc
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{what} config {str(path)!r} is not valid: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{what} config {str(path)!r} must hold a table of keys")
    if not isinstance(values.get(table), dict):
        return values
    section = values[table]
    # Keys beside the [table] would be ignored silently, and one set at both levels is ambiguous.
    for key, value in values.items():
        if key == table or isinstance(value, dict):
            continue
        where = "both at the top level and under" if key in section else "at the top level, outside"
        raise ConfigError(
            f"{what} config {str(path)!r} sets {key!r} {where} [{table}]; set each key once, under [{table}]"
        )
    return section


def load_feature_config(path: str | Path, **overrides: Any) -> FeatureConfig:
    """Reads a TOML or JSON feature config; keys may sit at top level or under ``[features]``.

    Args:
        path: ``.toml`` or ``.json`` file.
        **overrides: Values that replace those of the file (e.g. from command-line flags).

    Raises:
        ConfigError: unreadable file, unknown key or invalid value.
    """
    values = read_config_file(path, table="features", what="feature")
    return FeatureConfig.from_dict({**values, **overrides})


def _check_types(config) -> None:
    """Checks every field of a config dataclass against its type hint (ConfigError naming it)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        allowed = _allowed_types(hints[field.name])
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{field.name}={value!r} must be {names}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field.name}={value!r} must be finite")


def _allowed_types(hint: Any) -> tuple[type, ...]:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    allowed: list[type] = []
    for arg in args:
        allowed.append(arg)
        if arg is float:
            allowed.append(int)  # 0 in a TOML file means 0.0
    return tuple(allowed)


def _check_values(c: FeatureConfig) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    need(8000 <= c.sample_rate_hz <= 384000, f"sample_rate_hz={c.sample_rate_hz} must lie in 8000..384000")
    need(c.n_fft >= 16, f"n_fft={c.n_fft} must be at least 16")
    need(c.hop_length >= 1, f"hop_length={c.hop_length} must be at least 1")
    need(
        c.hop_length <= c.n_fft,
        f"hop_length={c.hop_length} is longer than n_fft={c.n_fft}: frames would skip samples",
    )
    need(c.n_mels >= 1, f"n_mels={c.n_mels} must be at least 1")
    nyquist = c.sample_rate_hz / 2
    need(c.fmin_hz >= 0, f"fmin_hz={c.fmin_hz} must not be negative")
    if c.fmax_hz is not None:
        need(
            c.fmax_hz <= nyquist,
            f"fmax_hz={c.fmax_hz} is above the Nyquist frequency {nyquist:g} Hz of "
            f"sample_rate_hz={c.sample_rate_hz}",
        )
    need(
        c.fmin_hz < c.fmax_resolved_hz,
        f"fmin_hz={c.fmin_hz} must be below fmax_hz={c.fmax_resolved_hz:g}",
    )
    need(c.power > 0, f"power={c.power} must be positive")
    need(c.mel_norm in _MEL_NORM, f"mel_norm={c.mel_norm!r} must be one of {_MEL_NORM}")
    need(c.window_frames >= 1, f"window_frames={c.window_frames} must be at least 1")
    need(c.window_hop_frames >= 1, f"window_hop_frames={c.window_hop_frames} must be at least 1")
    need(
        c.window_hop_frames <= c.window_frames,
        f"window_hop_frames={c.window_hop_frames} is longer than window_frames={c.window_frames}: "
        "windows would skip audio",
    )
    need(c.last_window in _LAST_WINDOW, f"last_window={c.last_window!r} must be one of {_LAST_WINDOW}")
    need(
        c.log_compression in _LOG_COMPRESSION,
        f"log_compression={c.log_compression!r} must be one of {_LOG_COMPRESSION}",
    )
    need(c.db_ref > 0, f"db_ref={c.db_ref} must be positive")
    need(c.amin > 0, f"amin={c.amin} must be positive")
    need(c.top_db is None or c.top_db > 0, f"top_db={c.top_db} must be positive or None")
    need(
        c.normalization in _NORMALIZATION,
        f"normalization={c.normalization!r} must be one of {_NORMALIZATION}",
    )
    need(
        c.normalization_scope in _NORMALIZATION_SCOPE,
        f"normalization_scope={c.normalization_scope!r} must be one of {_NORMALIZATION_SCOPE}",
    )
    need(c.channel is None or c.channel >= 0, f"channel={c.channel} must be None or >= 0")
    need(
        c.resample_quality in _RESAMPLE_QUALITY,
        f"resample_quality={c.resample_quality!r} must be one of {_RESAMPLE_QUALITY}",
    )
    need(c.feature_type in _FEATURE_TYPES, f"feature_type={c.feature_type!r} must be one of {_FEATURE_TYPES}")
    if c.feature_type == "mfcc":
        need(
            1 <= c.n_mfcc <= c.n_mels,
            f"n_mfcc={c.n_mfcc} must lie in 1..n_mels={c.n_mels} (coefficients of the mel bands)",
        )
        need(c.mfcc_deltas in (0, 1, 2), f"mfcc_deltas={c.mfcc_deltas} must be 0, 1 or 2")
        need(
            c.log_compression == "db",
            f"feature_type='mfcc' needs log_compression='db' (MFCC are the DCT of dB log-mels), "
            f"not {c.log_compression!r}",
        )
        need(
            c.mfcc_deltas == 0 or c.window_frames >= DELTA_WIDTH,
            f"mfcc_deltas={c.mfcc_deltas} needs window_frames >= {DELTA_WIDTH} (the deltas' width), "
            f"got {c.window_frames}",
        )
    else:
        for name in ("n_mfcc", "mfcc_deltas"):
            need(
                getattr(c, name) == _LATER_FIELDS[name],
                f"{name}={getattr(c, name)} is for feature_type='mfcc' (feature_type={c.feature_type!r})",
            )
    empty = _empty_mel_bands(c)
    need(
        not empty,
        f"n_mels={c.n_mels} is too many for n_fft={c.n_fft} between fmin_hz={c.fmin_hz:g} and "
        f"fmax_hz={c.fmax_resolved_hz:g}: mel bands {empty[:5]} contain no FFT bin "
        "(lower n_mels or raise n_fft)",
    )


def _empty_mel_bands(c: FeatureConfig) -> list[int]:
    return melscale.empty_bands(**c.filterbank_args)


@dataclasses.dataclass(frozen=True)
class RecordingConfig:
    """Where a recording's start time and site come from. Validated on construction.

    Attributes:
        timezone: IANA zone of times written without an offset (in file names and manifest
            columns): AudioMoth names are UTC by default, Song Meter names are the recorder's
            local time.
        time_from_filename: Read the start time from recorder file names (AudioMoth
            ``YYYYMMDD_HHMMSS.WAV``, Song Meter ``PREFIX_YYYYMMDD_HHMMSS.wav``) when no manifest
            column gives it.
        site_pattern: Regular expression searched in each source URI; its named groups ``site``
            and/or ``deployment`` fill those columns (e.g. ``site=(?P<site>[^/]+)/``).
    """

    timezone: str = "UTC"
    time_from_filename: bool = True
    site_pattern: str | None = None

    def __post_init__(self) -> None:
        import re
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"timezone={self.timezone!r} is not an IANA time zone (e.g. 'UTC')") from exc
        if self.site_pattern is not None:
            try:
                groups = re.compile(self.site_pattern).groupindex
            except re.error as exc:
                raise ConfigError(
                    f"site_pattern={self.site_pattern!r} is not a regular expression: {exc}"
                ) from exc
            if not {"site", "deployment"} & set(groups):
                raise ConfigError(
                    f"site_pattern={self.site_pattern!r} has no named group 'site' or 'deployment' "
                    "(write e.g. 'site=(?P<site>[^/]+)/')"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-serialisable)."""
        return dataclasses.asdict(self)
