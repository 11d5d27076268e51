"""A real gateway on a real port, served from an event loop of its own in a thread.

Hypothesis and schemathesis drive their examples from plain (synchronous) test functions and
send real HTTP requests; the gateway they talk to must keep running between examples, so it
cannot live in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.conftest import RunningGateway, Topics, start_gateway
from tests.kafka_reader import read_records


def fresh_topics(bootstrap: str) -> Topics:
    """A new events topic and DLQ (created from a synchronous fixture or test)."""
    name = f"sms-events-{uuid.uuid4().hex[:12]}"
    topics = Topics(name, f"{name}.dlq")
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    asyncio.run(ensure_topics(kafka, {topics.events: 3, topics.dlq: 1}))
    return topics


def read_topic(bootstrap: str, topic: str, seconds: float = 30.0) -> list[Any]:
    """Every record of ``topic`` up to its end offsets when called."""
    return asyncio.run(read_records(bootstrap, topic, seconds=seconds))


class GatewayThread:
    """``with GatewayThread(env) as gw:`` — ``gw.url`` answers until the block ends."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gateway")
        self._server: Any = None
        self.running: RunningGateway | None = None

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url.rstrip("/")

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(start_gateway(self._env), self._loop)
        self._server, self.running = started.result(timeout=60)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.running is not None:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    async def _close(self) -> None:
        assert self.running is not None
        await self.running.http.close()
        await self._server.close()
