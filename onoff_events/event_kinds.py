"""The kinds of webhook Onoff sends: what differs between them is data, not code.

One ``EventKind`` says where a kind arrives (its path), which schema checks it, which field is
the event's own time, which topic it goes to and how its CloudEvents type is named. The
gateway's webhook, the checker, the DLQ records and the consumers' decoder are written once,
for any kind.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventKind:
    name: str
    """``sms``, ``call``: the metric label and the settings' prefix."""
    path: str
    """Where Onoff POSTs it."""
    schema: str
    """Its JSON Schema file in ``schemas/``."""
    ce_type: str
    """``ce_type`` of its records: reverse-DNS name and contract version (bumped on a break)."""
    quarantine_type: str
    """``ce_type`` of its DLQ records."""
    time_field: str
    """The field holding the event's own time (``ce_time``); a record without one takes the
    receive time."""
    other_time_fields: tuple[str, ...]
    """Other date-time fields that, like the time field, must convert to UTC (years
    0001-9999): a sink stores them as instants."""
    topic: str
    """Its topic's default name (``KAFKA_TOPIC`` / ``KAFKA_CALL_TOPIC``)."""

    @property
    def dataschema(self) -> str:
        return f"https://onoff-events.dev/schemas/{self.schema}"


SMS = EventKind(
    name="sms",
    path="/v1/onoff/sms",
    schema="onoff-sms-event.schema.json",
    ce_type="com.onoff.business.sms.v1",
    quarantine_type="com.onoff.business.sms.quarantined.v1",
    time_field="date",
    other_time_fields=(),
    topic="sms-events",
)

CALL = EventKind(
    name="call",
    path="/v1/onoff/cdr",
    schema="onoff-call-event.schema.json",  # schemas.CALL_EVENT
    ce_type="com.onoff.business.call.v1",
    quarantine_type="com.onoff.business.call.quarantined.v1",
    time_field="callStarted",
    other_time_fields=("callEnded",),
    topic="call-events",
)

KINDS = (SMS, CALL)
