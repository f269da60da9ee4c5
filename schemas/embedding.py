"""Embedding configuration and the records of the embedding stage (frozen dataclasses).

An embedding model maps fixed-length windows of audio to vectors. Windows lie on one grid per
recording, as openl3 frames audio: resample to the model's rate; with ``center`` pad half a
window of silence before the start (so the first window is centred on the recording's first
sample); window ``k`` then covers samples ``[k * hop - pad, k * hop - pad + window)`` of the
recording, zeros outside it; the last window is the first one that reaches the recording's end.
So a window's values never depend on how a recording is split into work units.

OpenL3 (Cramer et al., 2019) is built in (``model="openl3"``): 1 s windows at 48 kHz, every
0.1 s by default, centred, ``input_repr`` / ``content_type`` / ``embedding_size`` as in the
openl3 package. Any other model is a TF SavedModel or a TFLite file with a declared sample rate,
window, hop, output and embedding size (``model="saved_model"`` or ``"tflite"``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from soundshard.schemas.config import _RESAMPLE_QUALITY, ConfigSerialization, _check_types, read_config_file
from soundshard.schemas.errors import ConfigError
from soundshard.schemas.records import SourceItem, WindowBatch, WorkUnit

#: Bumped whenever the embedding maths change in a way that alters values for the same config.
EMBEDDING_VERSION = 1
#: Column of the embedding in the window table.
EMBEDDING_COLUMN = "embedding"

MODELS = ("openl3", "saved_model", "tflite")
INPUT_REPRS = ("linear", "mel128", "mel256")
CONTENT_TYPES = ("env", "music")
OPENL3_EMBEDDING_SIZES = (512, 6144)
#: openl3 versions whose front-end is reproduced: "0.4" (kapre 0.3, the current package) and
#: "0.3" (kapre 0.1.4, the front-end the published weights were trained with).
FRONTENDS = ("0.4", "0.3")
OPENL3_SAMPLE_RATE_HZ = 48000
OPENL3_WINDOW_S = 1.0
_OPENL3_ONLY = ("input_repr", "content_type", "frontend")
_OTHER_ONLY = ("output", "signature")


def openl3_weights_name(input_repr: str, content_type: str) -> str:
    """File name of the official OpenL3 audio weights, e.g. ``openl3_audio_mel256_music.h5``."""
    return f"openl3_audio_{input_repr}_{content_type}.h5"


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig(ConfigSerialization):
    """Which embedding model runs, and how audio is cut into its windows. Validated on construction.

    Fields left ``None`` take the model's values: OpenL3 fixes ``sample_rate_hz`` (48000),
    ``window_s`` (1.0) and defaults ``embedding_size`` to 6144, ``center`` to True,
    ``input_repr`` to ``"mel256"``, ``content_type`` to ``"music"`` and ``frontend`` to ``"0.4"``
    (the openl3 package's defaults). Other models must declare ``sample_rate_hz``, ``window_s``
    and ``embedding_size``; ``center`` defaults to False for them.

    Attributes:
        model: ``"openl3"``, ``"saved_model"`` (a TF SavedModel folder) or ``"tflite"``.
        model_uri: OpenL3: the weight file (``openl3_audio_<repr>_<content>.h5``); otherwise the
            SavedModel folder or ``.tflite`` file. Local path or object-store URI; never
            downloaded from anywhere else.
        model_sha256: Expected SHA-256 of the weight file (of a SavedModel folder: of its files'
            relative paths and bytes, see ``transforms.embeddings.model_digest``); checked on
            load. The launcher fills it in from the file it finds.
        input_repr: OpenL3 spectrogram: ``"linear"``, ``"mel128"`` or ``"mel256"``.
        content_type: OpenL3 training content: ``"env"`` or ``"music"``.
        embedding_size: Values per embedding (OpenL3: 512 or 6144).
        frontend: OpenL3 front-end of openl3 ``"0.4"`` (Slaney mel of the magnitude, pad at the
            end) or ``"0.3"`` (HTK mel of the power, square root, 'same' padding).
        sample_rate_hz: Rate the model takes; inputs are resampled to it (soxr).
        window_s: Seconds of audio per embedding.
        hop_s: Seconds between window starts (rounded to whole samples). Larger than
            ``window_s`` is allowed (windows then sample the recording sparsely).
        center: Pad half a window of silence before the start, so window ``k`` is centred on
            ``k * hop_s`` (openl3's ``center=True``).
        output: Other models: output name, or index (tuple outputs; a signature's outputs in
            sorted-name order; a TFLite model's output details); ``None`` when there is one. For
            a TFLite model also the name of an intermediate tensor (a classifier's embedding
            layer, as BirdNET's); a SavedModel gives its signature's outputs only.
        signature: SavedModel signature to call; if the SavedModel has none, the object itself
            is called.
        channel: ``None`` mixes all channels down to mono; an index keeps that channel only.
        resample_quality: soxr quality preset (``QQ``, ``LQ``, ``MQ``, ``HQ``, ``VHQ``).
        trust_model_code: SavedModels only. SavedModels are programs: by default the ops of
            their graphs are checked against an allow-list of ordinary inference ops before
            loading (``transforms.embeddings.check_saved_model_ops``), and a model with file,
            Python or other I/O ops is refused. True skips that check and runs whatever ops the
            graph contains: only for model files you trust. It changes no value, so it is left
            out of the fingerprint (and of ``to_dict`` when False).
    """

    model: str = "openl3"
    model_uri: str | None = None
    model_sha256: str | None = None
    input_repr: str | None = None
    content_type: str | None = None
    embedding_size: int | None = None
    frontend: str | None = None
    sample_rate_hz: int | None = None
    window_s: float | None = None
    hop_s: float = 0.1
    center: bool | None = None
    output: str | int | None = None
    signature: str | None = None
    channel: int | None = None
    resample_quality: str = "HQ"
    trust_model_code: bool = False

    _WHAT = "embedding"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.model == "openl3":
            defaults = {
                "input_repr": "mel256",
                "content_type": "music",
                "embedding_size": 6144,
                "frontend": "0.4",
                "sample_rate_hz": OPENL3_SAMPLE_RATE_HZ,
                "window_s": OPENL3_WINDOW_S,
                "center": True,
            }
        else:
            defaults = {"center": False}
            if self.model == "saved_model":
                defaults["signature"] = "serving_default"
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if isinstance(self.window_s, int):
            object.__setattr__(self, "window_s", float(self.window_s))
        if isinstance(self.hop_s, int):
            object.__setattr__(self, "hop_s", float(self.hop_s))
        _check_values(self)

    # -- derived values ---------------------------------------------------------------------

    @property
    def feature_shape(self) -> tuple[int]:
        """Shape of one window's embedding, ``[embedding_size]``."""
        return (int(self.embedding_size),)

    @property
    def feature_column(self) -> str:
        """Column of the embedding in the window table."""
        return EMBEDDING_COLUMN

    @property
    def window_samples(self) -> int:
        """Samples per window at ``sample_rate_hz``."""
        return int(round(self.window_s * self.sample_rate_hz))

    @property
    def hop_samples(self) -> int:
        """Samples between window starts."""
        return int(round(self.hop_s * self.sample_rate_hz))

    @property
    def pad_start_samples(self) -> int:
        """Silence padded before the recording: half a window when centred, else 0."""
        return self.window_samples // 2 if self.center else 0

    @property
    def window_hop_s(self) -> float:
        """Seconds between window starts, after rounding to whole samples."""
        return self.hop_samples / self.sample_rate_hz

    @property
    def expected_weights_name(self) -> str | None:
        """OpenL3: the official weight file's name for this variant; else ``None``."""
        if self.model != "openl3":
            return None
        return openl3_weights_name(self.input_repr, self.content_type)

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field; ``trust_model_code`` only when True, so configs (and
        the files that record them) read the same as before the option existed."""
        values = super().to_dict()
        if not values["trust_model_code"]:
            del values["trust_model_code"]
        return values

    @functools.cached_property
    def fingerprint(self) -> str:
        """Stable 16-hex-digit digest of the config and the embedding-maths version.

        With ``model_sha256`` set, the model is identified by its content and ``model_uri`` is
        left out: the same weights read from another location give the same fingerprint.
        """
        values = self.to_dict()
        values.pop("trust_model_code", None)  # whether the ops were checked, not what they compute
        if self.model_sha256 is not None:
            values.pop("model_uri")
        payload = json.dumps({"embedding_version": EMBEDDING_VERSION, **values}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_values(c: EmbeddingConfig) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    need(c.model in MODELS, f"model={c.model!r} must be one of {MODELS}")
    need(
        not c.trust_model_code or c.model == "saved_model",
        f"trust_model_code={c.trust_model_code!r} applies to saved_model only (model={c.model!r})",
    )
    if c.model == "openl3":
        need(c.input_repr in INPUT_REPRS, f"input_repr={c.input_repr!r} must be one of {INPUT_REPRS}")
        need(
            c.content_type in CONTENT_TYPES,
            f"content_type={c.content_type!r} must be one of {CONTENT_TYPES}",
        )
        need(
            c.embedding_size in OPENL3_EMBEDDING_SIZES,
            f"embedding_size={c.embedding_size} must be one of {OPENL3_EMBEDDING_SIZES} for OpenL3",
        )
        need(c.frontend in FRONTENDS, f"frontend={c.frontend!r} must be one of {FRONTENDS}")
        need(
            c.sample_rate_hz == OPENL3_SAMPLE_RATE_HZ,
            f"sample_rate_hz={c.sample_rate_hz}: OpenL3 takes {OPENL3_SAMPLE_RATE_HZ} Hz (inputs are "
            "resampled to it)",
        )
        need(
            c.window_s == OPENL3_WINDOW_S,
            f"window_s={c.window_s}: OpenL3 takes windows of {OPENL3_WINDOW_S} s",
        )
        for name in _OTHER_ONLY:
            need(getattr(c, name) is None, f"{name}={getattr(c, name)!r} applies to saved_model/tflite only")
    else:
        for name in _OPENL3_ONLY:
            need(getattr(c, name) is None, f"{name}={getattr(c, name)!r} applies to model='openl3' only")
        for name in ("sample_rate_hz", "window_s", "embedding_size"):
            need(
                getattr(c, name) is not None,
                f"model={c.model!r} needs {name} (declare it in the model config, e.g. --model-config)",
            )
        need(
            c.embedding_size >= 1,
            f"embedding_size={c.embedding_size} must be at least 1",
        )
        need(
            8000 <= c.sample_rate_hz <= 384000,
            f"sample_rate_hz={c.sample_rate_hz} must lie in 8000..384000",
        )
        need(c.window_s > 0, f"window_s={c.window_s} must be positive")
        if c.model == "tflite":
            need(c.signature is None, f"signature={c.signature!r} applies to saved_model only")
    need(math.isfinite(c.hop_s) and c.hop_s > 0, f"hop_s={c.hop_s} must be positive")
    need(c.hop_samples >= 1, f"hop_s={c.hop_s} is shorter than one sample at {c.sample_rate_hz} Hz")
    need(c.window_samples >= 1, f"window_s={c.window_s} is shorter than one sample")
    need(c.channel is None or c.channel >= 0, f"channel={c.channel} must be None or >= 0")
    need(
        c.resample_quality in _RESAMPLE_QUALITY,
        f"resample_quality={c.resample_quality!r} must be one of {_RESAMPLE_QUALITY}",
    )
    if c.model_sha256 is not None:
        digest = c.model_sha256.lower()
        need(
            len(digest) == 64 and all(ch in "0123456789abcdef" for ch in digest),
            f"model_sha256={c.model_sha256!r} must be 64 hexadecimal digits",
        )
        object.__setattr__(c, "model_sha256", digest)


def load_embedding_config(path: str | Path, **overrides: Any) -> EmbeddingConfig:
    """Reads a TOML or JSON model config; keys may sit at top level or under ``[embedding]``.

    Args:
        path: ``.toml`` or ``.json`` file.
        **overrides: Values that replace those of the file (e.g. from command-line flags).

    Raises:
        ConfigError: unreadable file, unknown key or invalid value.
    """
    values = read_config_file(path, table="embedding", what="model")
    return EmbeddingConfig.from_dict({**values, **overrides})


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingInput:
    """One window of audio on its way to the model (the element RunInference batches).

    Attributes:
        unit: The work unit the window belongs to.
        index: Index of the window on the recording's window grid.
        samples: float32 ``[window_samples]`` (a view into the unit's decoded audio).
        silent: True when every sample of the window is exactly zero.
    """

    unit: WorkUnit
    index: int
    samples: np.ndarray
    silent: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingBatch(WindowBatch):
    """Consecutive embedded windows of one work unit (a :class:`WindowBatch` whose features are
    float32 ``[n_windows, embedding_size]``).

    Attributes:
        unit_first_window: First window of the work unit the windows belong to: shards are
            assigned by unit, so which shard a row lands in does not depend on how inference
            batches were cut.
    """

    unit_first_window: int = 0


def unit_source(batch: WindowBatch) -> tuple[SourceItem, int]:
    """``(source, first window of its work unit)`` of a batch: the key its shard is chosen by."""
    if isinstance(batch, EmbeddingBatch):
        return batch.source, batch.unit_first_window
    return batch.source, batch.first_window_index
