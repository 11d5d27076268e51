"""The gateway's settings: one object, read from the environment once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.auth import ApiKeys
from onoff_events import settings as s
from onoff_events.event_kinds import CALL, KINDS, SMS, EventKind
from onoff_events.kafka import KafkaSettings

# Onoff waits 10 s for an answer; a publish deadline at or past that would answer too late.
ONOFF_READ_TIMEOUT_SECONDS = 10.0
COMPRESSION_TYPES = frozenset({"none", "gzip", "lz4", "snappy", "zstd"})  # cramjam for the last 3
# What a record holds besides the body: the batch and record framing, the key (an event id),
# the CloudEvents headers and, on the DLQ, the record's own JSON fields and schema problems.
# Generous on purpose: the producer's limit only guards against our own mistakes, the
# topic's max.message.bytes is the one that counts.
RECORD_OVERHEAD_BYTES = 64 * 1024
# Webhooks in flight: tens in normal running (each acknowledged in a few ms), but thousands
# while Kafka is away, because each one is held to its publish deadline: Onoff spaces its five
# tries by our answer time, so holding keeps its retry window about 30 s wide (the fault
# suite: at 250 SMS/s, about 2,000 held at once plus retries). The count bounds sockets and
# tasks; the bytes bound the bodies held at once to a third of the pod's 384 MiB limit.
MAX_IN_FLIGHT = 10_000
IN_FLIGHT_BODY_BUDGET_BYTES = 128 * 1024 * 1024
# About a million SMS records of ~1 KiB (body and headers): 35 minutes of a Kafka outage at
# 500 SMS/s. Size it to the outage to ride out, and the volume to it.
SPOOL_MAX_BYTES = 1024**3


@dataclass(frozen=True, slots=True)
class Route:
    """One webhook the gateway serves: its event kind, and the topics and source it writes."""

    kind: EventKind
    topic: str
    dlq_topic: str
    ce_source: str


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Everything the gateway reads from its environment. See README.md for the table."""

    host: str
    port: int
    api_keys: ApiKeys
    insecure_no_auth: bool
    max_body_bytes: int
    publish_timeout_seconds: float
    retry_after_seconds: int
    drain_seconds: float
    shutdown_timeout_seconds: float
    keepalive_timeout_seconds: float
    body_read_timeout_seconds: float
    max_in_flight: int
    max_in_flight_bytes: int
    topic: str
    dlq_topic: str
    ce_source: str
    linger_ms: int
    compression_type: str
    kafka: KafkaSettings
    log_level: str
    # The call webhook (/v1/onoff/cdr → call-events), when GATEWAY_EVENT_KINDS names it.
    call_route: Route | None = None
    # The spool (docs/operations.md, "Durability"): off when spool_dir is None.
    spool_dir: Path | None = None
    spool_after_seconds: float = 2.0
    spool_max_bytes: int = SPOOL_MAX_BYTES
    spool_drain_seconds: float = 20.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewaySettings:
        """Build and validate; raise SettingsError naming the first bad setting."""
        keys = ApiKeys.parse(env.get("GATEWAY_API_KEYS", ""))
        insecure = s.flag(env, "GATEWAY_INSECURE_DEV_NO_AUTH")
        if not keys.digests and not insecure:
            raise s.SettingsError(
                "GATEWAY_API_KEYS: no API key configured; set label:key pairs, or set "
                "GATEWAY_INSECURE_DEV_NO_AUTH=true to accept unauthenticated requests "
                "(development only)"
            )
        if keys.digests and insecure:
            raise s.SettingsError(
                "GATEWAY_INSECURE_DEV_NO_AUTH: cannot be combined with GATEWAY_API_KEYS"
            )
        topic = s.text(env, "KAFKA_TOPIC", "sms-events")
        call_route = _call_route(env)
        publish_timeout = s.number(
            env, "GATEWAY_PUBLISH_TIMEOUT_SECONDS", 5.0, float, minimum=0.1, maximum=9.0
        )
        max_body_bytes = s.number(
            env, "GATEWAY_MAX_BODY_BYTES", 64 * 1024, int, minimum=1024, maximum=8 * 1024 * 1024
        )
        spool_dir = s.text(env, "GATEWAY_SPOOL_DIR", "").strip()
        return cls(
            host=s.text(env, "GATEWAY_HOST", "0.0.0.0"),  # noqa: S104 # a container listens on all interfaces
            port=s.number(env, "GATEWAY_PORT", 8080, int, minimum=1, maximum=65535),
            api_keys=keys,
            insecure_no_auth=insecure,
            max_body_bytes=max_body_bytes,
            publish_timeout_seconds=publish_timeout,
            retry_after_seconds=s.number(
                env, "GATEWAY_RETRY_AFTER_SECONDS", 5, int, minimum=1, maximum=3600
            ),
            drain_seconds=s.number(
                env, "GATEWAY_DRAIN_SECONDS", 0.0, float, minimum=0, maximum=300
            ),
            shutdown_timeout_seconds=s.number(
                env, "GATEWAY_SHUTDOWN_TIMEOUT_SECONDS", 15.0, float, minimum=1, maximum=600
            ),
            # An idle connection is closed after this long. It must outlast the idle timeout of
            # the proxy in front (ingress-nginx's upstream-keepalive-timeout and AWS ALB's idle
            # timeout are 60 s): a proxy reuses an idle upstream connection it believes open,
            # and one the gateway closes at that moment fails the request with a 502. An idle
            # connection costs a socket and a few KiB. aiohttp has no header timeout: this is
            # also how long a request line and headers may take to complete.
            keepalive_timeout_seconds=s.number(
                env, "GATEWAY_KEEPALIVE_TIMEOUT_SECONDS", 75.0, float, minimum=1, maximum=3600
            ),
            # A body still arriving this long after its headers is answered 408 and its
            # connection closed, so a client trickling bytes holds neither a connection nor a
            # slot for long. Onoff's bodies (a few hundred bytes, 64 KiB at most) come with their
            # headers; below Onoff's 10 s so its own timeout never fires first.
            body_read_timeout_seconds=s.number(
                env, "GATEWAY_BODY_READ_TIMEOUT_SECONDS", 5.0, float, minimum=0.1, maximum=9.0
            ),
            max_in_flight=s.number(
                env, "GATEWAY_MAX_IN_FLIGHT", MAX_IN_FLIGHT, int, minimum=1, maximum=100_000
            ),
            max_in_flight_bytes=s.number(
                env,
                "GATEWAY_MAX_IN_FLIGHT_BYTES",
                IN_FLIGHT_BODY_BUDGET_BYTES,
                int,
                minimum=max_body_bytes,
                maximum=4 * 1024**3,
            ),
            topic=topic,
            dlq_topic=s.text(env, "KAFKA_DLQ_TOPIC", f"{topic}.dlq"),
            ce_source=s.text(env, "GATEWAY_CE_SOURCE", "/onoff-events/gateway/v1/onoff/sms"),
            linger_ms=s.number(env, "KAFKA_LINGER_MS", 2, int, minimum=0, maximum=1000),
            compression_type=s.choice(env, "KAFKA_COMPRESSION_TYPE", "none", COMPRESSION_TYPES),
            kafka=KafkaSettings.from_env(env, client_id="onoff-gateway"),
            log_level=s.log_level(env),
            call_route=call_route,
            spool_dir=Path(spool_dir) if spool_dir else None,
            # Kafka answers in a few ms when it is well; this long without its ack, the record
            # goes to the spool instead, well inside Onoff's 10 s.
            spool_after_seconds=s.number(
                env,
                "GATEWAY_SPOOL_AFTER_SECONDS",
                2.0,
                float,
                minimum=0.01,
                maximum=publish_timeout,
            ),
            spool_max_bytes=s.number(
                env,
                "GATEWAY_SPOOL_MAX_BYTES",
                SPOOL_MAX_BYTES,
                int,
                minimum=max_body_bytes + RECORD_OVERHEAD_BYTES,
                maximum=1024**4,
            ),
            # At a stop, how long the replay may go on emptying the spool into Kafka. Within
            # terminationGracePeriodSeconds (deploy/k8s); what is left stays on the volume.
            spool_drain_seconds=s.number(
                env, "GATEWAY_SPOOL_DRAIN_SECONDS", 20.0, float, minimum=0, maximum=3600
            ),
        )

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every webhook served: the SMS one, then the call one when enabled."""
        sms = Route(SMS, self.topic, self.dlq_topic, self.ce_source)
        return (sms,) if self.call_route is None else (sms, self.call_route)

    @property
    def record_bytes_needed(self) -> dict[str, int]:
        """The largest record the gateway may write to each topic, in bytes.

        An events topic gets the body as it came; a DLQ gets a body that is not a JSON
        object as base64 inside a JSON record: 4 bytes for every 3.
        """
        base64_body = 4 * -(-self.max_body_bytes // 3)
        needed: dict[str, int] = {}
        for route in self.routes:
            needed[route.topic] = self.max_body_bytes + RECORD_OVERHEAD_BYTES
            needed[route.dlq_topic] = base64_body + RECORD_OVERHEAD_BYTES
        return needed

    @property
    def max_request_bytes(self) -> int:
        """The producer's ``max_request_size``: room for the largest record on any topic."""
        return max(self.record_bytes_needed.values())

    def describe(self) -> dict[str, Any]:
        """The settings as logged at start: key labels only, secrets masked."""
        return {
            "host": self.host,
            "port": self.port,
            "api_key_labels": list(self.api_keys.labels),
            "insecure_no_auth": self.insecure_no_auth,
            "max_body_bytes": self.max_body_bytes,
            "max_request_bytes": self.max_request_bytes,
            "publish_timeout_seconds": self.publish_timeout_seconds,
            "retry_after_seconds": self.retry_after_seconds,
            "drain_seconds": self.drain_seconds,
            "shutdown_timeout_seconds": self.shutdown_timeout_seconds,
            "keepalive_timeout_seconds": self.keepalive_timeout_seconds,
            "body_read_timeout_seconds": self.body_read_timeout_seconds,
            "max_in_flight": self.max_in_flight,
            "max_in_flight_bytes": self.max_in_flight_bytes,
            "topic": self.topic,
            "dlq_topic": self.dlq_topic,
            "ce_source": self.ce_source,
            "event_kinds": [r.kind.name for r in self.routes],
            "call_topic": self.call_route.topic if self.call_route else None,
            "call_dlq_topic": self.call_route.dlq_topic if self.call_route else None,
            "linger_ms": self.linger_ms,
            "compression_type": self.compression_type,
            "kafka": self.kafka.describe(),
            "log_level": self.log_level,
            "spool_dir": str(self.spool_dir) if self.spool_dir else None,
            "spool_after_seconds": self.spool_after_seconds,
            "spool_max_bytes": self.spool_max_bytes,
            "spool_drain_seconds": self.spool_drain_seconds,
        }


def _call_route(env: Mapping[str, str]) -> Route | None:
    """The call webhook's route when ``GATEWAY_EVENT_KINDS`` names ``call``.

    Off by default: it needs its topics (``call-events``, ``call-events.dlq``) and the
    gateway's write ACL on them, and a gateway missing a topic it writes is unready, so an
    upgrade that turned it on by itself would stop the SMS webhook too.
    """
    names = [n.strip() for n in s.text(env, "GATEWAY_EVENT_KINDS", SMS.name).split(",")]
    known = {k.name for k in KINDS}
    unknown = sorted(set(names) - known)
    if unknown or SMS.name not in names:
        raise s.SettingsError(
            f"GATEWAY_EVENT_KINDS: a comma-separated list of {sorted(known)} including "
            f"{SMS.name!r}, got {env.get('GATEWAY_EVENT_KINDS')!r}"
        )
    if CALL.name not in names:
        return None
    topic = s.text(env, "KAFKA_CALL_TOPIC", CALL.topic)
    return Route(
        CALL,
        topic,
        s.text(env, "KAFKA_CALL_DLQ_TOPIC", f"{topic}.dlq"),
        s.text(env, "GATEWAY_CALL_CE_SOURCE", f"/onoff-events/gateway{CALL.path}"),
    )
