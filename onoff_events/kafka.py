"""Kafka connection settings shared by the gateway and the consumers, topic creation, and
closing a producer whose stop() cannot finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    IllegalStateError,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    UnknownProducerId,
)

from onoff_events import settings as s
from onoff_events.logs import log_event

log = logging.getLogger("onoff_events.kafka")

# After one of these an idempotent producer fails every later record (aiokafka issue 1017:
# it never resets its sequence numbers): the only cure is a new producer.
PRODUCER_FATAL: tuple[type[BaseException], ...] = (
    OutOfOrderSequenceNumber,
    ProducerFenced,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    UnknownProducerId,
    IllegalStateError,
    ProducerClosed,
)

SECURITY_PROTOCOLS = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
SASL_MECHANISMS = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"})


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """How to reach the cluster. Strimzi's KafkaUser gives SCRAM-SHA-512 or mutual TLS."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "onoff-events"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], client_id: str) -> KafkaSettings:
        """Read ``KAFKA_*`` variables; raise SettingsError naming a bad one."""
        bootstrap = s.text(env, "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
        for server in bootstrap.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise s.SettingsError(
                    f"KAFKA_BOOTSTRAP_SERVERS: expected host:port[,host:port…], got {bootstrap!r}"
                )
        protocol = s.choice(env, "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", SECURITY_PROTOCOLS)
        mechanism = s.choice(env, "KAFKA_SASL_MECHANISM", "SCRAM-SHA-512", SASL_MECHANISMS)
        username = s.text(env, "KAFKA_SASL_USERNAME", "")
        password = env.get("KAFKA_SASL_PASSWORD", "")
        if protocol.startswith("SASL") and not (username and password):
            raise s.SettingsError(
                f"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD: required with "
                f"KAFKA_SECURITY_PROTOCOL={protocol}"
            )
        return cls(
            bootstrap_servers=bootstrap,
            client_id=s.text(env, "KAFKA_CLIENT_ID", client_id),
            security_protocol=protocol,
            sasl_mechanism=mechanism,
            sasl_username=username,
            sasl_password=password,
            ssl_cafile=s.text(env, "KAFKA_SSL_CAFILE", ""),
            ssl_certfile=s.text(env, "KAFKA_SSL_CERTFILE", ""),
            ssl_keyfile=s.text(env, "KAFKA_SSL_KEYFILE", ""),
        )

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments common to aiokafka's producer, consumer and admin client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile or None)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
            options["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    def describe(self) -> dict[str, str]:
        """The settings as printed at start, the password masked."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "sasl_mechanism": self.sasl_mechanism if self.sasl_username else "",
            "sasl_username": self.sasl_username,
            "sasl_password": s.mask(self.sasl_password),
        }


async def ensure_topics(
    kafka: KafkaSettings, topics: Mapping[str, int], replication_factor: int = 1
) -> list[str]:
    """Create the topics that do not exist yet (name → partitions); return the ones created.

    For local brokers and tests; in production Strimzi's KafkaTopic resources own the topics.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: PLC0415 # only tools need it

    admin = AIOKafkaAdminClient(**kafka.client_options())
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in topics if name not in existing]
        if missing:
            await admin.create_topics(
                [NewTopic(name, topics[name], replication_factor) for name in missing]
            )
        return missing
    finally:
        await admin.close()


async def abandon_producer(producer: AIOKafkaProducer) -> None:
    """Close a producer whose stop() timed out (its flush never ends while the cluster is
    away): its sender and connections, so no task or socket outlives it. aiokafka has no
    public way to abandon a flush. Records still pending were never acknowledged."""
    # Marked stopped, as stop() does first: a later stop() returns at once and __del__ does
    # not warn about an unclosed producer (send() does not look at this flag).
    producer._closed = True  # noqa: SLF001
    await producer._sender.close()  # noqa: SLF001
    await producer.client.close()


async def stop_producer(producer: AIOKafkaProducer, seconds: float) -> None:
    """Stop ``producer`` within ``seconds``, flushing what it can; never raises a Kafka or
    socket error. stop() waits for a flush that a dead cluster never allows: then the producer
    is abandoned, so no task or socket outlives it (records still pending were never
    acknowledged)."""
    try:
        async with asyncio.timeout(seconds):
            await producer.stop()
    except (KafkaError, TimeoutError) as exc:
        log_event(log, "producer_stop_failed", logging.WARNING, error_type=type(exc).__name__)
        with contextlib.suppress(KafkaError, OSError):
            await abandon_producer(producer)


async def topic_max_message_bytes(kafka: KafkaSettings, topics: Sequence[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` as the cluster applies it (the topic's own value, or
    the broker's ``message.max.bytes`` default). Raises KafkaError when the cluster will not
    say (a KafkaUser without DescribeConfigs on the topic); a topic it cannot describe is
    left out."""
    # Only the start-up check needs these.
    from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415
    from aiokafka.admin.config_resource import (  # noqa: PLC0415
        ConfigResource,
        ConfigResourceType,
    )

    admin = AIOKafkaAdminClient(**kafka.client_options())
    try:
        # start() inside: a start that fails half-way still has connections to close.
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
        )
    finally:
        await admin.close()
    limits: dict[str, int] = {}
    for response in responses:
        # (error_code, error_message, resource_type, resource_name, config_entries)
        for error_code, _, _, name, entries in response.resources:
            if error_code:
                continue
            for entry in entries:
                if entry[0] == "max.message.bytes" and str(entry[1]).isdigit():
                    limits[name] = int(entry[1])
    return limits


async def topic_partitions(kafka: KafkaSettings, topics: Sequence[str]) -> dict[str, list[int]]:
    """The partitions of each of ``topics`` that exists (one that does not, or that this user
    may not describe, is left out)."""
    from aiokafka.admin import AIOKafkaAdminClient  # noqa: PLC0415 # only tools need it

    admin = AIOKafkaAdminClient(**kafka.client_options())
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = [t for t in topics if t in existing]
        described = await admin.describe_topics(wanted) if wanted else []
    finally:
        await admin.close()
    return {
        str(d["topic"]): sorted(int(p["partition"]) for p in d.get("partitions", []))
        for d in described
        if not d.get("error_code")
    }
