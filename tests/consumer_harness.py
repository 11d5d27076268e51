"""Running consumer services in tests, in-process or as real processes, and reading sinks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from consumers.dedupe import dedupe_from_url
from consumers.metrics import ConsumerMetrics
from consumers.runner import Runner
from consumers.settings import ConsumerSettings
from consumers.sinks import SINKS
from onoff_events.cloudevents import SmsEventHeaders, rfc3339_now
from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.conftest import ROOT

HEADERS = SmsEventHeaders("/tests")


async def make_topics(bootstrap: str, partitions: int = 3, sink: str = "warehouse") -> str:
    """A fresh events topic with its sink DLQ; returns the events topic's name."""
    topic = f"sms-events-{uuid.uuid4().hex[:12]}"
    await ensure_topics(
        KafkaSettings(bootstrap_servers=bootstrap), {topic: partitions, f"{topic}.{sink}.dlq": 1}
    )
    return topic


async def publish(bootstrap: str, topic: str, events: Sequence[dict[str, Any] | bytes]) -> None:
    """Write records exactly as the gateway does (key = id, CloudEvents headers, acks=all).
    A ``bytes`` item is written as is, keyless: a record from some other, careless writer."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        futures = []
        for event in events:
            if isinstance(event, bytes):
                futures.append(await producer.send(topic, event))
                continue
            raw = orjson.dumps(event)
            headers = HEADERS.build(event["id"], event["date"], rfc3339_now(), "tests")
            futures.append(
                await producer.send(topic, raw, key=event["id"].encode(), headers=headers)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def consumer_env(bootstrap: str, topic: str, **extra: str) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "CONSUMER_GROUP": f"group-{uuid.uuid4().hex[:8]}",
        "RETRY_INITIAL_SECONDS": "0.1",
        "RETRY_MAX_SECONDS": "1",
        "CONSUMER_POLL_TIMEOUT_MS": "200",
        "CONSUMER_WATCHDOG_INTERVAL_SECONDS": "0.5",
        "CONSUMER_HOST": "127.0.0.1",
    }
    env.update(extra)
    return env


@dataclass
class InProcessConsumer:
    """A consumer service's runner in this event loop, with its own registry."""

    env: Mapping[str, str]
    sink_name: str = "warehouse"
    # Lets a test stand a real store behind a wrapper (to stop at a chosen step).
    wrap_dedupe: Any = None
    wrap_sink: Any = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    runner: Runner | None = None
    task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InProcessConsumer:
        settings = ConsumerSettings.from_env(self.sink_name, self.env)
        sink = SINKS[self.sink_name](self.env, self.registry)
        dedupe = dedupe_from_url(
            settings.dedupe_url, settings.group_id, settings.dedupe_ttl_seconds, sink
        )
        if self.wrap_dedupe is not None:
            dedupe = self.wrap_dedupe(dedupe)
        if self.wrap_sink is not None:
            sink = self.wrap_sink(sink)
        self.runner = Runner(settings, sink, dedupe, ConsumerMetrics.create(self.registry))
        self.task = asyncio.create_task(self.runner.run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.runner is not None
        assert self.task is not None
        self.runner.stop()
        await asyncio.wait_for(self.task, 30)

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


class ConsumerProcess:
    """``python -m consumers <sink>`` as a real process, its log in a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, sink: str = "warehouse") -> None:
        full = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KAFKA_", "CONSUMER_", "WAREHOUSE_", "DEDUPE_"))
        }
        full.update(env)
        self.port = int(env["CONSUMER_PORT"])
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumers", sink],
            cwd=ROOT,
            env=full,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def metrics(self) -> dict[str, float]:
        """name{label=value,…} → value, from a real scrape of /metrics."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.port}/metrics") as response,
        ):
            text = await response.text()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log.close()


async def pg_rows(url: str, schema: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1)", f"{schema}.sms_events")
        if exists is None:
            return []
        rows = await conn.fetch(f"SELECT * FROM {schema}.sms_events ORDER BY id")  # noqa: S608
        return [dict(r) for r in rows]
    finally:
        await conn.close()


async def wait_for_rows(
    url: str, schema: str, count: int, seconds: float = 60
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    rows: list[dict[str, Any]] = []
    while loop.time() < deadline:
        rows = await pg_rows(url, schema)
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.25)
    raise AssertionError(f"expected {count} rows in {schema}.sms_events, found {len(rows)}")
