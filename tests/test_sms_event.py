"""The SMS event contract as pure functions: verdicts, reasons, DLQ records, headers."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from onoff_events import schemas
from onoff_events.cloudevents import SmsEventHeaders
from onoff_events.dlq import quarantine_message, quarantine_record
from onoff_events.sms_event import EventChecker, Quarantined, ValidEvent
from tests.payloads import ONOFF_SAMPLE, sms_event

CHECKER = EventChecker()


def test_onoff_sample_is_valid_and_kept_byte_for_byte() -> None:
    verdict = CHECKER.check(ONOFF_SAMPLE)
    assert verdict == ValidEvent(
        "12345",
        "2023-05-20T14:30:00Z",
        ONOFF_SAMPLE,
        orjson.loads(ONOFF_SAMPLE),
        datetime(2023, 5, 20, 14, 30, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    "change",
    [
        {"externalName": None, "externalEmail": None},
        {"company": "ACME", "tags": [1, 2]},
        {"smsDirection": "RECEIVED", "body": ""},
        {"date": "2023-05-20T14:30:00.123+02:00"},
    ],
    ids=["optional-null", "unknown-fields", "received-empty-body", "offset-and-fraction"],
)
def test_valid_variants(change: dict[str, Any]) -> None:
    assert isinstance(CHECKER.check(orjson.dumps(sms_event(**change))), ValidEvent)


def test_optional_contact_fields_may_be_absent() -> None:
    event = sms_event()
    del event["externalName"], event["externalEmail"]
    assert isinstance(CHECKER.check(orjson.dumps(event)), ValidEvent)


@pytest.mark.parametrize(
    ("change", "problems"),
    [
        ({"smsDirection": "sent"}, [("/smsDirection", "enum")]),
        ({"date": "2023-05-20 14:30"}, [("/date", "format")]),
        ({"id": "x" * 257}, [("/id", "maxLength")]),
        ({"id": "tab\there"}, [("/id", "pattern")]),
        ({"onoffUserNumber": 1234567890}, [("/onoffUserNumber", "type")]),
        ({"externalNumber": "1" * 4000}, [("/externalNumber", "maxLength")]),
    ],
)
def test_each_violation_is_named_by_path_and_keyword(
    change: dict[str, Any], problems: list[tuple[str, str]]
) -> None:
    verdict = CHECKER.check(orjson.dumps(sms_event(**change)))
    assert isinstance(verdict, Quarantined)
    assert verdict.reason == "schema_violation"
    assert [(p.path, p.keyword) for p in verdict.problems] == problems


def test_reasons_never_quote_a_value_from_the_body() -> None:
    secret_values = {
        "onoffUserNumber": 33612345678,
        "date": "call +33612345678",
        "smsDirection": "alice@example.com",
        "id": "bad id with spaces",
    }
    verdict = CHECKER.check(orjson.dumps(sms_event(**secret_values)))
    assert isinstance(verdict, Quarantined)
    text = orjson.dumps([p.as_json() for p in verdict.problems]).decode()
    for value in ("33612345678", "alice@example.com", "bad id"):
        assert value not in text
    assert verdict.event_id is None  # an unusable id is not used as a key


def test_dlq_record_for_a_non_object_keeps_the_raw_bytes_and_matches_its_schema() -> None:
    raw = b"\x00\xffnot json"
    verdict = CHECKER.check(raw)
    assert isinstance(verdict, Quarantined)
    record = quarantine_record(verdict, "2024-01-01T00:00:00.000Z", "onoff")
    assert base64.b64decode(record["raw_body_base64"]) == raw
    assert "payload" not in record
    schemas.validator(schemas.DLQ_RECORD).validate(record)


def test_dlq_message_is_keyed_by_a_usable_id_and_carries_cloudevents_headers() -> None:
    event = sms_event(smsDirection="UP")
    verdict = CHECKER.check(orjson.dumps(event))
    assert isinstance(verdict, Quarantined)
    key, value, headers = quarantine_message(verdict, "2024-01-01T00:00:00.000Z", "onoff", "/s")
    assert key == event["id"].encode()
    assert orjson.loads(value)["payload"] == event
    names = dict(headers)
    assert names["ce_type"] == b"com.onoff.business.sms.quarantined.v1"
    assert names["content-type"] == b"application/json"
    other = quarantine_message(verdict, "2024-01-01T00:00:00.000Z", "onoff", "/s")
    assert dict(other[2])["ce_id"] != names["ce_id"]


def test_event_headers_follow_the_cloudevents_kafka_binding() -> None:
    headers = dict(
        SmsEventHeaders("/src").build(
            "id-1", "2023-05-20T14:30:00Z", "2023-05-20T14:30:01.000Z", "onoff"
        )
    )
    required = {"ce_specversion", "ce_id", "ce_source", "ce_type", "content-type"}
    assert required <= headers.keys()
    assert all(name == "content-type" or name.startswith("ce_") for name in headers)
    # Extension attribute names: lower-case letters and digits only (CloudEvents 1.0).
    for name in headers:
        if name.startswith("ce_"):
            assert name[3:].isalnum()
            assert name[3:].islower()


@pytest.mark.parametrize(
    "date",
    ["9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00"],
    ids=["utc-overflows-year-9999", "year-0000", "utc-underflows-year-0001"],
)
def test_a_date_consumers_cannot_convert_to_utc_is_quarantined_without_echoing_it(
    date: str,
) -> None:
    """The schema's date-time format accepts these, but no consumer can turn them into a UTC
    instant: the gateway refuses them (one definition of a valid event for every service)."""
    event = sms_event(date=date)
    verdict = CHECKER.check(orjson.dumps(event))
    assert isinstance(verdict, Quarantined)
    assert verdict.reason == "schema_violation"
    assert [(p.path, p.keyword) for p in verdict.problems] == [("/date", "format")]
    assert date not in orjson.dumps([p.as_json() for p in verdict.problems]).decode()
    assert verdict.event_id == event["id"]


@pytest.mark.parametrize(
    "date",
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T01:00:00+01:00",
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T22:59:59-01:00",
        "2016-12-31T23:59:60Z",
        "2023-05-20t14:30:00z",
    ],
)
def test_a_valid_event_carries_its_send_time_and_it_converts_to_utc(date: str) -> None:
    """The edges that still convert stay valid; the verdict carries the parsed time, so a
    consumer never parses the date a second time (and cannot disagree with the gateway)."""
    verdict = CHECKER.check(orjson.dumps(sms_event(date=date)))
    assert isinstance(verdict, ValidEvent)
    assert verdict.time == date
    assert verdict.at.tzinfo is not None
    assert verdict.at.astimezone(UTC).tzinfo is UTC


def _nested(depth: int, field: str = "x") -> bytes:
    return b'{"id":"n","' + field.encode() + b'":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [253, 300, 600, 1022])
def test_a_deeply_nested_object_that_breaks_the_schema_is_described_without_raising(
    depth: int,
) -> None:
    """jsonschema_rs cannot turn a deep instance into an error object (recursion limit);
    the problems are still named, from the shallow part of the body."""
    verdict = CHECKER.check(_nested(depth, "body"))
    assert isinstance(verdict, Quarantined)
    assert verdict.reason == "schema_violation"
    found = {(p.path, p.keyword) for p in verdict.problems}
    assert ("/body", "type") in found
    assert ("/date", "required") in found
    assert verdict.event_id == "n"


@pytest.mark.parametrize("depth", [253, 300, 600, 1022])
def test_the_dlq_record_of_a_too_deep_object_falls_back_to_the_raw_body(depth: int) -> None:
    """orjson writes at most 254 levels: the record keeps the exact bytes (base64) instead
    of the parsed payload, still keyed by the id and valid against its schema."""
    raw = _nested(depth)
    verdict = CHECKER.check(raw)
    assert isinstance(verdict, Quarantined)
    key, value, _ = quarantine_message(verdict, "2024-01-01T00:00:00.000Z", "onoff", "/s")
    assert key == b"n"
    record = orjson.loads(value)
    schemas.validator(schemas.DLQ_RECORD).validate(record)
    assert record["reason"] == "schema_violation"
    assert base64.b64decode(record["raw_body_base64"]) == raw
    assert "payload" not in record


@pytest.mark.parametrize("field", [b"body", b"company"])
@pytest.mark.parametrize("depth", [253, 1022])
def test_the_problems_of_a_deep_object_are_those_of_its_shallow_twin(
    field: bytes, depth: int
) -> None:
    """A body too deep to describe directly is described from a cut copy: the problems are
    exactly those of the same body with the deep value replaced by an empty one of its type,
    whether the deep value sits in a property the schema knows or in an unknown one."""
    wide = b"".join(b',"k%d":%d' % (i, i) for i in range(4000))
    head = b'{"id":"n","smsDirection":"UP","onoffUserNumber":1' + wide + b',"' + field + b'":'
    deep = CHECKER.check(head + b"[" * depth + b"]" * depth + b"}")
    twin = CHECKER.check(head + b"[]}")
    assert isinstance(deep, Quarantined)
    assert isinstance(twin, Quarantined)
    assert deep.problems == twin.problems
    assert ("/smsDirection", "enum") in {(p.path, p.keyword) for p in deep.problems}
    # A checker whose schema may care about any property describes the whole body: the same.
    whole = EventChecker(schema={**schemas.load(schemas.SMS_EVENT), "$comment": "any keyword"})
    assert whole.check(head + b"[]}") == twin
