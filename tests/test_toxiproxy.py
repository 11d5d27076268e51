"""The fault proxy of the fault-injection suite (issue #12), against real processes: Toxiproxy's
server (scripts/toxiproxy.sh, built by ``scripts/toxiproxy.sh install``), its HTTP API through
tests/fault/toxiproxy.py, and a private Kafka broker whose second listener (KAFKA_PROXIED_PORT)
advertises the proxy, so that aiokafka's every connection goes through it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.fault.toxiproxy import Toxiproxy, ToxiproxyError
from tests.kafka_reader import read_records
from tests.services import LocalKafka, free_port, free_port_pair

pytestmark = pytest.mark.broker_outage


@pytest.fixture
async def toxiproxy(tmp_path: Path) -> AsyncIterator[Toxiproxy]:
    """Our own server on a free port; started by each test (``start``), always stopped."""
    server = Toxiproxy(free_port(), tmp_path / "toxiproxy")
    try:
        yield server
    finally:
        await server.stop()


async def start(server: Toxiproxy) -> None:
    try:
        await server.start()
    except ToxiproxyError as error:
        # Not a skip: the fault suite cannot run without it. A missing binary reads
        # "toxiproxy-server v2.12.0 is not built: run scripts/toxiproxy.sh install".
        pytest.fail(str(error), pytrace=False)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def round_trip(port: int, payload: bytes = b"ping", seconds: float = 2.0) -> bytes:
    """Send ``payload`` to 127.0.0.1:``port`` and read the echo back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), seconds)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_toxics_on_a_tcp_echo_server(toxiproxy: Toxiproxy) -> None:
    """Each fault of the client on a plain TCP echo server: black hole (hangs), reset, cut and
    restore, clear, reset; and the API's errors."""
    await start(toxiproxy)
    # The version compiled in by scripts/toxiproxy.sh install (a plain go build says "git").
    assert re.fullmatch(r"\d+\.\d+\.\d+", await toxiproxy.version())
    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        upstream_port = upstream.sockets[0].getsockname()[1]
        proxy = await toxiproxy.create_proxy("echo", 0, f"127.0.0.1:{upstream_port}")
        assert proxy.enabled
        assert proxy.port not in (0, upstream_port)
        assert await round_trip(proxy.port) == b"ping"

        # Black hole: the connection opens, nothing comes back, nothing is closed.
        await toxiproxy.black_hole("echo")
        with pytest.raises(TimeoutError):
            await round_trip(proxy.port, seconds=0.5)
        await toxiproxy.clear("echo")
        assert await toxiproxy.toxics("echo") == []
        assert await round_trip(proxy.port) == b"ping"

        # Reset: the peer resets (or closes) at once, so nothing is read back.
        toxic = await toxiproxy.reset_peer("echo")
        assert (toxic.name, toxic.type, toxic.attributes) == (
            "reset_peer_downstream",
            "reset_peer",
            {"timeout": 0},
        )
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await round_trip(proxy.port)
        await toxiproxy.remove_toxic("echo", toxic.name)
        assert await round_trip(proxy.port) == b"ping"

        # Cut: the port refuses connections; restored, same port.
        assert not (await toxiproxy.cut("echo")).enabled
        with pytest.raises(ConnectionRefusedError):
            await round_trip(proxy.port)
        assert (await toxiproxy.restore("echo")).port == proxy.port
        assert await round_trip(proxy.port) == b"ping"

        # /reset: every proxy back up, every toxic gone.
        await toxiproxy.latency("echo", 50, jitter=5, stream="upstream")
        await toxiproxy.cut("echo")
        await toxiproxy.reset()
        assert (await toxiproxy.proxy("echo")).enabled
        assert await toxiproxy.toxics("echo") == []

        # Errors carry the server's status and message.
        await toxiproxy.latency("echo", 10)
        with pytest.raises(ToxiproxyError, match="toxic already exists") as duplicate:
            await toxiproxy.latency("echo", 10)
        assert duplicate.value.status == 409
        with pytest.raises(ToxiproxyError, match="proxy not found") as missing:
            await toxiproxy.cut("nope")
        assert missing.value.status == 404
        await toxiproxy.delete_proxy("echo")
    finally:
        upstream.close()
        await upstream.wait_closed()


def other_free_port(*taken: int) -> int:
    while (port := free_port()) in taken:
        pass
    return port


@pytest.fixture
async def proxied_broker(tmp_path: Path) -> AsyncIterator[tuple[LocalKafka, int]]:
    """A private broker with a PROXIED listener advertised on a port for the proxy to take:
    (broker, that port)."""
    port = free_port_pair()
    proxied = other_free_port(port, port + 1)
    proxy_port = other_free_port(port, port + 1, proxied)
    env = {"KAFKA_PROXIED_PORT": str(proxied), "KAFKA_PROXIED_ADVERTISED_PORT": str(proxy_port)}
    broker = LocalKafka(tmp_path / "kafka", port, env)
    try:
        yield broker, proxy_port
    finally:
        await asyncio.to_thread(broker.stop)


async def test_kafka_through_the_proxy_cut_restore_and_latency(
    toxiproxy: Toxiproxy, proxied_broker: tuple[LocalKafka, int]
) -> None:
    """aiokafka bootstrapped on the proxy stays on it (the metadata names the proxy); a cut
    proxy fails a produce within its timeout and the same producer works once restored; a
    300 ms latency toxic makes a produce take at least 300 ms; records read back through it."""
    broker, proxy_port = proxied_broker
    await asyncio.gather(start(toxiproxy), asyncio.to_thread(broker.start))
    proxied_port = int(broker.env["KAFKA_PROXIED_PORT"])
    proxy = await toxiproxy.create_proxy("kafka", proxy_port, f"127.0.0.1:{proxied_port}")
    assert proxy.port == proxy_port
    topic = f"toxiproxy-{uuid.uuid4().hex[:8]}"
    await ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap), {topic: 1})

    bootstrap = f"127.0.0.1:{proxy_port}"
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        request_timeout_ms=2000,  # a record that cannot be sent fails after 2 s
        enable_idempotence=False,
        acks=1,
    )
    await producer.start()
    acknowledged: list[bytes] = []

    async def produce() -> float:
        value = uuid.uuid4().bytes
        started = time.monotonic()
        await asyncio.wait_for(producer.send_and_wait(topic, value), 10)
        acknowledged.append(value)
        return time.monotonic() - started

    try:
        # The broker's metadata names the proxy: no connection goes around it.
        await produce()
        brokers = producer.client.cluster.brokers()
        assert {(b.host, b.port) for b in brokers} == {("127.0.0.1", proxy_port)}

        # Cut: a produce fails within its timeout.
        await toxiproxy.cut("kafka")
        started = time.monotonic()
        with pytest.raises((KafkaError, TimeoutError)):
            await produce()
        assert time.monotonic() - started < 10

        # Restored: the same producer reconnects by itself.
        await toxiproxy.restore("kafka")
        await produce()

        # 300 ms of latency on the answers: a produce takes at least that.
        await toxiproxy.latency("kafka", 300)
        assert await produce() >= 0.3
        await toxiproxy.clear("kafka")
        assert await produce() < 0.3
    finally:
        await producer.stop()

    # Read back through the proxy as well.
    records = await read_records(bootstrap, topic, count=len(acknowledged), seconds=15)
    assert [r.value for r in records] == acknowledged
