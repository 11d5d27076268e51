"""The gateway as a process: start-up refusal on bad settings, and SIGTERM under load."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.settings import GatewaySettings
from onoff_events.settings import SettingsError
from tests.conftest import API_KEYS, ROOT, TEST_KEY, Topics, gateway_env, wait_until
from tests.kafka_reader import read_records
from tests.payloads import sms_body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_gateway(
    env: dict[str, str], stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "KAFKA_"))}
    full_env.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway"], cwd=ROOT, env=full_env, stdout=stdout, stderr=stderr
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GATEWAY_API_KEYS": ""}, "GATEWAY_API_KEYS"),
        ({"GATEWAY_API_KEYS": "no-colon-here"}, "GATEWAY_API_KEYS"),
        ({"GATEWAY_API_KEYS": "bad label:0123456789abcdef"}, "GATEWAY_API_KEYS"),
        ({"GATEWAY_API_KEYS": "short:abc"}, "GATEWAY_API_KEYS"),
        ({"GATEWAY_API_KEYS": "a:0123456789abcdef,a:fedcba9876543210"}, "GATEWAY_API_KEYS"),
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({"GATEWAY_PORT": "70000"}, "GATEWAY_PORT"),
        ({"GATEWAY_PUBLISH_TIMEOUT_SECONDS": "10"}, "GATEWAY_PUBLISH_TIMEOUT_SECONDS"),
        ({"GATEWAY_MAX_BODY_BYTES": "-1"}, "GATEWAY_MAX_BODY_BYTES"),
        ({"GATEWAY_INSECURE_DEV_NO_AUTH": "maybe"}, "GATEWAY_INSECURE_DEV_NO_AUTH"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "kafka"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_COMPRESSION_TYPE": "brotli"}, "KAFKA_COMPRESSION_TYPE"),
    ],
)
def test_bad_setting_stops_the_gateway_at_start_naming_it(env: dict[str, str], named: str) -> None:
    full = {"GATEWAY_API_KEYS": API_KEYS, "GATEWAY_PORT": str(free_port()), **env}
    process = run_gateway(full)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    message = stderr.decode()
    assert f"invalid setting: {named}" in message
    # A malformed key spec is reported without the key itself.
    for secret in ("0123456789abcdef", "fedcba9876543210", TEST_KEY):
        assert secret not in message


def test_no_key_is_refused_unless_the_insecure_development_flag_is_set() -> None:
    port = free_port()
    process = run_gateway({"GATEWAY_PORT": str(port), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2
    assert b"GATEWAY_INSECURE_DEV_NO_AUTH" in stderr

    process = run_gateway(
        {
            "GATEWAY_PORT": str(port),
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "GATEWAY_INSECURE_DEV_NO_AUTH": "true",
        }
    )
    try:
        _wait_healthy(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30)  # reads and closes both pipes
    assert process.returncode == 0
    assert b'"event":"insecure_no_auth"' in stdout


def _wait_healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1].decode()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                if b" 200 " in conn.recv(64):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("the gateway did not become healthy")


@pytest.fixture
def drained_gateway(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    env = gateway_env(
        kafka_bootstrap,
        topics,
        GATEWAY_PORT=str(port),
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_DRAIN_SECONDS="1.5",
        GATEWAY_SHUTDOWN_TIMEOUT_SECONDS="10",
    )
    log_path = tmp_path / "gateway.log"
    # A file, not a pipe: a pipe nobody reads would block the gateway once it fills.
    with log_path.open("wb") as log_file:
        process = run_gateway(env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            yield process, port, log_path
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


async def test_sigterm_during_a_burst_loses_no_acknowledged_event(
    drained_gateway: tuple[subprocess.Popen[bytes], int, Path],
    kafka_bootstrap: str,
    topics: Topics,
) -> None:
    """SIGTERM while 32 clients post: /readyz turns 503 at once, the process exits 0 in a
    bounded time, and every event answered 200 is on the topic."""
    process, port, log_path = drained_gateway
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        await wait_until(lambda: process.poll() is None, 1, "the process")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            try:
                async with http.get(base + "/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert loop.time() < deadline, "gateway never became ready"
            await asyncio.sleep(0.1)

        acknowledged: list[bytes] = []
        refused = 0
        stop_sending = asyncio.Event()

        async def client() -> None:
            nonlocal refused
            for _ in range(400):  # bounded: at most 400 requests per client
                if stop_sending.is_set():
                    return
                body = sms_body()
                try:
                    async with http.post(
                        base + "/v1/onoff/sms",
                        data=body,
                        headers={"Authorization": f"x-api-key {TEST_KEY}"},
                    ) as r:
                        await r.read()
                        if r.status == 200:
                            acknowledged.append(body)
                        else:
                            refused += 1
                except aiohttp.ClientError:
                    refused += 1
                    await asyncio.sleep(0.05)

        clients = [asyncio.create_task(client()) for _ in range(32)]
        await asyncio.sleep(1.0)
        before_term = len(acknowledged)
        terminated_at = loop.time()
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with http.get(base + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["status"] == "draining"
        exit_code = await asyncio.to_thread(process.wait, 30)
        exit_seconds = loop.time() - terminated_at
        stop_sending.set()
        await asyncio.gather(*clients)

    assert exit_code == 0
    assert exit_seconds < 15
    assert before_term > 0
    assert len(acknowledged) > before_term  # requests kept being served during the drain
    records = await read_records(kafka_bootstrap, topics.events, seconds=20)
    on_topic = {r.value for r in records}
    missing = [b for b in acknowledged if b not in on_topic]
    assert missing == [], f"{len(missing)} acknowledged events missing of {len(acknowledged)}"
    events = [orjson.loads(line)["event"] for line in log_path.read_bytes().splitlines()]
    assert events.index("draining") < events.index("stopped")
    assert events[-1] == "stopped"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_KEEPALIVE_TIMEOUT_SECONDS", "0"),
        ("GATEWAY_KEEPALIVE_TIMEOUT_SECONDS", "forever"),
        ("GATEWAY_BODY_READ_TIMEOUT_SECONDS", "10"),  # Onoff gives up at 10 s
        ("GATEWAY_BODY_READ_TIMEOUT_SECONDS", "0"),
        ("GATEWAY_MAX_IN_FLIGHT", "0"),
        ("GATEWAY_MAX_IN_FLIGHT", "1.5"),
    ],
)
def test_a_bad_slow_client_setting_is_refused_naming_it(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{variable}: "):
        GatewaySettings.from_env({"GATEWAY_API_KEYS": API_KEYS, variable: value})


def test_slow_client_settings_have_defaults_and_are_logged() -> None:
    """Keep-alive outlasts the 60 s idle timeout of the proxies in front (ingress-nginx, AWS
    ALB); a body gets 5 s; up to 10,000 webhooks and 128 MiB of their bodies in flight (held
    to the deadline while Kafka is away); all are logged at start."""
    defaults = GatewaySettings.from_env({"GATEWAY_API_KEYS": API_KEYS})
    names = (
        "keepalive_timeout_seconds",
        "body_read_timeout_seconds",
        "max_in_flight",
        "max_in_flight_bytes",
    )
    assert {k: defaults.describe()[k] for k in names} == {
        "keepalive_timeout_seconds": 75,
        "body_read_timeout_seconds": 5,
        "max_in_flight": 10_000,
        "max_in_flight_bytes": 128 * 1024 * 1024,
    }
    large_bodies = {"GATEWAY_API_KEYS": API_KEYS, "GATEWAY_MAX_BODY_BYTES": str(8 * 1024 * 1024)}
    chosen = GatewaySettings.from_env({**large_bodies, "GATEWAY_MAX_IN_FLIGHT": "100"})
    assert chosen.max_in_flight == 100
    with pytest.raises(SettingsError, match="GATEWAY_MAX_IN_FLIGHT_BYTES"):
        # Less than one body of the largest size: no such webhook could ever be taken.
        GatewaySettings.from_env({**large_bodies, "GATEWAY_MAX_IN_FLIGHT_BYTES": "1048576"})
