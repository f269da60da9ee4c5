"""What flows through soundshard: configs, records, errors and the window table schema."""

from soundshard.schemas.config import FEATURE_VERSION, FeatureConfig, load_feature_config
from soundshard.schemas.errors import (
    AudioDecodeError,
    AudioValidationError,
    ConfigError,
    DataError,
    SoundshardError,
    SourceError,
)
from soundshard.schemas.records import DeadLetter, FileSummary, SourceItem, WindowBatch

__all__ = [
    "FEATURE_VERSION",
    "AudioDecodeError",
    "AudioValidationError",
    "ConfigError",
    "DataError",
    "DeadLetter",
    "FeatureConfig",
    "FileSummary",
    "SoundshardError",
    "SourceError",
    "SourceItem",
    "WindowBatch",
    "load_feature_config",
]
