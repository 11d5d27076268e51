"""The error policy of every consumer, in one place: what an exception means for a batch.

- **transient** (network, 5xx, 429, timeouts, a store or the cluster away): retry the same
  batch with backoff and jitter; never skip, never re-read it from Kafka meanwhile.
- **configuration** (credentials refused, a target's address wrong): the same retries, and the
  service is unready: events wait for the fix, none is skipped or dead-lettered for a mistake
  in our settings.
- **permanent for one event** (the sink refuses it, its data cannot be mapped): the sink names
  it in its ``Delivery``; it goes to the sink's DLQ and the partition moves on.
- **unexpected** (an exception no rule names: a bug, a vendor answering nonsense): in delivery
  it is treated as permanent for *one* event: the batch is split until the event that raises
  is alone, that event is dead-lettered with reason ``unexpected:<class>``, its batch-mates are
  delivered. In any other step (dedupe, DLQ, commit) no event can be blamed: the step is
  retried like a transient failure. Either way it is counted and alerted on.

A process exit is kept for what cannot go on: a sink that cannot start, or Python's own
``BaseException``s (memory exhausted, the task cancelled).
"""

from __future__ import annotations

import enum
import traceback
from pathlib import Path

from aiokafka.errors import KafkaError

from consumers.dedupe import DedupeUnavailable
from consumers.sinks import TransientSinkError

TRANSIENT = (TransientSinkError, DedupeUnavailable, KafkaError, OSError, TimeoutError)
UNEXPECTED_PREFIX = "unexpected:"


class Fate(enum.Enum):
    TRANSIENT = "transient"
    CONFIGURATION = "configuration"
    UNEXPECTED = "unexpected"


def fate_of(exc: BaseException) -> Fate:
    """The policy's answer for an exception a step raised."""
    if isinstance(exc, TransientSinkError) and exc.configuration:
        return Fate.CONFIGURATION
    if isinstance(exc, TRANSIENT):
        return Fate.TRANSIENT
    return Fate.UNEXPECTED


def unexpected_reason(exc: BaseException) -> str:
    """The DLQ reason of an event isolated by an unexpected exception: its class only (an
    exception's text may quote the event)."""
    return UNEXPECTED_PREFIX + type(exc).__name__


def where_raised(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame: enough to find the bug, and free of
    values (a traceback's text would carry the exception's message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"
