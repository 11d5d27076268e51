"""Making records durable in Kafka: one idempotent ``acks=all`` producer, supervised.

The supervisor connects in the background (so the gateway serves ``/healthz`` while Kafka is
down), probes the cluster so ``/readyz`` tells whether a publish can succeed, and replaces the
producer without restarting the process when it reaches a state it cannot leave by itself:
the new producer connects first and takes over, the old one is retired in the background, so
a replacement costs the time of one connection, not a close plus a connection.
aiokafka's idempotent producer never gives up a batch, and after a broker outage it can stay
stuck on ``OutOfOrderSequenceNumber`` for every later record (aiokafka issue 1017): the only
cure is a new producer with a new producer id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from gateway.metrics import GatewayMetrics
from onoff_events.cloudevents import Headers
from onoff_events.kafka import (
    PRODUCER_FATAL,
    KafkaSettings,
    stop_producer,
    topic_max_message_bytes,
)
from onoff_events.logs import log_event

log = logging.getLogger("gateway.publisher")


class PublishFailed(Exception):
    """A record was not made durable in time; ``reason`` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    linger_ms: int = 2
    compression_type: str | None = None
    # Large enough that a burst of webhooks shares one produce request per partition. The
    # broker holds a whole batch to the topic's max.message.bytes: capped to the smallest
    # topic limit once the start-up check has read it.
    max_batch_size: int = 256 * 1024
    # aiokafka's default is 1 MiB; build_app derives it from GATEWAY_MAX_BODY_BYTES.
    max_request_size: int = 1024 * 1024
    request_timeout_ms: int = 30_000
    connect_timeout_seconds: float = 10.0
    probe_interval_seconds: float = 2.0
    probe_timeout_seconds: float = 5.0
    close_timeout_seconds: float = 10.0
    # This many publish timeouts in a row while metadata probes succeed: the producer is stuck.
    stalled_after_timeouts: int = 5


class Publisher:
    """Publishes records and owns the producer's whole lifecycle."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Sequence[str],
        metrics: GatewayMetrics,
        options: ProducerOptions = ProducerOptions(),  # frozen, shared safely
        record_bytes_needed: Mapping[str, int] | None = None,
    ) -> None:
        self._kafka = kafka
        self._topics = tuple(topics)
        self._metrics = metrics
        self._options = options
        # topic → the largest record we may write there; checked once against the cluster.
        self._record_bytes_needed = dict(record_bytes_needed or {})
        self._limits_checked = False
        # topic → its max.message.bytes, as read at start (empty when the cluster won't say).
        self._topic_limits: dict[str, int] = {}
        self._max_batch_size = options.max_batch_size
        self._producer: AIOKafkaProducer | None = None
        # Why the current producer must be replaced, and since when; it serves until then.
        self._replacing: str | None = None
        self._replacing_since = 0.0
        # Set when a connected producer is in place; a fresh one while a replacement is asked.
        self._connected = asyncio.Event()
        self._closed = False  # close() ran: no producer will come any more
        self._retiring: set[asyncio.Task[None]] = set()
        self._ready = False
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._timeouts_in_a_row = 0
        self._reported_missing: tuple[str, ...] = ()
        self._failure_log: dict[str, tuple[float, int]] = {}  # reason → (last logged, suppressed)

    @property
    def ready(self) -> bool:
        """A producer is running and the last probe reached the cluster and saw our topics."""
        return self._ready and self._producer is not None and self.alive

    @property
    def alive(self) -> bool:
        """The supervisor runs (or has not started yet). False: nothing will reconnect or
        replace the producer any more, and only a restart of the process helps."""
        return self._supervisor is None or not self._supervisor.done()

    async def start(self) -> None:
        """Start supervising; returns at once, the first connection is made in the background."""
        self._supervisor = asyncio.create_task(self._supervise(), name="producer-supervisor")

    async def publish(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, within: float
    ) -> None:
        """Return once the broker acked the record (acks=all); else raise PublishFailed.

        ``reason`` ``message_too_large`` means Kafka will never take this record: the caller
        answers 413, not 503.
        """
        producer = self._producer
        started = time.perf_counter()
        waited = False
        if producer is None or self._replacing is not None:
            # No producer yet, or the one in place is broken: wait for one that connects,
            # within this webhook's deadline. Never a quick 503 while Kafka is away: Onoff
            # spaces its five tries by our answer time, so answering at the deadline keeps
            # its retry window about 30 s wide; answering at once shrank it to about 4 s
            # (the fault suite measured 4,012 of 11,250 SMS given up in a 15 s outage).
            # GATEWAY_MAX_IN_FLIGHT bounds how many wait.
            producer = await self._next_producer(topic, within)
            waited = True
            within -= time.perf_counter() - started
            if within <= 0:
                # Woken with the producer, but after the deadline (thousands wake at once):
                # a record sent now would be answered 503 while it may still be written.
                self._fail(topic, "producer_unavailable")
        sent = False
        try:
            async with asyncio.timeout(within):
                delivery = await producer.send(topic, value, key=key, headers=headers)
                sent = True
                await delivery
        except TimeoutError:
            # Late timeouts of a producer already replaced say nothing about the new one, nor
            # do those of a publish that spent most of its deadline waiting for it.
            if producer is self._producer and not waited:
                self._timeouts_in_a_row += 1
                if self._timeouts_in_a_row >= self._options.stalled_after_timeouts and self._ready:
                    self._replace(producer, "stalled")
            self._fail(topic, "timeout")
        except PRODUCER_FATAL as exc:
            self._replace(producer, type(exc).__name__)
            self._fail(topic, "producer_fatal")
        except MessageSizeTooLargeError:
            if not sent:
                # The producer's own check: the record alone is over max_request_size.
                self._fail(topic, "message_too_large")
            # The broker refused the batch (the topic's max.message.bytes). aiokafka had
            # given it sequence numbers the broker never stored, so every later record to
            # that partition would fail with OutOfOrderSequenceNumber: replace the producer
            # now (the swap leaves no gap) instead of failing innocent events.
            self._replace(producer, "message_too_large")
            if self.over_topic_limit(topic, key, value, headers):
                self._fail(topic, "message_too_large")
            # The batch held other records too: alone, in a fresh batch, this one may pass.
            self._fail(topic, "batch_too_large")
        except KafkaError as exc:
            log_event(log, "publish_error", logging.WARNING, error_type=type(exc).__name__)
            self._fail(topic, "kafka_error")
        if producer is self._producer:
            self._timeouts_in_a_row = 0
        self._metrics.publish_duration.labels(topic).observe(time.perf_counter() - started)

    def over_topic_limit(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> bool:
        """The record alone, in a batch of its own, is over the topic's max.message.bytes as
        read at start. False when the limit is unknown: a 503 may be retried for nothing,
        but a 413 would lose an event that only shared its batch."""
        limit = self._topic_limits.get(topic)
        if limit is None:
            return False
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        return bool(size > limit)

    async def close(self) -> None:
        """Stop supervising, flush what is pending (bounded), close every producer."""
        self._closed = True
        self._connected.set()  # publishes still waiting for a producer fail now
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._set_ready(ready=False)
        producer, self._producer = self._producer, None
        if producer is not None:
            self._retire(producer)
        retiring = list(self._retiring)
        try:
            # Each one is bounded by the close timeout (then abandoned); one that fails (its
            # done callback logs it) must not leave the others un-awaited.
            await asyncio.gather(*retiring, return_exceptions=True)
        except asyncio.CancelledError:
            for task in retiring:
                task.cancel()
            await asyncio.gather(*retiring, return_exceptions=True)
            raise

    async def _next_producer(self, topic: str, within: float) -> AIOKafkaProducer:
        """The first producer, or the one that replaces a broken one, once connected (usually
        well under a second when Kafka is up); ``producer_unavailable`` at the deadline."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            if self._closed:
                self._fail(topic, "producer_unavailable")
            producer = self._producer
            if producer is not None and self._replacing is None:
                return producer
            connected = self._connected
            try:
                async with asyncio.timeout_at(deadline):
                    await connected.wait()
            except TimeoutError:
                self._fail(topic, "producer_unavailable")

    def _fail(self, topic: str, reason: str) -> NoReturn:
        self._metrics.publish_failures.labels(topic, reason).inc()
        # One line per reason and second at most: an outage at 1,000 requests/s must not turn
        # into 1,000 log lines/s; the metric has the exact count.
        now = time.monotonic()
        last, suppressed = self._failure_log.get(reason, (0.0, 0))
        if now - last >= 1.0:
            log_event(
                log,
                "publish_failed",
                logging.WARNING,
                topic=topic,
                reason=reason,
                similar_failures_not_logged=suppressed,
            )
            self._failure_log[reason] = (now, 0)
        else:
            self._failure_log[reason] = (last, suppressed + 1)
        raise PublishFailed(reason)

    def _replace(self, producer: AIOKafkaProducer, reason: str) -> None:
        """Ask the supervisor for a new producer. The current one stays until the new one is
        connected, so records it holds may still be acked; new publishes wait for the new one
        (within their own deadline) instead of failing on the broken one."""
        if producer is not self._producer or self._replacing is not None:
            return  # already replaced, or being replaced, after a concurrent failure
        log_event(log, "producer_replaced", logging.WARNING, reason=reason)
        self._metrics.producer_restarts.labels(reason).inc()
        self._replacing = reason
        self._replacing_since = time.monotonic()
        self._connected = asyncio.Event()  # publishes from now on wait for the replacement
        self._timeouts_in_a_row = 0
        self._wake.set()

    def _swap(self, fresh: AIOKafkaProducer) -> None:
        old, self._producer = self._producer, fresh
        self._timeouts_in_a_row = 0
        if old is not None:
            seconds = time.monotonic() - self._replacing_since
            self._metrics.producer_replacement_seconds.observe(seconds)
            log_event(
                log,
                "producer_swapped",
                reason=self._replacing,
                seconds_since_replacement_asked=round(seconds, 3),
            )
            self._retire(old)
        self._replacing = None
        self._connected.set()

    def _retire(self, producer: AIOKafkaProducer) -> None:
        """Stop ``producer`` in the background: its pending records may still be acked (and
        answered 200) while the new producer already serves."""
        task = asyncio.create_task(
            stop_producer(producer, self._options.close_timeout_seconds), name="producer-retire"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log_event(log, "producer_retire_failed", logging.WARNING, error_type=type(exc).__name__)

    def _set_ready(self, *, ready: bool) -> None:
        if ready != self._ready:
            log_event(
                log,
                "producer_ready" if ready else "producer_not_ready",
                logging.INFO if ready else logging.WARNING,
            )
        self._ready = ready
        self._metrics.producer_connected.set(1 if ready else 0)

    async def _supervise(self) -> None:
        try:
            await self._keep_a_producer()
        except Exception as exc:  # noqa: BLE001 # reported, and /healthz fails: the pod restarts
            # Nothing reconnects or replaces the producer any more: say so and go unready;
            # ``alive`` turns False, so /healthz answers 503 and Kubernetes restarts the pod.
            self._set_ready(ready=False)
            log_event(
                log, "producer_supervisor_died", logging.CRITICAL, error_type=type(exc).__name__
            )

    async def _keep_a_producer(self) -> None:
        backoff = 0.5
        while True:
            if self._producer is None or self._replacing is not None:
                try:
                    fresh = await self._connect()
                except (KafkaError, OSError, TimeoutError) as exc:
                    log_event(
                        log,
                        "producer_connect_failed",
                        logging.WARNING,
                        error_type=type(exc).__name__,
                        retry_in_seconds=backoff,
                    )
                    if self._replacing is not None:
                        # The producer in place is broken and no new one connects (no probe
                        # runs meanwhile): unready. Publishes keep waiting, to their deadline.
                        self._set_ready(ready=False)
                    await self._sleep(backoff)
                    # At most 2 s between tries: webhooks wait for a producer, so one must be
                    # found within a second or two of Kafka's return (connects are cheap).
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.5
                self._swap(fresh)
            assert self._producer is not None  # noqa: S101 # set just above when it was None
            await self._probe(self._producer)
            if self._ready and not self._limits_checked:
                await self._check_record_limits()
            await self._sleep(self._options.probe_interval_seconds)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when a producer must be replaced."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _connect(self) -> AIOKafkaProducer:
        o = self._options
        producer = AIOKafkaProducer(
            **self._kafka.client_options(),
            acks="all",
            enable_idempotence=True,
            linger_ms=o.linger_ms,
            compression_type=o.compression_type,
            max_batch_size=self._max_batch_size,
            max_request_size=o.max_request_size,
            request_timeout_ms=o.request_timeout_ms,
        )
        try:
            async with asyncio.timeout(o.connect_timeout_seconds):
                await producer.start()
        except BaseException:
            await stop_producer(producer, o.close_timeout_seconds)
            raise
        for topic in self._topics:
            producer.client.add_topic(topic)
        log_event(
            log,
            "producer_started",
            bootstrap_servers=self._kafka.bootstrap_servers,
            max_batch_bytes=self._max_batch_size,
        )
        return producer

    async def _check_record_limits(self) -> None:
        """Once, at start: log the producer's request and batch limits and compare what each
        topic must take with its ``max.message.bytes``, when the cluster tells us; cap the
        producer's batches to the smallest limit. Only logs: it never stops the supervisor."""
        self._limits_checked = True
        needed = self._record_bytes_needed
        batch = self._options.max_batch_size
        try:
            async with asyncio.timeout(self._options.probe_timeout_seconds):
                limits = await topic_max_message_bytes(self._kafka, list(needed))
        except Exception as exc:  # noqa: BLE001 # a diagnostic: logged, the gateway serves on
            limits = {}
            log_event(log, "topic_limits_unreadable", logging.INFO, error_type=type(exc).__name__)
        self._topic_limits = limits
        log_event(
            log,
            "record_size_limits",
            max_request_bytes=self._options.max_request_size,
            max_batch_bytes=batch,
            record_bytes_needed=needed,
            topic_max_message_bytes=limits,
        )
        for topic, need in needed.items():
            limit = limits.get(topic)
            required = max(need, batch)
            if limit is None:
                log_event(
                    log,
                    "topic_max_message_bytes_unknown",
                    topic=topic,
                    record_bytes_needed=need,
                    max_message_bytes_required=required,
                    detail="the cluster did not say (no DescribeConfigs permission?); a record "
                    "the broker refuses for its size is answered 503, as it may only have "
                    "shared a batch too large",
                )
            elif limit < need:
                log_event(
                    log,
                    "topic_max_message_bytes_too_low",
                    logging.ERROR,
                    topic=topic,
                    max_message_bytes=limit,
                    record_bytes_needed=need,
                    max_message_bytes_required=required,
                    detail="bodies near GATEWAY_MAX_BODY_BYTES will be answered 413: raise the "
                    "topic's max.message.bytes (KafkaTopic config) or lower "
                    "GATEWAY_MAX_BODY_BYTES",
                )
            elif limit < batch:
                log_event(
                    log,
                    "topic_max_message_bytes_too_low",
                    logging.WARNING,
                    topic=topic,
                    max_message_bytes=limit,
                    record_bytes_needed=need,
                    max_message_bytes_required=required,
                    detail="below the producer's batch size: its batches are capped to the "
                    "topic's limit (more produce requests under load); raise the topic's "
                    "max.message.bytes (KafkaTopic config)",
                )
        smallest = min(limits.values(), default=batch)
        if smallest < self._max_batch_size and self._producer is not None:
            # A batch over a topic's limit is refused whole, its small records with it.
            self._max_batch_size = smallest
            self._replace(self._producer, "max_batch_size_capped")

    async def _probe(self, producer: AIOKafkaProducer) -> None:
        sender = producer._sender.sender_task  # noqa: SLF001 # aiokafka exposes no health API
        if sender is not None and sender.done():
            self._replace(producer, "sender_stopped")
            return
        try:
            async with asyncio.timeout(self._options.probe_timeout_seconds):
                reached = bool(await producer.client.force_metadata_update())
        except TimeoutError:
            reached = False
        cluster = producer.client.cluster
        missing = tuple(t for t in self._topics if not cluster.partitions_for_topic(t))
        if reached and missing != self._reported_missing:
            self._reported_missing = missing
            if missing:
                log_event(
                    log,
                    "topics_missing",
                    logging.ERROR,
                    topics=list(missing),
                    # TOPIC_AUTHORIZATION_FAILED in the metadata: an ACL, not a missing topic.
                    not_authorized=sorted(set(missing) & cluster.unauthorized_topics),
                )
        self._set_ready(ready=reached and not missing)
