"""The gateway's Prometheus metrics, built on an injected registry (a clean one per test).

Labels are bounded sets chosen by the code (route template, status, reason, key label);
never an event id, a number, an e-mail or a body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Onoff gives up after 10 s; the buckets are dense below the 20 ms target and reach past 10 s.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
# Why a webhook request was answered before its body was read in full: its body did not
# arrive within GATEWAY_BODY_READ_TIMEOUT_SECONDS (408), or GATEWAY_MAX_IN_FLIGHT requests, or
# GATEWAY_MAX_IN_FLIGHT_BYTES of bodies, were being handled already (503).
REFUSAL_REASONS = ("body_timeout", "in_flight_limit", "in_flight_bytes_limit")


@dataclass(frozen=True, slots=True)
class GatewayMetrics:
    http_requests: Counter
    http_request_duration: Histogram
    http_requests_in_flight: Gauge
    webhook_requests_in_flight: Gauge
    refused_requests: Counter
    auth_failures: Counter
    accepted_events: Counter
    quarantined_events: Counter
    publish_duration: Histogram
    publish_failures: Counter
    producer_connected: Gauge
    producer_restarts: Counter
    producer_replacement_seconds: Histogram
    spool_records: Gauge
    spool_bytes: Gauge
    spool_max_bytes: Gauge
    spool_oldest_age: Gauge
    spooled_records: Counter
    replayed_records: Counter
    spool_failures: Counter
    spool_commit_duration: Histogram
    spool_commit_records: Histogram
    # Labelled children by label values: .labels() takes a lock and builds a key on every
    # call, which shows on the request path's profile.
    _children: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = ("request", route, method, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                self.http_requests.labels(route, method, str(status)),
                self.http_request_duration.labels(route),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def count_refused(self, reason: str) -> None:
        key = ("refused", reason)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.refused_requests.labels(reason)
        child.inc()

    def observe_publish(self, topic: str, seconds: float) -> None:
        key = ("publish", topic)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.publish_duration.labels(topic)
        child.observe(seconds)

    def count_accepted(self, kind: str, key_label: str, durability: str) -> None:
        key = ("accepted", kind, key_label, durability)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.accepted_events.labels(kind, key_label, durability)
        child.inc()

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        p = "onoff_gateway_"
        metrics = cls(
            http_requests=Counter(
                p + "http_requests",
                "HTTP requests answered, by route template, method and status.",
                ["route", "method", "status"],
                registry=registry,
            ),
            http_request_duration=Histogram(
                p + "http_request_duration_seconds",
                "Time to answer an HTTP request.",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            http_requests_in_flight=Gauge(
                p + "http_requests_in_flight",
                "HTTP requests being handled now.",
                registry=registry,
            ),
            webhook_requests_in_flight=Gauge(
                p + "webhook_requests_in_flight",
                "SMS webhook requests being handled now: what GATEWAY_MAX_IN_FLIGHT caps.",
                registry=registry,
            ),
            refused_requests=Counter(
                p + "refused_requests",
                "SMS webhook requests answered without reading their body in full, by reason: "
                "body_timeout (408), in_flight_limit and in_flight_bytes_limit (503).",
                ["reason"],
                registry=registry,
            ),
            auth_failures=Counter(
                p + "auth_failures",
                "Webhook requests refused with 401, by reason.",
                ["reason"],
                registry=registry,
            ),
            accepted_events=Counter(
                p + "accepted_events",
                "Events answered 200 on their kind's topic, by kind (sms, call), API key label "
                "and where they were durable then: kafka (acks=all) or spool (fsynced to the "
                "local spool).",
                ["kind", "key_label", "durability"],
                registry=registry,
            ),
            quarantined_events=Counter(
                p + "quarantined_events",
                "Webhook bodies recorded to their kind's DLQ topic instead of its events topic, "
                "by kind (sms, call) and reason.",
                ["kind", "reason"],
                registry=registry,
            ),
            publish_duration=Histogram(
                p + "publish_duration_seconds",
                "Time from handing a record to the producer to the broker's acks=all answer.",
                ["topic"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            publish_failures=Counter(
                p + "publish_failures",
                "Records Kafka did not acknowledge in time, by topic and reason: answered 503 "
                "(message_too_large: 413), or spooled when the spool is on; replay tries too.",
                ["topic", "reason"],
                registry=registry,
            ),
            producer_connected=Gauge(
                p + "producer_connected",
                "1 when the Kafka producer is started and the last metadata probe succeeded.",
                registry=registry,
            ),
            producer_restarts=Counter(
                p + "producer_restarts",
                "Kafka producers replaced without restarting the process, by reason.",
                ["reason"],
                registry=registry,
            ),
            producer_replacement_seconds=Histogram(
                p + "producer_replacement_seconds",
                "Time from deciding to replace the producer to the new one serving.",
                buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
                registry=registry,
            ),
            spool_records=Gauge(
                p + "spool_records",
                "Records in the spool, waiting for Kafka (0 when the spool is off).",
                registry=registry,
            ),
            spool_bytes=Gauge(
                p + "spool_bytes",
                "Bytes of the records in the spool (keys, values, headers).",
                registry=registry,
            ),
            spool_max_bytes=Gauge(
                p + "spool_max_bytes",
                "GATEWAY_SPOOL_MAX_BYTES: past it, a webhook Kafka cannot take gets 503.",
                registry=registry,
            ),
            spool_oldest_age=Gauge(
                p + "spool_oldest_record_age_seconds",
                "Age of the oldest record in the spool (0 when it is empty).",
                registry=registry,
            ),
            spooled_records=Counter(
                p + "spooled_records",
                "Records written to the spool (fsynced), by topic.",
                ["topic"],
                registry=registry,
            ),
            replayed_records=Counter(
                p + "replayed_records",
                "Spooled records acknowledged by Kafka and removed from the spool, by topic.",
                ["topic"],
                registry=registry,
            ),
            spool_failures=Counter(
                p + "spool_failures",
                "Records the spool could not take (answered 503), by reason: full, disk_full, "
                "io_error, read_only, corrupt, disk_error, closed.",
                ["reason"],
                registry=registry,
            ),
            spool_commit_duration=Histogram(
                p + "spool_commit_duration_seconds",
                "Time of one spool group commit, its fsync included.",
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                registry=registry,
            ),
            spool_commit_records=Histogram(
                p + "spool_commit_records",
                "Records per spool group commit (one fsync each).",
                buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
                registry=registry,
            ),
        )
        for reason in REFUSAL_REASONS:  # exported at 0 from the start, so rate() sees the first
            metrics.refused_requests.labels(reason)
        return metrics
