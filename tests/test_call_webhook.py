"""The call webhook (``POST /v1/onoff/cdr``) through the real gateway into a real broker: the
same route machinery as the SMS one, over another event kind (schema, topic, ``ce_type``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.settings import GatewaySettings
from onoff_events import schemas
from onoff_events.event_kinds import CALL
from onoff_events.kafka import KafkaSettings, ensure_topics
from onoff_events.settings import SettingsError
from onoff_events.sms_event import EventChecker, Quarantined, ValidEvent
from tests.conftest import TEST_KEY, RunningGateway, Topics, gateway_env, start_gateway
from tests.kafka_reader import read_records
from tests.payloads import CALL_SAMPLE, call_event, sms_event

AUTH = {"Authorization": f"x-api-key {TEST_KEY}", "Content-Type": "application/json"}


@pytest.fixture
async def calls(kafka_bootstrap: str) -> Topics:
    name = f"call-events-{uuid.uuid4().hex[:12]}"
    result = Topics(name, f"{name}.dlq")
    await ensure_topics(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), {result.events: 3, result.dlq: 1}
    )
    return result


@pytest.fixture
async def both(
    kafka_bootstrap: str, topics: Topics, calls: Topics
) -> AsyncIterator[RunningGateway]:
    env = gateway_env(
        kafka_bootstrap,
        topics,
        GATEWAY_EVENT_KINDS="sms,call",
        KAFKA_CALL_TOPIC=calls.events,
        KAFKA_CALL_DLQ_TOPIC=calls.dlq,
    )
    server, running = await start_gateway(env)
    try:
        yield running
    finally:
        await running.http.close()
        await server.close()


async def post(gw: RunningGateway, path: str, body: bytes) -> tuple[int, Any]:
    async with gw.http.post(gw.url.rstrip("/") + path, data=body, headers=AUTH) as response:
        return response.status, orjson.loads(await response.read())


@pytest.mark.parametrize("event_name", ["CDR", "VM", "RECORDING"])
async def test_each_kind_of_call_is_on_call_events_byte_for_byte_with_its_headers(
    both: RunningGateway, calls: Topics, kafka_bootstrap: str, event_name: str
) -> None:
    by_name: dict[str, dict[str, Any]] = {
        "VM": {"voicemailUrl": "https://example.com/vm/1.mp3", "voicemailDuration": 31},
        "RECORDING": {"callRecordingUrl": "https://example.com/rec/1.mp3"},
    }
    extra = by_name.get(event_name, {})
    event = call_event(eventName=event_name, futureField={"kept": [1, 2.50, "x"]}, **extra)
    body = orjson.dumps(event).replace(b"2.5", b"2.50")  # a spelling only the raw bytes keep
    assert await post(both, "/v1/onoff/cdr", body) == (200, {"status": "accepted"})

    [record] = await read_records(kafka_bootstrap, calls.events, count=1)
    assert record.key == event["id"].encode()
    assert record.value == body
    headers = dict(record.headers)
    assert headers["ce_type"] == b"com.onoff.business.call.v1"
    assert headers["ce_id"] == event["id"].encode()
    assert headers["ce_time"] == event["callStarted"].encode()
    assert headers["ce_source"] == b"/onoff-events/gateway/v1/onoff/cdr"
    assert headers["ce_dataschema"] == CALL.dataschema.encode()
    assert headers["ce_keylabel"] == b"primary"
    accepted = both.registry.get_sample_value(
        "onoff_gateway_accepted_events_total",
        {"kind": "call", "key_label": "primary", "durability": "kafka"},
    )
    assert accepted == 1


async def test_a_call_without_a_start_time_takes_the_receive_time(
    both: RunningGateway, calls: Topics, kafka_bootstrap: str
) -> None:
    event = {k: v for k, v in call_event(eventName="VM").items() if k != "callStarted"}
    assert (await post(both, "/v1/onoff/cdr", orjson.dumps(event)))[0] == 200
    [record] = await read_records(kafka_bootstrap, calls.events, count=1)
    headers = dict(record.headers)
    assert headers["ce_time"] == headers["ce_receivedtime"]


async def test_a_call_and_an_sms_with_the_same_id_both_go_to_their_own_topic(
    both: RunningGateway, topics: Topics, calls: Topics, kafka_bootstrap: str
) -> None:
    shared = str(uuid.uuid4())
    sms = orjson.dumps(sms_event(id=shared))
    call = orjson.dumps(call_event(id=shared))
    assert (await post(both, "/v1/onoff/sms", sms))[0] == 200
    assert (await post(both, "/v1/onoff/cdr", call))[0] == 200
    [on_sms] = await read_records(kafka_bootstrap, topics.events, count=1)
    [on_call] = await read_records(kafka_bootstrap, calls.events, count=1)
    assert (on_sms.key, on_sms.value) == (shared.encode(), sms)
    assert (on_call.key, on_call.value) == (shared.encode(), call)
    assert dict(on_sms.headers)["ce_type"] == b"com.onoff.business.sms.v1"


async def test_a_schema_breaking_call_is_quarantined_on_the_call_dlq(
    both: RunningGateway, topics: Topics, calls: Topics, kafka_bootstrap: str
) -> None:
    """200 with the problems (Onoff must not retry it), the body kept on call-events.dlq with
    the call's quarantine type; nothing on either events topic; an SMS body posted to the
    call route is a call that breaks the call schema."""
    broken = call_event(eventName="SMS", callDuration=-3)
    status, answer = await post(both, "/v1/onoff/cdr", orjson.dumps(broken))
    assert (status, answer["status"]) == (200, "quarantined")
    assert {p["path"] for p in answer["problems"]} == {"/eventName", "/callDuration"}
    [record] = await read_records(kafka_bootstrap, calls.dlq, count=1)
    dlq = orjson.loads(record.value)
    assert (dlq["reason"], dlq["event_id"], dlq["payload"]) == (
        "schema_violation",
        broken["id"],
        broken,
    )
    schemas.validator(schemas.DLQ_RECORD).validate(dlq)
    assert dict(record.headers)["ce_type"] == b"com.onoff.business.call.quarantined.v1"
    assert await read_records(kafka_bootstrap, calls.events, seconds=1) == []
    assert await read_records(kafka_bootstrap, topics.dlq, seconds=1) == []
    quarantined = both.registry.get_sample_value(
        "onoff_gateway_quarantined_events_total", {"kind": "call", "reason": "schema_violation"}
    )
    assert quarantined == 1


async def test_the_call_route_is_off_unless_named(gateway: RunningGateway) -> None:
    """Off by default: it needs topics and ACLs an upgrade may not have yet, and a gateway
    missing a topic is unready (the SMS webhook with it)."""
    async with gateway.http.post(
        gateway.url.rstrip("/") + "/v1/onoff/cdr", data=CALL_SAMPLE, headers=AUTH
    ) as response:
        assert response.status == 404
    assert gateway.settings.call_route is None


@pytest.mark.parametrize("kinds", ["call", "sms,fax", "", "sms,,call"])
def test_event_kinds_must_name_known_kinds_and_the_sms(kinds: str) -> None:
    with pytest.raises(SettingsError, match="GATEWAY_EVENT_KINDS"):
        GatewaySettings.from_env(
            {"GATEWAY_INSECURE_DEV_NO_AUTH": "true", "GATEWAY_EVENT_KINDS": kinds}
        )


def test_the_call_topics_follow_their_settings() -> None:
    s = GatewaySettings.from_env(
        {"GATEWAY_INSECURE_DEV_NO_AUTH": "true", "GATEWAY_EVENT_KINDS": "sms, call"}
    )
    assert s.call_route is not None
    assert (s.call_route.topic, s.call_route.dlq_topic) == ("call-events", "call-events.dlq")
    assert set(s.record_bytes_needed) == {
        "sms-events",
        "sms-events.dlq",
        "call-events",
        "call-events.dlq",
    }


# --- the checker, for any body -------------------------------------------------------------

MAYBE_TEXT = st.none() | st.text(max_size=40)
# RFC 3339 offsets are whole minutes (zoneinfo's historical offsets have seconds).
OFFSETS = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
DATES = st.datetimes(timezones=OFFSETS).map(lambda d: d.isoformat())
CALLS = st.fixed_dictionaries(
    {
        "id": st.uuids().map(str),
        "eventName": st.sampled_from(["CDR", "VM", "RECORDING"]),
    },
    optional={
        "onoffUserName": MAYBE_TEXT,
        "externalNumber": MAYBE_TEXT,
        "callStarted": st.none() | DATES,
        "callEnded": st.none() | DATES,
        "callDuration": st.none() | st.integers(0, 10**6) | st.floats(0, 1e6),
        "callDirection": MAYBE_TEXT,
        "callStatus": MAYBE_TEXT,
        "callNotes": MAYBE_TEXT,
        "voicemailUrl": MAYBE_TEXT,
        "voicemailDuration": st.none() | st.integers(0, 3600),
        "callRecordingUrl": MAYBE_TEXT,
        "tags": st.none()
        | st.lists(
            st.fixed_dictionaries(
                {"tagId": st.text(max_size=5) | st.integers(0, 2**53), "tagName": MAYBE_TEXT}
            ),
            max_size=3,
        ),
        "unknownField": st.dictionaries(
            st.text(max_size=5), st.integers(-(2**53), 2**53), max_size=3
        ),
    },
)


@settings(max_examples=200)
@given(CALLS)
def test_every_call_the_schema_allows_gets_a_verdict_with_a_utc_time(event: dict[str, Any]) -> None:
    verdict = EventChecker(CALL).check(orjson.dumps(event))
    if isinstance(verdict, Quarantined):
        # Only a date with no UTC instant (years 0001/9999 at the edge) is refused.
        assert verdict.problems
        assert {p.path for p in verdict.problems} <= {"/callStarted", "/callEnded"}
        assert {p.keyword for p in verdict.problems} == {"format"}
        return
    assert isinstance(verdict, ValidEvent)
    assert verdict.event_id == event["id"]
    assert verdict.time == event.get("callStarted")
    if verdict.at is not None:
        assert verdict.at.utcoffset() is not None


@given(st.binary(max_size=200))
def test_any_bytes_get_a_call_verdict_never_an_exception(raw: bytes) -> None:
    assert isinstance(EventChecker(CALL).check(raw), Quarantined | ValidEvent)
