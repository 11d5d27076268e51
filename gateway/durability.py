"""Where a webhook's record is durable before its 200: Kafka, or the local spool.

With the spool off (GATEWAY_SPOOL_DIR unset) a record is durable once Kafka acknowledged it
(``acks=all``) within the publish deadline, else the answer is 503. With it on:

* Kafka ready: the record is published and gets ``GATEWAY_SPOOL_AFTER_SECONDS`` (2 s) for its
  ack; past that, it is spooled. The producer may still deliver its copy later: the replay
  then writes a second one, and the consumers' dedupe drops it (same id, same key).
* Kafka not ready (no producer connected, or the last probe failed): spooled at once.
* The spool full or its disk failing: 503, never a 200 without an fsync.

The replay sends spooled records to Kafka, oldest first, through the same idempotent
producer, with their original headers plus ``ce_spooledtime``; a record leaves the spool only
after its ack. It runs beside new webhooks, which go straight to Kafka once it is back: one
batch of records in flight at a time, so it shares the producer instead of crowding it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

from gateway.metrics import GatewayMetrics
from gateway.publisher import Publisher, PublishFailed
from gateway.spool import DISK_RESERVE_BYTES, SPOOLED_TIME, Spool, SpooledRecord, SpoolFailed
from onoff_events.cloudevents import Headers, rfc3339_now
from onoff_events.logs import log_event

log = logging.getLogger("gateway.durability")

Durability = Literal["kafka", "spool"]
DURABILITY_HEADER = "Onoff-Events-Durability"
REPLAY_BATCH = 500  # records in flight per replay round
NOT_READY_POLL_SECONDS = 0.5
MAX_REPLAY_BACKOFF_SECONDS = 5.0


class DurableStore:
    """Makes records durable (Kafka or spool) and empties the spool into Kafka."""

    def __init__(
        self,
        publisher: Publisher,
        metrics: GatewayMetrics,
        *,
        publish_timeout: float,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 1024**3,
        spool_after: float = 2.0,
        drain_seconds: float = 20.0,
        largest_record: int = 0,
    ) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._publish_timeout = publish_timeout
        self._spool_dir = spool_dir
        self._spool_max_bytes = spool_max_bytes
        self._spool: Spool | None = None  # opened by start() when spool_dir is set
        self._spool_after = spool_after
        self._drain_seconds = drain_seconds
        self._largest_record = largest_record
        self._replay: asyncio.Task[None] | None = None
        self._emptied = asyncio.Event()  # the replay found the spool empty
        self._failure_logged = 0.0

    @property
    def spool(self) -> Spool | None:
        return self._spool

    @property
    def kafka_ready(self) -> bool:
        return self._publisher.ready

    @property
    def ready(self) -> bool:
        """A webhook can be made durable now: Kafka is ready, or the spool has room for the
        largest record we take."""
        if self._publisher.ready:
            return True
        spool = self._spool
        return spool is not None and spool.has_room(self._largest_record) and not spool.failing

    @property
    def alive(self) -> bool:
        """False once the producer's supervisor or the replay died: only a restart helps."""
        replay_dead = self._replay is not None and self._replay.done()
        return self._publisher.alive and not replay_dead

    async def start(self) -> None:
        """Open the spool (a disk that fails here stops the start: better no pod than one
        that cannot keep its promise), then connect to Kafka and start the replay, which
        first sends what a previous run left in the spool."""
        if self._spool_dir is not None:
            # Free space kept on the volume: room for a delete's WAL pages (the replay's
            # chunks), however large the records the gateway takes.
            reserve = max(DISK_RESERVE_BYTES, 1024 * 1024 + 4 * self._largest_record)
            spool = self._spool = await Spool.open(
                self._spool_dir, self._spool_max_bytes, self._observe_commit, reserve
            )
            m = self._metrics
            m.spool_records.set_function(lambda: spool.stats.records)
            m.spool_bytes.set_function(lambda: spool.stats.bytes)
            m.spool_max_bytes.set(spool.max_bytes)
            m.spool_oldest_age.set_function(lambda: _age(spool.stats.oldest_spooled_at))
            log_event(
                log,
                "spool_opened",
                path=str(spool.path),
                records=spool.stats.records,
                bytes=spool.stats.bytes,
                max_bytes=spool.max_bytes,
            )
        await self._publisher.start()
        if self._spool is not None:
            self._replay = asyncio.create_task(self._replay_forever(), name="spool-replay")
            self._replay.add_done_callback(_report_replay_end)

    def _observe_commit(self, records: int, seconds: float) -> None:
        self._metrics.spool_commit_duration.observe(seconds)
        self._metrics.spool_commit_records.observe(records)

    async def make_durable(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> Durability:
        """Return where the record is durable; raise PublishFailed when it is nowhere."""
        spool = self._spool
        if spool is None:
            await self._publisher.publish(topic, key, value, headers, self._publish_timeout)
            return "kafka"
        if self._publisher.ready:
            try:
                await self._publisher.publish(topic, key, value, headers, self._spool_after)
            except PublishFailed as exc:
                if exc.reason == "message_too_large":
                    raise  # Kafka will never take it: 413, and nothing to replay
            else:
                return "kafka"
        elif self._publisher.over_topic_limit(topic, key, value, headers):
            # The replay could never deliver it: refuse now, as Kafka would.
            raise PublishFailed("message_too_large")
        try:
            spooled = [*headers, (SPOOLED_TIME, rfc3339_now().encode())]
            await spool.append(topic, key, value, spooled, self._publish_timeout)
        except SpoolFailed as exc:
            self._metrics.spool_failures.labels(exc.reason).inc()
            raise PublishFailed(f"spool_{exc.reason}") from exc
        self._metrics.spooled_records.labels(topic).inc()
        return "spool"

    async def close(self) -> None:
        """At a stop, after the last request: give the replay ``drain_seconds`` to empty the
        spool, stop it, close the producer, close the spool. What is left stays on disk and
        is replayed at the next start."""
        try:
            if self._replay is not None:
                await self._drain()
                await _cancel(self._replay)
        finally:
            try:
                await self._publisher.close()
            finally:
                if self._spool is not None:
                    await self._spool.close()
                    left = self._spool.stats.records
                    log_event(
                        log,
                        "spool_closed",
                        logging.WARNING if left else logging.INFO,
                        records_left=left,
                    )

    async def _drain(self) -> None:
        spool = self._spool
        assert spool is not None  # noqa: S101 # only called with a spool
        if not spool.stats.records or self._replay is None or self._replay.done():
            return
        log_event(log, "spool_draining", records=spool.stats.records, within=self._drain_seconds)
        self._emptied.clear()  # the replay sets it when it finds the spool empty again
        emptied = asyncio.create_task(self._emptied.wait())
        try:
            await asyncio.wait({emptied, self._replay}, timeout=self._drain_seconds)
        finally:
            await _cancel(emptied)

    # --- the replay -----------------------------------------------------------------------

    async def _replay_forever(self) -> None:
        spool = self._spool
        assert spool is not None  # noqa: S101 # only started with a spool
        backoff = 0.5
        while True:
            if not spool.stats.records:
                self._emptied.set()
                spool.appended.clear()
                if not spool.stats.records:
                    await spool.appended.wait()
                continue
            self._emptied.clear()
            if not self._publisher.ready:
                await asyncio.sleep(NOT_READY_POLL_SECONDS)
                continue
            try:
                batch = await spool.oldest(REPLAY_BATCH)
                acked = await self._replay_batch(batch)
                await spool.remove(acked)
            except (sqlite3.Error, OSError) as exc:
                # The spool's disk: logged and retried; the records stay where they are (one
                # Kafka acked but not yet removed is sent again: a duplicate, never a loss).
                self._log_replay_failure(f"spool_{type(exc).__name__}")
                complete = False
            else:
                for record in acked:
                    self._metrics.replayed_records.labels(record.topic).inc()
                # Back off only when nothing went: a record Kafka refuses (its size over a
                # topic limit lowered since) must not slow the records behind it.
                complete = bool(acked)
            if not complete:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_REPLAY_BACKOFF_SECONDS)
            else:
                backoff = 0.5

    async def _replay_batch(self, batch: list[SpooledRecord]) -> list[SpooledRecord]:
        """Publish ``batch`` in order (one producer keeps each partition's order); return the
        records Kafka acknowledged."""
        results = await asyncio.gather(
            *(
                self._publisher.publish(r.topic, r.key, r.value, r.headers, self._publish_timeout)
                for r in batch
            ),
            return_exceptions=True,
        )
        acked = []
        for record, result in zip(batch, results, strict=True):
            if result is None:
                acked.append(record)
            elif isinstance(result, PublishFailed):
                self._log_replay_failure(result.reason)
            elif isinstance(result, BaseException):
                raise result
        return acked

    def _log_replay_failure(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._failure_logged >= 5.0:  # one line per 5 s; the metrics count them all
            self._failure_logged = now
            log_event(log, "spool_replay_failed", logging.WARNING, reason=reason)


def _report_replay_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        # /healthz turns 503 (``alive``): the pod restarts and the replay starts again.
        log_event(log, "spool_replay_died", logging.CRITICAL, error_type=type(exc).__name__)


def _age(spooled_at: float | None) -> float:
    return max(time.time() - spooled_at, 0.0) if spooled_at is not None else 0.0


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel and await ``task``; an error it had already died of was logged then."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
