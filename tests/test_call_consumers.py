"""Call events from ``call-events`` into the warehouse's ``onoff_calls``, in PostgreSQL and
DuckDB, with the real broker: the same runner over another event kind (its own topic, group,
DLQ and dedupe namespace)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import duckdb
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.records import CallRecord, RecordDecoder
from consumers.settings import ConsumerSettings
from consumers.sinks.crm import call_properties
from onoff_events.cloudevents import EventHeaders, rfc3339_now
from onoff_events.event_kinds import CALL
from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.conftest import wait_until
from tests.consumer_harness import InProcessConsumer, consumer_env, make_topics, publish
from tests.fakes.hubspot import DEFAULT_TOKEN, FakeHubSpot
from tests.payloads import call_event, sms_event

CALL_HEADERS = EventHeaders("/tests", CALL)


async def call_topic(bootstrap: str) -> str:
    topic = f"call-events-{uuid.uuid4().hex[:12]}"
    await ensure_topics(
        KafkaSettings(bootstrap_servers=bootstrap), {topic: 3, f"{topic}.warehouse.dlq": 1}
    )
    return topic


async def publish_calls(bootstrap: str, topic: str, events: Sequence[dict[str, Any]]) -> None:
    """As the gateway writes them: key = id, the call kind's CloudEvents headers."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for event in events:
            headers = CALL_HEADERS.build(
                event["id"], event.get("callStarted"), rfc3339_now(), "tests"
            )
            await producer.send_and_wait(
                topic, orjson.dumps(event), key=event["id"].encode(), headers=headers
            )
    finally:
        await producer.stop()


def test_a_call_service_has_its_own_topic_group_and_dlq() -> None:
    calls = ConsumerSettings.from_env("warehouse", {"CONSUMER_EVENT_KIND": "call"})
    sms = ConsumerSettings.from_env("warehouse", {})
    assert (calls.topic, calls.group_id, calls.dlq_topic) == (
        "call-events",
        "onoff-warehouse-calls",
        "call-events.warehouse.dlq",
    )
    assert (sms.topic, sms.group_id, sms.dlq_topic) == (
        "sms-events",
        "onoff-warehouse",
        "sms-events.warehouse.dlq",
    )


async def test_each_kind_of_call_is_one_row_of_onoff_calls_in_postgres_and_duckdb(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """A CDR, a voicemail and a recording (each sent twice), and a call with nothing but its
    id and name: one row each, the columns mapped, unknown fields kept in the payload."""
    topic = await call_topic(kafka_bootstrap)
    cdr = call_event(futureField={"kept": True})
    vm = call_event(
        eventName="VM",
        callStatus="MISSED",
        voicemailUrl="https://example.com/vm/1.mp3",
        voicemailDuration=31,
        tags=None,
    )
    recording = call_event(eventName="RECORDING", callRecordingUrl="https://example.com/r.mp3")
    bare = {"id": str(uuid.uuid4()), "eventName": "CDR"}
    await publish_calls(kafka_bootstrap, topic, [cdr, vm, recording, bare, cdr, vm])
    common = {"CONSUMER_EVENT_KIND": "call", "KAFKA_CALL_TOPIC": topic}
    pg_env = consumer_env(
        kafka_bootstrap, topic, WAREHOUSE_URL=postgres_url, WAREHOUSE_SCHEMA=pg_schema, **common
    )
    duck_path = tmp_path / "calls.duckdb"
    duck_env = consumer_env(
        kafka_bootstrap, topic, WAREHOUSE_URL=f"duckdb:///{duck_path}", **common
    )
    async with InProcessConsumer(pg_env) as pg, InProcessConsumer(duck_env) as duck:
        for consumer in (pg, duck):
            await wait_until(
                lambda c=consumer: c.metric("onoff_consumer_events_consumed_total") == 6,
                30,
                "6 call records consumed",
            )
            await wait_until(
                lambda c=consumer: c.metric("onoff_consumer_events_delivered_total") == 4,
                10,
                "4 calls delivered",
            )
            assert consumer.metric("onoff_consumer_duplicates_dropped_total") == 2
            assert consumer.metric("onoff_consumer_dlq_events_total") == 0
            # Panels and alerts tell the services apart by the sink label.
            delivered = "onoff_consumer_events_delivered_total"
            assert consumer.metric(delivered, sink="warehouse-calls") == 4
            assert consumer.metric(delivered, sink="warehouse") == 0

    conn = await asyncpg.connect(postgres_url)
    try:
        rows = {
            r["id"]: dict(r)
            for r in await conn.fetch(f"SELECT * FROM {pg_schema}.onoff_calls")  # noqa: S608
        }
    finally:
        await conn.close()
    assert set(rows) == {cdr["id"], vm["id"], recording["id"], bare["id"]}
    row = rows[cdr["id"]]
    assert (row["event_name"], row["direction"], row["status"]) == ("CDR", "INCOMING", "ANSWERED")
    assert row["started_at"] == datetime(2023, 5, 20, 14, 30, tzinfo=UTC)
    assert row["ended_at"] == datetime(2023, 5, 20, 14, 32, 5, tzinfo=UTC)
    assert row["duration_seconds"] == 125
    assert orjson.loads(row["tags"]) == cdr["tags"]
    assert orjson.loads(row["payload"])["futureField"] == {"kept": True}
    assert row["kafka_topic"] == topic
    assert row["received_at"] is not None
    assert (rows[vm["id"]]["voicemail_url"], rows[vm["id"]]["voicemail_duration_seconds"]) == (
        "https://example.com/vm/1.mp3",
        31,
    )
    assert rows[vm["id"]]["tags"] is None
    assert rows[recording["id"]]["recording_url"] == "https://example.com/r.mp3"
    assert rows[bare["id"]]["started_at"] is None

    embedded = duckdb.connect(str(duck_path), read_only=True)
    try:
        duck_rows = {
            r[0]: r[1:]
            for r in embedded.execute(
                "SELECT id, event_name, status, epoch(started_at), duration_seconds, "
                "voicemail_url, tags, recording_url FROM onoff_calls"
            ).fetchall()
        }
    finally:
        embedded.close()
    assert set(duck_rows) == set(rows)
    for call_id, (
        name,
        status,
        started,
        duration,
        voicemail,
        tags,
        recording_url,
    ) in duck_rows.items():
        pg_row = rows[call_id]
        assert (name, status, duration, voicemail, recording_url) == (
            pg_row["event_name"],
            pg_row["status"],
            pg_row["duration_seconds"],
            pg_row["voicemail_url"],
            pg_row["recording_url"],
        )
        expected_start = pg_row["started_at"].timestamp() if pg_row["started_at"] else None
        assert started == expected_start
        assert (orjson.loads(tags) if tags else None) == (
            orjson.loads(pg_row["tags"]) if pg_row["tags"] else None
        )


async def test_a_call_and_an_sms_with_the_same_id_are_both_delivered(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str, redis_url: str
) -> None:
    """Dedupe keys are per topic: with one Redis dedupe store for both services, the SMS
    delivered first does not make the call with its id a duplicate (nor the reverse)."""
    shared = str(uuid.uuid4())
    sms_topic = await make_topics(kafka_bootstrap)
    calls = await call_topic(kafka_bootstrap)
    await publish(kafka_bootstrap, sms_topic, [sms_event(id=shared)])
    await publish_calls(kafka_bootstrap, calls, [call_event(id=shared)])
    common = {"WAREHOUSE_URL": postgres_url, "WAREHOUSE_SCHEMA": pg_schema, "DEDUPE_URL": redis_url}
    sms_env = consumer_env(kafka_bootstrap, sms_topic, **common)
    call_env = consumer_env(
        kafka_bootstrap, calls, CONSUMER_EVENT_KIND="call", KAFKA_CALL_TOPIC=calls, **common
    )
    # The defaults: one group (and so one dedupe namespace) per topic.
    for env in (sms_env, call_env):
        del env["CONSUMER_GROUP"]
    async with InProcessConsumer(sms_env) as sms:
        await wait_until(
            lambda: sms.metric("onoff_consumer_events_delivered_total") == 1, 30, "the SMS"
        )
    async with InProcessConsumer(call_env) as call:
        await wait_until(
            lambda: call.metric("onoff_consumer_events_delivered_total") == 1, 30, "the call"
        )
        assert call.metric("onoff_consumer_duplicates_dropped_total") == 0
    conn = await asyncpg.connect(postgres_url)
    try:
        in_sms = await conn.fetchval(
            f"SELECT count(*) FROM {pg_schema}.sms_events WHERE id = $1",  # noqa: S608
            shared,
        )
        in_calls = await conn.fetchval(
            f"SELECT count(*) FROM {pg_schema}.onoff_calls WHERE id = $1",  # noqa: S608
            shared,
        )
    finally:
        await conn.close()
    assert (in_sms, in_calls) == (1, 1)
    await asyncio.sleep(0)


# --- alerts on calls -----------------------------------------------------------------------

KEY_CUSTOMER = "+33612345678"


async def test_a_missed_call_from_a_key_customer_raises_an_alert_in_alertmanager(
    kafka_bootstrap: str, alertmanager_url: str, tmp_path: Path
) -> None:
    """Call rules on call-events: a missed incoming call from a listed number fires the
    missed_call rule once (sent twice), in the real Alertmanager; an answered call, a missed
    call from another number and an outgoing one fire nothing; a voicemail fires the
    voicemail rule. SMS rules in the same file never fire on calls."""
    tag = uuid.uuid4().hex[:8]
    rules = tmp_path / "rules.toml"
    rules.write_text(
        f"""
[[rule]]
name = "missed-{tag}"
kind = "missed_call"
numbers = ["06 12 34 56 78"]
targets = ["alertmanager"]
severity = "critical"

[[rule]]
name = "vm-{tag}"
kind = "voicemail"
targets = ["alertmanager", "log"]

[[rule]]
name = "word-{tag}"
kind = "keyword"
words = ["missed"]
targets = ["alertmanager"]
"""
    )
    topic = await call_topic(kafka_bootstrap)
    await ensure_topics(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), {f"{topic}.alerts.dlq": 1}
    )
    missed = call_event(callStatus="MISSED", externalNumber=KEY_CUSTOMER, callDuration=0)
    answered = call_event(callStatus="ANSWERED", externalNumber=KEY_CUSTOMER)
    other = call_event(callStatus="missed", externalNumber="+33699887766")
    outgoing = call_event(
        callStatus="MISSED", callDirection="OUTGOING", externalNumber=KEY_CUSTOMER
    )
    voicemail = call_event(eventName="VM", callStatus="MISSED", externalNumber="+33699887766")
    env = consumer_env(
        kafka_bootstrap,
        topic,
        CONSUMER_EVENT_KIND="call",
        KAFKA_CALL_TOPIC=topic,
        ALERT_RULES_FILE=str(rules),
        ALERTMANAGER_URL=alertmanager_url,
        ALERT_SENDER_KEY="test-sender-key-" + uuid.uuid4().hex,
        DEDUPE_URL=f"sqlite:///{tmp_path}/state.sqlite3",
    )
    await publish_calls(
        kafka_bootstrap, topic, [missed, answered, other, outgoing, voicemail, missed]
    )
    async with InProcessConsumer(env, sink_name="alerts") as consumer:
        await wait_until(
            lambda: consumer.metric("onoff_consumer_events_consumed_total") == 6,
            30,
            "6 calls consumed",
        )
        await wait_until(
            lambda: (
                consumer.metric("onoff_consumer_commits_total") >= 1
                and consumer.metric("onoff_consumer_lag_records") == 0
            ),
            20,
            "caught up",
        )
        matched = {
            rule: consumer.metric("onoff_consumer_alert_rules_matched_total", rule=rule)
            for rule in (f"missed-{tag}", f"vm-{tag}", f"word-{tag}")
        }
    # The VM also says MISSED, but comes from an unlisted number: only the voicemail rule.
    assert matched == {f"missed-{tag}": 1, f"vm-{tag}": 1, f"word-{tag}": 0}

    async with aiohttp.ClientSession() as http:
        url = f"{alertmanager_url}/api/v2/alerts"
        async with http.get(url, params={"filter": f'rule="missed-{tag}"'}) as response:
            [alert] = await response.json()
        async with http.get(url, params={"filter": f'rule="vm-{tag}"'}) as response:
            [vm_alert] = await response.json()
    assert alert["labels"]["alertname"] == "OnoffCallRule"
    assert (alert["labels"]["kind"], alert["labels"]["severity"]) == ("missed_call", "critical")
    description = alert["annotations"]["description"]
    assert "Missed call" in description
    assert "INCOMING call, status MISSED" in description
    assert missed["id"] in description
    assert KEY_CUSTOMER not in str(alert)  # masked, as for SMS
    assert vm_alert["labels"]["kind"] == "voicemail"


# --- HubSpot calls -------------------------------------------------------------------------


async def test_calls_are_logged_as_hubspot_calls_on_the_contact_once_each(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A CDR, a voicemail and a recording from a known contact (each sent twice): one HubSpot
    call engagement each (crm/v3/objects/calls), on the contact, with direction, status,
    duration in ms and the recording (the voicemail's audio for a VM)."""
    hubspot = FakeHubSpot()
    await hubspot.start()
    try:
        contact = hubspot.seed_contact({"firstname": "Key", "phone": "+33612345678"})
        topic = await call_topic(kafka_bootstrap)
        await ensure_topics(
            KafkaSettings(bootstrap_servers=kafka_bootstrap), {f"{topic}.crm.dlq": 1}
        )
        cdr = call_event(externalNumber="06 12 34 56 78")
        vm = call_event(
            eventName="VM",
            callStatus=None,
            callDirection=None,
            externalNumber="+33612345678",
            voicemailUrl="https://example.com/vm/1.mp3",
            voicemailDuration=31,
        )
        recording = call_event(
            eventName="RECORDING",
            callDirection="OUTGOING",
            externalNumber="+33612345678",
            callRecordingUrl="https://example.com/rec/1.mp3",
            callDuration=12.5,
        )
        await publish_calls(kafka_bootstrap, topic, [cdr, vm, recording, cdr, vm])
        env = consumer_env(
            kafka_bootstrap,
            topic,
            CONSUMER_EVENT_KIND="call",
            KAFKA_CALL_TOPIC=topic,
            HUBSPOT_TOKEN=DEFAULT_TOKEN,
            HUBSPOT_BASE_URL=hubspot.base_url,
            DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe.sqlite3",
        )
        async with InProcessConsumer(env, sink_name="crm") as consumer:
            await wait_until(lambda: len(hubspot.calls) == 3, 30, "three HubSpot calls")
            await wait_until(
                lambda: consumer.metric("onoff_consumer_events_consumed_total") == 5,
                10,
                "5 call records consumed",
            )
            assert consumer.metric("onoff_consumer_dlq_events_total") == 0
        by_event = {c.properties["onoff_event_id"]: c for c in hubspot.calls}
        assert set(by_event) == {cdr["id"], vm["id"], recording["id"]}
        assert hubspot.communications == []
        logged = by_event[cdr["id"]]
        assert logged.contact_ids == [contact]
        assert logged.associations[0]["associationTypeId"] == 194
        props = logged.properties
        assert (props["hs_call_direction"], props["hs_call_status"]) == ("INBOUND", "COMPLETED")
        assert props["hs_call_duration"] == "125000"
        assert props["hs_timestamp"].startswith("2023-05-20T14:30:00")
        assert "Call from 06 12 34 56 78" in props["hs_call_body"]  # the number as sent
        voicemail = by_event[vm["id"]].properties
        assert voicemail["hs_call_recording_url"] == "https://example.com/vm/1.mp3"
        assert (voicemail["hs_call_status"], voicemail["hs_call_duration"]) == (
            "NO_ANSWER",
            "31000",
        )
        recorded = by_event[recording["id"]].properties
        assert recorded["hs_call_direction"] == "OUTBOUND"
        assert recorded["hs_call_recording_url"] == "https://example.com/rec/1.mp3"
        assert recorded["hs_call_duration"] == "12500"
    finally:
        await hubspot.close()


CALL_DATES = st.none() | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(lambda d: d.isoformat())
ANY_CALL = st.fixed_dictionaries(
    {"id": st.uuids().map(str), "eventName": st.sampled_from(["CDR", "VM", "RECORDING"])},
    optional={
        "callStarted": CALL_DATES,
        "callEnded": CALL_DATES,
        "callDuration": st.none() | st.integers(0, 10**7) | st.floats(0, 1e7),
        "voicemailDuration": st.none() | st.floats(0, 1e5),
        "callDirection": st.none() | st.text(max_size=64),
        "callStatus": st.none() | st.text(max_size=64),
        "callNotes": st.none() | st.text(),
        "externalNumber": st.none() | st.text(max_size=64),
        "voicemailUrl": st.none() | st.text(max_size=100),
        "callRecordingUrl": st.none() | st.text(max_size=100),
    },
)


@settings(max_examples=200)
@given(ANY_CALL)
def test_every_call_the_gateway_accepts_maps_to_a_hubspot_call_it_would_take(
    event: dict[str, Any],
) -> None:
    decoded = RecordDecoder(CALL).decode(
        ConsumerRecord("t", 0, 0, 0, 0, None, orjson.dumps(event), None, 0, 0, [])
    )
    if not isinstance(decoded, CallRecord):
        return  # refused by the schema: never reaches a sink
    properties = call_properties(decoded)
    assert all(isinstance(v, str) for v in properties.values())
    assert properties["hs_timestamp"].endswith("Z")
    assert properties.get("hs_call_direction", "INBOUND") in ("INBOUND", "OUTBOUND")
    assert properties.get("hs_call_status", "COMPLETED") in (
        "COMPLETED", "NO_ANSWER", "BUSY", "FAILED", "CANCELED",
    )  # fmt: skip
    assert properties.get("hs_call_duration", "0").isdigit()
