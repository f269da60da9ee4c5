"""Outcomes of inputs: the dead letter of a failure, and the Beam counters every outcome is counted
in (no Beam transforms here)."""

from __future__ import annotations

import logging

from apache_beam.metrics import Metrics

from soundshard.schemas.errors import DataError
from soundshard.schemas.outcomes import Stage
from soundshard.schemas.records import DeadLetter, SourceItem

#: Namespace of soundshard's Beam counters.
NAMESPACE = "soundshard"
_LOG = logging.getLogger(__name__)


def count(reason: str, n: int = 1) -> None:
    """Increments the Beam counter ``soundshard/<reason>``."""
    Metrics.counter(NAMESPACE, reason).inc(n)


def dead_letter(
    item: SourceItem, stage: Stage, exc: BaseException, *, where: str | None = None
) -> DeadLetter:
    """A dead letter for ``item`` failing at ``stage``; counts it under its reason.

    ``where`` names the part that failed (e.g. a unit's window range) when not the whole file.
    """
    reason = exc.reason if isinstance(exc, DataError) else "unexpected_error"
    if not isinstance(exc, DataError):
        _LOG.warning("unexpected %s in stage %s for %s", type(exc).__name__, stage, item.uri, exc_info=exc)
    count(reason)
    count("dead_letters")
    message = str(exc) if where is None or where in str(exc) else f"{where}: {exc}"
    return DeadLetter(item.uri, item.clip_id, stage, reason, type(exc).__name__, message, item.augmentation)
