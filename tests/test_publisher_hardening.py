"""The gateway's producer against the real broker: bodies up to the configured limit reach
the topic, a record Kafka refuses as too large is a 413 (never a 503 Onoff would retry for
ever), a producer replacement leaves at most a short 503 window, and a dead supervisor takes
``/healthz`` down."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from gateway.app import PUBLISHER
from gateway.metrics import GatewayMetrics
from gateway.publisher import ProducerOptions, Publisher, PublishFailed
from onoff_events.kafka import KafkaSettings, ensure_topics, topic_max_message_bytes
from tests.conftest import TEST_KEY, RunningGateway, Topics, gateway_env, start_gateway, wait_until
from tests.kafka_reader import read_records
from tests.payloads import sms_body, sms_event
from tests.services import LocalKafka, free_port_pair

MIB = 1024 * 1024
FAST = ProducerOptions(
    probe_interval_seconds=0.3,
    probe_timeout_seconds=1.0,
    connect_timeout_seconds=3.0,
    close_timeout_seconds=3.0,
)


async def create_topics(bootstrap: str, max_message_bytes: int) -> Topics:
    """A fresh events topic and DLQ whose ``max.message.bytes`` is set explicitly, so the test
    does not depend on the broker's default."""
    name = f"sms-events-{uuid.uuid4().hex[:12]}"
    topics = Topics(name, f"{name}.dlq")
    config = {"max.message.bytes": str(max_message_bytes)}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topics.events, 3, 1, topic_configs=config), NewTopic(topics.dlq, 1, 1)]
        )
    finally:
        await admin.close()
    return topics


async def post(gw: RunningGateway, body: bytes) -> tuple[int, dict[str, str]]:
    # aiohttp warns about sending more than 1 MiB as raw bytes; a file-like body streams.
    async with gw.http.post(
        gw.url.rstrip("/") + "/v1/onoff/sms",
        data=io.BytesIO(body) if len(body) > MIB // 2 else body,
        headers={"Authorization": f"x-api-key {TEST_KEY}"},
    ) as response:
        await response.read()
        return response.status, dict(response.headers)


async def status_of(gw: RunningGateway, path: str) -> int:
    async with gw.http.get(gw.url.rstrip("/") + path) as response:
        return response.status


@pytest.fixture
async def big_gateway(kafka_bootstrap: str) -> AsyncIterator[tuple[RunningGateway, Topics]]:
    """A gateway taking bodies up to 2 MiB, on a topic that takes records up to 4 MiB."""
    topics = await create_topics(kafka_bootstrap, 4 * MIB)
    env = gateway_env(kafka_bootstrap, topics, GATEWAY_MAX_BODY_BYTES=str(2 * MIB))
    server, gw = await start_gateway(env, FAST)
    try:
        yield gw, topics
    finally:
        await gw.http.close()
        await server.close()


async def test_a_body_over_one_mib_within_the_limit_is_acknowledged_and_on_the_topic(
    big_gateway: tuple[RunningGateway, Topics], kafka_bootstrap: str
) -> None:
    """aiokafka's own request limit is 1 MiB; the producer's follows GATEWAY_MAX_BODY_BYTES, so
    a 1.5 MiB body is acknowledged and a data team's consumer reads it back whole."""
    gw, topics = big_gateway
    body = sms_body(body="x" * (3 * MIB // 2))
    status, _ = await post(gw, body)
    assert status == 200
    records = await read_records(kafka_bootstrap, topics.events, count=1)
    assert [r.value for r in records] == [body]


async def test_a_record_the_broker_refuses_as_too_large_is_answered_413_and_the_next_passes(
    kafka_bootstrap: str,
) -> None:
    """The topic's max.message.bytes (200 kB) is below the gateway's body limit (1 MiB): the
    broker refuses the record; the answer is 413 (a retry can never pass), counted; the next
    event with the same key (same partition) is still acknowledged."""
    topics = await create_topics(kafka_bootstrap, 200_000)
    env = gateway_env(kafka_bootstrap, topics, GATEWAY_MAX_BODY_BYTES=str(MIB))
    server, gw = await start_gateway(env, FAST)
    try:
        event = sms_event(body="y" * 300_000)
        small = sms_body(id=event["id"])
        # One record first, so the broker already holds this producer's sequence numbers for
        # the partition: the refused batch must not leave a gap that breaks later records.
        assert (await post(gw, small))[0] == 200
        status, headers = await post(gw, orjson.dumps(event))
        assert status == 413
        assert "Retry-After" not in headers
        assert (
            gw.registry.get_sample_value(
                "onoff_gateway_publish_failures_total",
                {"topic": topics.events, "reason": "message_too_large"},
            )
            == 1
        )
        for _ in range(3):
            assert (await post(gw, small))[0] == 200
    finally:
        await gw.http.close()
        await server.close()


async def set_max_message_bytes(bootstrap: str, topic: str, limit: int) -> None:
    """Change a topic's ``max.message.bytes`` on the running broker and wait until it says so."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(
            ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": str(limit)}
        )
        await admin.alter_configs([resource])
    finally:
        await admin.close()
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    for _ in range(50):
        if (await topic_max_message_bytes(settings, [topic])).get(topic) == limit:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"max.message.bytes of {topic} never became {limit}")


BATCHING = dataclasses.replace(FAST, linger_ms=100)  # concurrent records share one batch


async def test_small_events_batched_past_the_topic_limit_are_never_answered_413(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Four 60 kB events on one key at once: each fits the topic's 200 kB, the four together
    do not. The broker judges a whole batch; Onoff never retries a 413, so each answer is a
    200 or a 503 with Retry-After, and after retrying the 503s all four are on the topic. The
    start-up check says the topic's limit is below the producer's batch size, and the producer
    is rebuilt with batches capped to it."""
    caplog.set_level(logging.INFO, logger="gateway.publisher")
    topics = await create_topics(kafka_bootstrap, 200_000)
    server, gw = await start_gateway(gateway_env(kafka_bootstrap, topics), BATCHING)
    try:
        key = str(uuid.uuid4())
        bodies = [sms_body(id=key, body=f"{i}" * 60_000) for i in range(4)]
        answers = await asyncio.gather(*(post(gw, body) for body in bodies))
        for status, headers in answers:
            assert status != 413
            assert status == 200 or (status, "Retry-After" in headers) == (503, True)
        await wait_until(
            lambda: any(
                r.getMessage() == "producer_started"
                and getattr(r, "fields", {}).get("max_batch_bytes") == 200_000
                for r in caplog.records
            ),
            10,
            "a producer whose batches are capped to the topic's limit",
        )
        for body, (status, _) in zip(bodies, answers, strict=True):
            if status != 200:
                assert (await post(gw, body))[0] == 200
        # Once capped, the same burst is accepted at once.
        again = [sms_body(id=key, body=f"{i}" * 60_000) for i in range(4)]
        assert [a[0] for a in await asyncio.gather(*(post(gw, b) for b in again))] == [200] * 4
    finally:
        await gw.http.close()
        await server.close()
    records = await read_records(kafka_bootstrap, topics.events, count=8)
    assert sorted(r.value for r in records) == sorted(bodies + again)
    [low] = [r for r in caplog.records if r.getMessage() == "topic_max_message_bytes_too_low"]
    fields = getattr(low, "fields", {})
    assert (fields["topic"], fields["max_message_bytes"]) == (topics.events, 200_000)
    assert fields["max_message_bytes_required"] == 256 * 1024


async def test_a_batch_refused_for_its_size_is_503_when_each_of_its_records_fits(
    kafka_bootstrap: str,
) -> None:
    """The topic's limit was lowered after start (the gateway read 4 MiB): a batch of 110 kB
    records is refused by the broker though each record fits. That is a 503 with Retry-After
    (the retry travels in a fresh batch and passes), counted as batch_too_large, not a 413."""
    topics = await create_topics(kafka_bootstrap, 4 * MIB)
    env = gateway_env(kafka_bootstrap, topics, GATEWAY_MAX_BODY_BYTES=str(128 * 1024))
    server, gw = await start_gateway(env, BATCHING)
    try:
        await wait_until(lambda: gw.app[PUBLISHER]._limits_checked, 10, "the start-up check")
        await set_max_message_bytes(kafka_bootstrap, topics.events, 200_000)
        key = str(uuid.uuid4())
        bodies = [sms_body(id=key, body=f"{i}" * 110_000) for i in range(4)]
        answers = await asyncio.gather(*(post(gw, body) for body in bodies))
        assert all(status in (200, 503) for status, _ in answers), answers
        assert all("Retry-After" in headers for status, headers in answers if status == 503)
        assert any(status == 503 for status, _ in answers)
        assert (
            gw.registry.get_sample_value(
                "onoff_gateway_publish_failures_total",
                {"topic": topics.events, "reason": "batch_too_large"},
            )
            or 0
        ) >= 1
        for body, (status, _) in zip(bodies, answers, strict=True):
            if status == 503:
                assert (await post(gw, body))[0] == 200
    finally:
        await gw.http.close()
        await server.close()


async def steady_load(
    gw: RunningGateway, stop: asyncio.Event, answers: list[tuple[float, float, int]]
) -> None:
    """Post valid events back to back until ``stop``; record (start, end, status)."""
    while not stop.is_set():
        started = time.monotonic()
        status, headers = await post(gw, sms_body())
        if status != 200:
            assert (status, "Retry-After" in headers) == (503, True)
        answers.append((started, time.monotonic(), status))


def window_of_503s(answers: list[tuple[float, float, int]]) -> float:
    """From the start of the first refused request to the end of the last one."""
    refused = [(s, e) for s, e, status in answers if status != 200]
    if not refused:
        return 0.0
    return max(e for _, e in refused) - min(s for s, _ in refused)


async def test_a_producer_replacement_under_load_leaves_at_most_two_seconds_of_503(
    gateway_under_load: tuple[RunningGateway, Topics],
) -> None:
    """A producer stuck on OutOfOrderSequenceNumber (aiokafka issue 1017) whose stop() hangs
    (a flush that never ends, up to the close timeout): the new producer connects first and
    takes over; the old one is retired in the background. The 503 window stays ≤ 2 s, and
    every answer is a 200 or a 503 with Retry-After."""
    gw, topics = gateway_under_load
    publisher = gw.app[PUBLISHER]
    stop = asyncio.Event()
    answers: list[tuple[float, float, int]] = []
    loaders = [asyncio.create_task(steady_load(gw, stop, answers)) for _ in range(8)]
    try:
        await asyncio.sleep(1.0)
        stuck: Any = publisher._producer  # the test reaches in to break it on purpose
        real_stop = stuck.stop

        async def hanging_stop() -> None:
            # A flush that a sick cluster never allows: stop() returns only when cancelled.
            await asyncio.Event().wait()
            await real_stop()

        stuck.stop = hanging_stop
        for partition in range(3):
            stuck._txn_manager.increment_sequence_number(
                TopicPartition(topics.events, partition), 7
            )
        await wait_until(
            lambda: publisher._producer not in (None, stuck), 30, "the new producer in place"
        )
        await asyncio.sleep(2.0)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    window = window_of_503s(answers)
    refused = sum(1 for *_, status in answers if status != 200)
    swap = gw.registry.get_sample_value("onoff_gateway_producer_replacement_seconds_sum")
    logging.getLogger("test").warning(
        "503 window during the replacement: %.3f s, %d of %d answers 503, swap after %.3f s",
        window,
        refused,
        len(answers),
        swap or -1.0,
    )
    assert (
        gw.registry.get_sample_value(
            "onoff_gateway_producer_restarts_total", {"reason": "OutOfOrderSequenceNumber"}
        )
        == 1
    )
    assert sum(1 for *_, status in answers if status == 200) > 50
    assert window <= 2.0, f"503 window {window:.2f} s"


@pytest.fixture
async def gateway_under_load(
    kafka_bootstrap: str, topics: Topics
) -> AsyncIterator[tuple[RunningGateway, Topics]]:
    server, gw = await start_gateway(gateway_env(kafka_bootstrap, topics), FAST)
    try:
        yield gw, topics
    finally:
        await gw.http.close()
        await server.close()


async def test_a_dead_supervisor_takes_healthz_down_and_says_so(
    gateway_under_load: tuple[RunningGateway, Topics], caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor is what reconnects and replaces the producer: if it dies of an error
    nobody foresaw, the pod must be restarted, so /healthz answers 503 and a log line says
    why (the error's type only)."""
    gw, _ = gateway_under_load
    publisher = gw.app[PUBLISHER]
    assert await status_of(gw, "/healthz") == 200

    async def broken_probe(*_: object) -> None:
        raise RuntimeError("unforeseen")

    publisher._probe = broken_probe  # type: ignore[method-assign]
    await wait_until(lambda: not publisher.alive, 10, "the supervisor to die")
    assert await status_of(gw, "/healthz") == 503
    assert await status_of(gw, "/readyz") == 503
    died = [r for r in caplog.records if r.getMessage() == "producer_supervisor_died"]
    assert died
    assert died[0].levelno >= logging.ERROR
    assert getattr(died[0], "fields", {}).get("error_type") == "RuntimeError"


async def test_an_unforeseen_error_reading_topic_limits_is_logged_and_the_gateway_serves_on(
    kafka_bootstrap: str,
    topics: Topics,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The start-up size check is a diagnostic: any error in it is logged with its type, and
    the supervisor (which reconnects and replaces the producer) lives on."""
    caplog.set_level(logging.INFO, logger="gateway.publisher")

    async def unforeseen(*_: object) -> dict[str, int]:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr("gateway.publisher.topic_max_message_bytes", unforeseen)
    server, gw = await start_gateway(gateway_env(kafka_bootstrap, topics), FAST)
    try:
        publisher = gw.app[PUBLISHER]
        await wait_until(lambda: publisher._limits_checked, 10, "the start-up check")
        await asyncio.sleep(2 * FAST.probe_interval_seconds)
        assert publisher.alive
        assert await status_of(gw, "/healthz") == 200
        assert (await post(gw, sms_body()))[0] == 200
    finally:
        await gw.http.close()
        await server.close()
    [unreadable] = [r for r in caplog.records if r.getMessage() == "topic_limits_unreadable"]
    assert getattr(unreadable, "fields", {}).get("error_type") == "RuntimeError"


@pytest.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[LocalKafka]:
    broker = LocalKafka(tmp_path / "kafka", free_port_pair())
    await asyncio.to_thread(broker.start)
    try:
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)


@pytest.mark.broker_outage
async def test_a_replacement_that_cannot_connect_turns_readyz_503_and_webhooks_wait_for_one(
    private_broker: LocalKafka,
) -> None:
    """The producer breaks (its accumulator closed: every send raises ProducerClosed) while
    the broker is away, so its replacement cannot connect. /readyz turns 503 within seconds.
    Webhooks are held until their publish deadline, then answered 503: never at once, since
    Onoff spaces its five tries by our answer time, and a quick 503 would burn its whole
    retry window in seconds. A webhook that arrives as the broker comes back waits for the
    replacement and gets its 200. (Probes are far apart, so only the replacement can notice
    the outage.)"""
    topics = Topics("sms-events", "sms-events.dlq")
    await ensure_topics(KafkaSettings(private_broker.bootstrap), {topics.events: 1, topics.dlq: 1})
    options = dataclasses.replace(FAST, probe_interval_seconds=60.0)
    deadline = 4.0
    env = gateway_env(
        private_broker.bootstrap, topics, GATEWAY_PUBLISH_TIMEOUT_SECONDS=str(deadline)
    )
    server, gw = await start_gateway(env, options)
    try:
        assert (await post(gw, sms_body()))[0] == 200
        await asyncio.to_thread(private_broker.stop)
        broken: Any = gw.app[PUBLISHER]._producer  # the test reaches in to break it on purpose
        broken._message_accumulator._closed = True
        started = time.monotonic()
        assert (await post(gw, sms_body()))[0] == 503  # ProducerClosed: replacement asked
        await wait_until(lambda: not gw.app[PUBLISHER].ready, 5, "readiness to drop")
        assert await status_of(gw, "/readyz") == 503
        assert time.monotonic() - started < 5
        answers = []
        for _ in range(2):
            began = time.monotonic()
            status, headers = await post(gw, sms_body())
            waited = time.monotonic() - began
            answers.append((status, "Retry-After" in headers, deadline - 0.3 <= waited))
            assert waited < deadline + 1.0, waited
        assert answers == [(503, True, True)] * 2

        await asyncio.to_thread(private_broker.start)
        began = time.monotonic()
        assert (await post(gw, sms_body()))[0] == 200  # held until the replacement connected
        assert time.monotonic() - began < deadline + 1.0
        await wait_until(lambda: gw.app[PUBLISHER].ready, 30, "readiness after the broker is back")
        assert await status_of(gw, "/readyz") == 200
    finally:
        await gw.http.close()
        await server.close()


async def test_a_publish_after_close_fails_at_once_instead_of_hanging() -> None:
    """Once the publisher is closed no producer will come: a publish (one still in flight at
    shutdown) is refused with producer_unavailable at once, not held, and never spins."""
    publisher = Publisher(
        KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        ["sms-events"],
        GatewayMetrics.create(CollectorRegistry()),
    )
    await publisher.close()
    began = time.monotonic()
    with pytest.raises(PublishFailed) as failed:
        await asyncio.wait_for(publisher.publish("sms-events", b"k", b"{}", [], 3.0), 5)
    assert failed.value.reason == "producer_unavailable"
    assert time.monotonic() - began < 0.5
