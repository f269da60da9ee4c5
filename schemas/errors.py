"""One exception hierarchy for soundshard.

Configuration errors stop a run before any data is touched; data errors describe one bad input and
are turned into dead letters by the pipeline (they never stop the run for the other inputs).
"""

from __future__ import annotations


class SoundshardError(Exception):
    """Base class of every error soundshard raises on purpose."""


class ConfigError(SoundshardError, ValueError):
    """A configuration or command-line value is invalid; the message names the value."""


class OutputLockedError(SoundshardError):
    """Another run is writing to the output folder (it holds the folder's lock)."""


class DataError(SoundshardError):
    """One input cannot be processed; carries a snake_case ``reason`` used as counter name.

    Args:
        message: Human-readable description that names the offending value, shape or path.
        reason: Stable snake_case reason (``decode_error``, ``audio_too_short`` ...).
    """

    default_reason = "data_error"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or self.default_reason


class SourceError(DataError):
    """An input listed by a folder, glob or manifest cannot be used (missing file, bad row)."""

    default_reason = "source_error"


class AudioDecodeError(DataError):
    """The bytes of an input cannot be decoded as audio (unknown format, truncated, empty)."""

    default_reason = "decode_error"


class AudioValidationError(DataError):
    """Decoded audio is unusable (no samples, non-finite values, too short for a window)."""

    default_reason = "invalid_audio"


class StorageError(DataError):
    """An input cannot be read from its object store.

    Transient errors (connection resets, timeouts, HTTP 408/429/5xx) outlasted the retries, or the
    store refused the read (reason ``missing_file`` for an object that no longer exists). The
    message names the URI, what was read, the attempts made and the last error.
    """

    default_reason = "storage_error"
