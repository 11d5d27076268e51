"""Records of the gateway's DLQ topics (``sms-events.dlq``, ``call-events.dlq``), built as
pure functions.

The record's shape is ``schemas/dlq-record.schema.json``. The value keeps what Onoff sent (the
parsed object, or the raw bytes in base64 when it is not a JSON object or cannot be written
back as JSON) so that an operator can fix and re-drive it; the reasons never quote a value
from the body. Building a record never raises: a body the gateway could read is never
answered with a 500.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson

from onoff_events.cloudevents import SPEC_VERSION, Headers
from onoff_events.event_kinds import SMS, EventKind
from onoff_events.sms_event import Quarantined

QUARANTINE_EVENT_TYPE = SMS.quarantine_type

# Room for the record's own fields (reasons, ids, labels) beyond the body: with a payload
# larger than the body in base64 plus this, the record keeps the raw bytes instead. Well under
# the 64 KiB the gateway's size budget leaves for them (gateway/settings.py).
_FIELDS_MARGIN_BYTES = 16 * 1024


def quarantine_record(
    verdict: Quarantined, received_at: str, key_label: str, *, keep_payload: bool = True
) -> dict[str, Any]:
    """The DLQ record for a body that could not go to the events topic: with the parsed
    ``payload`` when there is one and ``keep_payload``, else with the raw bytes."""
    record: dict[str, Any] = {
        "dlq_version": 1,
        "stage": "gateway",
        "reason": verdict.reason,
        "errors": [p.as_json() for p in verdict.problems],
        "event_id": verdict.event_id,
        "received_at": received_at,
        "key_label": key_label,
    }
    if verdict.payload is not None and keep_payload:
        record["payload"] = verdict.payload
    else:
        record["raw_body_base64"] = base64.b64encode(verdict.raw).decode()
    return record


def quarantine_message(
    verdict: Quarantined, received_at: str, key_label: str, source: str, kind: EventKind = SMS
) -> tuple[bytes | None, bytes, Headers]:
    """Key, value and CloudEvents headers of the DLQ record for ``verdict``.

    The key is the event id when there is a usable one, so a quarantined event lands in the
    same partition as its valid retries would; each record gets its own ``ce_id``.

    The record is never larger than the body in base64 plus its own fields (the size the
    producer and the DLQ topic are sized for): a payload that grows when written back keeps
    the raw bytes instead.
    """
    key = verdict.event_id.encode() if verdict.event_id is not None else None
    try:
        value = orjson.dumps(quarantine_record(verdict, received_at, key_label))
    except orjson.JSONEncodeError:
        # orjson reads 1024 levels but writes only about 254: an object nested in between
        # cannot be written back, so the record keeps the exact bytes Onoff sent instead.
        value = orjson.dumps(quarantine_record(verdict, received_at, key_label, keep_payload=False))
    else:
        base64_size = 4 * -(-len(verdict.raw) // 3)
        if len(value) > base64_size + _FIELDS_MARGIN_BYTES:
            # Numbers grow when written back (1e9 becomes 1000000000.0), whitespace-free
            # bodies cannot shrink: such a payload could exceed what Kafka takes.
            value = orjson.dumps(
                quarantine_record(verdict, received_at, key_label, keep_payload=False)
            )
    headers: Headers = [
        ("ce_specversion", SPEC_VERSION.encode()),
        ("ce_id", uuid.uuid4().hex.encode()),
        ("ce_source", source.encode()),
        ("ce_type", kind.quarantine_type.encode()),
        ("ce_time", received_at.encode()),
        ("content-type", b"application/json"),
        ("ce_keylabel", key_label.encode()),
    ]
    return key, value, headers
