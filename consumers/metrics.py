"""The consumer services' Prometheus metrics, on an injected registry; every series carries
the sink's name, so one dashboard serves all sinks. No ids, numbers or bodies in labels."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0)  # fmt: skip


class BatchHistogram(Collector):
    """A histogram with a ``sink`` label, fed a whole batch of values in one call.

    prometheus-client's Histogram takes one value per call, each under a lock: one call per
    event was 5% of the warehouse consumer's CPU at 40k events/s. Scraped exactly like a
    Histogram of the same name (``_bucket``, ``_count``, ``_sum``)."""

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [*sorted(buckets), float("inf")]
        self._lock = threading.Lock()  # a scrape may run in another thread
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        registry.register(self)

    def observe_many(self, sink: str, values: Iterable[float]) -> None:
        bounds = self._bounds
        counts = [0] * len(bounds)
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # the first bucket with le >= value
            total += value
        with self._lock:
            series = self._counts.setdefault(sink, [0] * len(bounds))
            for i, count in enumerate(counts):
                series[i] += count
            self._sums[sink] = self._sums.get(sink, 0.0) + total

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=["sink"])

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["sink"])
        with self._lock:
            for sink, counts in self._counts.items():
                cumulative = zip(self._bounds, accumulate(counts), strict=True)
                family.add_metric(
                    [sink],
                    [(_le(bound), count) for bound, count in cumulative],
                    sum_value=self._sums[sink],
                )
        yield family


def _le(bound: float) -> str:
    """A bucket's ``le`` label as prometheus-client writes it ("0.005", "300.0", "+Inf")."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass(frozen=True, slots=True)
class ConsumerMetrics:
    consumed: Counter
    delivered: Counter
    duplicates: Counter
    retries: Counter
    dlq: Counter
    batch_size: Histogram
    delivery_duration: Histogram
    end_to_end_latency: BatchHistogram
    lag: Gauge
    restarts: Counter
    abandoned_batches: Counter
    dedupe_errors: Counter
    ready: Gauge
    commits: Counter
    unexpected_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ConsumerMetrics:
        p = "onoff_consumer_"
        return cls(
            consumed=Counter(
                p + "events_consumed",
                "Records read from the events topic.",
                ["sink"],
                registry=registry,
            ),
            delivered=Counter(
                p + "events_delivered",
                "Events the sink acknowledged (first delivery of an id).",
                ["sink"],
                registry=registry,
            ),
            duplicates=Counter(
                p + "duplicates_dropped",
                "Records dropped because their id was already delivered "
                "(by the dedupe store, or earlier in the same batch).",
                ["sink"],
                registry=registry,
            ),
            retries=Counter(
                p + "retries",
                "Retries after a transient failure, by stage "
                "(sink_start, dedupe, deliver, dlq, commit).",
                ["sink", "stage"],
                registry=registry,
            ),
            dlq=Counter(
                p + "dlq_events",
                "Records sent to the sink's DLQ topic, by reason.",
                ["sink", "reason"],
                registry=registry,
            ),
            batch_size=Histogram(
                p + "batch_size_records",
                "Records per batch read from Kafka.",
                ["sink"],
                buckets=BATCH_BUCKETS,
                registry=registry,
            ),
            delivery_duration=Histogram(
                p + "delivery_duration_seconds",
                "Time to deliver one batch to the sink, retries included.",
                ["sink"],
                buckets=SECONDS_BUCKETS,
                registry=registry,
            ),
            end_to_end_latency=BatchHistogram(
                p + "end_to_end_latency_seconds",
                "From the gateway's receive time to the sink's ack.",
                buckets=SECONDS_BUCKETS,
                registry=registry,
            ),
            lag=Gauge(
                p + "lag_records",
                "Records on the partition after the last committed offset.",
                ["sink", "partition"],
                registry=registry,
            ),
            restarts=Counter(
                p + "kafka_consumer_restarts",
                "Kafka consumers recreated in-process, by reason.",
                ["sink", "reason"],
                registry=registry,
            ),
            abandoned_batches=Counter(
                p + "abandoned_batches",
                "Batches given up without a commit (shutdown, rebalance); "
                "their records are read again.",
                ["sink", "reason"],
                registry=registry,
            ),
            dedupe_errors=Counter(
                p + "dedupe_errors",
                "Failed calls to the dedupe store.",
                ["sink"],
                registry=registry,
            ),
            ready=Gauge(
                p + "ready",
                "1 when the service consumes and its sink answers.",
                ["sink"],
                registry=registry,
            ),
            commits=Counter(
                p + "commits", "Offset commits, by outcome.", ["sink", "outcome"], registry=registry
            ),
            unexpected_errors=Counter(
                p + "unexpected_errors",
                "Exceptions of no known kind, by stage and exception class. In delivery the "
                "event that raises is isolated and dead-lettered (reason unexpected:<class>); "
                "elsewhere the step is retried like a transient failure.",
                ["sink", "stage", "error_type"],
                registry=registry,
            ),
        )
