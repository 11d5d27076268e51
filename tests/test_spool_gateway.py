"""The gateway with its spool, against a real broker of its own: Kafka away or frozen, the
gateway SIGKILLed while spooling, a full disk. Each 200 says where the record was durable;
every 200'd id reaches the topic, in order, with its headers plus ``ce_spooledtime``.

The gateway runs as its own process (``python -m gateway``) so it can be SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.app import STORE
from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.conftest import TEST_KEY, Topics, gateway_env, start_gateway, wait_until
from tests.fault.cluster import ServiceProcess, metric_sum
from tests.kafka_reader import read_records
from tests.payloads import sms_body
from tests.services import LocalKafka, free_port, free_port_pair
from tests.test_spool import small_tmpfs

pytestmark = pytest.mark.broker_outage
ROOT = Path(__file__).resolve().parent.parent
TOPICS = Topics("sms-events", "sms-events.dlq")


class GatewayProcess(ServiceProcess):
    """``python -m gateway`` on a free port (the fault suite's process wrapper)."""

    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        port = free_port()
        listen = {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port)}
        super().__init__(log.stem, ["-m", "gateway"], {**env, **listen}, port, log)
        self.url = f"http://127.0.0.1:{port}"

    async def start_alive(self) -> None:
        self.start()
        await self.wait_ready(30, "/healthz")  # alive; ready may wait for Kafka or not at all

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    async def metric(self, name: str, **labels: str) -> float:
        return metric_sum(await self.metrics(), name, **labels)


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str, bytes]:
    async with http.post(
        url + "/v1/onoff/sms", data=body, headers={"Authorization": f"x-api-key {TEST_KEY}"}
    ) as response:
        return (
            response.status,
            response.headers.get("Onoff-Events-Durability", ""),
            await response.read(),
        )


async def spool_drained(gateway: GatewayProcess, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while await gateway.metric("onoff_gateway_spool_records"):
        assert time.monotonic() < deadline, f"the spool did not drain within {seconds} s"
        await asyncio.sleep(0.25)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[LocalKafka]:
    kafka = LocalKafka(tmp_path / "kafka", free_port_pair())  # not started
    try:
        yield kafka
    finally:
        await asyncio.to_thread(kafka.stop)


async def start_broker(kafka: LocalKafka) -> None:
    await asyncio.to_thread(kafka.start)
    # One partition: the order of the topic is the order of the answers.
    await ensure_topics(
        KafkaSettings(bootstrap_servers=kafka.bootstrap), {TOPICS.events: 1, TOPICS.dlq: 1}
    )


def spool_env(kafka: LocalKafka, spool: Path, **extra: str) -> dict[str, str]:
    return gateway_env(
        kafka.bootstrap,
        TOPICS,
        GATEWAY_SPOOL_DIR=str(spool),
        GATEWAY_SPOOL_AFTER_SECONDS="1",
        **extra,
    )


async def test_spooled_while_kafka_is_away_survives_kill_9_and_reaches_kafka_in_order(
    broker: LocalKafka, tmp_path: Path
) -> None:
    env = spool_env(broker, tmp_path / "spool")
    bodies = [sms_body(body=f"message {i}") for i in range(60)]
    ids = [orjson.loads(b)["id"] for b in bodies]
    async with aiohttp.ClientSession() as http:
        first = GatewayProcess(env, tmp_path / "gateway-1.log")
        await first.start_alive()
        try:
            async with http.get(first.url + "/readyz") as ready:
                # No Kafka, but the spool has room: a webhook gets its 200, so stay in service.
                assert (ready.status, await ready.json()) == (
                    200,
                    {"status": "ready", "durability": "spool"},
                )
            answers = [await post(http, first.url, b) for b in bodies[:40]]
            assert {(status, where) for status, where, _ in answers} == {(200, "spool")}
            assert await first.metric("onoff_gateway_spool_records") == 40
            accepted = await first.metric("onoff_gateway_accepted_events_total", durability="spool")
            assert accepted == 40
        finally:
            first.kill(signal.SIGKILL)  # no drain, no close: what a crash leaves

        second = GatewayProcess(env, tmp_path / "gateway-2.log")
        await second.start_alive()
        try:
            # The killed gateway's records are still there, and new ones join them.
            assert await second.metric("onoff_gateway_spool_records") == 40
            answers = [await post(http, second.url, b) for b in bodies[40:]]
            assert {(status, where) for status, where, _ in answers} == {(200, "spool")}

            await start_broker(broker)

            await spool_drained(second)
            assert await second.metric("onoff_gateway_replayed_records_total") == 60

            status, where, _ = await post(http, second.url, sms_body())
            assert (status, where) == (200, "kafka")  # Kafka is back: straight to it
        finally:
            second.kill(signal.SIGTERM)

    records = await read_records(broker.bootstrap, TOPICS.events, seconds=30)
    assert [r.key.decode() for r in records[:60]] == ids  # every one, oldest first, once
    for record, body in zip(records, bodies, strict=False):
        headers = dict(record.headers)
        assert record.value == body
        assert headers["ce_id"] == record.key
        assert headers["ce_type"] == b"com.onoff.business.sms.v1"
        assert headers["ce_spooledtime"] >= headers["ce_receivedtime"]
    assert "ce_spooledtime" not in dict(records[60].headers)


async def test_frozen_broker_spools_after_the_deadline_then_replays(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """Kafka connected but not answering (SIGSTOP): each webhook waits
    GATEWAY_SPOOL_AFTER_SECONDS, is spooled and answered, far inside Onoff's 10 s."""
    await start_broker(broker)
    env = spool_env(broker, tmp_path / "spool")
    async with aiohttp.ClientSession() as http:
        gateway = GatewayProcess(env, tmp_path / "gateway.log")
        await gateway.start_alive()
        try:
            await wait_until_ready(http, gateway.url)
            status, where, _ = await post(http, gateway.url, sms_body())
            assert (status, where) == (200, "kafka")
            pid = int((broker.folder / "kafka.pid").read_text())
            os.kill(pid, signal.SIGSTOP)
            try:
                bodies = [sms_body() for _ in range(5)]
                started = time.monotonic()
                answers = await asyncio.gather(*(post(http, gateway.url, b) for b in bodies))
                took = time.monotonic() - started
            finally:
                os.kill(pid, signal.SIGCONT)
            assert {(s, w) for s, w, _ in answers} == {(200, "spool")}
            assert took < 5.0
            await spool_drained(gateway)
        finally:
            gateway.kill(signal.SIGTERM)
    records = await read_records(broker.bootstrap, TOPICS.events, seconds=30)
    keys = {r.key for r in records}
    # Each spooled record is in the topic; the producer may have written its own copy too.
    assert {orjson.loads(b)["id"].encode() for b in bodies} <= keys


async def wait_until_ready(http: aiohttp.ClientSession, url: str) -> None:
    async def kafka_ready() -> bool:
        async with http.get(url + "/readyz") as response:
            return response.status == 200 and "durability" not in await response.json()

    deadline = time.monotonic() + 60
    while not await kafka_ready():
        assert time.monotonic() < deadline, "the gateway never reached Kafka"
        await asyncio.sleep(0.2)


async def test_full_disk_answers_503_and_every_200_reaches_kafka(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """A spool volume that fills up: 200 (spooled, fsynced) until it is full, then 503 with
    the reason; never a 200 for a record that is not on the disk."""
    # 4 MiB, of which the spool leaves 2 MiB free (its reserve, so a full spool can delete).
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        env = spool_env(broker, disk)
        async with aiohttp.ClientSession() as http:
            gateway = GatewayProcess(env, tmp_path / "gateway.log")
            await gateway.start_alive()
            accepted: list[str] = []
            refused: list[bytes] = []
            try:
                for _ in range(400):
                    body = sms_body(body="x" * 8000)
                    status, where, answer = await post(http, gateway.url, body)
                    if status == 200:
                        assert where == "spool"
                        accepted.append(orjson.loads(body)["id"])
                    else:
                        assert status == 503
                        refused.append(answer)
                        if len(refused) >= 10:
                            break
                assert accepted
                assert refused
                assert {orjson.loads(a)["detail"] for a in refused} == {
                    "not made durable: spool_disk_full"
                }
                full = await gateway.metric(
                    "onoff_gateway_spool_failures_total", reason="disk_full"
                )
                assert full >= 10
                await start_broker(broker)
                await spool_drained(gateway)
                # Emptied, the disk takes records again.
                status, _, _ = await post(http, gateway.url, sms_body())
                assert status == 200
            finally:
                gateway.kill(signal.SIGTERM)
    records = await read_records(broker.bootstrap, TOPICS.events, seconds=30)
    assert set(accepted) <= {r.key.decode() for r in records}


async def test_sigterm_while_kafka_is_away_stops_within_its_bounds_and_keeps_the_spool(
    broker: LocalKafka, tmp_path: Path
) -> None:
    """A stop cannot wait for Kafka forever: the replay gets GATEWAY_SPOOL_DRAIN_SECONDS, then
    the gateway exits 0 and leaves the records on the volume (for the next start, tested
    above), saying how many."""
    spool = tmp_path / "spool"
    env = spool_env(
        broker, spool, GATEWAY_SPOOL_DRAIN_SECONDS="2", GATEWAY_SHUTDOWN_TIMEOUT_SECONDS="2"
    )
    log = tmp_path / "gateway.log"
    async with aiohttp.ClientSession() as http:
        gateway = GatewayProcess(env, log)
        await gateway.start_alive()
        answers = [await post(http, gateway.url, sms_body()) for _ in range(10)]
        assert {(status, where) for status, where, _ in answers} == {(200, "spool")}
        started = time.monotonic()
        code = await asyncio.to_thread(gateway.kill, signal.SIGTERM)
        took = time.monotonic() - started
    assert code == 0
    assert took < 12, f"the stop took {took:.1f} s"
    with contextlib.closing(sqlite3.connect(spool / "spool.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM spool").fetchone() == (10,)
    closed = [
        orjson.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and '"spool_closed"' in line
    ]
    assert [c["records_left"] for c in closed] == [10]


async def test_a_failing_spool_disk_takes_the_pod_out_of_readiness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka away, so readiness rests on the spool alone: ready while it writes; after a
    write fails (injected at the worker thread's SQLite call: this machine cannot make a
    disk fail under an open file), 503 for the webhook and for /readyz, so the load balancer
    sends Onoff elsewhere instead of to a pod that can only refuse."""
    nowhere = f"127.0.0.1:{free_port()}"  # no broker: the producer never connects
    env = gateway_env(
        nowhere, TOPICS, GATEWAY_SPOOL_DIR=str(tmp_path / "spool"), GATEWAY_SPOOL_DRAIN_SECONDS="0"
    )
    server, gw = await start_gateway(env, wait_ready=False)
    try:
        store = gw.app[STORE]
        await wait_until(lambda: store.spool is not None, 10, "the spool to open")

        async def ready() -> tuple[int, dict[str, str]]:
            async with gw.http.get(gw.url.rstrip("/") + "/readyz") as response:
                return response.status, await response.json()

        assert await ready() == (200, {"status": "ready", "durability": "spool"})
        status, where, _ = await post(gw.http, gw.url.rstrip("/"), sms_body())
        assert (status, where) == (200, "spool")

        def io_error(*_: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        assert store.spool is not None
        monkeypatch.setattr(store.spool, "_append_sync", io_error)
        status, _, answer = await post(gw.http, gw.url.rstrip("/"), sms_body())
        assert status == 503
        assert orjson.loads(answer)["detail"].startswith("not made durable: spool_")
        assert (await ready())[0] == 503
    finally:
        await gw.http.close()
        await server.close()
