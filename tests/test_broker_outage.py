"""The gateway when Kafka is away: 503 with Retry-After inside the deadline, never a 200 for
an event that is not durable, and recovery without a restart once the broker is back.

These tests run a private broker of their own (scripts/kafka.sh) so they can stop it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from gateway.app import PUBLISHER
from gateway.publisher import ProducerOptions
from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.conftest import TEST_KEY, RunningGateway, Topics, gateway_env, start_gateway, wait_until
from tests.kafka_reader import read_records
from tests.payloads import sms_body, sms_event
from tests.services import LocalKafka, free_port_pair

pytestmark = pytest.mark.broker_outage

FAST_PROBES = ProducerOptions(
    probe_interval_seconds=0.3,
    probe_timeout_seconds=1.0,
    connect_timeout_seconds=3.0,
    close_timeout_seconds=3.0,
)
DEADLINE = 1.5


async def post(gw: RunningGateway, body: bytes) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    async with gw.http.post(
        gw.url.rstrip("/") + "/v1/onoff/sms",
        data=body,
        headers={"Authorization": f"x-api-key {TEST_KEY}"},
    ) as response:
        await response.read()
        return response.status, dict(response.headers), time.monotonic() - started


async def status_of(gw: RunningGateway, path: str) -> int:
    async with gw.http.get(gw.url.rstrip("/") + path) as response:
        return response.status


@pytest.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[LocalKafka]:
    broker = LocalKafka(tmp_path / "kafka", free_port_pair())
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)


async def test_gateway_serves_health_while_kafka_is_down_and_recovers_after_outages(
    private_broker: LocalKafka,
) -> None:
    """Down at start → 503 fast; up → 200; broker stopped → 503 within the deadline and not
    ready; broker back → 200 again, same process, and every 200 is on the topic."""
    topics = Topics("sms-events", "sms-events.dlq")
    env = gateway_env(
        private_broker.bootstrap,
        topics,
        GATEWAY_PUBLISH_TIMEOUT_SECONDS=str(DEADLINE),
        GATEWAY_RETRY_AFTER_SECONDS="7",
    )
    server, gw = await start_gateway(env, FAST_PROBES, wait_ready=False)
    acknowledged: list[bytes] = []
    try:
        # 1. No broker at all: alive, not ready, and webhooks are refused with Retry-After.
        assert await status_of(gw, "/healthz") == 200
        assert await status_of(gw, "/readyz") == 503
        status, headers, elapsed = await post(gw, sms_body())
        assert (status, headers["Retry-After"]) == (503, "7")
        assert elapsed < DEADLINE + 1.0

        # 2. The broker arrives: the gateway connects by itself.
        await asyncio.to_thread(private_broker.start)
        await ensure_topics(
            KafkaSettings(private_broker.bootstrap), {"sms-events": 3, "sms-events.dlq": 1}
        )
        await wait_until(lambda: gw.app[PUBLISHER].ready, 60, "readiness after the broker started")
        for _ in range(5):
            body = sms_body()
            assert (await post(gw, body))[0] == 200
            acknowledged.append(body)

        # 3. The broker goes away while the gateway runs.
        await asyncio.to_thread(private_broker.stop)
        answers = await asyncio.gather(*(post(gw, sms_body()) for _ in range(5)))
        for status, headers, elapsed in answers:
            assert status == 503
            assert headers["Retry-After"] == "7"
            assert elapsed < DEADLINE + 1.0, elapsed
        await wait_until(lambda: not gw.app[PUBLISHER].ready, 30, "readiness to drop")
        assert await status_of(gw, "/readyz") == 503
        failures = (
            gw.registry.get_sample_value(
                "onoff_gateway_publish_failures_total", {"topic": "sms-events", "reason": "timeout"}
            )
            or 0
        )
        unavailable = (
            gw.registry.get_sample_value(
                "onoff_gateway_publish_failures_total",
                {"topic": "sms-events", "reason": "producer_unavailable"},
            )
            or 0
        )
        assert failures + unavailable >= 6

        # 4. The broker is back: same process, 200 again.
        await asyncio.to_thread(private_broker.start)
        await wait_until(lambda: gw.app[PUBLISHER].ready, 60, "readiness after the restart")
        ok = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while ok < 5 and loop.time() < deadline:
            body = sms_body()
            if (await post(gw, body))[0] == 200:
                acknowledged.append(body)
                ok += 1
        assert ok == 5
    finally:
        await gw.http.close()
        await server.close()

    records = await read_records(private_broker.bootstrap, "sms-events", seconds=15)
    on_topic = {r.value for r in records}
    assert all(body in on_topic for body in acknowledged)
    # 503s may still have landed (Onoff's retry then makes a duplicate the consumers drop).
    assert {orjson.loads(b)["id"] for b in acknowledged} <= {r.key.decode() for r in records}


async def test_stuck_idempotent_producer_is_replaced_without_restart(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str
) -> None:
    """aiokafka issue 1017: after an outage the idempotent producer's sequence numbers no
    longer match the broker's and every record fails with OutOfOrderSequenceNumber. We put a
    real producer into that state (its sequence numbers pushed ahead), and the real broker
    refuses the next record; the gateway answers 503 once, replaces the producer, and the
    next webhook is acknowledged by the same process."""
    from aiokafka.structs import TopicPartition  # noqa: PLC0415

    event = sms_event()
    assert (await post(gateway, orjson.dumps(event)))[0] == 200
    publisher = gateway.app[PUBLISHER]
    stuck = publisher._producer  # the test reaches in to break it on purpose
    for partition in range(3):
        stuck._txn_manager.increment_sequence_number(TopicPartition(topics.events, partition), 7)

    status, _, _ = await post(gateway, orjson.dumps(sms_event(id=event["id"])))
    assert status == 503
    assert (
        gateway.registry.get_sample_value(
            "onoff_gateway_producer_restarts_total", {"reason": "OutOfOrderSequenceNumber"}
        )
        == 1
    )
    await wait_until(
        lambda: publisher.ready and publisher._producer is not stuck, 30, "the replacement producer"
    )
    assert publisher._producer is not stuck

    retry = orjson.dumps(sms_event(id=event["id"], body="retried"))
    assert (await post(gateway, retry))[0] == 200
    records = await read_records(kafka_bootstrap, topics.events, count=2)
    assert [r.value for r in records] == [orjson.dumps(event), retry]
