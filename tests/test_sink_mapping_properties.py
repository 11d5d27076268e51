"""Whole SMS events, as varied as the schema allows, through the warehouse's and the CRM's
pure mappings: whatever the gateway's checker accepts, both sinks map without raising."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime, timedelta
from functools import cache
from types import SimpleNamespace
from typing import Any

import orjson
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from consumers.phones import to_e164
from consumers.records import RecordDecoder, SmsRecord
from consumers.sinks.crm import CrmSink, _contact_properties, communication_body
from consumers.sinks.warehouse import COLUMNS, FROM_PAYLOAD, _duck_row, _pg_row, warehouse_row
from onoff_events import schemas
from tests.fakes.hubspot import DEFAULT_TOKEN

SCHEMA_FIELDS = frozenset(schemas.load(schemas.SMS_EVENT)["properties"])
# ECMA-262 \s (the schema's pattern dialect) plus the control characters the pattern excludes.
_NOT_IN_ID = "".join(map(chr, range(0x20))) + "\x7f\ufeff"
ID_CHARS = st.characters(
    codec="utf-8", exclude_categories=("Zs", "Zl", "Zp"), exclude_characters=_NOT_IN_ID
)
ANY_TEXT = st.characters(codec="utf-8")  # control characters, NUL, HTML, emoji: all allowed

phone_like = st.from_regex(r"\A(\+|00)?[0-9][0-9 .\-]{0,18}\Z").filter(lambda s: len(s) <= 64)
phones = st.one_of(
    phone_like,
    st.builds(lambda n: f"+336{n:08d}", st.integers(0, 99_999_999)),
    st.text(ANY_TEXT, max_size=64),  # short codes, sender names, anything
)
optional_text = st.one_of(st.none(), st.text(ANY_TEXT, max_size=20))

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(ANY_TEXT, max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(ANY_TEXT, max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)
extra_fields = st.dictionaries(
    st.text(ANY_TEXT, min_size=1, max_size=16).filter(lambda k: k not in SCHEMA_FIELDS),
    json_value,
    max_size=4,
)


@st.composite
def rfc3339_dates(draw: st.DrawFn) -> str:
    """RFC 3339 date-times across years 0001-9999: any offset or Z, upper or lower case,
    0-9 fraction digits, and leap seconds (valid only at 23:59:60 UTC)."""
    offset = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    leap = draw(st.integers(0, 9)) == 0
    if leap:
        day = draw(st.datetimes(datetime(2, 1, 1), datetime(9998, 12, 31)))
        moment = day.replace(hour=23, minute=59, second=59) + timedelta(minutes=offset)
    else:
        moment = draw(st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59)))
    digits = draw(st.integers(0, 9))
    fraction = "." + draw(st.from_regex(rf"\A[0-9]{{{digits}}}\Z")) if digits else ""
    seconds = "60" if leap else f"{moment.second:02d}"
    if offset == 0:
        zone = draw(st.sampled_from(["Z", "+00:00", "-00:00"]))
    else:
        hours, minutes = divmod(abs(offset), 60)
        zone = f"{'-' if offset < 0 else '+'}{hours:02d}:{minutes:02d}"
    # Zero-padded by hand: strftime("%Y") writes year 1 as "1".
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{seconds}{fraction}{zone}"
    )
    return text.lower() if draw(st.booleans()) else text


@st.composite
def sms_events(draw: st.DrawFn) -> dict[str, Any]:
    """A whole event: every field the schema names, optional ones sometimes absent or null,
    unknown extra fields, in any key order."""
    fields: dict[str, Any] = {
        "id": draw(st.one_of(st.uuids().map(str), st.text(ID_CHARS, min_size=1, max_size=256))),
        "eventName": "SMS",
        "onoffUserName": draw(st.text(ANY_TEXT, max_size=256)),
        "onoffUserEmail": draw(st.one_of(st.emails(), st.text(ANY_TEXT, max_size=320))),
        "onoffUserNumber": draw(phones),
        "externalNumber": draw(phones),
        "date": draw(rfc3339_dates()),
        "smsDirection": draw(st.sampled_from(["SENT", "RECEIVED"])),
        "body": draw(st.text(ANY_TEXT, max_size=400)),
    }
    for name, values in (
        ("externalName", optional_text),
        ("externalEmail", st.one_of(st.none(), st.emails(), st.text(ANY_TEXT, max_size=20))),
    ):
        if draw(st.booleans()):
            fields[name] = draw(values)
    fields.update(draw(extra_fields))
    return dict(draw(st.permutations(list(fields.items()))))


def encode(fields: dict[str, Any], style: int) -> bytes:
    """The same event as different writers put it on the topic."""
    if style == 0:
        return orjson.dumps(fields)
    if style == 1:
        return json.dumps(fields).encode()  # \uXXXX escapes
    return json.dumps(fields, ensure_ascii=False, indent=2).encode()


@cache
def crm() -> CrmSink:
    return CrmSink(CollectorRegistry(), token=DEFAULT_TOKEN)  # makes no request until deliver


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(fields=sms_events(), style=st.integers(0, 2))
def test_every_event_the_checker_accepts_maps_in_the_warehouse_and_the_crm(
    fields: dict[str, Any], style: int
) -> None:
    raw = encode(fields, style)
    kafka_record = SimpleNamespace(
        topic="sms-events", partition=3, offset=42, key=None, value=raw, headers=[]
    )
    decoded = RecordDecoder().decode(kafka_record)
    event("accepted" if isinstance(decoded, SmsRecord) else "refused")
    note(f"date={fields['date']!r} decoded={decoded!r}"[:2000])
    assume(isinstance(decoded, SmsRecord))
    assert isinstance(decoded, SmsRecord)
    assert decoded.event_id == fields["id"]

    # (a) The warehouse row: in COLUMNS order, id and payload fields as sent, raw kept.
    row = dict(zip(COLUMNS, warehouse_row(decoded), strict=True))
    assert row["id"] == fields["id"]
    for column, field in FROM_PAYLOAD.items():
        assert row[column] == fields.get(field), column
    assert row["payload"] == raw.decode()
    assert orjson.loads(row["payload"]) == fields
    assert row["sent_at"] is decoded.sent_at
    assert row["sent_at"].astimezone(UTC).tzinfo is UTC
    assert (row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == (
        "sms-events",
        3,
        42,
    )
    duck = _duck_row(decoded)
    assert datetime.fromisoformat(duck[3]) == decoded.sent_at
    assert _pg_row(decoded)[0] == raw.decode()

    # (b) The CRM communication: JSON-encodable, its timestamp the same instant in UTC.
    communication = crm()._engagement(decoded, "contact-1")
    orjson.dumps(communication)
    properties = communication["properties"]
    timestamp = properties["hs_timestamp"]
    assert isinstance(timestamp, str)
    assert timestamp.endswith("Z")
    assert datetime.fromisoformat(timestamp).utcoffset() == timedelta(0)
    assert datetime.fromisoformat(timestamp) == decoded.sent_at
    assert properties["onoff_event_id"] == fields["id"]
    assert properties["hs_communication_body"] == communication_body(decoded.payload)
    assert html.escape(fields["body"]).replace("\n", "<br>") in properties["hs_communication_body"]
    # ... and the contact the CRM would create for the other party's number.
    number = to_e164(fields["externalNumber"], "FR")
    assert number is None or number.startswith("+")
    contact = _contact_properties(decoded, number or "+33612345678")
    assert all(isinstance(v, str) for v in contact.values())
    assert contact.get("email") == (fields.get("externalEmail") or None)
