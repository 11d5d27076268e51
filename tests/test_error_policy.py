"""The runner's error policy against a real broker and a real (embedded) warehouse: an
exception the runner does not know is isolated to the event that causes it, which goes to
the sink's DLQ; the rest of the batch is delivered and the service keeps running."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from consumers.dedupe import DedupeStore
from consumers.records import SmsRecord
from consumers.sinks import Delivery, Sink
from onoff_events import schemas
from tests.conftest import wait_until
from tests.consumer_harness import InProcessConsumer, consumer_env, make_topics, publish
from tests.kafka_reader import read_records
from tests.payloads import sms_event


class RaisesFor:
    """A real sink in front of which chosen events raise an error the runner has no rule
    for, as a mapping bug would (the CRM's OverflowError on a far-future date). Counts every
    attempt per id, so a test sees each delivery, not just the rows a primary key keeps."""

    def __init__(self, sink: Sink, culprits: set[str], error: type[Exception]) -> None:
        self._sink = sink
        self._culprits = culprits
        self._error = error
        self.name = sink.name
        self.attempts: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()

    async def start(self) -> None:
        await self._sink.start()

    async def close(self) -> None:
        await self._sink.close()

    async def deliver(self, events: Sequence[SmsRecord]) -> Delivery:
        self.attempts.update(e.event_id for e in events)
        if any(e.event_id in self._culprits for e in events):
            raise self._error("date value out of range")
        outcome = await self._sink.deliver(events)
        self.delivered.update(e.event_id for e in events if e.event_id not in outcome.rejected)
        return outcome


async def test_an_event_the_sink_raises_an_unknown_error_on_is_dead_lettered_alone(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Before the policy, the OverflowError ended the runner (exit 1, then the same batch
    again on every restart). Now: that event alone on the DLQ with reason
    ``unexpected:OverflowError``, its 19 batch-mates delivered once each, offsets committed,
    the runner still running."""
    topic = await make_topics(kafka_bootstrap, partitions=1)
    events = [sms_event() for _ in range(20)]
    culprit = events[7]["id"]
    wrappers: list[RaisesFor] = []

    def wrap(sink: Sink) -> RaisesFor:
        wrappers.append(RaisesFor(sink, {culprit}, OverflowError))
        return wrappers[-1]

    env = consumer_env(
        kafka_bootstrap, topic, WAREHOUSE_URL=f"duckdb:///{tmp_path}/warehouse.duckdb"
    )
    await publish(kafka_bootstrap, topic, events)
    async with InProcessConsumer(env, wrap_sink=wrap) as consumer:
        await wait_until(
            lambda: (
                consumer.metric("onoff_consumer_commits_total", outcome="ok") >= 1
                and consumer.metric("onoff_consumer_dlq_events_total") == 1
            ),
            30,
            "the batch committed with one event dead-lettered",
        )
        assert consumer.task is not None
        assert not consumer.task.done(), "the runner must keep running"
        assert (
            consumer.metric(
                "onoff_consumer_unexpected_errors_total",
                stage="deliver",
                error_type="OverflowError",
            )
            >= 1
        )
        assert consumer.metric("onoff_consumer_events_delivered_total") == 19
        assert consumer.metric("onoff_consumer_ready") == 1
    [sink] = wrappers
    assert sink.delivered == Counter(e["id"] for e in events if e["id"] != culprit)
    assert culprit not in sink.delivered

    [record] = await read_records(kafka_bootstrap, f"{topic}.warehouse.dlq", count=1)
    value = orjson.loads(record.value)
    schemas.validator(schemas.SINK_DLQ_RECORD).validate(value)
    assert value["reason"] == "unexpected:OverflowError"
    assert value["event_id"] == culprit
    assert value["payload"] == events[7]
    assert "out of range" not in value["detail"]  # an exception's text may quote the event


class FailsFirstClaims:
    """A real dedupe store whose first claims raise an error of no known kind (a driver bug,
    a store answering nonsense): not the events' fault, so nothing may be dead-lettered."""

    def __init__(self, store: DedupeStore, failures: int) -> None:
        self._store = store
        self.failures_left = failures

    async def claim(self, ids: Sequence[str]) -> set[str]:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("store answered something unexpected")
        return await self._store.claim(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_an_unknown_error_outside_delivery_is_retried_and_counted_never_fatal(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = await make_topics(kafka_bootstrap, partitions=1)
    events = [sms_event() for _ in range(5)]
    env = consumer_env(
        kafka_bootstrap,
        topic,
        WAREHOUSE_URL=f"duckdb:///{tmp_path}/warehouse.duckdb",
        DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe.sqlite3",
    )
    await publish(kafka_bootstrap, topic, events)
    async with InProcessConsumer(
        env, wrap_dedupe=lambda store: FailsFirstClaims(store, 2)
    ) as consumer:
        await wait_until(
            lambda: consumer.metric("onoff_consumer_events_delivered_total") == 5,
            30,
            "all five delivered after the store recovered",
        )
        assert consumer.task is not None
        assert not consumer.task.done()
        assert (
            consumer.metric(
                "onoff_consumer_unexpected_errors_total", stage="dedupe", error_type="RuntimeError"
            )
            == 2
        )
        assert consumer.metric("onoff_consumer_dlq_events_total") == 0
