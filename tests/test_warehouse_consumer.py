"""The warehouse consumer against real Kafka, PostgreSQL, Redis and DuckDB: each unique id
becomes one row, through duplicates, crashes, rebalances, outages and poison records."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from consumers.records import RecordDecoder, SmsRecord
from consumers.sinks import Delivery, TransientSinkError
from consumers.sinks.warehouse import PostgresWarehouse
from onoff_events import schemas
from tests.conftest import wait_until
from tests.consumer_harness import (
    ConsumerProcess,
    InProcessConsumer,
    consumer_env,
    make_topics,
    pg_rows,
    publish,
    wait_for_rows,
)
from tests.kafka_reader import read_records
from tests.payloads import sms_event
from tests.services import ScriptService, free_port

CONTENT = ("id", "event_name", "direction", "user_name", "user_email", "user_number",
           "external_number", "external_name", "external_email", "body")  # fmt: skip


def duckdb_rows(path: Path) -> list[dict[str, Any]]:
    db = duckdb.connect(str(path), read_only=True)
    try:
        cursor = db.execute(
            "SELECT *, epoch(sent_at) AS sent_epoch, payload::VARCHAR AS payload_text "
            "FROM sms_events ORDER BY id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        db.close()


async def committed_total(bootstrap: str, group: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(meta.offset for meta in offsets.values() if meta.offset >= 0)
    finally:
        await admin.close()


@pytest.mark.parametrize("store", ["separate", "sink"])
async def test_same_id_five_times_is_one_row_in_postgres_and_in_duckdb(
    kafka_bootstrap: str,
    postgres_url: str,
    redis_url: str,
    pg_schema: str,
    tmp_path: Path,
    *,
    store: str,
) -> None:
    """Five copies of an id in a row, five concurrently, five spread over time → one row per
    id in each warehouse, with the same content; the metrics count what happened. With a
    separate dedupe store (Redis, SQLite) and with the table as its own store (the default)."""
    topic = await make_topics(kafka_bootstrap)
    pg_env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=postgres_url,
        WAREHOUSE_SCHEMA=pg_schema,
        DEDUPE_URL=redis_url if store == "separate" else "sink",
    )
    duck_path = tmp_path / "warehouse.duckdb"
    duck_env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=f"duckdb:///{duck_path}",
        DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe.sqlite3" if store == "separate" else "sink",
    )
    in_a_row, concurrent, spread = sms_event(), sms_event(), sms_event(body="Ça va? 😀")
    async with InProcessConsumer(pg_env) as pg, InProcessConsumer(duck_env) as duck:
        await publish(kafka_bootstrap, topic, [in_a_row] * 5)
        await asyncio.gather(*(publish(kafka_bootstrap, topic, [concurrent]) for _ in range(5)))
        for _ in range(5):
            await publish(kafka_bootstrap, topic, [spread])
            await asyncio.sleep(0.4)
        for consumer in (pg, duck):
            await wait_until(
                lambda c=consumer: c.metric("onoff_consumer_events_consumed_total") == 15,
                30,
                "15 records consumed",
            )
            await wait_until(
                lambda c=consumer: (
                    c.metric("onoff_consumer_lag_records") == 0
                    and c.metric("onoff_consumer_commits_total") > 0
                ),
                10,
                "lag 0",
            )
            assert consumer.metric("onoff_consumer_events_delivered_total") == 3
            assert consumer.metric("onoff_consumer_duplicates_dropped_total") == 12
            assert consumer.metric("onoff_consumer_dlq_events_total") == 0

    postgres = await pg_rows(postgres_url, pg_schema)
    embedded = duckdb_rows(duck_path)
    assert [r["id"] for r in postgres] == sorted([in_a_row["id"], concurrent["id"], spread["id"]])
    assert [r["id"] for r in embedded] == [r["id"] for r in postgres]
    for pg_row, duck_row in zip(postgres, embedded, strict=True):
        assert {c: pg_row[c] for c in CONTENT} == {c: duck_row[c] for c in CONTENT}
        assert pg_row["sent_at"].timestamp() == duck_row["sent_epoch"]
        assert orjson.loads(pg_row["payload"]) == orjson.loads(duck_row["payload_text"])
        assert pg_row["received_at"] is not None
    assert {r["body"] for r in postgres} >= {"Ça va? 😀"}


@pytest.mark.parametrize("store", ["redis", "sink"])
async def test_consumer_killed_mid_batch_then_others_take_over_delivers_each_id_once(
    kafka_bootstrap: str,
    postgres_url: str,
    redis_url: str,
    pg_schema: str,
    tmp_path: Path,
    *,
    store: str,
) -> None:
    """SIGKILL one consumer process mid-stream, then two others share its partitions (each
    reading a batch ahead across the rebalances): every id is in the warehouse exactly once
    and none is missing."""
    topic = await make_topics(kafka_bootstrap, partitions=6)
    events = [sms_event() for _ in range(5000)]
    copies = random.Random(7).sample(events, 500)  # noqa: S311 # test data
    await publish(kafka_bootstrap, topic, events + copies)
    env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=postgres_url,
        WAREHOUSE_SCHEMA=pg_schema,
        DEDUPE_URL=redis_url if store == "redis" else "sink",
        CONSUMER_MAX_BATCH="10",
    )
    log = tmp_path / "consumers.log"
    first = ConsumerProcess({**env, "CONSUMER_PORT": str(free_port())}, log)
    try:
        await wait_for_rows(postgres_url, pg_schema, 100, seconds=60)
        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(10) == -signal.SIGKILL
        at_kill = len(await pg_rows(postgres_url, pg_schema))
        assert at_kill < 5000, "the first consumer finished before it was killed"
    finally:
        first.close()
    others = [ConsumerProcess({**env, "CONSUMER_PORT": str(free_port())}, log) for _ in range(2)]
    try:
        rows = await wait_for_rows(postgres_url, pg_schema, 5000, seconds=90)
        await asyncio.sleep(2)  # anything delivered twice would show up now
        rows = await pg_rows(postgres_url, pg_schema)
        assert len(rows) == 5000
        assert {r["id"] for r in rows} == {e["id"] for e in events}
        scrapes = [await other.metrics() for other in others]
        assert all(s["onoff_consumer_ready{sink=warehouse}"] == 1 for s in scrapes)
        # Counted deliveries, not rows under a primary key (which cannot hold a duplicate):
        # the insert tells new rows from held ones, so with either dedupe store the takers-over
        # deliver exactly the ids the killed consumer had not written, none of them twice.
        delivered = sum(s["onoff_consumer_events_delivered_total{sink=warehouse}"] for s in scrapes)
        assert delivered == 5000 - at_kill
    finally:
        for other in others:
            other.close()


class FailsWhileHeld:
    """The real sink, except that the batch holding ``held_id`` fails transiently (as in a
    brief PostgreSQL error) while ``holding`` is set; other batches go through."""

    def __init__(self, sink: Any, held_id: str) -> None:
        self._sink = sink
        self.name = sink.name
        self.held_id = held_id
        self.holding = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)

    async def deliver(self, events: Sequence[SmsRecord]) -> Delivery:
        if self.holding and any(e.event_id == self.held_id for e in events):
            raise TransientSinkError("held by the test")
        delivery: Delivery = await self._sink.deliver(events)
        return delivery


async def test_batch_delivered_while_the_one_before_retries_is_not_committed_before_it(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str
) -> None:
    """The warehouse delivers the next batch while the previous one finishes. If the previous
    one cannot finish (a transient error, then a stop), the next one must not commit: its
    commit would move the offset past events not yet in the table."""
    topic = await make_topics(kafka_bootstrap, partitions=1)
    events = [sms_event() for _ in range(30)]
    await publish(kafka_bootstrap, topic, events)
    env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=postgres_url,
        WAREHOUSE_SCHEMA=pg_schema,
        DEDUPE_URL="sink",
        CONSUMER_MAX_BATCH="10",
    )
    group = env["CONSUMER_GROUP"]
    held: list[FailsWhileHeld] = []

    def hold_first_batch(sink: Any) -> FailsWhileHeld:
        held.append(FailsWhileHeld(sink, events[0]["id"]))
        return held[0]

    async with InProcessConsumer(env, wrap_sink=hold_first_batch) as consumer:
        # The second batch (offsets 10-19) is written while the first keeps failing...
        rows = await wait_for_rows(postgres_url, pg_schema, 10, seconds=30)
        assert {r["id"] for r in rows} == {e["id"] for e in events[10:20]}
        await wait_until(
            lambda: consumer.metric("onoff_consumer_retries_total", stage="deliver") >= 3,
            30,
            "retries of the first batch",
        )
        # ...and is not committed: nothing is, while the first batch is not in.
        assert await committed_total(kafka_bootstrap, group) == 0
    # The stop abandons the first batch at its next retry, and with it the second.
    assert await committed_total(kafka_bootstrap, group) == 0
    assert consumer.metric("onoff_consumer_abandoned_batches_total", reason="shutdown") == 2
    assert len(await pg_rows(postgres_url, pg_schema)) == 10

    # The next member of the group reads all three batches again: each id once.
    async with InProcessConsumer(env) as again:
        rows = await wait_for_rows(postgres_url, pg_schema, 30, seconds=30)
        await wait_until(
            lambda: again.metric("onoff_consumer_events_delivered_total") == 20, 10, "delivered"
        )
        assert again.metric("onoff_consumer_duplicates_dropped_total") == 10
    assert await committed_total(kafka_bootstrap, group) == 30
    assert {r["id"] for r in rows} == {e["id"] for e in events}


async def test_overlapping_batches_sharing_ids_in_opposite_orders_never_deadlock(
    postgres_url: str, pg_schema: str
) -> None:
    """With two batches in hand, the same ids can reach two inserts at once (copies in
    adjacent batches). Rows are written in one order, so one insert waits for the other
    instead of PostgreSQL aborting one of them as a deadlock (a 1 s stall, then a retry)."""
    decoder = RecordDecoder()
    events = [sms_event() for _ in range(600)]

    def records(batch: list[dict[str, Any]], first_offset: int) -> list[SmsRecord]:
        decoded = [
            decoder.decode(
                ConsumerRecord(
                    "t", 0, first_offset + i, 0, 0, None, orjson.dumps(e), None, 0, 0, ()
                )
            )
            for i, e in enumerate(batch)
        ]
        assert all(isinstance(d, SmsRecord) for d in decoded)
        return decoded  # type: ignore[return-value]

    warehouse = PostgresWarehouse(postgres_url, schema=pg_schema, parallel_inserts=1)
    await warehouse.start()
    try:
        # Two connections open first, so the two inserts really run at the same time.
        warm = [sms_event(), sms_event()]
        await asyncio.gather(
            warehouse.deliver(records(warm[:1], 10_000)),
            warehouse.deliver(records(warm[1:], 10_001)),
        )
        first, second = await asyncio.gather(
            warehouse.deliver(records(events, 0)),
            warehouse.deliver(records(events[::-1], 600)),
        )
    finally:
        await warehouse.close()
    assert not first.rejected
    assert not second.rejected
    # Each id went in once: whichever insert wrote it, the other saw it as already held.
    assert len(first.already_held) + len(second.already_held) == 600
    assert len(await pg_rows(postgres_url, pg_schema)) == 602


async def test_postgres_down_for_a_while_holds_commits_then_delivers_everything(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """With PostgreSQL stopped the consumer retries (visible in metrics) and commits nothing;
    once it is back, every event arrives."""
    database = ScriptService("postgres.sh", tmp_path / "pg", free_port())
    await asyncio.to_thread(database.start)
    url = database.url
    try:
        topic = await make_topics(kafka_bootstrap)
        env = consumer_env(
            kafka_bootstrap,
            topic,
            WAREHOUSE_URL=url,
            DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe.sqlite3",
        )
        first, second = [sms_event() for _ in range(20)], [sms_event() for _ in range(20)]
        async with InProcessConsumer(env) as consumer:
            await publish(kafka_bootstrap, topic, first)
            await wait_for_rows(url, "public", 20)
            group = env["CONSUMER_GROUP"]
            await wait_until(lambda: consumer.metric("onoff_consumer_lag_records") == 0, 10, "lag")
            assert await committed_total(kafka_bootstrap, group) == 20

            await asyncio.to_thread(database.stop)
            await publish(kafka_bootstrap, topic, second)
            await wait_until(
                lambda: consumer.metric("onoff_consumer_retries_total", stage="deliver") >= 3,
                30,
                "delivery retries",
            )
            assert consumer.metric("onoff_consumer_ready") == 0
            assert await committed_total(kafka_bootstrap, group) == 20

            await asyncio.sleep(2)  # "a while"
            await asyncio.to_thread(database.start)
            rows = await wait_for_rows(url, "public", 40, seconds=60)
            assert {r["id"] for r in rows} == {e["id"] for e in first + second}
            await wait_until(lambda: consumer.metric("onoff_consumer_ready") == 1, 10, "ready")
        assert await committed_total(kafka_bootstrap, group) == 40
    finally:
        await asyncio.to_thread(database.stop)


async def test_redis_down_pauses_the_consumer_without_skipping_or_repeating(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    store = ScriptService("redis.sh", tmp_path / "redis", free_port())
    await asyncio.to_thread(store.start)
    try:
        topic = await make_topics(kafka_bootstrap)
        env = consumer_env(
            kafka_bootstrap,
            topic,
            WAREHOUSE_URL=postgres_url,
            WAREHOUSE_SCHEMA=pg_schema,
            DEDUPE_URL=store.url,
        )
        first, second = [sms_event() for _ in range(10)], [sms_event() for _ in range(10)]
        async with InProcessConsumer(env) as consumer:
            await publish(kafka_bootstrap, topic, first)
            await wait_for_rows(postgres_url, pg_schema, 10)

            await asyncio.to_thread(store.stop)
            await publish(kafka_bootstrap, topic, second + first[:5])
            await wait_until(
                lambda: consumer.metric("onoff_consumer_retries_total", stage="dedupe") >= 3,
                30,
                "dedupe retries",
            )
            assert consumer.metric("onoff_consumer_dedupe_errors_total") >= 3
            assert len(await pg_rows(postgres_url, pg_schema)) == 10  # paused, not skipping

            await asyncio.to_thread(store.start)
            rows = await wait_for_rows(postgres_url, pg_schema, 20, seconds=60)
            await wait_until(
                lambda: consumer.metric("onoff_consumer_events_consumed_total") == 25,
                30,
                "all 25 records consumed",
            )
            assert {r["id"] for r in rows} == {e["id"] for e in first + second}
            assert consumer.metric("onoff_consumer_events_delivered_total") == 20
            # The five copies were dropped by the store's done marks (kept across the restart).
            assert consumer.metric("onoff_consumer_duplicates_dropped_total") == 5
    finally:
        await asyncio.to_thread(store.stop)


async def test_poison_records_go_to_the_dlq_and_the_partition_keeps_flowing(
    kafka_bootstrap: str, postgres_url: str, redis_url: str, pg_schema: str
) -> None:
    topic = await make_topics(kafka_bootstrap, partitions=1)
    before, after = sms_event(), sms_event()
    nul_body = sms_event(body="NUL \u0000 inside")  # valid JSON; PostgreSQL refuses NUL in text
    env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=postgres_url,
        WAREHOUSE_SCHEMA=pg_schema,
        DEDUPE_URL=redis_url,
    )
    async with InProcessConsumer(env) as consumer:
        await publish(kafka_bootstrap, topic, [before, b"{not json", nul_body, after])
        rows = await wait_for_rows(postgres_url, pg_schema, 2)
        await wait_until(
            lambda: consumer.metric("onoff_consumer_dlq_events_total") == 2, 20, "two DLQ records"
        )
        assert consumer.metric("onoff_consumer_dlq_events_total", reason="invalid_event") == 1
        assert consumer.metric("onoff_consumer_dlq_events_total", reason="rejected_by_sink") == 1
        await wait_until(lambda: consumer.metric("onoff_consumer_lag_records") == 0, 10, "lag 0")
    assert {r["id"] for r in rows} == {before["id"], after["id"]}

    dlq = await read_records(kafka_bootstrap, f"{topic}.warehouse.dlq", count=2)
    values = sorted((orjson.loads(r.value) for r in dlq), key=lambda v: v["source"]["offset"])
    assert [v["reason"] for v in values] == ["invalid_event", "rejected_by_sink"]
    assert values[0]["raw_value_base64"]
    assert values[0]["source"]["offset"] == 1
    assert values[1]["payload"] == nul_body
    assert values[1]["detail"].startswith("postgres 22")
    assert dlq[1].key == nul_body["id"].encode()
    for value in values:
        assert value["stage"] == "warehouse"
        schemas.validator(schemas.SINK_DLQ_RECORD).validate(value)


async def test_sigterm_mid_stream_exits_zero_and_a_restart_loses_and_doubles_nothing(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    topic = await make_topics(kafka_bootstrap)
    events = [sms_event() for _ in range(3000)]
    await publish(kafka_bootstrap, topic, events)
    env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=postgres_url,
        WAREHOUSE_SCHEMA=pg_schema,
        CONSUMER_MAX_BATCH="10",
        DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe.sqlite3",
        CONSUMER_PORT=str(free_port()),
    )
    log = tmp_path / "consumer.log"
    consumer = ConsumerProcess(env, log)
    try:
        await wait_for_rows(postgres_url, pg_schema, 100)
        consumer.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(consumer.process.wait, 25)
        at_term = len(await pg_rows(postgres_url, pg_schema))
        assert at_term < 3000, "the consumer finished before SIGTERM"
    finally:
        consumer.close()
    assert exit_code == 0
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    events_logged = [line["event"] for line in lines]
    assert "draining" in events_logged
    assert events_logged[-1] == "stopped"

    restarted = ConsumerProcess(env, log)
    try:
        await wait_for_rows(postgres_url, pg_schema, 3000)
        await asyncio.sleep(1)
        rows = await pg_rows(postgres_url, pg_schema)
        assert len(rows) == 3000
        assert {r["id"] for r in rows} == {e["id"] for e in events}
    finally:
        restarted.close()


async def test_stuck_kafka_consumer_is_recreated_by_the_watchdog(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """A consumer that stops fetching while records wait is replaced, in-process."""
    topic = await make_topics(kafka_bootstrap)
    env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=postgres_url,
        WAREHOUSE_SCHEMA=pg_schema,
        CONSUMER_STALL_SECONDS="2",
        DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe.sqlite3",
    )
    async with InProcessConsumer(env) as consumer:
        await publish(kafka_bootstrap, topic, [sms_event()])
        await wait_for_rows(postgres_url, pg_schema, 1)
        runner = consumer.runner
        assert runner is not None
        stuck = runner._consumer  # the test makes a real consumer stop fetching
        stuck.pause(*stuck.assignment())
        await publish(kafka_bootstrap, topic, [sms_event() for _ in range(5)])
        await wait_for_rows(postgres_url, pg_schema, 6, seconds=30)
        assert (
            consumer.metric("onoff_consumer_kafka_consumer_restarts_total", reason="stalled") == 1
        )
        assert runner._consumer is not stuck


def test_bad_warehouse_url_stops_the_consumer_at_start_naming_it(tmp_path: Path) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from tests.conftest import ROOT  # noqa: PLC0415

    done = subprocess.run(
        [sys.executable, "-m", "consumers", "warehouse"],
        cwd=ROOT,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "WAREHOUSE_URL": "mysql://x"},
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert b"invalid setting: WAREHOUSE_URL" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "consumers", "nope"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert b"usage: onoff-consumer" in done.stderr
