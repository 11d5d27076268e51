"""Every event the decoder accepts maps to an alert for every target without raising.

Generated from the fields of schemas/onoff-sms-event.schema.json: dates over the whole
0001..9999 range with any offset (the edges included, where converting to UTC overflows),
any Unicode in the text fields, unknown extra fields. An event that does not pass
``EventChecker`` is discarded (the gateway never forwards it); every other one goes
through the alerts sink's ``deliver`` with rules of every kind firing, and the payload of
each target (Alertmanager, Slack, PagerDuty, log) must build and serialise with orjson.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, NamedTuple

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from consumers.alert_rules import parse_rules
from consumers.phones import to_e164
from consumers.records import RecordDecoder, SmsRecord
from consumers.sinks import alerts
from consumers.sinks.alerts import Alert, AlertsSink
from consumers.sinks.burst import NEVER_FIRED
from onoff_events.cloudevents import RECEIVED_TIME, parse_rfc3339, rfc3339_now
from tests.payloads import sms_event

BLOCKED = "+33611223344"
ROUTING_KEY = "R0UT1NGKEY0000000000000000000000"

EVERY_TARGET = ["log", "alertmanager", "slack", "pagerduty"]
RULES = parse_rules(
    {
        "rule": [
            {"name": "every-message", "kind": "regex", "pattern": "^", "include_body": True},
            {"name": "urgent", "kind": "keyword", "words": ["urgent", "call me"]},
            {"name": "stop", "kind": "opt_out", "include_body": True},
            {"name": "burst", "kind": "burst", "max_messages": 1, "window_minutes": 1440},
            {"name": "blocked", "kind": "blocklist", "numbers": [BLOCKED]},
        ]
    },
    lambda n: to_e164(n, "FR"),
)
# Every rule sends to every target.
RULES = type(RULES)(tuple(replace(r, targets=tuple(EVERY_TARGET)) for r in RULES.rules))

# Each target's payload builder, as the target calls it.
BUILDERS: dict[str, Callable[[Alert], Any]] = {
    "alertmanager": alerts.alertmanager_alert,
    "slack": alerts.slack_message,
    "pagerduty": lambda a: alerts.pagerduty_event(a, ROUTING_KEY),
    "log": alerts.log_fields,
}


class KafkaRecord(NamedTuple):
    """The attributes of an aiokafka ConsumerRecord that the decoder reads."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    topic: str
    partition: int
    offset: int


class BuildingTarget:
    """A target that builds its payload as the real one does, and keeps it serialised."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[bytes] = []

    async def send(self, alerts_: Sequence[Alert]) -> None:
        self.sent.extend(orjson.dumps(BUILDERS[self.name](a)) for a in alerts_)

    async def close(self) -> None:
        """Nothing to release."""


class FiringBurstStore:
    """Every sender has just sent twice: the burst rule (max 1) fires on every event."""

    async def record(self, key: str, event_id: str, at: float, window: float) -> list[float]:
        return [at, at]

    async def fired_until(self, key: str) -> float:
        return NEVER_FIRED

    async def mark_fired(self, key: str, until: float, window: float) -> None:
        """Not kept: each example starts from nothing."""

    async def close(self) -> None:
        """Nothing to release."""


# --- strategies, field by field from the schema ------------------------------------------------

EDGE_MOMENTS = st.sampled_from(
    [
        datetime(1, 1, 1),
        datetime(1, 1, 1, 0, 59, 59),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
        datetime(9999, 12, 31, 23, 0),
        datetime(1970, 1, 1),
    ]
)
OFFSET_MINUTES = st.one_of(st.sampled_from([0, -1439, 1439, -60, 60]), st.integers(-1439, 1439))


@st.composite
def rfc3339_dates(draw: st.DrawFn) -> str:
    moment = draw(st.one_of(EDGE_MOMENTS, st.datetimes()))  # datetimes(): years 1..9999
    m = moment
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    fraction = draw(st.sampled_from(["", "micro", "milli"]))
    if fraction == "micro":
        text += f".{moment.microsecond:06d}"
    elif fraction == "milli":
        text += f".{moment.microsecond // 1000:03d}"
    minutes = draw(OFFSET_MINUTES)
    if minutes == 0 and draw(st.booleans()):
        offset = draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if minutes < 0 else "+"
        offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    if draw(st.booleans()):
        text = text.replace("T", "t")
    return text + offset


def unicode_text(max_size: int) -> st.SearchStrategy[str]:
    # Every plane, including control characters, private use and unassigned code points
    # (hypothesis leaves out only lone surrogates, which JSON cannot carry to us).
    return st.text(st.characters(codec="utf-8"), max_size=max_size)


numbers = st.one_of(
    st.sampled_from([BLOCKED, "0611223344", "0033611223344", "+1 202 555 0100", "BANK-FR", ""]),
    st.from_regex(r"\A\+?[0-9 ().-]{0,20}\Z"),
    unicode_text(64),
)
bodies = st.one_of(
    unicode_text(400),
    st.builds(lambda t: "STOP " + t, unicode_text(50)),
    st.builds(lambda t: t + " URGENT, call me", unicode_text(50)),
    st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(4000, 6000)),
)
ids = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=256
)
extra_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | unicode_text(20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(unicode_text(8), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def sms_events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": draw(ids),
        "eventName": "SMS",
        "onoffUserName": draw(unicode_text(256)),
        "onoffUserEmail": draw(unicode_text(320)),
        "onoffUserNumber": draw(numbers),
        "externalNumber": draw(numbers),
        "date": draw(rfc3339_dates()),
        "smsDirection": draw(st.sampled_from(["SENT", "RECEIVED"])),
        "body": draw(bodies),
    }
    for optional, size in (("externalName", 256), ("externalEmail", 320)):
        choice = draw(st.sampled_from(["absent", "null", "text"]))
        if choice != "absent":
            event[optional] = None if choice == "null" else draw(unicode_text(size))
    extra = draw(st.dictionaries(unicode_text(12), extra_values, max_size=3))
    return {**extra, **event}


def headers(received: str | None) -> list[tuple[str, bytes]]:
    return [] if received is None else [(RECEIVED_TIME, received.encode())]


def deliver(event: SmsRecord) -> dict[str, BuildingTarget]:
    targets = {name: BuildingTarget(name) for name in BUILDERS}
    sink = AlertsSink(
        CollectorRegistry(),
        rules=RULES,
        targets=targets,
        burst=FiringBurstStore(),
        region="FR",
        sender_key=b"k" * 32,
    )
    # A loop of its own, never set as the thread's loop: pytest-asyncio's stays untouched.
    loop = asyncio.new_event_loop()
    try:
        delivery = loop.run_until_complete(sink.deliver([event]))
        loop.run_until_complete(sink.close())
    finally:
        loop.close()
    assert delivery.rejected == {}
    return targets


PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DECODER = RecordDecoder()
RECEIVE_TIMES = st.one_of(st.none(), st.just(rfc3339_now()), rfc3339_dates())


def assert_every_target_got_a_serialisable_payload(targets: dict[str, BuildingTarget]) -> None:
    for target in targets.values():
        assert len(target.sent) >= 2, target.name  # the regex and burst rules fire on all
        for payload_bytes in target.sent:
            assert orjson.loads(payload_bytes)


@PROPERTY
@given(payload=sms_events(), received=RECEIVE_TIMES)
def test_every_event_the_decoder_accepts_maps_to_every_target_without_raising(
    payload: dict[str, Any], received: str | None
) -> None:
    record = KafkaRecord(b"k", orjson.dumps(payload), headers(received), "sms-events", 0, 7)
    decoded = DECODER.decode(record)
    assume(isinstance(decoded, SmsRecord))  # the checker (or the date parser) refused it
    assert isinstance(decoded, SmsRecord)
    assert_every_target_got_a_serialisable_payload(deliver(decoded))


@PROPERTY
@given(payload=sms_events(), received=RECEIVE_TIMES)
def test_every_parseable_date_maps_even_one_the_gateway_now_refuses(
    payload: dict[str, Any], received: str | None
) -> None:
    """The sink does not rely on the gateway's date check: a record written before it, or by
    another producer, with a date whose UTC form is out of Python's range still maps."""
    sent_at = parse_rfc3339(payload["date"])
    assume(sent_at is not None)
    assert sent_at is not None
    event = SmsRecord(
        payload["id"],
        payload,
        orjson.dumps(payload),
        sent_at,
        None if received is None else parse_rfc3339(received),
        "sms-events",
        0,
        7,
    )
    assert_every_target_got_a_serialisable_payload(deliver(event))


def test_a_date_past_9999_in_utc_goes_to_pagerduty_with_the_receive_time() -> None:
    """9999-12-31T23:59:59-01:00 is a valid RFC 3339 time whose UTC form is in year 10000:
    Python cannot represent it, so the PagerDuty timestamp falls back to the receive time
    and the details keep the date as sent."""
    received = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    sent = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-1)))
    payload = sms_event(id="p1", date="9999-12-31T23:59:59-01:00")
    event = SmsRecord("p1", payload, orjson.dumps(payload), sent, received, "sms-events", 0, 1)
    targets = deliver(event)
    [first, *_] = [orjson.loads(p) for p in targets["pagerduty"].sent]
    assert first["payload"]["timestamp"] == "2026-11-27T10:00:00.000Z"
    assert first["payload"]["custom_details"]["sms_date"] == "9999-12-31T23:59:59-01:00"
    without_receive_time = deliver(event._replace(received_at=None))
    [first, *_] = [orjson.loads(p) for p in without_receive_time["pagerduty"].sent]
    assert "timestamp" not in first["payload"]  # optional in Events API v2
    assert first["payload"]["custom_details"]["sms_date"] == "9999-12-31T23:59:59-01:00"
