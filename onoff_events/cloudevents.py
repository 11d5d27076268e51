"""CloudEvents Kafka protocol binding, binary content mode: the event's attributes travel as
``ce_``-prefixed record headers, the data is the record value untouched."""

from __future__ import annotations

from datetime import UTC, datetime

from onoff_events.event_kinds import SMS, EventKind

SPEC_VERSION = "1.0"
SMS_EVENT_TYPE = SMS.ce_type
"""``ce_type``: reverse-DNS name of the event and its contract version (bumped on a break)."""
SMS_DATASCHEMA = SMS.dataschema
RECEIVED_TIME = "ce_receivedtime"
"""Extension attribute: when the gateway received the webhook (RFC 3339, UTC, milliseconds)."""
KEY_LABEL = "ce_keylabel"
"""Extension attribute: label of the API key that authenticated the webhook (never the key)."""

Headers = list[tuple[str, bytes]]


def parse_rfc3339(text: str) -> datetime | None:
    """An RFC 3339 date-time as an aware datetime; None when it is not one.

    RFC 3339 allows a lower-case 't'/'z' and a leap second (:60), which Python's
    fromisoformat refuses: upper-case, and a leap second becomes the last microsecond of
    its minute. A time without an offset is not RFC 3339.
    """
    moment: datetime | None
    try:
        # The common case, and the gateway's own format: no normalising needed.
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = _normalised(text)
    return moment if moment is not None and moment.tzinfo is not None else None


def _normalised(text: str) -> datetime | None:
    candidate = text.strip().upper()
    if len(candidate) > 19 and candidate[16:19] == ":60":
        candidate = candidate[:17] + "59.999999" + candidate[19:].lstrip("0123456789.")
    try:
        return datetime.fromisoformat(candidate)
    except ValueError:
        return None


def rfc3339_now() -> str:
    """The current UTC time as RFC 3339 with milliseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventHeaders:
    """Builds the headers of one record of an event kind's topic (``sms-events``,
    ``call-events``); the constant ones are encoded once."""

    def __init__(self, source: str, kind: EventKind = SMS) -> None:
        self._constant: Headers = [
            ("ce_specversion", SPEC_VERSION.encode()),
            ("ce_source", source.encode()),
            ("ce_type", kind.ce_type.encode()),
            ("ce_dataschema", kind.dataschema.encode()),
            ("content-type", b"application/json"),
        ]

    def build(
        self, event_id: str, event_time: str | None, received_time: str, key_label: str
    ) -> Headers:
        """``ce_time`` is the event's own time, or the receive time when it has none (a call
        without ``callStarted``)."""
        return [
            ("ce_id", event_id.encode()),
            ("ce_time", (event_time or received_time).encode()),
            *self._constant,
            (RECEIVED_TIME, received_time.encode()),
            (KEY_LABEL, key_label.encode()),
        ]


SmsEventHeaders = EventHeaders
"""The SMS kind's headers (EventHeaders' default kind)."""
