"""How a run reads from object stores: retries, time limits, read-ahead, memory (a frozen config)."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from typing import Any

from soundshard.schemas.errors import ConfigError

#: Environment variables (of the launcher) that override the defaults: prefix + upper-case field.
STORAGE_ENV_PREFIX = "SOUNDSHARD_STORAGE_"
#: The ``--storage-*`` flag of each field.
STORAGE_FLAGS = {
    "attempts": "--storage-attempts",
    "attempt_timeout_s": "--storage-attempt-timeout-s",
    "deadline_s": "--storage-deadline-s",
    "backoff_s": "--storage-backoff-s",
    "max_backoff_s": "--storage-max-backoff-s",
    "read_ahead": "--storage-read-ahead",
    "cache_mb": "--storage-cache-mb",
}


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """How reads from object stores retry transient errors, and how many run at once.

    Every request gets at most ``attempt_timeout_s``. A request that fails with a transient error
    (connection reset or refused, timeout, HTTP 408/429/5xx) is sent again after an exponential
    backoff with jitter: ``min(max_backoff_s, backoff_s * 2**k)`` times a random factor in
    [0.5, 1] before the k-th retry. It gives up after ``attempts`` requests or when ``deadline_s``
    has passed since the first, whichever comes first; the store's error is then a ``StorageError``.
    The defaults let a short outage pass (about 1 to 2 s of backoff in all) and keep an object that
    never answers from holding a worker for more than ``deadline_s``.

    Resolved once, on the launcher (:meth:`resolve`: the defaults, then ``SOUNDSHARD_STORAGE_<FIELD>``
    variables of the launcher's environment, then the ``--storage-*`` flags), validated there (a
    bad value stops the run before any worker starts), written to ``dataset.json`` and carried to
    the workers inside the stages that read; workers never read the environment.

    Attributes:
        attempts: Requests per read, the first included (1: no retries).
        attempt_timeout_s: Limit of one request, in seconds.
        deadline_s: Limit of one read with all its retries, in seconds.
        backoff_s: Pause before the first retry (before jitter), in seconds.
        max_backoff_s: Longest pause between two attempts, in seconds.
        read_ahead: Objects whose first blocks one planner fetches at once (``1``: one after
            another). Each read waits a round trip on the store; several in flight hide it. The
            reads run together on the filesystem's event loop, so more costs little.
        cache_mb: Megabytes of small objects a worker process keeps between the header read
            and the decoding (``FETCHED``; 0: none kept, every object is fetched twice).

    Raises:
        ConfigError: a value out of range (the message names it).
    """

    attempts: int = 4
    attempt_timeout_s: float = 10.0
    deadline_s: float = 30.0
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    read_ahead: int = 8
    cache_mb: float = 128.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ConfigError(f"storage retry attempts={self.attempts} must be at least 1")
        if self.read_ahead < 1:
            raise ConfigError(f"storage read_ahead={self.read_ahead} must be at least 1")
        for name in ("attempt_timeout_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"storage retry {name}={getattr(self, name)} must be positive")
        for name in ("backoff_s", "max_backoff_s", "cache_mb"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"storage retry {name}={getattr(self, name)} must not be negative")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StorageConfig:
        """The defaults, overridden by ``SOUNDSHARD_STORAGE_<FIELD>`` variables.

        Raises:
            ConfigError: a variable that is not a number, or out of range; the message names it.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = STORAGE_ENV_PREFIX + field.name.upper()
            if environ.get(name, "").strip():
                kind = int if field.type in (int, "int") else float
                try:
                    values[field.name] = kind(environ[name])
                except ValueError as exc:
                    raise ConfigError(f"{name}={environ[name]!r} is not {kind.__name__}") from exc
        return cls(**values)

    def pause_s(self, retry: int) -> float:
        """Backoff before retry number ``retry`` (0 for the first), with jitter."""
        return min(self.max_backoff_s, self.backoff_s * 2**retry) * random.uniform(0.5, 1.0)

    @classmethod
    def resolve(cls, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> StorageConfig:
        """The defaults, the environment's ``SOUNDSHARD_STORAGE_*``, then ``flags`` (field name to
        value; ``None``: not given), in that order.

        Raises:
            ConfigError: a value that is not a number or is out of range (the message names it).
        """
        given = {k: v for k, v in flags.items() if v is not None}
        return dataclasses.replace(cls.from_env(environ), **given)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
