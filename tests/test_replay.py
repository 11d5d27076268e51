"""``onoff-consumer <sink> --replay-from …``: a range of ``sms-events`` delivered again to one
sink, against the real broker and PostgreSQL.

Deliveries are counted by a ``BEFORE INSERT`` trigger, which fires for every row the warehouse
proposes, including those its ``ON CONFLICT`` then skips: an id proposed twice shows as 2 even
though the primary key keeps one row.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from consumers.dedupe import SinkDedupe, dedupe_from_url
from consumers.replay import (
    Progress,
    ReplayError,
    ReplaySummary,
    format_offsets,
    parse_position,
    plan_range,
    replay,
    replay_group,
    replay_settings,
    resolve_range,
)
from consumers.settings import ConsumerSettings
from consumers.sinks import SINKS, Delivery, TransientSinkError
from tests.conftest import ROOT, wait_until
from tests.consumer_harness import (
    InProcessConsumer,
    consumer_env,
    make_topics,
    publish,
    wait_for_rows,
)
from tests.fakes.hubspot import DEFAULT_TOKEN, FakeHubSpot
from tests.payloads import sms_event

# --- pure parts ------------------------------------------------------------------------------


@given(st.dictionaries(st.integers(0, 999), st.integers(0, 10**12), min_size=1, max_size=8))
def test_partition_offset_pairs_round_trip(offsets: dict[int, int]) -> None:
    assert parse_position(format_offsets(offsets)) == offsets


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "2026-11-26T00:00:00", "0:1,0:2", "0:1,", "-1:3", "0000-01-01T00:00:00Z"],
)
def test_a_position_that_means_nothing_is_refused_with_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|twice|UTC"):
        parse_position(text)


def test_times_keep_their_offset() -> None:
    at = parse_position("2026-11-26T01:00:00+01:00")
    assert isinstance(at, datetime)
    assert at.astimezone(UTC) == datetime(2026, 11, 26, tzinfo=UTC)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 50),  # beginning
            st.integers(0, 50),  # records held
            st.none() | st.integers(0, 120),  # start asked
            st.none() | st.integers(0, 120),  # until asked
            st.integers(0, 120),  # committed so far
        ),
        min_size=1,
        max_size=5,
    )
)
def test_a_planned_range_stays_within_what_kafka_holds_and_resumes_without_gap(
    parts: list[tuple[int, int, int | None, int | None, int]],
) -> None:
    beginnings = {p: b for p, (b, *_) in enumerate(parts)}
    ends = {p: b + n for p, (b, n, *_) in enumerate(parts)}
    plan = plan_range(
        "t",
        beginnings,
        ends,
        {p: s for p, (_, _, s, _, _) in enumerate(parts)},
        {p: u for p, (_, _, _, u, _) in enumerate(parts)},
    )
    committed = {p: c for p, (*_, c) in enumerate(parts)}
    for p, beginning in beginnings.items():
        assert beginning <= plan.start[p] <= plan.until[p] <= ends[p]
    resume = plan.resume_from(committed)
    assert plan.done(committed) + sum(plan.until[p] - o for p, o in resume.items()) == plan.total
    for p, offset in resume.items():
        assert plan.start[p] <= offset < plan.until[p]


def test_a_partition_the_topic_lacks_is_refused() -> None:
    with pytest.raises(ReplayError, match="no partition 7"):
        plan_range("t", {0: 0}, {0: 5}, {7: 0}, None)


def test_replay_groups_are_their_own() -> None:
    group = replay_group("crm", datetime(2026, 11, 27, 9, 5, 1, tzinfo=UTC))
    assert group == "onoff-crm-replay-20261127T090501Z"


# --- against the real broker and PostgreSQL ------------------------------------------------

AUDIT = """
CREATE TABLE IF NOT EXISTS {s}.proposed (id text, at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION {s}.count_proposed() RETURNS trigger AS $$
BEGIN INSERT INTO {s}.proposed (id) VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS proposed ON {s}.sms_events;
CREATE TRIGGER proposed BEFORE INSERT ON {s}.sms_events
  FOR EACH ROW EXECUTE FUNCTION {s}.count_proposed();
TRUNCATE {s}.proposed;
"""


async def sql(url: str, statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statements)
    finally:
        await conn.close()


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def proposed(url: str, schema: str) -> dict[str, int]:
    """How many times each id was proposed to the table since the audit was installed."""
    rows = await fetch(url, f"SELECT id, count(*) AS n FROM {schema}.proposed GROUP BY id")  # noqa: S608
    return {r["id"]: r["n"] for r in rows}


async def filled_warehouse(
    bootstrap: str, url: str, schema: str, waves: Sequence[int], pause: float = 1.2
) -> tuple[str, dict[str, str], list[list[str]], list[datetime]]:
    """Publish ``waves`` of events (a pause between them, each wave's start time kept), let
    the live warehouse consumer deliver them all, then count proposals from here on."""
    topic = await make_topics(bootstrap)
    env = consumer_env(bootstrap, topic, WAREHOUSE_URL=url, WAREHOUSE_SCHEMA=schema)
    ids: list[list[str]] = []
    starts: list[datetime] = []
    for i, size in enumerate(waves):
        if i:
            await asyncio.sleep(pause)
        starts.append(datetime.now(UTC))
        events = [sms_event() for _ in range(size)]
        ids.append([e["id"] for e in events])
        await publish(bootstrap, topic, events)
    async with InProcessConsumer(env):
        await wait_for_rows(url, schema, sum(waves))
    await sql(url, AUDIT.format(s=schema))
    return topic, env, ids, starts


async def run_replay(env: Mapping[str, str], start: Any, until: Any = None) -> ReplaySummary:
    settings = replay_settings(ConsumerSettings.from_env("warehouse", env))
    sink = SINKS["warehouse"](env, CollectorRegistry())
    dedupe = dedupe_from_url(settings.dedupe_url, "onoff-warehouse", 3600, sink)
    plan = await resolve_range(settings.kafka, settings.topic, start, until)
    return await replay(settings, sink, dedupe, plan)


async def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> list[int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return [await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)]
    finally:
        await consumer.stop()


async def test_a_time_window_replayed_into_an_emptied_table_brings_every_row_back_once(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str
) -> None:
    """Three waves; the table emptied (a bad migration); the middle wave's window replayed:
    exactly its rows come back, each proposed once, and the live group's offsets stay."""
    topic, env, ids, starts = await filled_warehouse(
        kafka_bootstrap, postgres_url, pg_schema, [15, 40, 15]
    )
    live_before = await committed(kafka_bootstrap, env["CONSUMER_GROUP"], topic)
    await sql(postgres_url, f"DELETE FROM {pg_schema}.sms_events")  # noqa: S608

    summary = await run_replay(env, starts[1], starts[2])

    assert summary.complete
    assert summary.group_id.startswith("onoff-warehouse-replay-")
    assert (summary.read, summary.delivered, summary.already_present) == (40, 40, 0)
    assert summary.dead_lettered == 0
    assert await proposed(postgres_url, pg_schema) == dict.fromkeys(ids[1], 1)
    rows = await fetch(postgres_url, f"SELECT id FROM {pg_schema}.sms_events")  # noqa: S608
    assert sorted(r["id"] for r in rows) == sorted(ids[1])
    assert await committed(kafka_bootstrap, env["CONSUMER_GROUP"], topic) == live_before
    # The replay's own group ends at the window's end: 15 + 40 records in.
    assert sum(await committed(kafka_bootstrap, summary.group_id, topic)) == 55


async def test_a_replay_into_a_full_warehouse_inserts_nothing_and_counts_it_present(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str
) -> None:
    """The dedupe answer is bypassed, so each event reaches the sink (one proposal each), and
    the table's key turns every one away: 0 inserted, all counted as already present. The dry
    run before it reads the same range and proposes nothing."""
    _, env, ids, starts = await filled_warehouse(kafka_bootstrap, postgres_url, pg_schema, [30])
    everything = starts[0] - timedelta(minutes=1)

    dry = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consumers", "warehouse", "--replay-from",
         everything.isoformat(), "--dry-run"],
        cwd=ROOT, env=_process_env(env), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr.decode()
    counted = orjson.loads(dry.stdout.splitlines()[-1])
    assert counted | {"sink": "warehouse"} == {
        "sink": "warehouse",
        "dry_run": True,
        "total": 30,
        "records": 30,
        "event_ids": 30,
        "poison": 0,
    }
    assert await proposed(postgres_url, pg_schema) == {}

    summary = await run_replay(env, everything)
    assert summary.complete
    assert (summary.read, summary.delivered, summary.already_present) == (30, 0, 30)
    assert await proposed(postgres_url, pg_schema) == dict.fromkeys(ids[0], 1)


def _process_env(env: Mapping[str, str]) -> dict[str, str]:
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAFKA_", "CONSUMER_", "WAREHOUSE_", "DEDUPE_"))
    }
    return full | dict(env)


SLOW_INSERTS = """
CREATE OR REPLACE FUNCTION {s}.slow() RETURNS trigger AS $$
BEGIN PERFORM pg_sleep(0.15); RETURN NULL; END $$ LANGUAGE plpgsql;
CREATE TRIGGER slow BEFORE INSERT ON {s}.sms_events
  FOR EACH STATEMENT EXECUTE FUNCTION {s}.slow();
"""


async def test_ctrl_c_mid_replay_then_resume_leaves_no_gap_and_no_double(
    kafka_bootstrap: str, postgres_url: str, pg_schema: str
) -> None:
    """The real command, interrupted with SIGINT while it delivers (inserts slowed to make the
    moment wide), prints where to resume; the resume command delivers the rest: every id
    proposed exactly once over the two runs."""
    _, env, ids, starts = await filled_warehouse(kafka_bootstrap, postgres_url, pg_schema, [300])
    await sql(postgres_url, f"DELETE FROM {pg_schema}.sms_events")  # noqa: S608
    await sql(postgres_url, SLOW_INSERTS.format(s=pg_schema))
    slow_env = dict(env, CONSUMER_MAX_BATCH="10")
    command = [sys.executable, "-m", "consumers", "warehouse"]
    first = await asyncio.create_subprocess_exec(
        *command,
        "--replay-from",
        (starts[0] - timedelta(seconds=5)).isoformat(),
        cwd=ROOT,
        env=_process_env(slow_env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(await proposed(postgres_url, pg_schema)) < 60:
            assert first.returncode is None, "the replay ended before it was interrupted"
            assert time.monotonic() < deadline, "the replay did not start delivering"
            await asyncio.sleep(0.1)
        first.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(first.communicate(), 60)
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert first.returncode == 130, err.decode()
    interrupted = orjson.loads(out.splitlines()[-1])
    assert interrupted["complete"] is False
    assert 60 <= interrupted["delivered"] < 300
    assert b"resume with: onoff-consumer warehouse --replay-from" in err

    resume = interrupted["resume"].split()[2:]  # after "onoff-consumer warehouse"
    second = await asyncio.to_thread(
        subprocess.run,
        [*command, *resume],
        cwd=ROOT,
        env=_process_env(env),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 0, second.stderr.decode()
    resumed = orjson.loads(second.stdout.splitlines()[-1])
    assert resumed["complete"] is True
    assert resumed["already_present"] == 0
    assert interrupted["delivered"] + resumed["delivered"] == 300
    assert await proposed(postgres_url, pg_schema) == dict.fromkeys(ids[0], 1)


async def test_a_crm_replay_logs_nothing_twice_and_counts_what_hubspot_holds(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The CRM's idempotency is HubSpot's own: its ``onoff_event_id`` property. Replaying SMS
    already logged creates no communication and counts each as already present; one SMS the
    live service never logged (its contact added since) is logged once."""
    hubspot = FakeHubSpot()
    await hubspot.start()
    try:
        hubspot.seed_contact({"firstname": "Known", "phone": "+33612345678"})
        topic = await make_topics(kafka_bootstrap, sink="crm")
        env = consumer_env(
            kafka_bootstrap,
            topic,
            HUBSPOT_TOKEN=DEFAULT_TOKEN,
            HUBSPOT_BASE_URL=hubspot.base_url,
            DEDUPE_URL=f"sqlite:///{tmp_path}/dedupe.sqlite3",
        )
        known = [sms_event(externalNumber="+33612345678") for _ in range(5)]
        later = sms_event(externalNumber="+33698765432")
        started = datetime.now(UTC) - timedelta(seconds=5)
        await publish(kafka_bootstrap, topic, [*known, later])
        async with InProcessConsumer(env, sink_name="crm") as live:
            await wait_until(
                lambda: live.metric("onoff_consumer_events_consumed_total") == 6,
                30,
                "6 SMS read by the live CRM service",
            )
            await wait_until(lambda: len(hubspot.communications) == 5, 20, "5 communications")
        hubspot.seed_contact({"firstname": "Later", "phone": "+33698765432"})

        settings = replay_settings(ConsumerSettings.from_env("crm", env))
        sink = SINKS["crm"](env, CollectorRegistry())
        dedupe = dedupe_from_url(settings.dedupe_url, "onoff-crm", 3600, sink)
        plan = await resolve_range(settings.kafka, settings.topic, started, None)
        summary = await replay(settings, sink, dedupe, plan)

        assert summary.complete
        assert (summary.read, summary.delivered, summary.already_present) == (6, 1, 5)
        by_event = Counter(c.properties["onoff_event_id"] for c in hubspot.communications)
        assert by_event == Counter({e["id"]: 1 for e in [*known, later]})
    finally:
        await hubspot.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    screen = Terminal()
    bar = Progress(200, screen)
    bar.update(50)
    bar.update(200)
    bar.close()
    assert "200/200" in screen.getvalue()
    assert "event" in screen.getvalue()

    caplog.set_level(logging.INFO, "consumers.replay")
    lines = Progress(200, io.StringIO())
    lines.update(50)  # the first report comes at once, then one per PROGRESS_LOG_SECONDS
    lines.update(60)
    lines.update(200)  # and the last one
    reports = [r for r in caplog.records if r.getMessage() == "replay_progress"]
    assert len(reports) == 2
    assert [r.fields["done"] for r in reports] == [50, 200]  # type: ignore[attr-defined]
    assert reports[0].fields["total"] == 200  # type: ignore[attr-defined]


class FailsFromTheThirdBatch:
    """A sink that takes two batches, then is down (transient): the third batch retries."""

    name = "warehouse"
    idempotent_by_key = True
    # As the warehouse: the next batch is read while this one is delivered, so the end of the
    # range is seen while the last batch still retries.
    overlapping_batches = True

    def __init__(self) -> None:
        self.batches = 0
        self.delivered: list[str] = []

    async def start(self) -> None:
        return None

    async def deliver(self, events: Sequence[Any]) -> Delivery:
        self.batches += 1
        if self.batches >= 3:
            raise TransientSinkError("down")
        self.delivered += [e.event_id for e in events]
        return Delivery()

    async def close(self) -> None:
        return None


async def test_a_stop_while_the_last_batch_retries_is_not_complete_and_resumes_it(
    kafka_bootstrap: str,
) -> None:
    """The whole range was read (the end reached) but its last batch was still retrying when
    the stop came: the summary must say incomplete and resume from that batch, never claim
    the range delivered (a re-drive would then mark it done in its ledger)."""
    topic = await make_topics(kafka_bootstrap, partitions=1)
    events = [sms_event() for _ in range(30)]
    await publish(kafka_bootstrap, topic, events)
    env = consumer_env(kafka_bootstrap, topic, CONSUMER_MAX_BATCH="10", DEDUPE_URL="sink")
    settings = replay_settings(ConsumerSettings.from_env("warehouse", env))
    sink = FailsFromTheThirdBatch()
    plan = await resolve_range(settings.kafka, topic, {0: 0}, None)
    stop = asyncio.Event()

    async def stop_once_retrying() -> None:
        # The third batch failed at least twice: it is retrying.
        await wait_until(lambda: sink.batches >= 4, 30, "the third batch to retry")
        await asyncio.sleep(1.5)  # and the fetch after it found the end of the range
        stop.set()

    stopper = asyncio.create_task(stop_once_retrying())
    summary = await asyncio.wait_for(replay(settings, sink, SinkDedupe(), plan, stop=stop), 60)
    await stopper
    assert sink.delivered == [e["id"] for e in events[:20]]
    assert summary.complete is False
    assert summary.resume_from == {0: 20}
    assert summary.as_json()["resume"].endswith("--replay-from 0:20 --until 0:30")
