"""Slow and idle clients against the real app, served as ``python -m gateway`` serves it
(``build_runner``), with a real broker: raw sockets play the client that trickles its body,
never finishes its headers, or idles on a keep-alive connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import orjson
from aiohttp import ClientSession, web
from prometheus_client import CollectorRegistry

from gateway.app import PUBLISHER, WEBHOOK_PATH, build_app, build_runner
from gateway.settings import GatewaySettings
from tests.conftest import TEST_KEY, Topics, gateway_env, wait_until
from tests.payloads import sms_body

# Slack for a loaded test machine on top of the bound under test.
MARGIN = 1.5


@dataclass
class Served:
    port: int
    registry: CollectorRegistry
    settings: GatewaySettings

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def serve(env: Mapping[str, str]) -> AsyncIterator[Served]:
    """The gateway on a free port, behind the same runner ``python -m gateway`` builds."""
    settings = GatewaySettings.from_env(env)
    registry = CollectorRegistry()
    app = build_app(settings, registry)
    runner = build_runner(app, settings)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await wait_until(lambda: app[PUBLISHER].ready, 30, "the gateway's producer to be ready")
        yield Served(runner.addresses[0][1], registry, settings)
    finally:
        await runner.cleanup()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class RawConnection:
    """One TCP connection to the gateway, written and read byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Answer(int(status_line.split()[1]), headers, body)

    async def closed_by_server(self) -> bytes:
        """Whatever the server still sends, once it has closed the connection."""
        return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def webhook_head(content_length: int) -> bytes:
    return (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        f"Authorization: x-api-key {TEST_KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {content_length}\r\n"
        "\r\n"
    ).encode()


async def post_webhook(http: ClientSession, served: Served, body: bytes) -> tuple[int, str]:
    headers = {"Authorization": f"x-api-key {TEST_KEY}", "Content-Type": "application/json"}
    async with http.post(served.webhook_url, data=body, headers=headers) as response:
        return response.status, response.headers.get("Retry-After", "")


async def test_a_body_trickling_past_the_read_timeout_is_answered_408_and_closed(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """Headers, then part of the body, then nothing: 408 with ``Connection: close`` at the body
    timeout and the connection closed, counted as body_timeout; a normal webhook posted
    meanwhile is accepted at once."""
    env = gateway_env(kafka_bootstrap, topics, GATEWAY_BODY_READ_TIMEOUT_SECONDS="2")
    async with serve(env) as served, ClientSession() as http:
        body = sms_body()
        slow = await RawConnection.open(served.port)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await slow.send(webhook_head(len(body)) + body[:20])

            status, _ = await asyncio.wait_for(post_webhook(http, served, sms_body()), 1.5)
            assert status == 200

            answer = await asyncio.wait_for(slow.answer(), 2 + MARGIN)
            waited = loop.time() - started
            assert answer.status == 408
            assert answer.headers["connection"] == "close"
            assert orjson.loads(answer.body)["error"] == "body_timeout"
            assert waited >= 1.9
            # At once: not after aiohttp reads and discards what might still come.
            assert await asyncio.wait_for(slow.closed_by_server(), 0.5) == b""
        finally:
            await slow.close()
        assert served.sample("onoff_gateway_refused_requests_total", reason="body_timeout") == 1
        assert (
            served.sample(
                "onoff_gateway_http_requests_total",
                route=WEBHOOK_PATH,
                method="POST",
                status="408",
            )
            == 1
        )
        assert served.sample("onoff_gateway_webhook_requests_in_flight") == 0


async def test_an_idle_keep_alive_connection_is_closed_at_the_keep_alive_timeout(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """A connection kept alive after its answer and left idle is closed by the gateway about
    GATEWAY_KEEPALIVE_TIMEOUT_SECONDS later, not before."""
    env = gateway_env(kafka_bootstrap, topics, GATEWAY_KEEPALIVE_TIMEOUT_SECONDS="1")
    async with serve(env) as served:
        idle = await RawConnection.open(served.port)
        try:
            await idle.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await asyncio.wait_for(idle.answer(), 5)
            assert answer.status == 200
            assert answer.headers.get("connection") != "close"
            loop = asyncio.get_running_loop()
            answered = loop.time()
            assert await asyncio.wait_for(idle.closed_by_server(), 1 + MARGIN) == b""
            assert loop.time() - answered >= 0.8
        finally:
            await idle.close()


async def test_a_request_whose_headers_never_end_is_dropped_at_the_keep_alive_timeout(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """aiohttp has no header timeout: a request line and half the headers, then nothing, is
    closed at the keep-alive deadline (set by GATEWAY_KEEPALIVE_TIMEOUT_SECONDS), unanswered."""
    env = gateway_env(kafka_bootstrap, topics, GATEWAY_KEEPALIVE_TIMEOUT_SECONDS="1")
    async with serve(env) as served:
        stalled = await RawConnection.open(served.port)
        try:
            await stalled.send(f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            assert await asyncio.wait_for(stalled.closed_by_server(), 1 + MARGIN) == b""
        finally:
            await stalled.close()


async def test_past_max_in_flight_a_webhook_gets_503_at_once_and_later_ones_are_served(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """With GATEWAY_MAX_IN_FLIGHT=2 and two webhooks held by slow bodies, a third is answered
    503 with Retry-After at once, its body never read (the connection is dropped within the
    body timeout, not aiohttp's 10 s lingering); the two held ones then finish with 200, and
    the next webhook is accepted."""
    env = gateway_env(
        kafka_bootstrap,
        topics,
        GATEWAY_MAX_IN_FLIGHT="2",
        GATEWAY_BODY_READ_TIMEOUT_SECONDS="3",
        GATEWAY_RETRY_AFTER_SECONDS="7",
    )
    async with serve(env) as served, ClientSession() as http:
        bodies = [sms_body(), sms_body()]
        held = [await RawConnection.open(served.port) for _ in bodies]
        third = await RawConnection.open(served.port)
        try:
            for connection, body in zip(held, bodies, strict=True):
                await connection.send(webhook_head(len(body)) + body[:20])
            await wait_until(
                lambda: served.sample("onoff_gateway_webhook_requests_in_flight") == 2,
                2,
                "two webhooks in flight",
            )

            loop = asyncio.get_running_loop()
            await third.send(webhook_head(len(bodies[0])))  # and never the body
            refused = await asyncio.wait_for(third.answer(), 0.5)
            refused_at = loop.time()
            assert refused.status == 503
            assert refused.headers["retry-after"] == "7"
            assert orjson.loads(refused.body)["error"] == "unavailable"
            assert (
                served.sample("onoff_gateway_refused_requests_total", reason="in_flight_limit") == 1
            )

            for connection, body in zip(held, bodies, strict=True):
                await connection.send(body[20:])
            for connection in held:
                answer = await asyncio.wait_for(connection.answer(), 5)
                assert (answer.status, orjson.loads(answer.body)) == (200, {"status": "accepted"})
            await wait_until(
                lambda: served.sample("onoff_gateway_webhook_requests_in_flight") == 0,
                2,
                "no webhook in flight",
            )
            assert await post_webhook(http, served, sms_body()) == (200, "")

            assert await asyncio.wait_for(third.closed_by_server(), 3 + MARGIN) == b""
            assert loop.time() - refused_at <= 3 + MARGIN
        finally:
            for connection in [*held, third]:
                await connection.close()
        assert served.sample("onoff_gateway_refused_requests_total", reason="body_timeout") == 0


async def test_past_max_in_flight_bytes_a_webhook_gets_503_at_once_and_a_small_one_fits(
    kafka_bootstrap: str, topics: Topics
) -> None:
    """GATEWAY_MAX_IN_FLIGHT_BYTES counts the bodies in flight by their Content-Length: with
    one 40,000-byte webhook held, a 30,000-byte one is refused at once (503, counted), while a
    small one still fits and is accepted."""
    env = gateway_env(
        kafka_bootstrap,
        topics,
        GATEWAY_MAX_IN_FLIGHT_BYTES=str(64 * 1024),
        GATEWAY_BODY_READ_TIMEOUT_SECONDS="3",
    )
    async with serve(env) as served, ClientSession() as http:
        big = sms_body(body="x" * 39_500)
        held = await RawConnection.open(served.port)
        refused_connection = await RawConnection.open(served.port)
        try:
            await held.send(webhook_head(len(big)) + big[:20])
            await wait_until(
                lambda: served.sample("onoff_gateway_webhook_requests_in_flight") == 1,
                2,
                "one webhook in flight",
            )
            await refused_connection.send(webhook_head(30_000))
            refused = await asyncio.wait_for(refused_connection.answer(), 0.5)
            assert refused.status == 503
            assert (
                served.sample(
                    "onoff_gateway_refused_requests_total", reason="in_flight_bytes_limit"
                )
                == 1
            )
            assert await post_webhook(http, served, sms_body()) == (200, "")
            await held.send(big[20:])
            answer = await asyncio.wait_for(held.answer(), 5)
            assert answer.status == 200
        finally:
            await held.close()
            await refused_connection.close()
