"""Sinks: where the consumer services deliver SMS events.

A sink is small: start, deliver a batch (say which events it can never accept), close. Adding
one means one module here and one line in ``SINKS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from prometheus_client import CollectorRegistry


class TransientSinkError(Exception):
    """The sink cannot take the batch now (down, timeout, 5xx, 429); retry the same batch.

    ``retry_after`` is the sink's own hint in seconds (HTTP ``Retry-After``), when it gave one.
    A subclass with ``configuration = True`` means our settings are wrong (credentials, an
    address): retried the same way, and the service is unready until they are fixed.
    """

    configuration: ClassVar[bool] = False

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkConfigError(Exception):
    """The sink's settings are wrong: the service must not start."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a sink did with a batch: every event not named here is delivered."""

    rejected: Mapping[str, str] = field(default_factory=dict)
    """``{event_id: reason}``: events the sink can never accept (they go to its DLQ)."""
    already_held: frozenset[str] = frozenset()
    """Ids the sink already had (a sink that is its own dedupe store): duplicates."""


class Sink(Protocol):
    """What the runner needs of a sink."""

    name: str

    async def start(self) -> None:
        """Connect and prepare (create tables…); may raise TransientSinkError to be retried."""

    async def deliver(self, events: Sequence[Any]) -> Delivery:
        """Deliver every event (``EventRecord``s of the service's kind: an SmsRecord or a
        CallRecord), idempotently by ``event_id``.

        Name in the result the events the sink can never accept (they go to the sink's DLQ)
        and, for a sink that keys its own records, those it already held; raise
        TransientSinkError when the whole batch should be retried.
        """
        ...

    async def close(self) -> None:
        """Release connections."""


SinkFactory = Callable[[Mapping[str, str], CollectorRegistry], Sink]


# Factories import their module on use: a service loads only its own sink's drivers.
def _warehouse(env: Mapping[str, str], registry: CollectorRegistry) -> Sink:
    from consumers.sinks.warehouse import warehouse_from_env  # noqa: PLC0415

    return warehouse_from_env(env)


def _crm(env: Mapping[str, str], registry: CollectorRegistry) -> Sink:
    from consumers.sinks.crm import crm_from_env  # noqa: PLC0415

    return crm_from_env(env, registry)


def _alerts(env: Mapping[str, str], registry: CollectorRegistry) -> Sink:
    from consumers.sinks.alerts import alerts_from_env  # noqa: PLC0415

    return alerts_from_env(env, registry)


SINKS: dict[str, SinkFactory] = {
    "warehouse": _warehouse,
    "crm": _crm,
    "alerts": _alerts,
}
