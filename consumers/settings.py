"""A consumer service's settings: one object, read from the environment once at start.

The sink reads its own settings (``WAREHOUSE_URL``…) from the same mapping, in its module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consumers.backoff import Backoff
from onoff_events import settings as s
from onoff_events.event_kinds import CALL, KINDS, SMS, EventKind
from onoff_events.kafka import KafkaSettings


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    sink: str
    kind: EventKind
    group_id: str
    topic: str
    dlq_topic: str
    max_batch: int
    poll_timeout_ms: int
    max_poll_interval_ms: int
    rebalance_timeout_ms: int
    host: str
    port: int
    dedupe_url: str = field(repr=False)  # may hold a password
    dedupe_ttl_seconds: int
    backoff: Backoff
    stall_seconds: float
    watchdog_interval_seconds: float
    shutdown_timeout_seconds: float
    kafka: KafkaSettings
    log_level: str
    env: Mapping[str, str] = field(repr=False, default_factory=dict)

    @classmethod
    def from_env(cls, sink: str, env: Mapping[str, str]) -> ConsumerSettings:
        # One service per sink and event kind: its own topic, group, DLQ and dedupe namespace
        # (an SMS and a call may share an id).
        name = s.choice(env, "CONSUMER_EVENT_KIND", SMS.name, frozenset(k.name for k in KINDS))
        kind = CALL if name == CALL.name else SMS
        if kind is CALL:
            topic = s.text(env, "KAFKA_CALL_TOPIC", CALL.topic)
            group = f"onoff-{sink}-calls"
        else:
            topic = s.text(env, "KAFKA_TOPIC", SMS.topic)
            group = f"onoff-{sink}"
        return cls(
            sink=sink,
            kind=kind,
            group_id=s.text(env, "CONSUMER_GROUP", group),
            topic=topic,
            dlq_topic=s.text(env, "CONSUMER_DLQ_TOPIC", f"{topic}.{sink}.dlq"),
            max_batch=s.number(env, "CONSUMER_MAX_BATCH", 500, int, minimum=1, maximum=10_000),
            poll_timeout_ms=s.number(
                env, "CONSUMER_POLL_TIMEOUT_MS", 1000, int, minimum=10, maximum=60_000
            ),
            # A sink outage of minutes must not churn the group: generous poll interval.
            max_poll_interval_ms=s.number(
                env,
                "CONSUMER_MAX_POLL_INTERVAL_MS",
                900_000,
                int,
                minimum=10_000,
                maximum=3_600_000,
            ),
            # How long the group waits for every member to hand its partitions over; a batch in
            # hand finishes within it or is abandoned (read again by the next owner).
            rebalance_timeout_ms=s.number(
                env,
                "CONSUMER_REBALANCE_TIMEOUT_MS",
                90_000,
                int,
                minimum=5_000,
                maximum=600_000,
            ),
            host=s.text(env, "CONSUMER_HOST", "0.0.0.0"),  # noqa: S104 # containers listen on all
            port=s.number(env, "CONSUMER_PORT", 8081, int, minimum=1, maximum=65535),
            dedupe_url=s.text(env, "DEDUPE_URL", _default_dedupe_url(sink)),
            dedupe_ttl_seconds=s.number(
                env, "DEDUPE_TTL_SECONDS", 7 * 24 * 3600, int, minimum=60, maximum=366 * 24 * 3600
            ),
            backoff=Backoff(
                initial_seconds=s.number(
                    env, "RETRY_INITIAL_SECONDS", 0.5, float, minimum=0.01, maximum=60
                ),
                max_seconds=s.number(
                    env, "RETRY_MAX_SECONDS", 30.0, float, minimum=0.1, maximum=3600
                ),
            ),
            stall_seconds=s.number(
                env, "CONSUMER_STALL_SECONDS", 120.0, float, minimum=1, maximum=3600
            ),
            watchdog_interval_seconds=s.number(
                env, "CONSUMER_WATCHDOG_INTERVAL_SECONDS", 5.0, float, minimum=0.1, maximum=300
            ),
            shutdown_timeout_seconds=s.number(
                env, "CONSUMER_SHUTDOWN_TIMEOUT_SECONDS", 20.0, float, minimum=1, maximum=600
            ),
            kafka=KafkaSettings.from_env(env, client_id=f"onoff-consumer-{sink}"),
            log_level=s.log_level(env),
            env=dict(env),
        )

    @property
    def service(self) -> str:
        """The service's name in metrics and logs (the ``sink`` label): the sink for SMS,
        ``<sink>-calls`` for calls, so every panel and alert tells the two apart."""
        return self.sink if self.kind is SMS else f"{self.sink}-calls"

    def describe(self) -> dict[str, Any]:
        """As logged at start: the dedupe URL without its password or query-string secrets."""
        return {
            "sink": self.sink,
            "kind": self.kind.name,
            "group_id": self.group_id,
            "topic": self.topic,
            "dlq_topic": self.dlq_topic,
            "max_batch": self.max_batch,
            "port": self.port,
            "dedupe_url": s.mask_url(self.dedupe_url),
            "dedupe_ttl_seconds": self.dedupe_ttl_seconds,
            "retry_initial_seconds": self.backoff.initial_seconds,
            "retry_max_seconds": self.backoff.max_seconds,
            "stall_seconds": self.stall_seconds,
            "rebalance_timeout_ms": self.rebalance_timeout_ms,
            "shutdown_timeout_seconds": self.shutdown_timeout_seconds,
            "kafka": self.kafka.describe(),
            "log_level": self.log_level,
        }


def _default_dedupe_url(sink: str) -> str:
    # The warehouse's primary key already says which ids it holds: no second store needed.
    return "sink" if sink == "warehouse" else f"sqlite:///.data/dedupe-{sink}.sqlite3"
