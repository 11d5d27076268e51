"""Kafka records of an event kind's topic (``sms-events``, ``call-events``) decoded for sinks,
as pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from onoff_events.cloudevents import RECEIVED_TIME, parse_rfc3339
from onoff_events.event_kinds import CALL, SMS, EventKind
from onoff_events.sms_event import EventChecker, Quarantined


class SmsRecord(NamedTuple):
    """One SMS event as read from Kafka, with where it came from. (A named tuple, not a
    frozen dataclass: one is built per event, and a frozen dataclass takes five times as long
    to build.)"""

    event_id: str
    payload: dict[str, Any]
    raw: bytes
    sent_at: datetime
    received_at: datetime | None
    topic: str
    partition: int
    offset: int


class CallRecord(NamedTuple):
    """One call event (a call log, voicemail or recording) as read from ``call-events``.
    ``started_at``/``ended_at`` are ``callStarted``/``callEnded`` parsed (None when absent);
    each converts to UTC (the checker refuses one that does not)."""

    event_id: str
    payload: dict[str, Any]
    raw: bytes
    started_at: datetime | None
    ended_at: datetime | None
    received_at: datetime | None
    topic: str
    partition: int
    offset: int


EventRecord = SmsRecord | CallRecord
"""What a sink receives: the runner only reads what both have (id, raw, payload, where)."""


@dataclass(frozen=True, slots=True)
class PoisonRecord:
    """A record no sink can use (not a valid SMS event); it goes to the sink's DLQ."""

    reason: str
    detail: str
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int


class RecordDecoder:
    """Checks each value against the same schema file as the gateway: the topic may have
    other writers (a replay tool, a test), and a sink must never see a malformed event."""

    def __init__(self, kind: EventKind = SMS) -> None:
        self._kind = kind
        self._checker = EventChecker(kind)

    def decode(self, record: Any) -> EventRecord | PoisonRecord:
        """Never raises: whatever the bytes, the answer is an event or a poison record."""
        try:
            return self._decode(record)
        except Exception as exc:  # noqa: BLE001 # a decoder bug must not stop the partition
            return _poison(record, "invalid_event", f"undecodable: {type(exc).__name__}")

    def _decode(self, record: Any) -> EventRecord | PoisonRecord:
        value: bytes | None = record.value
        if value is None:
            return _poison(record, "invalid_event", "the record has no value (a tombstone)")
        verdict = self._checker.check(value)
        if isinstance(verdict, Quarantined):
            problems = ", ".join(f"{p.path or '/'} {p.keyword}" for p in verdict.problems)
            return _poison(record, "invalid_event", f"{verdict.reason}: {problems}")
        if self._kind is CALL:
            ended = verdict.payload.get("callEnded")
            return CallRecord(
                event_id=verdict.event_id,
                payload=verdict.payload,
                raw=value,
                started_at=verdict.at,
                # The checker refused a callEnded with no UTC time: this parse succeeds.
                ended_at=parse_rfc3339(ended) if isinstance(ended, str) else None,
                received_at=_received_at(record.headers),
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
        # The checker parsed the date once and refused one with no UTC time: the same
        # definition of valid as the gateway's, and no second parse per event.
        if verdict.at is None:  # the SMS schema requires a date: another kind's record
            return _poison(record, "invalid_event", "no event time")
        return SmsRecord(
            event_id=verdict.event_id,
            payload=verdict.payload,
            raw=value,
            sent_at=verdict.at,
            received_at=_received_at(record.headers),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )


def first_of_each_id(
    records: Iterable[EventRecord],
) -> tuple[list[EventRecord], list[EventRecord]]:
    """Split a batch into the first record of each id and the later copies (duplicates)."""
    seen: set[str] = set()
    unique: list[EventRecord] = []
    copies: list[EventRecord] = []
    for record in records:
        if record.event_id in seen:
            copies.append(record)
        else:
            seen.add(record.event_id)
            unique.append(record)
    return unique, copies


def next_offsets(records: Sequence[Any]) -> dict[tuple[str, int], int]:
    """The offset to commit per (topic, partition): one past the last record seen."""
    offsets: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        offsets[key] = max(offsets.get(key, 0), record.offset + 1)
    return offsets


def _poison(record: Any, reason: str, detail: str) -> PoisonRecord:
    return PoisonRecord(
        reason, detail, record.key, record.value, record.topic, record.partition, record.offset
    )


def _received_at(headers: Sequence[tuple[str, bytes | None]] | None) -> datetime | None:
    """The gateway's receive time; None when absent or unusable (another writer's header
    must never stop the consumer)."""
    for name, value in headers or ():
        if name == RECEIVED_TIME and isinstance(value, bytes):
            try:
                moment = parse_rfc3339(value.decode())
                # Latency is computed in UTC: a time that has none (year 1 at +01:00) is unusable.
                return moment.astimezone(UTC) if moment is not None else None
            except (UnicodeDecodeError, OverflowError, ValueError):
                return None
    return None
