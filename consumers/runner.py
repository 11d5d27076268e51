"""The batch loop every sink shares: read → dedupe → deliver → DLQ → confirm → commit.

Offsets are committed only after the sink acknowledged the whole batch, so a crash at any
point re-reads what was not committed; the dedupe store and the sink's own idempotency make
that re-read deliver nothing twice. What an exception means (transient, configuration,
permanent for one event, unexpected) is decided in ``consumers.policy``; this module carries
it out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from aiokafka.structs import TopicPartition

from consumers.dedupe import ClaimHeld, DedupeStore, DedupeUnavailable
from consumers.metrics import ConsumerMetrics
from consumers.policy import (
    TRANSIENT,
    UNEXPECTED_PREFIX,
    Fate,
    fate_of,
    unexpected_reason,
    where_raised,
)
from consumers.records import (
    EventRecord,
    PoisonRecord,
    RecordDecoder,
    first_of_each_id,
    next_offsets,
)
from consumers.settings import ConsumerSettings
from consumers.sinks import Delivery, Sink, TransientSinkError
from onoff_events.cloudevents import rfc3339_now
from onoff_events.kafka import PRODUCER_FATAL, stop_producer
from onoff_events.logs import log_event

log = logging.getLogger("consumers.runner")
T = TypeVar("T")
DLQ_SEND_TIMEOUT_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class _Fetched:
    """One ``getmany`` and its records decoded, with the rebalance epoch it was read in."""

    records: list[Any]
    decoded: list[EventRecord | PoisonRecord]
    offsets: dict[tuple[str, int], int]  # to commit: one past the last record per partition
    epoch: int


@dataclass(frozen=True, slots=True)
class _Handling:
    """One batch being delivered and committed, in its own task."""

    task: asyncio.Task[None]
    fetched: _Fetched


class BatchAbandoned(Exception):
    """The batch is given up without a commit (shutdown or partitions revoked)."""


class Runner:
    """One sink's consumer service: owns the Kafka consumer, the DLQ producer and the sink."""

    def __init__(
        self,
        settings: ConsumerSettings,
        sink: Sink,
        dedupe: DedupeStore,
        metrics: ConsumerMetrics,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._dedupe = dedupe
        self._m = metrics
        self._name = settings.service  # the metrics' sink label, and logs
        self._decoder = RecordDecoder(settings.kind)
        # A sink whose result does not depend on batch order (every row keyed, nothing read
        # back: the warehouse) takes the next batch while the previous one finishes. The CRM
        # and alerts do depend on it (a contact created by one batch is found by the next).
        self._overlap = bool(getattr(sink, "overlapping_batches", False))
        # A sink bound by a vendor's pace (the CRM) says how many events fit the time a batch
        # may take: no batch may outlive the group's rebalance timeout.
        self._max_batch = min(settings.max_batch, getattr(sink, "max_batch_events", 10**9))
        self._stop = asyncio.Event()
        self._exhausted = False  # a fixed range read to its end (a replay); never the service
        self._abandon = asyncio.Event()
        self._restart = asyncio.Event()
        self._in_hand: set[asyncio.Task[None]] = set()  # batches handled, not yet finished
        self._epoch = 0  # bumped at each rebalance: tells a read-ahead batch it is stale
        self._consumer: AIOKafkaConsumer | None = None
        self._dlq: AIOKafkaProducer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._last_fetch = time.monotonic()
        # The loop's heartbeat: a fetch that returned (records or not), a step attempted, a
        # rebalance callback. The watchdog judges this, not fetch times: a long healthy batch
        # beats, a consumer stuck in a rebalance (aiokafka issue 1154) does not.
        self._heartbeat = time.monotonic()
        self._watchdog_task: asyncio.Task[None] | None = None
        self._lag_since: float | None = None
        self._retrying = 0  # steps backing off now (two batches may be in hand)
        self._healthy = False
        self._retry_log: dict[str, float] = {}

    @property
    def alive(self) -> bool:
        """False when the loop itself stopped: no heartbeat for twice the stall time (the
        watchdog's own remedy, a new Kafka consumer, did not help) or the watchdog died.
        /healthz reports it, so Kubernetes restarts the pod."""
        watchdog = self._watchdog_task
        if watchdog is not None and watchdog.done() and not watchdog.cancelled():
            return False
        silent = time.monotonic() - self._heartbeat
        return silent < 2 * self._settings.stall_seconds or self._abandon.is_set()

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()

    @property
    def ready(self) -> bool:
        return self._healthy and self._consumer is not None and not self._restart.is_set()

    def stop(self) -> None:
        """Ask the loop to end: the batch in progress finishes its current step, then the
        service leaves the group; a batch still waiting to retry is abandoned uncommitted."""
        self._stop.set()

    async def run(self) -> None:
        """Run until stop(); every resource opened here is closed here."""
        try:
            await self._until_done(self._sink.start, "sink_start")
            self._dlq = await self._until_done(self._start_dlq_producer, "dlq")
            while not self._stop.is_set():
                self._consumer = await self._until_done(self._start_consumer, "consumer_start")
                # One watchdog per consumer, stopped before its consumer: a check still running
                # on a stopped consumer would make aiokafka open a connection nobody closes.
                watchdog = self._watchdog_task = asyncio.create_task(
                    self._watchdog(self._consumer), name=f"{self._name}-watchdog"
                )
                try:
                    await self._consume(self._consumer)
                finally:
                    await self._settle(watchdog)
                    consumer, self._consumer = self._consumer, None
                    await _stop_consumer(consumer)
                    # stop() revokes without telling the listener: another member may commit
                    # past what we remember before we get a partition back.
                    self._forget(list(self._committed))
                if self._restart.is_set() and not self._stop.is_set():
                    self._restart.clear()
                    log_event(log, "kafka_consumer_recreated", logging.WARNING, sink=self._name)
        except BatchAbandoned:
            pass  # stop() arrived while a start-up step was retrying
        finally:
            self._set_healthy(healthy=False)
            await _stop_producer(self._dlq)
            for close in (self._sink.close, self._dedupe.close):
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                        await close()
                except (TimeoutError, *TRANSIENT) as exc:
                    log_event(
                        log,
                        "close_failed",
                        logging.WARNING,
                        sink=self._name,
                        error_type=type(exc).__name__,
                    )
            log_event(log, "runner_stopped", sink=self._name)

    # --- the batch loop -------------------------------------------------------------------

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        self._last_fetch = time.monotonic()
        ahead: asyncio.Task[_Fetched] | None = None
        handling: _Handling | None = None
        try:
            while not (self._stop.is_set() or self._restart.is_set() or self._exhausted):
                try:
                    fetching = ahead or asyncio.create_task(
                        self._fetch(consumer), name=f"{self._name}-fetch"
                    )
                    ahead = None
                    fetched = await self._unless_interrupted(fetching)
                    if fetched is None:
                        return  # stop, or the watchdog wants a new consumer
                except KafkaError as exc:
                    # Fetch or group errors aiokafka does not retry itself (authorization during
                    # an ACL change, an undecodable batch): a fresh consumer after a pause.
                    log_event(
                        log,
                        "kafka_consumer_error",
                        logging.ERROR,
                        sink=self._name,
                        error_type=type(exc).__name__,
                    )
                    self._m.restarts.labels(self._name, "fetch_error").inc()
                    self._set_healthy(healthy=False)
                    await self._interrupted_within(self._settings.backoff.max_seconds)
                    return
                finally:
                    ahead = None
                if not fetched.records:
                    await self._answered_empty(consumer)
                    continue
                if fetched.epoch != self._epoch:
                    # Read ahead under an assignment revoked since: never delivered (its commit
                    # could pass an abandoned batch). Nothing is skipped by dropping it: every
                    # rebalance gives a new assignment that starts from the committed offsets.
                    self._m.abandoned_batches.labels(self._name, "read_ahead").inc()
                    continue
                self._last_fetch = time.monotonic()
                # Two stages overlap: the next batch is read and decoded while this one is
                # delivered, and this one is delivered while the previous one finishes (its
                # last insert, its commit). Commits stay in batch order: a batch commits only
                # after the one before it did, and never if that one was abandoned.
                ahead = asyncio.create_task(self._fetch(consumer), name=f"{self._name}-fetch")
                previous, handling = handling, self._start_handling(consumer, fetched, handling)
                if not self._overlap:
                    previous, handling = handling, None  # this sink takes one batch at a time
                if previous is not None and await self._finish(previous):
                    if self._stop.is_set():
                        return
                    await self._read_again(consumer, previous, handling)
                    handling = None
                self._last_fetch = time.monotonic()
        finally:
            if ahead is not None:
                # Its records are not committed: whoever reads these partitions next gets them.
                await self._settle(ahead)
            if handling is not None:
                # Not cancelled: like any batch at a stop, it finishes its current step and
                # commits, or gives up at its next retry.
                await self._finish(handling)

    async def _answered_empty(self, consumer: AIOKafkaConsumer) -> None:
        """An empty fetch says Kafka answers; it says nothing of a batch still retrying in
        hand (the warehouse's overlap), which keeps the service unready. (A replay also
        checks here whether its range is read: consumers/replay.py.)"""
        if not self._retrying:
            self._set_healthy(healthy=True)

    async def _unless_interrupted(self, fetching: asyncio.Task[_Fetched]) -> _Fetched | None:
        """The fetch's result; None (the fetch cancelled) if a stop or a restart comes first:
        aiokafka's getmany waits out a rebalance with no bound of its own."""
        if fetching.done():
            return fetching.result()
        stop = asyncio.create_task(self._stop.wait())
        restart = asyncio.create_task(self._restart.wait())
        try:
            await asyncio.wait({fetching, stop, restart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (stop, restart):
                waiter.cancel()
            await asyncio.gather(stop, restart, return_exceptions=True)
        if fetching.done():
            return fetching.result()
        await self._settle(fetching)
        return None

    def _start_handling(
        self, consumer: AIOKafkaConsumer, fetched: _Fetched, previous: _Handling | None
    ) -> _Handling:
        task = asyncio.create_task(
            self._handle_batch(consumer, fetched, previous.task if previous else None),
            name=f"{self._name}-batch",
        )
        # on_revoked waits for every batch still in hand before the partitions move.
        self._in_hand.add(task)
        task.add_done_callback(self._in_hand.discard)
        return _Handling(task, fetched)

    async def _read_again(
        self, consumer: AIOKafkaConsumer, abandoned: _Handling, after: _Handling | None
    ) -> None:
        """A batch was abandoned, so the one after it cannot commit either: wait for that
        one, then read both again from the last offsets we committed."""
        partitions = set(abandoned.fetched.offsets)
        if after is not None:
            await self._finish(after)
            partitions |= set(after.fetched.offsets)
        for topic, partition in partitions:
            tp = TopicPartition(topic, partition)
            if tp in consumer.assignment() and tp in self._committed:
                consumer.seek(tp, self._committed[tp])

    async def _finish(self, handling: _Handling) -> bool:
        """Wait for a batch's handling; True if it was abandoned (not committed)."""
        try:
            await handling.task
        except BatchAbandoned:
            reason = "shutdown" if self._stop.is_set() else "rebalance"
            self._m.abandoned_batches.labels(self._name, reason).inc()
            log_event(
                log,
                "batch_abandoned",
                logging.WARNING,
                sink=self._name,
                reason=reason,
                records=len(handling.fetched.records),
            )
            return True
        return False

    async def _settle(self, task: asyncio.Task[Any]) -> None:
        """Cancel a helper task and wait for it; an error it ended with is logged, never
        raised over the exception (or the orderly stop) that is ending its owner."""
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 # logged; the caller is already unwinding
            log_event(
                log,
                "task_failed",
                logging.ERROR,
                sink=self._name,
                task=task.get_name(),
                error_type=type(exc).__name__,
            )

    async def _fetch(self, consumer: AIOKafkaConsumer) -> _Fetched:
        """One ``getmany``, decoded, tagged with the rebalance epoch it was read in."""
        batches = await consumer.getmany(
            timeout_ms=self._settings.poll_timeout_ms, max_records=self._max_batch
        )
        # Taken with no await since getmany returned: the records belong to the assignment in
        # force at this epoch (aiokafka's getmany waits out a reassignment in progress).
        epoch = self._epoch
        self._beat()
        records = [r for tp in sorted(batches) for r in batches[tp]]
        decoded = [self._decoder.decode(r) for r in records]
        return _Fetched(records, decoded, next_offsets(records), epoch)

    async def _handle_batch(
        self,
        consumer: AIOKafkaConsumer,
        fetched: _Fetched,
        previous: asyncio.Task[None] | None,
    ) -> None:
        records, decoded = fetched.records, fetched.decoded
        self._m.consumed.labels(self._name).inc(len(records))
        self._m.batch_size.labels(self._name).observe(len(records))
        poison = [d for d in decoded if isinstance(d, PoisonRecord)]
        unique, copies = first_of_each_id(d for d in decoded if not isinstance(d, PoisonRecord))
        ids = [e.event_id for e in unique]

        done = await self._until_done(lambda: self._dedupe.claim(ids), "dedupe")
        todo = [e for e in unique if e.event_id not in done]
        self._m.duplicates.labels(self._name).inc(len(copies) + len(unique) - len(todo))

        async with self._leased([e.event_id for e in todo]):
            await self._deliver_claimed(todo, poison)
        if previous is not None:
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                # The batch before this one was not committed: committing this one would move
                # the offsets past it. Both are read again; the dedupe store drops this one.
                raise BatchAbandoned
        await self._commit(consumer, fetched.offsets)
        self._set_healthy(healthy=True)

    async def _deliver_claimed(
        self, todo: Sequence[EventRecord], poison: Sequence[PoisonRecord]
    ) -> None:
        """Deliver the claimed events, dead-letter what the sink refused and the poison, and
        confirm the claims."""
        started = time.perf_counter()
        try:
            outcome = await self._deliver(todo) if todo else Delivery()
        except BatchAbandoned:
            with contextlib.suppress(*TRANSIENT):
                await self._dedupe.release([e.event_id for e in todo])
            raise
        self._m.delivery_duration.labels(self._name).observe(time.perf_counter() - started)
        now = datetime.now(UTC)
        rejected, held = outcome.rejected, outcome.already_held
        delivered = [e for e in todo if e.event_id not in rejected and e.event_id not in held]
        self._m.duplicates.labels(self._name).inc(len(held))
        self._m.delivered.labels(self._name).inc(len(delivered))
        self._m.end_to_end_latency.observe_many(
            self._name,
            (
                max((now - event.received_at).total_seconds(), 0.0)
                for event in delivered
                if event.received_at is not None
            ),
        )

        if poison or rejected:
            dlq_records = [self._poison_record(p) for p in poison] + [
                self._rejected_record(e, rejected[e.event_id])
                for e in todo
                if e.event_id in rejected
            ]
            await self._until_done(lambda: self._send_dlq(dlq_records), "dlq")
        # Rejected events are handled too: a later copy must not be rejected again.
        await self._until_done(lambda: self._dedupe.confirm([e.event_id for e in todo]), "dedupe")

    async def _deliver(self, events: Sequence[EventRecord]) -> Delivery:
        """Deliver ``events``; an unexpected exception splits them in halves until the event
        that raises is alone, and that event alone is rejected (the policy's "permanent for
        one event"). Its batch-mates are delivered: a sink is idempotent by event id."""
        try:
            return await self._until_done(partial(self._sink.deliver, events), "deliver")
        except BatchAbandoned:
            raise
        except Exception as exc:  # noqa: BLE001 # the policy's 'unexpected': isolated below
            self._count_unexpected("deliver", exc, len(events))
            if len(events) == 1:
                return Delivery({events[0].event_id: unexpected_reason(exc)})
        middle = len(events) // 2
        first = await self._deliver(events[:middle])
        second = await self._deliver(events[middle:])
        return Delivery(
            {**first.rejected, **second.rejected}, first.already_held | second.already_held
        )

    @contextlib.asynccontextmanager
    async def _leased(self, ids: Sequence[str]) -> AsyncIterator[None]:
        """Renew our dedupe leases on ``ids`` while they are delivered, for a sink whose
        leases settle (the CRM): another member then waits for us instead of writing the same
        events while we still do."""
        settle = float(getattr(self._sink, "takeover_settle_seconds", 0.0))
        if settle <= 0 or not ids:
            yield
            return
        renewer = asyncio.create_task(
            self._renew_leases(ids, settle / 3), name=f"{self._name}-lease"
        )
        try:
            yield
        finally:
            await self._settle(renewer)

    async def _renew_leases(self, ids: Sequence[str], every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self._dedupe.refresh(ids)
            except TRANSIENT as exc:
                # The lease then ages: another member may wait for it, never write over it
                # early (it waits the whole settle time after our last renewal).
                log_event(
                    log,
                    "lease_renewal_failed",
                    logging.WARNING,
                    sink=self._name,
                    error_type=type(exc).__name__,
                )

    def _count_unexpected(self, stage: str, exc: BaseException, events: int) -> None:
        self._m.unexpected_errors.labels(self._name, stage, type(exc).__name__).inc()
        log_event(
            log,
            "unexpected_error",
            logging.ERROR,
            sink=self._name,
            stage=stage,
            error_type=type(exc).__name__,
            where=where_raised(exc),
            events=events,
            action="isolate" if stage == "deliver" else "retry",
        )

    async def _commit(
        self, consumer: AIOKafkaConsumer, to_commit: dict[tuple[str, int], int]
    ) -> None:
        offsets = {TopicPartition(t, p): o for (t, p), o in to_commit.items()}
        try:
            await self._until_done(
                lambda: consumer.commit(offsets),
                "commit",
                retry_if=lambda e: not isinstance(e, CommitFailedError),
            )
        except CommitFailedError:
            # The group rebalanced during the batch: the new owner re-reads it and the dedupe
            # store drops what we delivered. Nothing is lost; nothing is delivered twice.
            self._m.commits.labels(self._name, "rebalanced").inc()
            log_event(log, "commit_after_rebalance", logging.WARNING, sink=self._name)
            return
        self._committed.update(offsets)
        self._m.commits.labels(self._name, "ok").inc()

    # --- retries --------------------------------------------------------------------------

    async def _until_done(
        self,
        step: Callable[[], Awaitable[T]],
        stage: str,
        retry_if: Callable[[BaseException], bool] = lambda _: True,
    ) -> T:
        """Run ``step`` until it succeeds; back off between transient failures. While backing
        off, a stop or a partition revocation abandons the batch (BatchAbandoned).

        An unexpected exception is raised from delivery (the caller isolates its event) and
        retried like a transient failure anywhere else (no event can be blamed there)."""
        attempt = 0
        try:
            while True:
                self._beat()
                try:
                    return await step()
                except Exception as exc:
                    fate = fate_of(exc)
                    if fate is Fate.UNEXPECTED:
                        # Delivery isolates the event; a sink that cannot start stops the
                        # service (nothing can go on); BatchAbandoned is the runner's own.
                        if stage in {"deliver", "sink_start"} or isinstance(exc, BatchAbandoned):
                            raise
                        self._count_unexpected(stage, exc, 0)
                    if not retry_if(exc):
                        raise
                    if attempt == 0:
                        self._retrying += 1
                    self._set_healthy(healthy=False)
                    self._m.retries.labels(self._name, stage).inc()
                    # Waiting out another member's lease is the store working, not failing.
                    if isinstance(exc, DedupeUnavailable) and not isinstance(exc, ClaimHeld):
                        self._m.dedupe_errors.labels(self._name).inc()
                    retry_after = (
                        exc.retry_after if isinstance(exc, TransientSinkError | ClaimHeld) else None
                    )
                    delay = self._settings.backoff.delay(attempt, retry_after)
                    self._log_retry(stage, exc, attempt, delay)
                    attempt += 1
                    if await self._interrupted_within(delay):
                        raise BatchAbandoned from exc
        finally:
            # Also when the batch is abandoned: a stale count would blind the watchdog.
            if attempt > 0:
                self._retrying -= 1

    async def _interrupted_within(self, seconds: float) -> bool:
        stop = asyncio.create_task(self._stop.wait())
        abandon = asyncio.create_task(self._abandon.wait())
        try:
            done, _ = await asyncio.wait(
                {stop, abandon}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (stop, abandon):
                task.cancel()
            await asyncio.gather(stop, abandon, return_exceptions=True)
        return bool(done)

    def _log_retry(self, stage: str, exc: BaseException, attempt: int, delay: float) -> None:
        now = time.monotonic()
        if now - self._retry_log.get(stage, 0.0) >= 5.0:  # one line per stage per 5 s
            self._retry_log[stage] = now
            log_event(
                log,
                "retrying",
                logging.WARNING,
                sink=self._name,
                stage=stage,
                error=str(exc)
                if isinstance(exc, TransientSinkError | DedupeUnavailable)
                else type(exc).__name__,
                attempt=attempt,
                delay_seconds=round(delay, 3),
            )

    def _set_healthy(self, *, healthy: bool) -> None:
        self._healthy = healthy
        self._m.ready.labels(self._name).set(1 if self.ready else 0)

    # --- the DLQ --------------------------------------------------------------------------

    def _rejected_record(self, event: EventRecord, reason: str) -> tuple[bytes | None, bytes]:
        record: dict[str, Any] = {
            "dlq_version": 1,
            "stage": self._settings.sink,
            "reason": "rejected_by_sink",
            "detail": reason,
            "event_id": event.event_id,
            "rejected_at": rfc3339_now(),
            "source": {"topic": event.topic, "partition": event.partition, "offset": event.offset},
            "payload": event.payload,
        }
        if reason.startswith(UNEXPECTED_PREFIX):
            record["reason"] = reason
            record["detail"] = (
                f"the sink raised {reason.removeprefix(UNEXPECTED_PREFIX)} on this event alone "
                "(its batch-mates were delivered); see the unexpected_error log line"
            )
        try:
            return event.event_id.encode(), orjson.dumps(record)
        except orjson.JSONEncodeError:
            # Deeper than orjson writes (254 levels): keep the record's bytes as read instead.
            del record["payload"]
            record["raw_value_base64"] = base64.b64encode(event.raw).decode()
            return event.event_id.encode(), orjson.dumps(record)

    def _poison_record(self, poison: PoisonRecord) -> tuple[bytes | None, bytes]:
        return poison.key, orjson.dumps(
            {
                "dlq_version": 1,
                "stage": self._settings.sink,
                "reason": poison.reason,
                "detail": poison.detail,
                "event_id": None,
                "rejected_at": rfc3339_now(),
                "source": {
                    "topic": poison.topic,
                    "partition": poison.partition,
                    "offset": poison.offset,
                },
                "raw_value_base64": base64.b64encode(poison.value or b"").decode(),
            }
        )

    async def _send_dlq(self, dlq_records: list[tuple[bytes | None, bytes]]) -> None:
        producer = self._dlq
        if producer is None:
            self._dlq = await self._start_dlq_producer()
            producer = self._dlq
        deliveries: list[asyncio.Future[Any]] = []
        try:
            # Bounded: an idempotent producer never gives up a batch by itself.
            async with asyncio.timeout(DLQ_SEND_TIMEOUT_SECONDS):
                for key, value in dlq_records:
                    deliveries.append(await self._send_one_dlq(producer, key, value))
                await asyncio.gather(*deliveries)
        except PRODUCER_FATAL as exc:
            self._dlq = None
            await _stop_producer(producer)
            self._m.restarts.labels(self._name, "dlq_producer_fatal").inc()
            raise TransientSinkError(f"dlq producer replaced: {type(exc).__name__}") from exc
        finally:
            for delivery in deliveries:
                if not delivery.done():
                    delivery.cancel()
            await asyncio.gather(*deliveries, return_exceptions=True)
        for _, value in dlq_records:
            self._m.dlq.labels(self._name, orjson.loads(value)["reason"]).inc()
        log_event(
            log,
            "dead_lettered",
            logging.WARNING,
            sink=self._name,
            records=len(dlq_records),
            topic=self._settings.dlq_topic,
        )

    async def _send_one_dlq(
        self, producer: AIOKafkaProducer, key: bytes | None, value: bytes
    ) -> asyncio.Future[Any]:
        headers = [("content-type", b"application/json")]
        try:
            delivery: asyncio.Future[Any] = await producer.send(
                self._settings.dlq_topic, value, key=key, headers=headers
            )
        except MessageSizeTooLargeError:
            # The record stays readable at its source offset; the DLQ keeps where and why.
            record = orjson.loads(value)
            record.pop("payload", None)
            record["raw_value_base64"] = ""
            record["detail"] += " (value too large for the DLQ: read it at its source offset)"
            delivery = await producer.send(
                self._settings.dlq_topic, orjson.dumps(record), key=key, headers=headers
            )
        return delivery

    # --- Kafka clients --------------------------------------------------------------------

    async def _start_dlq_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **self._settings.kafka.client_options(),
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=15_000,
        )
        try:
            await asyncio.wait_for(producer.start(), 15)
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def _start_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        consumer = AIOKafkaConsumer(
            **s.kafka.client_options(),
            group_id=s.group_id,
            enable_auto_commit=False,
            # A new group reads the topic from the start: nothing published is skipped.
            auto_offset_reset="earliest",
            max_poll_interval_ms=s.max_poll_interval_ms,
            # on_revoked waits for the batch in hand (an insert may take up to its 30 s
            # command timeout), within a bound below this one.
            rebalance_timeout_ms=s.rebalance_timeout_ms,
            max_poll_records=self._max_batch,
        )
        consumer.subscribe([s.topic], listener=_Rebalance(self))
        try:
            await asyncio.wait_for(consumer.start(), 15)
        except BaseException:
            await consumer.stop()
            raise
        self._last_fetch = time.monotonic()
        log_event(log, "kafka_consumer_started", sink=self._name, group_id=s.group_id)
        return consumer

    # --- the watchdog ---------------------------------------------------------------------

    async def _watchdog(self, consumer: AIOKafkaConsumer) -> None:
        """Lag per partition; and if the consumer fetches nothing while lag stays, it is
        stuck (aiokafka has reports of consumers stuck after a broker restart): recreate it."""
        self._lag_since = None
        while True:
            await asyncio.sleep(self._settings.watchdog_interval_seconds)
            silent = time.monotonic() - self._heartbeat
            # on_revoked waiting for the batch in hand is bounded by itself (below the
            # rebalance timeout): not a hang, whatever CONSUMER_STALL_SECONDS says.
            revoking = self._abandon.is_set()
            if (
                silent > self._settings.stall_seconds
                and not self._restart.is_set()
                and not revoking
            ):
                # No fetch returned and no step was tried for that long, assignment or not:
                # the consumer is stuck (in a rebalance, on a frozen broker). A new one.
                log_event(
                    log,
                    "kafka_consumer_no_progress",
                    logging.ERROR,
                    sink=self._name,
                    silent_seconds=round(silent, 1),
                )
                self._m.restarts.labels(self._name, "no_progress").inc()
                self._restart.set()
                self._set_healthy(healthy=False)
                continue
            assigned = list(consumer.assignment())
            if not assigned:
                continue
            try:
                ends = await asyncio.wait_for(consumer.end_offsets(assigned), 10)
            except (KafkaError, TimeoutError):
                continue  # the cluster is away: not the consumer's fault, nothing to fix
            total = 0
            for tp, end in ends.items():
                done = self._committed.get(tp)
                if done is None:
                    done = await _committed(consumer, tp)
                lag = max(end - done, 0) if done is not None else end
                total += lag
                self._m.lag.labels(self._name, str(tp.partition)).set(lag)
            now = time.monotonic()
            if total == 0:
                self._lag_since = None
                continue
            if self._lag_since is None:
                self._lag_since = now
            # Stuck: records wait, and none arrived since they started waiting (or since the
            # last batch). A batch held up by sink retries, or still being delivered, is not
            # the consumer's fault.
            idle = now - max(self._lag_since, self._last_fetch)
            if not self._retrying and not self._in_hand and idle > self._settings.stall_seconds:
                log_event(
                    log,
                    "kafka_consumer_stalled",
                    logging.ERROR,
                    sink=self._name,
                    lag=total,
                    idle_seconds=round(idle, 1),
                )
                self._m.restarts.labels(self._name, "stalled").inc()
                self._restart.set()
                self._lag_since = None
                self._set_healthy(healthy=False)

    def _forget(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop(tp, None)
            with contextlib.suppress(KeyError):
                self._m.lag.remove(self._name, str(tp.partition))

    async def on_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # A batch waiting to retry gives up (the new owner will deliver it); a batch in a
        # healthy step finishes and commits. Either way, wait for it before letting go.
        self._beat()
        self._epoch += 1  # a batch read ahead until now is not delivered
        self._abandon.set()
        try:
            if self._in_hand:
                # Bounded: past the rebalance timeout the broker evicts us anyway. A batch
                # still in hand then goes on; its commit fails (the new owner re-reads it) and
                # its dedupe leases make the new owner wait for it instead of writing twice.
                bound = self._settings.rebalance_timeout_ms / 1000 * 0.8
                _, late = await asyncio.wait(set(self._in_hand), timeout=bound)
                if late:
                    self._m.abandoned_batches.labels(self._name, "revoke_timeout").inc(len(late))
                    log_event(
                        log,
                        "revoke_timeout",
                        logging.WARNING,
                        sink=self._name,
                        batches=len(late),
                        waited_seconds=round(bound, 1),
                    )
        finally:
            self._abandon.clear()
        self._forget(revoked)

    async def on_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self._last_fetch = time.monotonic()
        self._beat()
        log_event(
            log,
            "partitions_assigned",
            sink=self._name,
            partitions=sorted(tp.partition for tp in assigned),
        )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc] # aiokafka is untyped
    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._runner.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self._runner.on_assigned(assigned)


async def _committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    try:
        offset = await asyncio.wait_for(consumer.committed(tp), 5)
    except (KafkaError, TimeoutError):
        return None
    return int(offset) if offset is not None else None


async def _stop_producer(producer: AIOKafkaProducer | None) -> None:
    """Stop within a bound: stop() flushes, which a dead cluster never lets finish."""
    if producer is not None:
        await stop_producer(producer, CLOSE_TIMEOUT_SECONDS)


async def _stop_consumer(consumer: AIOKafkaConsumer | None) -> None:
    """Leave the group (no commit: enable_auto_commit is off)."""
    if consumer is None:
        return
    try:
        await asyncio.wait_for(consumer.stop(), 15)
    except (KafkaError, TimeoutError) as exc:
        log_event(log, "kafka_consumer_stop_failed", logging.WARNING, error_type=type(exc).__name__)
        with contextlib.suppress(KafkaError, OSError):
            await consumer._client.close()  # noqa: SLF001 # a stop cut short: close its sockets
