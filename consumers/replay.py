"""Replaying ``sms-events`` into one sink: ``onoff-consumer <sink> --replay-from … [--until …]``.

A replay is the service's own batch loop (``Runner``) with three differences:

- its consumer group is its own (``onoff-<sink>-replay-<stamp>``) and its partitions are
  assigned, not subscribed: the live group's offsets and members are never touched;
- it reads a fixed range of offsets (from ``offsets_for_times`` or given) and stops by itself
  at the end of it;
- the dedupe store's "already delivered" answer is bypassed (that is the point of a replay):
  the sink's own idempotency decides (the warehouse's ``ON CONFLICT``, the CRM's
  ``onoff_event_id``), and what the sink already held is counted as already present.

The range, the resume point and the summary are pure functions of offsets; Kafka is read and
written only by ``resolve_range`` and the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from consumers.dedupe import DedupeStore
from consumers.metrics import ConsumerMetrics
from consumers.records import PoisonRecord, RecordDecoder, next_offsets
from consumers.runner import Runner, _Fetched
from consumers.settings import ConsumerSettings
from consumers.sinks import Sink
from onoff_events.cloudevents import parse_rfc3339
from onoff_events.event_kinds import SMS, EventKind
from onoff_events.kafka import KafkaSettings, topic_partitions
from onoff_events.logs import log_event

log = logging.getLogger("consumers.replay")

Position = datetime | dict[int, int]
"""Where a replay starts or stops: an instant, or an offset for each partition named."""

_OFFSETS = re.compile(r"\d+:\d+(,\d+:\d+)*")
PROGRESS_LOG_SECONDS = 10.0


class ReplayError(Exception):
    """The replay cannot be planned (an unknown topic, a partition that does not exist)."""


def parse_position(text: str) -> Position:
    """``2026-11-26T00:00:00Z`` (RFC 3339, with its offset) or ``0:120,1:98`` (partition:offset
    pairs). Raises ValueError with a message for the operator."""
    text = text.strip()
    if _OFFSETS.fullmatch(text):
        offsets: dict[int, int] = {}
        for pair in text.split(","):
            partition, offset = (int(x) for x in pair.split(":"))
            if partition in offsets:
                raise ValueError(f"partition {partition} is given twice")
            offsets[partition] = offset
        return offsets
    moment = parse_rfc3339(text) if text else None
    if moment is None or moment.tzinfo is None:
        raise ValueError(
            f"expected an RFC 3339 time with its offset (2026-11-26T00:00:00Z) or "
            f"partition:offset pairs (0:120,1:98), got {text!r}"
        )
    try:
        moment.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"{text!r} has no UTC instant") from None
    return moment


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """The offsets a replay reads: ``start[p]`` up to, not including, ``until[p]``."""

    topic: str
    start: Mapping[int, int]
    until: Mapping[int, int]

    @property
    def total(self) -> int:
        return sum(max(self.until[p] - self.start[p], 0) for p in self.start)

    def done(self, committed: Mapping[int, int]) -> int:
        """Records behind the committed offsets (read and settled)."""
        return sum(
            max(min(committed.get(p, s), self.until[p]) - s, 0) for p, s in self.start.items()
        )

    def resume_from(self, committed: Mapping[int, int]) -> dict[int, int]:
        """Where to start again after a stop: the committed offset of each partition not yet
        finished (records before it were delivered and committed; none after it were)."""
        return {
            p: max(committed.get(p, s), s)
            for p, s in sorted(self.start.items())
            if max(committed.get(p, s), s) < self.until[p]
        }


def plan_range(
    topic: str,
    beginnings: Mapping[int, int],
    ends: Mapping[int, int],
    start_at: Mapping[int, int | None] | dict[int, int],
    until_at: Mapping[int, int | None] | None,
) -> ReplayRange:
    """The range from what Kafka said. ``start_at``/``until_at`` map partitions to an offset,
    or to None where a time has no record at or after it (then: the end offset). Offsets are
    kept within what the partition still holds (retention may have deleted the start)."""
    unknown = sorted(set(start_at) - set(ends))
    if unknown:
        raise ReplayError(f"{topic} has no partition {', '.join(map(str, unknown))}")
    start: dict[int, int] = {}
    until: dict[int, int] = {}
    for p in sorted(start_at):
        first = start_at[p]
        first = ends[p] if first is None else first
        start[p] = min(max(first, beginnings[p]), ends[p])
        last = ends[p] if until_at is None else until_at.get(p)
        last = ends[p] if last is None else last
        until[p] = max(min(last, ends[p]), start[p])
    return ReplayRange(topic, start, until)


async def resolve_range(
    kafka: KafkaSettings, topic: str, start: Position, until: Position | None
) -> ReplayRange:
    """Ask Kafka for the offsets of ``start`` and ``until`` (times through
    ``offsets_for_times``); ``until`` defaults to the end offsets now."""
    found = await topic_partitions(kafka, [topic])
    if topic not in found:
        raise ReplayError(f"topic {topic} does not exist (or this user may not describe it)")
    partitions = [TopicPartition(topic, p) for p in found[topic]]
    consumer = AIOKafkaConsumer(**kafka.client_options(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        beginnings = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)

        async def offsets_at(position: Position) -> dict[int, int | None]:
            if isinstance(position, dict):
                return dict(position)
            ms = int(position.timestamp() * 1000)
            at = await consumer.offsets_for_times(dict.fromkeys(partitions, ms))
            return {tp.partition: (o.offset if o is not None else None) for tp, o in at.items()}

        start_at = await offsets_at(start)
        until_at = await offsets_at(until) if until is not None else None
    finally:
        await consumer.stop()
    return plan_range(
        topic,
        {tp.partition: o for tp, o in beginnings.items()},
        {tp.partition: o for tp, o in ends.items()},
        start_at,
        until_at,
    )


def format_offsets(offsets: Mapping[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(offsets.items()))


def replay_group(sink: str, now: datetime | None = None) -> str:
    """``onoff-<sink>-replay-<UTC stamp>``: a group of its own, findable by its prefix."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"onoff-{sink}-replay-{stamp}"


class ReplayDedupe:
    """The dedupe store seen by a replay: nothing is "already delivered" (the sink's own
    idempotency decides), and delivered ids are still marked done in the real store, so the
    live group skips them if it reaches them later. No claim is taken, so none is released or
    renewed: the live group's leases are left alone."""

    def __init__(self, store: DedupeStore) -> None:
        self._store = store

    async def claim(self, ids: Sequence[str]) -> set[str]:
        return set()

    async def confirm(self, ids: Sequence[str]) -> None:
        await self._store.confirm(ids)

    async def release(self, ids: Sequence[str]) -> None:
        return None

    async def refresh(self, ids: Sequence[str]) -> None:
        return None

    async def ping(self) -> None:
        await self._store.ping()

    async def close(self) -> None:
        await self._store.close()


class ReplayRunner(Runner):
    """The sink's batch loop over a fixed range, in a group of its own; ends by itself."""

    def __init__(
        self,
        settings: ConsumerSettings,
        sink: Sink,
        dedupe: DedupeStore,
        metrics: ConsumerMetrics,
        *,
        replay: ReplayRange,
        only: frozenset[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(settings, sink, ReplayDedupe(dedupe), metrics)
        self.range = replay
        self._only = only  # (partition, offset) of the records to deliver; None: all
        self.finished = False
        self.committed: dict[int, int] = {}

    async def _start_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        consumer = AIOKafkaConsumer(
            **s.kafka.client_options(),
            group_id=s.group_id,
            enable_auto_commit=False,
            max_poll_records=self._max_batch,
        )
        await asyncio.wait_for(consumer.start(), 15)
        try:
            partitions = [TopicPartition(self.range.topic, p) for p in self.range.start]
            consumer.assign(partitions)
            for tp in partitions:
                # After a new consumer (the watchdog's remedy) go on from our own commits.
                committed = await consumer.committed(tp)
                start = self.range.start[tp.partition]
                consumer.seek(tp, max(committed, start) if committed is not None else start)
                if (committed or start) >= self.range.until[tp.partition]:
                    consumer.pause(tp)
        except BaseException:
            await consumer.stop()
            raise
        log_event(log, "replay_consumer_started", sink=self._name, group_id=s.group_id)
        return consumer

    async def _fetch(self, consumer: AIOKafkaConsumer) -> _Fetched:
        fetched = await super()._fetch(consumer)
        until, only = self.range.until, self._only
        kept = [
            i
            for i, r in enumerate(fetched.records)
            if r.offset < until[r.partition] and (only is None or (r.partition, r.offset) in only)
        ]
        for r in fetched.records:
            if r.offset >= until[r.partition] - 1:
                consumer.pause(TopicPartition(r.topic, r.partition))  # read nothing past it
        records = [fetched.records[i] for i in kept]
        return _Fetched(
            records, [fetched.decoded[i] for i in kept], next_offsets(records), fetched.epoch
        )

    async def _answered_empty(self, consumer: AIOKafkaConsumer) -> None:
        await super()._answered_empty(consumer)
        for p, last in self.range.until.items():
            if await consumer.position(TopicPartition(self.range.topic, p)) < last:
                return
        # Read to the end: the loop ends once the batches in hand are delivered.
        self._exhausted = self.finished = True

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        await super()._consume(consumer)
        if self.finished:
            self.stop()

    async def _finish(self, handling: Any) -> bool:
        abandoned = await super()._finish(handling)
        if abandoned:
            # Read to the end is not delivered to the end: a batch given up uncommitted (a
            # stop while it retried) makes the replay incomplete, resumable from its commits.
            self.finished = False
        return abandoned

    async def _commit(
        self, consumer: AIOKafkaConsumer, to_commit: dict[tuple[str, int], int]
    ) -> None:
        await super()._commit(consumer, to_commit)
        for (_, partition), offset in to_commit.items():
            self.committed[partition] = max(self.committed.get(partition, 0), offset)


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    sink: str
    group_id: str
    kind: str
    read: int
    delivered: int
    already_present: int
    dead_lettered: int
    complete: bool
    resume_from: dict[int, int]
    until: dict[int, int]

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sink": self.sink,
            "group_id": self.group_id,
            "read": self.read,
            "delivered": self.delivered,
            "already_present": self.already_present,
            "dead_lettered": self.dead_lettered,
            "complete": self.complete,
        }
        if not self.complete:
            # The kind goes with the command: the offsets are those of its topic.
            prefix = "" if self.kind == SMS.name else f"CONSUMER_EVENT_KIND={self.kind} "
            out["resume"] = (
                f"{prefix}onoff-consumer {self.sink} --replay-from "
                f"{format_offsets(self.resume_from)} --until {format_offsets(self.until)}"
            )
        return out


def _metric(registry: CollectorRegistry, name: str) -> int:
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return int(total)


class Progress:
    """Events done / total, rate and ETA: a bar on a terminal, a log line every
    ``PROGRESS_LOG_SECONDS`` otherwise (a Kubernetes Job's log)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = total
        self._started = time.monotonic()
        self._last_log = 0.0
        self._bar: Any = None
        if stream.isatty():
            from tqdm import tqdm  # noqa: PLC0415 # only a terminal needs it

            self._bar = tqdm(total=total, unit="event", file=stream, dynamic_ncols=True)

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_log < PROGRESS_LOG_SECONDS and done < self._total:
            return
        self._last_log = now
        elapsed = max(now - self._started, 1e-9)
        rate = done / elapsed
        eta = (self._total - done) / rate if rate > 0 else None
        log_event(
            log,
            "replay_progress",
            done=done,
            total=self._total,
            rate_per_second=round(rate, 1),
            eta_seconds=round(eta) if eta is not None else None,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def replay(
    settings: ConsumerSettings,
    sink: Sink,
    dedupe: DedupeStore,
    replay_range: ReplayRange,
    *,
    only: frozenset[tuple[int, int]] | None = None,
    stop: asyncio.Event | None = None,
    progress_stream: TextIO | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ReplaySummary:
    """Deliver ``replay_range`` (or only the records at ``only``) to ``sink`` and return what
    happened; SIGINT/SIGTERM (or ``stop``) ends it cleanly, with where to resume."""
    registry = CollectorRegistry()
    runner = ReplayRunner(
        settings, sink, dedupe, ConsumerMetrics.create(registry), replay=replay_range, only=only
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    progress = Progress(replay_range.total, progress_stream or sys.stderr)
    run = asyncio.create_task(runner.run(), name=f"{settings.sink}-replay")
    stopping = asyncio.create_task(stop.wait())
    try:
        while not run.done():
            await asyncio.wait({run, stopping}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            done = replay_range.done(runner.committed)
            progress.update(done)
            if on_progress is not None:
                on_progress(done)
            if stopping.done() and not run.done():
                log_event(log, "replay_stopping", sink=settings.sink)
                runner.stop()
                await run
        await run  # raises what ended it, if anything did
    finally:
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        progress.close()
        for sig in handled:
            loop.remove_signal_handler(sig)
    return ReplaySummary(
        sink=settings.sink,
        group_id=settings.group_id,
        kind=settings.kind.name,
        read=_metric(registry, "onoff_consumer_events_consumed_total"),
        delivered=_metric(registry, "onoff_consumer_events_delivered_total"),
        already_present=_metric(registry, "onoff_consumer_duplicates_dropped_total"),
        dead_lettered=_metric(registry, "onoff_consumer_dlq_events_total"),
        complete=runner.finished,
        resume_from=replay_range.resume_from(runner.committed),
        until=dict(replay_range.until),
    )


async def dry_run(
    kafka: KafkaSettings,
    replay_range: ReplayRange,
    only: frozenset[tuple[int, int]] | None = None,
    kind: EventKind = SMS,
) -> dict[str, int]:
    """What a replay of ``replay_range`` would read: records, distinct event ids, and poison
    (records no sink can use); nothing is delivered, no group is used."""
    partitions = [
        TopicPartition(replay_range.topic, p)
        for p in replay_range.start
        if replay_range.start[p] < replay_range.until[p]
    ]
    decoder = RecordDecoder(kind)
    ids: set[str] = set()
    records = poison = 0
    if partitions:
        consumer = AIOKafkaConsumer(
            **kafka.client_options(), group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(partitions)
            for tp in partitions:
                consumer.seek(tp, replay_range.start[tp.partition])
            remaining = set(partitions)
            while remaining:
                batch = await consumer.getmany(timeout_ms=500, max_records=5000)
                for tp, found in batch.items():
                    for r in found:
                        if r.offset >= replay_range.until[tp.partition]:
                            break
                        if only is not None and (r.partition, r.offset) not in only:
                            continue
                        records += 1
                        event = decoder.decode(r)
                        if isinstance(event, PoisonRecord):
                            poison += 1
                        else:
                            ids.add(event.event_id)
                for tp in list(remaining):
                    if await consumer.position(tp) >= replay_range.until[tp.partition]:
                        remaining.discard(tp)
                        consumer.pause(tp)
        finally:
            await consumer.stop()
    return {"records": records, "event_ids": len(ids), "poison": poison}


def replay_settings(settings: ConsumerSettings, group_id: str | None = None) -> ConsumerSettings:
    """The service's settings for a replay: the same sink, DLQ and Kafka access, a group of
    its own."""
    return replace(settings, group_id=group_id or replay_group(settings.sink))
