"""The gateway when the wire to the broker resets every connection (the fault suite's
wire-gateway-broker scenario, in isolation): a private broker whose every connection goes
through Toxiproxy, the real gateway process (``python -m gateway``, uvloop, as deployed) under
an open-loop load with Onoff's retries, and each webhook's answer time measured by the sender.

The README promises an answer within GATEWAY_PUBLISH_TIMEOUT_SECONDS whatever Kafka does: 503
at the deadline while the wire is broken, 200 only once the broker acked (acks=all)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.conftest import ROOT, TEST_KEY, Topics, gateway_env
from tests.fault.toxiproxy import Toxiproxy, ToxiproxyError
from tests.payloads import sms_body
from tests.services import LocalKafka, free_port, free_port_pair

pytestmark = pytest.mark.broker_outage

DEADLINE = 5.0  # GATEWAY_PUBLISH_TIMEOUT_SECONDS, the default
MARGIN = 1.0  # scheduling, writing the answer, and a shared CI machine
RATE = 100.0  # webhooks per second, open loop
RETRIES = 4  # Onoff's: 4 more tries after a 5xx, 1 s apart


@dataclass
class Answer:
    sent_at: float  # seconds since the load started
    phase: str
    status: str  # the HTTP status, or the client error's name
    seconds: float


@dataclass
class Load:
    """Onoff-like sender: event ``i`` leaves at ``i / rate`` whatever the earlier answers; a
    5xx is retried after 1 s; every try's answer time is kept."""

    url: str
    rate: float
    phase: str = "before"
    answers: list[Answer] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        # No connect or read timeout of its own: a late answer is measured, not cut off.
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=5000)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            started = time.monotonic()
            i = 0
            while not self._stop.is_set():
                delay = started + i / self.rate - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                    continue
                task = asyncio.create_task(self._deliver(http, started))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.gather(*tasks)

    def stop(self) -> None:
        self._stop.set()

    async def _deliver(self, http: aiohttp.ClientSession, origin: float) -> None:
        body = sms_body()
        for attempt in range(1 + RETRIES):
            if attempt:
                await asyncio.sleep(1.0)
            phase = self.phase
            sent = time.monotonic()
            try:
                async with http.post(
                    self.url, data=body, headers={"Authorization": f"x-api-key {TEST_KEY}"}
                ) as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            self.answers.append(Answer(sent - origin, phase, status, time.monotonic() - sent))
            if status == "200":
                return


def by_phase(answers: list[Answer]) -> dict[str, dict[str, object]]:
    """Per phase: tries, p50/p99/max answer time (s), statuses."""
    numbers: dict[str, dict[str, object]] = {}
    for phase in dict.fromkeys(a.phase for a in answers):
        mine = [a for a in answers if a.phase == phase]
        times = sorted(a.seconds for a in mine)
        numbers[phase] = {
            "tries": len(times),
            "p50": round(times[len(times) // 2], 3),
            "p99": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
            "max": round(times[-1], 3),
            "statuses": dict(Counter(a.status for a in mine)),
        }
    return numbers


@pytest.fixture
async def toxiproxy(tmp_path: Path) -> AsyncIterator[Toxiproxy]:
    server = Toxiproxy(free_port(), tmp_path / "toxiproxy")
    try:
        yield server
    finally:
        await server.stop()


def other_free_port(*taken: int) -> int:
    while (port := free_port()) in taken:
        pass
    return port


@pytest.fixture
async def proxied_broker(tmp_path: Path) -> AsyncIterator[tuple[LocalKafka, int]]:
    """A private broker with a PROXIED listener advertised on the proxy's port."""
    port = free_port_pair()
    proxied = other_free_port(port, port + 1)
    proxy_port = other_free_port(port, port + 1, proxied)
    env = {"KAFKA_PROXIED_PORT": str(proxied), "KAFKA_PROXIED_ADVERTISED_PORT": str(proxy_port)}
    broker = LocalKafka(tmp_path / "kafka", port, env)
    try:
        yield broker, proxy_port
    finally:
        await asyncio.to_thread(broker.stop)


@contextlib.asynccontextmanager
async def gateway_process(env: dict[str, str], log: Path) -> AsyncIterator[str]:
    """``python -m gateway`` on a free port, ready; its base URL. SIGTERM (then SIGKILL) after."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "GATEWAY_"))}
    clean.update(env, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port), LOG_LEVEL="WARNING")
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", cwd=ROOT, env=clean, stdout=out, stderr=out
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
                deadline = time.monotonic() + 60
                while True:
                    assert process.returncode is None, f"the gateway exited; log: {log}"
                    assert time.monotonic() < deadline, f"the gateway is not ready; log: {log}"
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(url + "/readyz") as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.2)
            yield url
        finally:
            if process.returncode is None:
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_every_webhook_is_answered_within_the_deadline_while_connections_reset(
    toxiproxy: Toxiproxy, proxied_broker: tuple[LocalKafka, int], tmp_path: Path
) -> None:
    """3 s clean, 10 s of reset_peer (every connection to the broker reset, new ones too), 5 s
    clean again, at 100 webhooks/s plus Onoff's retries: every try is answered within the
    publish deadline plus a margin; the reset phase does answer 503 (the fault bit) and the
    gateway serves 200s again afterwards."""
    broker, proxy_port = proxied_broker
    proxied_port = int(broker.env["KAFKA_PROXIED_PORT"])
    try:
        await toxiproxy.start()
        # The proxy takes its port before the broker's slow start, so nothing else can.
        await toxiproxy.create_proxy("kafka", proxy_port, f"127.0.0.1:{proxied_port}")
    except ToxiproxyError as error:
        pytest.fail(str(error), pytrace=False)
    await asyncio.to_thread(broker.start)
    topics = Topics("sms-events", "sms-events.dlq")
    await ensure_topics(KafkaSettings(broker.bootstrap), {topics.events: 3, topics.dlq: 1})
    # Bootstrapped on the proxy: every connection of the gateway's producer goes through it.
    env = gateway_env(
        f"127.0.0.1:{proxy_port}", topics, GATEWAY_PUBLISH_TIMEOUT_SECONDS=str(DEADLINE)
    )

    async with gateway_process(env, tmp_path / "gateway.log") as url:
        load = Load(url + "/v1/onoff/sms", RATE)
        sending = asyncio.create_task(load.run())
        try:
            await asyncio.sleep(3)
            load.phase = "reset_peer"
            await toxiproxy.reset_peer("kafka")
            await asyncio.sleep(10)
            load.phase = "after"
            await toxiproxy.clear("kafka")
            await asyncio.sleep(5)
        finally:
            load.stop()
            await sending

    numbers = by_phase(load.answers)
    late = sorted(
        (a for a in load.answers if a.seconds > DEADLINE + MARGIN), key=lambda a: -a.seconds
    )
    assert not late, (f"{len(late)} tries answered after {DEADLINE + MARGIN} s", numbers, late[:5])
    unanswered = [a for a in load.answers if not a.status.isdigit()]
    assert not unanswered, (numbers, unanswered[:5])
    reset = numbers["reset_peer"]["statuses"]
    assert isinstance(reset, dict)
    assert reset.get("503", 0) > 0, numbers  # the fault bit
    after = [a for a in load.answers if a.phase == "after" and a.sent_at > 3 + 10 + 2]
    assert after, numbers
    assert all(a.status == "200" for a in after), numbers
