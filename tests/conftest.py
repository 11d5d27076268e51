"""Real services for the tests: a Kafka broker, and gateways built on it.

Service addresses come from the environment first (``KAFKA_BOOTSTRAP_SERVERS``), so the same
suite runs against any real cluster; otherwise testcontainers' Kafka when a Docker engine
answers; otherwise the project's own broker (``scripts/kafka.sh``) in a temporary folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.app import PUBLISHER, build_app
from gateway.publisher import ProducerOptions
from gateway.settings import GatewaySettings
from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.services import (
    LocalKafka,
    ScriptService,
    docker_engine_answers,
    free_port,
    free_port_pair,
)

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "test-key-0123456789abcdef"
ROTATED_KEY = "rotated-key-fedcba9876543210"
API_KEYS = f"primary:{TEST_KEY},rotated:{ROTATED_KEY}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a real Kafka broker for the whole session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if docker_engine_answers():
        from testcontainers.kafka import KafkaContainer  # noqa: PLC0415 # needs an engine

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), free_port_pair())
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@dataclass(frozen=True)
class Topics:
    events: str
    dlq: str


@pytest.fixture
async def topics(kafka_bootstrap: str) -> Topics:
    """A fresh events topic and DLQ for one test, so tests never see each other's records."""
    name = f"sms-events-{uuid.uuid4().hex[:12]}"
    result = Topics(name, f"{name}.dlq")
    await ensure_topics(
        KafkaSettings(bootstrap_servers=kafka_bootstrap), {result.events: 3, result.dlq: 1}
    )
    return result


def gateway_env(bootstrap: str, topics: Topics, **extra: str) -> dict[str, str]:
    """The environment a test gateway reads its settings from."""
    env = {
        "GATEWAY_API_KEYS": API_KEYS,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topics.events,
        "KAFKA_DLQ_TOPIC": topics.dlq,
        "GATEWAY_PUBLISH_TIMEOUT_SECONDS": "5",
    }
    env.update(extra)
    return env


@dataclass
class RunningGateway:
    """An in-process gateway on a real port, its registry, and a client session."""

    url: str
    app: web.Application
    registry: CollectorRegistry
    http: ClientSession
    settings: GatewaySettings


async def start_gateway(
    env: Mapping[str, str], options: ProducerOptions | None = None, *, wait_ready: bool = True
) -> tuple[TestServer, RunningGateway]:
    settings = GatewaySettings.from_env(env)
    registry = CollectorRegistry()
    app = build_app(settings, registry, options)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    http = ClientSession()
    running = RunningGateway(str(server.make_url("")), app, registry, http, settings)
    if wait_ready:
        await wait_until(lambda: app[PUBLISHER].ready, 30, "the gateway's producer to be ready")
    return server, running


@pytest.fixture
async def gateway(kafka_bootstrap: str, topics: Topics) -> AsyncIterator[RunningGateway]:
    server, running = await start_gateway(gateway_env(kafka_bootstrap, topics))
    try:
        yield running
    finally:
        await running.http.close()
        await server.close()


async def wait_until(condition: object, seconds: float, what: str) -> None:
    """Poll ``condition()`` until true; fail the test naming ``what`` after ``seconds``."""
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def _postgres_container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415 # needs an engine

    with PostgresContainer("postgres:16-alpine", driver=None) as container:
        yield container.get_connection_url()


@contextlib.contextmanager
def _redis_container() -> Iterator[str]:
    from testcontainers.redis import RedisContainer  # noqa: PLC0415 # needs an engine

    with RedisContainer() as container:
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


def _real_service(
    factory: pytest.TempPathFactory,
    variable: str,
    script: str,
    container: Callable[[], contextlib.AbstractContextManager[str]] | None = None,
) -> Iterator[str]:
    """The address in ``variable`` when set; else a container when a Docker engine answers
    (and the service has one); else the project's ``scripts/<script>`` in a temp folder."""
    configured = os.environ.get(variable)
    if configured:
        yield configured
        return
    if container is not None and docker_engine_answers():
        with container() as url:
            yield url
        return
    service = ScriptService(script, factory.mktemp(script.removesuffix(".sh")), free_port())
    service.start()
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL: ``POSTGRES_URL``, else testcontainers, else scripts/postgres.sh."""
    yield from _real_service(tmp_path_factory, "POSTGRES_URL", "postgres.sh", _postgres_container)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: ``REDIS_URL``, else testcontainers, else scripts/redis.sh."""
    yield from _real_service(tmp_path_factory, "REDIS_URL", "redis.sh", _redis_container)


@pytest.fixture(scope="session")
def alertmanager_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus Alertmanager: ``ALERTMANAGER_URL``, else scripts/alertmanager.sh."""
    yield from _real_service(tmp_path_factory, "ALERTMANAGER_URL", "alertmanager.sh")


@pytest.fixture
def pg_schema() -> str:
    """A fresh PostgreSQL schema name for one test's warehouse table."""
    return f"t_{uuid.uuid4().hex[:12]}"
