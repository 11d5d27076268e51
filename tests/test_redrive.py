"""``onoff-dlq redrive`` and ``list`` against the real broker, PostgreSQL and the HubSpot fake.

Deliveries are counted, not rows: a ``BEFORE INSERT`` trigger counts every row the warehouse
proposes (tests/test_replay.py), and the HubSpot fake keeps every communication created.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from consumers.redrive import DlqRecord, Filters, original_body, recheck, replay_sources
from onoff_events.event_kinds import CALL, KINDS, SMS, EventKind
from onoff_events.kafka import KafkaSettings, ensure_topics
from onoff_events.sms_event import EventChecker, ValidEvent
from tests.conftest import ROOT, TEST_KEY, gateway_env, wait_until
from tests.consumer_harness import ConsumerProcess, InProcessConsumer, consumer_env
from tests.fakes.hubspot import DEFAULT_TOKEN, FakeHubSpot
from tests.live_gateway import GatewayThread, fresh_topics, read_topic
from tests.payloads import call_event, sms_event
from tests.services import free_port
from tests.test_replay import AUDIT, proposed, sql

# --- pure parts ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def dlq_record(fields: Mapping[str, Any], **where: Any) -> DlqRecord:
    return DlqRecord(
        where.get("topic", "sms-events.dlq"),
        where.get("partition", 0),
        where.get("offset", 0),
        where.get("timestamp_ms", 0),
        None,
        orjson.dumps(fields),
        where.get("headers", []),
    )


@given(st.dictionaries(st.text(), JSON, max_size=6))
def test_a_kept_object_is_re_driven_with_the_same_fields_and_values(
    payload: dict[str, Any],
) -> None:
    body = original_body(dlq_record({"reason": "schema_violation", "payload": payload}))
    assert body is not None
    assert orjson.loads(body) == payload


@given(st.binary(max_size=300))
def test_kept_bytes_are_re_driven_byte_for_byte(raw: bytes) -> None:
    fields = {"reason": "invalid_json", "raw_body_base64": base64.b64encode(raw).decode()}
    assert original_body(dlq_record(fields)) == raw


DLQ_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "reason": st.text(max_size=20),
        # Sometimes a valid SMS or call: the republished record is then checked too.
        "payload": JSON | st.builds(sms_event) | st.builds(call_event),
        "raw_body_base64": st.text(max_size=40) | st.binary(max_size=30).map(
            lambda b: base64.b64encode(b).decode()
        ),
        "received_at": JSON,
        "key_label": JSON,
        "source": JSON | st.fixed_dictionaries(
            {"topic": st.just("sms-events"), "partition": JSON, "offset": JSON}
        ),
    },
)  # fmt: skip


@given(
    st.binary(max_size=200) | DLQ_SHAPED.map(orjson.dumps),
    st.lists(st.tuples(st.sampled_from(["ce_source", "ce_time", "ce_keylabel"]), st.binary())),
    st.sampled_from(KINDS),
)
def test_any_dlq_record_gets_a_verdict_never_an_exception(
    value: bytes, headers: list[tuple[str, bytes]], kind: EventKind
) -> None:
    """Whatever the DLQ holds (another writer's bytes, a record of ours with any payload,
    any headers): a verdict, a republished record that passes the schema, or a reason."""
    record = DlqRecord("sms-events.dlq", 0, 0, 0, None, value, headers)
    verdict = recheck(record, EventChecker(kind), kind, "2026-11-27T00:00:00.000Z")
    if not isinstance(verdict, str):
        assert isinstance(EventChecker(kind).check(verdict.value), ValidEvent)
    for partition, offset in replay_sources([record], "sms-events").values():
        assert min(partition, offset) >= 0


def test_a_call_dead_letter_that_passes_now_goes_back_as_a_call() -> None:
    event = call_event()
    record = dlq_record({"reason": "schema_violation", "payload": event}, topic="call-events.dlq")
    moved = recheck(record, EventChecker(CALL), CALL, "2026-11-27T00:00:00.000Z")
    assert not isinstance(moved, str)
    headers = dict(moved.headers)
    assert headers["ce_type"] == b"com.onoff.business.call.v1"
    assert headers["ce_source"] == b"/onoff-events/gateway/v1/onoff/cdr"
    assert headers["ce_time"] == event["callStarted"].encode()


def test_a_record_that_passes_now_keeps_its_id_label_and_receive_time() -> None:
    event = sms_event()
    record = dlq_record(
        {
            "reason": "schema_violation",
            "event_id": event["id"],
            "received_at": "2026-11-26T10:00:00.000Z",
            "key_label": "primary",
            "payload": event,
        },
        offset=42,
        headers=[("ce_source", b"/somewhere")],
    )
    moved = recheck(record, EventChecker(), SMS, "2026-11-27T00:00:00.000Z")
    assert not isinstance(moved, str)
    assert moved.key == event["id"].encode()
    assert moved.where == "sms-events.dlq:0:42"
    headers = dict(moved.headers)
    assert headers["ce_id"] == event["id"].encode()
    assert headers["ce_source"] == b"/somewhere"
    assert headers["ce_receivedtime"] == b"2026-11-26T10:00:00.000Z"
    assert headers["ce_keylabel"] == b"primary"
    assert headers["ce_redriven"] == b"2026-11-27T00:00:00.000Z"


def test_filters_take_what_they_name() -> None:
    record = dlq_record(
        {"reason": "schema_violation", "key_label": "primary"}, partition=1, offset=5,
        timestamp_ms=1_000,
    )  # fmt: skip
    assert Filters().matches(record)
    assert Filters(reasons=frozenset({"schema_violation"}), key_label="primary").matches(record)
    assert not Filters(reasons=frozenset({"invalid_json"})).matches(record)
    assert not Filters(key_label="secondary").matches(record)
    assert Filters(since_ms=1_000, before_ms=1_001).matches(record)
    assert not Filters(before_ms=1_000).matches(record)
    assert Filters(offsets=frozenset({(1, 5)})).matches(record)
    assert not Filters(offsets=frozenset({(0, 5)})).matches(record)


# --- the gateway's DLQ, after widening the schema -------------------------------------------


def widened_schemas(tmp_path: Path) -> Path:
    """A copy of schemas/ in which ``onoffUserName`` may be up to 1,024 characters."""
    target = tmp_path / "schemas"
    shutil.copytree(ROOT / "schemas", target)
    path = target / "onoff-sms-event.schema.json"
    schema = orjson.loads(path.read_bytes())
    schema["properties"]["onoffUserName"]["maxLength"] = 1024
    path.write_bytes(orjson.dumps(schema))
    return target


def dlq_command(
    env: Mapping[str, str], *args: str, schemas: Path | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    full |= dict(env)
    if schemas is not None:
        full["ONOFF_SCHEMAS_DIR"] = str(schemas)
    done = subprocess.run(
        [sys.executable, "-m", "consumers.dlq_cli", *args],
        cwd=ROOT, env=full, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    lines = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
    return done.returncode, lines, done.stderr.decode()


def post_all(url: str, bodies: list[bytes]) -> None:
    import urllib.request  # noqa: PLC0415

    for body in bodies:
        request = urllib.request.Request(  # noqa: S310 # our own gateway on 127.0.0.1
            url + "/v1/onoff/sms",
            data=body,
            headers={"Authorization": f"x-api-key {TEST_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            assert response.status == 200


async def test_re_driving_100_quarantined_after_widening_the_schema_delivers_each_once(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """100 webhooks with a long user name are quarantined (200, on the DLQ), 5 others lack
    ``eventName``. The schema is widened; a dry run, then a re-drive: the 100 reach
    ``sms-events`` with their ids and headers, the warehouse (reading with the new schema)
    proposes each once, the 5 stay and are counted. A second re-drive moves none."""
    topics = await asyncio.to_thread(fresh_topics, kafka_bootstrap)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    await ensure_topics(kafka, {f"{topics.events}.redriven": 1})
    long_named = [sms_event(onoffUserName="N" * 300) for _ in range(100)]
    nameless = [{k: v for k, v in sms_event().items() if k != "eventName"} for _ in range(5)]
    with GatewayThread(gateway_env(kafka_bootstrap, topics)) as gateway:
        await asyncio.to_thread(
            post_all, gateway.url, [orjson.dumps(e) for e in long_named + nameless]
        )
    assert len(await asyncio.to_thread(read_topic, kafka_bootstrap, topics.dlq)) == 105
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC": topics.events,
        "KAFKA_DLQ_TOPIC": topics.dlq,
    }
    schemas = widened_schemas(tmp_path)

    code, [dry], err = await asyncio.to_thread(
        dlq_command, env, "redrive", "--dry-run", schemas=schemas
    )
    assert code == 0, err
    assert dry == {
        "topic": topics.dlq,
        "dry_run": True,
        "matched": 105,
        "already_redriven": 0,
        "still_failing": {"schema_violation": 5},
        "would_move": 0 + 100,
    }
    code, [moved], err = await asyncio.to_thread(dlq_command, env, "redrive", schemas=schemas)
    assert code == 0, err
    assert (moved["moved"], moved["still_failing"]) == (100, {"schema_violation": 5})

    on_topic = await asyncio.to_thread(read_topic, kafka_bootstrap, topics.events)
    assert sorted(r.key.decode() for r in on_topic) == sorted(e["id"] for e in long_named)
    for record in on_topic:
        headers = dict(record.headers)
        assert headers["ce_id"] == record.key
        assert headers["ce_keylabel"] == b"primary"
        assert b"ce_redriven" in {k.encode() for k in headers}
        assert orjson.loads(record.value)["onoffUserName"] == "N" * 300

    # The warehouse, reading with the widened schema, delivers each id once.
    consumer_port = free_port()
    warehouse = ConsumerProcess(
        consumer_env(
            kafka_bootstrap,
            topics.events,
            WAREHOUSE_URL=postgres_url,
            WAREHOUSE_SCHEMA=pg_schema,
            CONSUMER_PORT=str(consumer_port),
            ONOFF_SCHEMAS_DIR=str(schemas),
        ),
        tmp_path / "warehouse.log",
    )
    try:
        await delivered(warehouse, 100)
        await sql(postgres_url, AUDIT.format(s=pg_schema))
        code, [again], err = await asyncio.to_thread(dlq_command, env, "redrive", schemas=schemas)
        assert code == 0, err
        assert (again["already_redriven"], again["moved"]) == (100, 0)
        assert again["still_failing"] == {"schema_violation": 5}
        await asyncio.sleep(2)  # room for a second copy to arrive, if one had been sent
        assert len(await asyncio.to_thread(read_topic, kafka_bootstrap, topics.events)) == 100
        assert await proposed(postgres_url, pg_schema) == {}
        assert await delivered(warehouse, 100) == 100
    finally:
        warehouse.close()

    code, listed, err = await asyncio.to_thread(
        dlq_command, env, "list", "--topic", topics.dlq, "--reason", "schema_violation"
    )
    assert code == 0, err
    assert len(listed) == 105
    assert sum(row["redriven"] for row in listed) == 100
    assert all("N" * 300 not in orjson.dumps(row).decode() for row in listed)


async def delivered(consumer: ConsumerProcess, expected: int, seconds: float = 60) -> float:
    """The consumer's delivered count from a real scrape, once it reaches ``expected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    count = -1.0
    while loop.time() < deadline:
        try:
            metrics = await consumer.metrics()
        except OSError:
            metrics = {}
        count = sum(
            v for k, v in metrics.items() if k.startswith("onoff_consumer_events_delivered_total")
        )
        if count >= expected:
            return count
        await asyncio.sleep(0.25)
    raise AssertionError(f"{count} events delivered, expected {expected}")


# --- a sink's DLQ: back to that sink only ----------------------------------------------------


async def test_a_crm_dead_letter_re_driven_logs_one_communication_and_no_other_sink_sees_it(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """HubSpot refuses to create the contact of an SMS (its e-mail is invalid): the CRM
    dead-letters it, the warehouse stores it. Sales add the contact by hand; the CRM DLQ is
    re-driven: one communication on that contact, the events topic unchanged, the warehouse
    proposed nothing. A second re-drive moves none and HubSpot still holds one."""
    hubspot = FakeHubSpot()
    await hubspot.start()
    try:
        topics = await asyncio.to_thread(fresh_topics, kafka_bootstrap)
        kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
        await ensure_topics(kafka, {f"{topics.events}.crm.dlq": 1, f"{topics.events}.redriven": 1})
        stranger = sms_event(externalNumber="+33 6 55 44 33 22", externalEmail="not-an-email")
        with GatewayThread(gateway_env(kafka_bootstrap, topics)) as gateway:
            await asyncio.to_thread(post_all, gateway.url, [orjson.dumps(stranger)])
        crm = consumer_env(
            kafka_bootstrap,
            topics.events,
            HUBSPOT_TOKEN=DEFAULT_TOKEN,
            HUBSPOT_BASE_URL=hubspot.base_url,
            DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe-crm.sqlite3",
            CRM_UNKNOWN_CONTACT="create",
        )
        warehouse = consumer_env(
            kafka_bootstrap, topics.events, WAREHOUSE_URL=postgres_url, WAREHOUSE_SCHEMA=pg_schema
        )
        async with (
            InProcessConsumer(crm, sink_name="crm") as live_crm,
            InProcessConsumer(warehouse) as live_warehouse,
        ):
            await wait_until(
                lambda: (
                    live_crm.metric("onoff_consumer_dlq_events_total") == 1
                    and live_warehouse.metric("onoff_consumer_events_delivered_total") == 1
                ),
                30,
                "the CRM to dead-letter the SMS and the warehouse to store it",
            )
        assert hubspot.communications == []
        await sql(postgres_url, AUDIT.format(s=pg_schema))
        contact = hubspot.seed_contact({"firstname": "Added", "phone": "+33655443322"})
        events_before = len(await asyncio.to_thread(read_topic, kafka_bootstrap, topics.events))

        crm_dlq = f"{topics.events}.crm.dlq"
        code, [dry], err = await asyncio.to_thread(
            dlq_command, crm, "redrive", "--topic", crm_dlq, "--dry-run"
        )
        assert code == 0, err
        assert (dry["sink"], dry["would_move"], dry["matched"]) == ("crm", 1, 1)
        assert hubspot.communications == []

        code, [moved], err = await asyncio.to_thread(
            dlq_command, crm, "redrive", "--topic", crm_dlq
        )
        assert code == 0, err
        assert (moved["moved"], moved["delivered"], moved["complete"]) == (1, 1, True)
        [logged] = hubspot.communications
        assert logged.properties["onoff_event_id"] == stranger["id"]
        assert logged.contact_ids == [contact]

        code, [again], err = await asyncio.to_thread(
            dlq_command, crm, "redrive", "--topic", crm_dlq
        )
        assert code == 0, err
        assert (again["already_redriven"], again["moved"]) == (1, 0)
        assert len(hubspot.communications) == 1
        events_after = len(await asyncio.to_thread(read_topic, kafka_bootstrap, topics.events))
        assert events_after == events_before  # nothing went back on the topic every sink reads
        assert await proposed(postgres_url, pg_schema) == {}
    finally:
        await hubspot.close()
