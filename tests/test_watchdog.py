"""The consumer's watchdog against a real broker it can freeze: a consumer stuck in a
rebalance is recreated, and the service recovers by itself once the broker answers again.

A private broker (scripts/kafka.sh) so the test can SIGSTOP it without disturbing others."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from consumers.records import SmsRecord
from consumers.service import build_http
from consumers.sinks import Delivery, Sink
from tests.conftest import wait_until
from tests.consumer_harness import (
    InProcessConsumer,
    consumer_env,
    make_topics,
    publish,
    wait_for_rows,
)
from tests.payloads import sms_event
from tests.services import LocalKafka, free_port, free_port_pair


@pytest.fixture
async def frozen_broker(tmp_path: Path) -> AsyncIterator[LocalKafka]:
    broker = LocalKafka(tmp_path / "kafka", free_port_pair())
    await asyncio.to_thread(broker.start)
    try:
        yield broker
    finally:
        pid = int((broker.folder / "kafka.pid").read_text())
        os.kill(pid, signal.SIGCONT)  # never leave a frozen broker behind
        await asyncio.to_thread(broker.stop)


@pytest.mark.broker_outage
async def test_broker_frozen_in_the_middle_of_a_rebalance_then_everything_is_delivered(
    frozen_broker: LocalKafka, postgres_url: str, pg_schema: str
) -> None:
    """SIGSTOP the broker right after the first member gave its partitions up to let a second
    one in, for 8 s. Every event published before and after reaches the warehouse, and both
    loops beat again. (Measured on aiokafka 0.14: getmany keeps returning empty batches while
    the group waits, so the loop beats and the watchdog rightly leaves it alone; the test
    below covers a loop that stops beating.)"""
    bootstrap = frozen_broker.bootstrap
    topic = await make_topics(bootstrap, partitions=2)
    env = consumer_env(
        bootstrap,
        topic,
        WAREHOUSE_URL=postgres_url,
        WAREHOUSE_SCHEMA=pg_schema,
        CONSUMER_STALL_SECONDS="3",
        CONSUMER_REBALANCE_TIMEOUT_MS="30000",
    )
    before = [sms_event() for _ in range(10)]
    after = [sms_event() for _ in range(10)]
    pid = int((frozen_broker.folder / "kafka.pid").read_text())
    async with InProcessConsumer(env) as first:
        await publish(bootstrap, topic, before)
        await wait_for_rows(postgres_url, pg_schema, 10, 60)
        assert first.runner is not None
        epoch = first.runner._epoch  # bumped when the first member's partitions are revoked
        async with InProcessConsumer(env) as second:
            await wait_until(
                lambda: first.runner is not None and first.runner._epoch > epoch,
                30,
                "the rebalance to start",
            )
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(8)
            finally:
                os.kill(pid, signal.SIGCONT)
            await publish(bootstrap, topic, after)
            rows = await wait_for_rows(postgres_url, pg_schema, 20, 90)
            assert {r["id"] for r in rows} == {e["id"] for e in before + after}
            await wait_until(
                lambda: (
                    first.runner is not None
                    and second.runner is not None
                    and first.runner.alive
                    and second.runner.alive
                ),
                30,
                "both loops beating again",
            )


class NeverAnswers:
    """A real sink whose delivery call never returns: a client with no timeout on a
    half-open connection. Nothing the runner awaits may hang without being seen."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.name = sink.name
        self.called = asyncio.Event()

    async def start(self) -> None:
        await self._sink.start()

    async def close(self) -> None:
        await self._sink.close()

    async def deliver(self, events: Sequence[SmsRecord]) -> Delivery:
        self.called.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_loop_that_stops_beating_is_recreated_then_reported_dead_on_healthz(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Before: the watchdog looked only at fetch times with lag, never at a step that hangs,
    and /healthz said 200 for ever. Now: no heartbeat for CONSUMER_STALL_SECONDS asks for a new
    Kafka consumer; no heartbeat for twice that turns /healthz to 503 (Kubernetes restarts
    the pod), scraped from the service's real HTTP endpoint."""
    topic = await make_topics(kafka_bootstrap, partitions=1)
    port = free_port()
    env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=f"duckdb:///{tmp_path}/warehouse.duckdb",
        CONSUMER_STALL_SECONDS="2",
        CONSUMER_PORT=str(port),
    )
    sinks: list[NeverAnswers] = []

    def wrap(sink: Sink) -> NeverAnswers:
        sinks.append(NeverAnswers(sink))
        return sinks[-1]

    await publish(kafka_bootstrap, topic, [sms_event()])
    consumer = InProcessConsumer(env, wrap_sink=wrap)
    await consumer.__aenter__()
    assert consumer.runner is not None
    assert consumer.task is not None
    runner = consumer.runner
    http = web.AppRunner(build_http(runner, consumer.registry))
    await http.setup()
    await web.TCPSite(http, "127.0.0.1", port).start()
    try:
        await asyncio.wait_for(sinks[0].called.wait(), 30)
        assert await healthz(port) == 200
        await wait_until(
            lambda: (
                consumer.metric(
                    "onoff_consumer_kafka_consumer_restarts_total", reason="no_progress"
                )
                >= 1
            ),
            10,
            "the watchdog to ask for a new consumer",
        )
        await wait_until(lambda: not runner.alive, 10, "the loop reported dead")
        assert await healthz(port) == 503
    finally:
        await http.cleanup()
        consumer.task.cancel()  # the hung step never ends by itself: what a pod restart does
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.task


async def healthz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        return response.status
