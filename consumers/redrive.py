"""Re-driving dead letters, as pure functions: which records, and what each becomes.

- A record of a gateway DLQ (``sms-events.dlq``, ``call-events.dlq``) goes through the same
  check as a webhook of its kind,
  against the schema in force now. If it passes, it becomes an ``sms-events`` record with its
  original id (the key), the CloudEvents headers the gateway would have written when it was
  received, and ``ce_redriven`` (when it was re-driven). If it still fails, it stays where it
  is and is counted by reason.
- A record of a sink's DLQ (``sms-events.<sink>.dlq``) names the ``sms-events`` record it came
  from (``source``); that record is replayed into that sink alone (consumers/replay.py).

Re-driving twice moves nothing twice: every record moved is written to a ledger topic
(``sms-events.redriven``, compacted, keyed by the DLQ record's coordinates) and skipped by
every later re-drive. A re-drive that stops between its publish and its ledger write moves
those records again, and the consumers' dedupe (same id) still delivers them once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from onoff_events.cloudevents import KEY_LABEL, EventHeaders, Headers
from onoff_events.event_kinds import EventKind
from onoff_events.sms_event import EventChecker, ValidEvent

REDRIVEN_TIME = "ce_redriven"


@dataclass(frozen=True, slots=True)
class DlqRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]

    @property
    def where(self) -> str:
        """``topic:partition:offset``: how the tools name a record, and its ledger key."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    def fields(self) -> Mapping[str, Any]:
        """The record's JSON object; empty when it is not one (another writer's bytes)."""
        try:
            body = orjson.loads(self.value or b"")
        except orjson.JSONDecodeError:
            return {}
        return body if isinstance(body, dict) else {}

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name and isinstance(value, bytes):
                return value.decode(errors="replace")
        return None

    def key_label(self) -> str:
        return str(self.fields().get("key_label") or self.header(KEY_LABEL) or "-")

    def reason(self) -> str:
        return str(self.fields().get("reason", "unreadable"))


@dataclass(frozen=True, slots=True)
class Filters:
    """Which DLQ records a command takes; an empty filter takes them all."""

    reasons: frozenset[str] = frozenset()
    key_label: str | None = None
    since_ms: int | None = None  # Kafka timestamp of the DLQ record, inclusive
    before_ms: int | None = None  # exclusive
    offsets: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (partition, offset)

    def matches(self, record: DlqRecord) -> bool:
        return (
            (not self.reasons or record.reason() in self.reasons)
            and (self.key_label is None or record.key_label() == self.key_label)
            and (self.since_ms is None or record.timestamp_ms >= self.since_ms)
            and (self.before_ms is None or record.timestamp_ms < self.before_ms)
            and (not self.offsets or (record.partition, record.offset) in self.offsets)
        )


@dataclass(frozen=True, slots=True)
class Republished:
    """A gateway DLQ record that now passes: what goes on the events topic."""

    where: str
    key: bytes
    value: bytes
    headers: Headers


def original_body(record: DlqRecord) -> bytes | None:
    """The body Onoff sent, as well as the DLQ record kept it: the exact bytes when it kept
    them (``raw_body_base64``), else the parsed object written back as JSON (same fields and
    values; numbers may be spelled differently)."""
    fields = record.fields()
    raw = fields.get("raw_body_base64")
    if isinstance(raw, str):
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None
    payload = fields.get("payload")
    if isinstance(payload, dict):
        try:
            return orjson.dumps(payload)
        except orjson.JSONEncodeError:
            return None
    return None


def recheck(
    record: DlqRecord, checker: EventChecker, kind: EventKind, now: str
) -> Republished | str:
    """The events-topic record for a gateway DLQ record of ``kind`` that passes ``checker``
    now, or the reason it still fails (``unreadable`` when the DLQ record holds no body)."""
    body = original_body(record)
    if body is None:
        return "unreadable"
    verdict = checker.check(body)
    if not isinstance(verdict, ValidEvent):
        return verdict.reason
    fields = record.fields()
    received = str(fields.get("received_at") or record.header("ce_time") or now)
    # The gateway's own source when the DLQ record lost its headers (its default setting).
    source = record.header("ce_source") or f"/onoff-events/gateway{kind.path}"
    headers = EventHeaders(source, kind).build(
        verdict.event_id, verdict.time, received, record.key_label()
    )
    headers.append((REDRIVEN_TIME, now.encode()))
    return Republished(record.where, verdict.event_id.encode(), body, headers)


def replay_sources(records: Iterable[DlqRecord], events_topic: str) -> dict[str, tuple[int, int]]:
    """Sink DLQ records → the (partition, offset) of the events-topic record each came from;
    a record that names no usable source (another topic, a hand-made record) is left out."""
    sources: dict[str, tuple[int, int]] = {}
    for record in records:
        source = record.fields().get("source")
        if not isinstance(source, dict) or source.get("topic") != events_topic:
            continue
        partition, offset = source.get("partition"), source.get("offset")
        if isinstance(partition, int) and isinstance(offset, int) and min(partition, offset) >= 0:
            sources[record.where] = (partition, offset)
    return sources


def ledger_entry(where: str, moved_to: str, now: str) -> tuple[bytes, bytes]:
    """Key and value of the ledger record saying ``where`` was re-driven."""
    return where.encode(), orjson.dumps({"redriven_at": now, "to": moved_to})


def sink_of(dlq_topic: str, events_topic: str, sinks: Iterable[str]) -> str | None:
    """The sink whose DLQ ``dlq_topic`` is (``<events>.<sink>.dlq``); None for any other."""
    for sink in sinks:
        if dlq_topic == f"{events_topic}.{sink}.dlq":
            return sink
    return None
