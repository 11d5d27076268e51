"""The independent checker: what is where, read with clients that are not ours.

* The topics are read with Kafka's own console consumer and ``GetOffsetShell`` from the jars
  ``scripts/kafka.sh`` fetched — not aiokafka, not our runner — and the count read is compared
  with the partitions' end offsets, so a short read cannot pass for a complete one.
* The warehouse: PostgreSQL's rows, and a count of insert attempts per id kept by triggers the
  checker installs before the load (``install_attempt_counters``): a second insert of an id
  would be counted even where a primary key hides it.
* The CRM: the HubSpot fake's stored communications and its log of successful creates.
* Alerts: Alertmanager's own count of alerts received (``alertmanager_alerts_received_total``)
  and its ``/api/v2/alerts``.

It then states each property on one line and returns them with the figures as JSON.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson

from tests.fault.cluster import ALERT_RULE, Cluster
from tests.fault.sender import ALERT_WORD, SendResult
from tests.services import KAFKA_SCRIPT

KEY_SEPARATOR = "\t|onoff-fault|\t"

ATTEMPT_COUNTERS = """
CREATE TABLE IF NOT EXISTS public.fault_insert_attempts (
    id text NOT NULL, inserted boolean NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION public.fault_proposed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.fault_insert_attempts (id, inserted) VALUES (NEW.id, false); RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION public.fault_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.fault_insert_attempts (id, inserted) VALUES (NEW.id, true); RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS fault_proposed ON public.sms_events;
DROP TRIGGER IF EXISTS fault_inserted ON public.sms_events;
CREATE TRIGGER fault_proposed BEFORE INSERT ON public.sms_events
    FOR EACH ROW EXECUTE FUNCTION public.fault_proposed();
CREATE TRIGGER fault_inserted AFTER INSERT ON public.sms_events
    FOR EACH ROW EXECUTE FUNCTION public.fault_inserted();
"""


async def install_attempt_counters(postgres_url: str) -> None:
    """Count every row the warehouse proposes (BEFORE INSERT, so rows an ``ON CONFLICT DO
    NOTHING`` then skips count too) and every row it actually writes (AFTER INSERT). Rolled-back
    attempts leave no trace, as they left no row."""
    conn = await asyncpg.connect(postgres_url)
    try:
        # The warehouse consumer makes the table at start (its migrations): wait for it.
        for _ in range(300):
            if await conn.fetchval("SELECT to_regclass('public.sms_events')") is not None:
                break
            await asyncio.sleep(0.1)
        await conn.execute(ATTEMPT_COUNTERS)
    finally:
        await conn.close()


@dataclass
class TopicRecord:
    partition: int
    offset: int
    key: str | None
    value: bytes


async def _java_tool(*args: str, limit_seconds: float = 180) -> str:
    process = await asyncio.create_subprocess_exec(
        str(KAFKA_SCRIPT),
        "class",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), limit_seconds)
    if process.returncode not in (0, None):
        raise RuntimeError(f"{args[0]} failed: {err.decode(errors='replace')[-2000:]}")
    return out.decode()


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Each partition's end offset, by Kafka's GetOffsetShell."""
    out = await _java_tool(
        "org.apache.kafka.tools.GetOffsetShell",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--time",
        "-1",
    )
    ends: dict[int, int] = {}
    for line in out.splitlines():
        name, partition, offset = line.rsplit(":", 2)
        if name == topic:
            ends[int(partition)] = int(offset)
    return ends


async def read_topic(bootstrap: str, topic: str) -> list[TopicRecord]:
    """Every record of ``topic`` up to the end offsets read first, by Kafka's console consumer,
    one partition at a time (concurrently); raises when fewer were read than those offsets say
    exist (no transactions, so offsets are dense). Reading each partition up to its own end
    offset keeps the read exact while the topic still grows (a request a client gave up on,
    written late): one read of "the first N records of the topic" may swap a partition's last
    records for another's late ones (seen in the soak)."""
    ends = await end_offsets(bootstrap, topic)
    parts = await asyncio.gather(
        *(_read_partition(bootstrap, topic, p, end) for p, end in sorted(ends.items()) if end)
    )
    return [record for part in parts for record in part]


async def _read_partition(
    bootstrap: str, topic: str, partition: int, end: int
) -> list[TopicRecord]:
    out = await _java_tool(
        "org.apache.kafka.tools.consumer.ConsoleConsumer",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--partition",
        str(partition),
        "--offset",
        "earliest",
        "--max-messages",
        str(end),
        "--timeout-ms",
        "30000",
        "--formatter-property",
        "print.key=true",
        "--formatter-property",
        "print.offset=true",
        "--formatter-property",
        f"key.separator={KEY_SEPARATOR}",
        "--formatter-property",
        "null.literal=<null>",
    )
    records: list[TopicRecord] = []
    # Each line: "Offset:O<sep>KEY<sep>VALUE"; values are one-line JSON.
    for line in out.splitlines():
        fields = line.split(KEY_SEPARATOR)
        if len(fields) != 3:
            continue
        offset, key, value = fields
        records.append(
            TopicRecord(
                partition,
                int(offset.removeprefix("Offset:")),
                None if key == "<null>" else key,
                value.encode(),
            )
        )
    if len(records) != end:
        raise RuntimeError(f"{topic}-{partition}: read {len(records)} records, the end says {end}")
    return records


@dataclass
class Property:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class SinkFigures:
    delivered: int = 0  # ids present once in the sink's store
    missing: int = 0  # ids in the topic found neither in the store nor on the sink's DLQ
    missing_ids: list[str] = field(default_factory=list)  # a few of them (the suite's own ids)
    twice: int = 0  # ids the sink wrote more than once
    dead_lettered: int = 0
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    attempts: int = 0  # writes the sink made, counted outside it
    extra_attempts: int = 0  # attempts beyond one per id (absorbed, or not, by the store)


@dataclass
class Verdict:
    properties: list[Property]
    figures: dict[str, Any]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.properties)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "properties": [asdict(p) for p in self.properties],
            "figures": self.figures,
        }


def _sample(ids: Iterable[str], n: int = 3) -> str:
    some = sorted(ids)[:n]
    return ", ".join(some) + (" …" if len(some) == n else "")


def _event_ids(records: list[TopicRecord]) -> tuple[Counter[str], set[str]]:
    """ids on the events topic (with how many records each) and those whose body is an alert."""
    ids: Counter[str] = Counter()
    alerts: set[str] = set()
    for r in records:
        try:
            event = orjson.loads(r.value)
        except orjson.JSONDecodeError:
            continue
        event_id = str(event.get("id"))
        ids[event_id] += 1
        if ALERT_WORD in str(event.get("body", "")):
            alerts.add(event_id)
    return ids, alerts


async def _dlq(bootstrap: str, topic: str) -> dict[str, str]:
    """event_id → reason on a sink's DLQ."""
    found: dict[str, str] = {}
    for r in await read_topic(bootstrap, topic):
        record = orjson.loads(r.value)
        found[str(record.get("event_id"))] = str(record.get("reason"))
    return found


async def _warehouse(url: str) -> tuple[Counter[str], Counter[str], Counter[str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = Counter(str(r["id"]) for r in await conn.fetch("SELECT id FROM public.sms_events"))
        inserted: Counter[str] = Counter()
        proposed: Counter[str] = Counter()
        for r in await conn.fetch("SELECT id, inserted FROM public.fault_insert_attempts"):
            (inserted if r["inserted"] else proposed)[str(r["id"])] += 1
        return rows, inserted, proposed
    finally:
        await conn.close()


async def _alertmanager_received(url: str) -> tuple[float, int]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(url + "/metrics") as response:
            text = await response.text()
        received = sum(
            float(m.group(1))
            for m in re.finditer(
                r'^alertmanager_alerts_received_total\{[^}]*status="firing"[^}]*\} (\S+)$',
                text,
                re.MULTILINE,
            )
        )
        async with http.get(
            url + "/api/v2/alerts", params={"filter": f'rule="{ALERT_RULE}"'}
        ) as response:
            held = len(await response.json())
    return received, held


async def check(cluster: Cluster, sent: SendResult) -> Verdict:
    """Read every store and state the properties."""
    bootstrap = cluster.kafka.bootstrap
    properties: list[Property] = []
    figures: dict[str, Any] = {"sender": sent.to_json()}

    records = await read_topic(bootstrap, cluster.topic)
    in_topic, alert_ids = _event_ids(records)
    gateway_dlq = await read_topic(bootstrap, f"{cluster.topic}.dlq")
    figures["topic"] = {
        "records": len(records),
        "unique_ids": len(in_topic),
        "records_beyond_one_per_id": len(records) - len(in_topic),
        "gateway_dlq_records": len(gateway_dlq),
    }

    lost = sent.acknowledged - set(in_topic)
    properties.append(
        Property(
            "acknowledged-is-durable",
            not lost,
            f"{len(sent.acknowledged)} ids got a 200; {len(lost)} of them are not in the topic"
            + (f" ({_sample(lost)})" if lost else ""),
        )
    )
    strangers = set(in_topic) - set(sent.sent_ids)
    properties.append(
        Property(
            "nothing-invented",
            not strangers,
            f"{len(strangers)} ids in the topic were never sent",
        )
    )
    properties.append(
        Property(
            "no-schema-rejects",
            not gateway_dlq,
            f"{len(gateway_dlq)} records on the gateway's DLQ (every event sent is valid)",
        )
    )
    figures["lost"] = len(lost)
    figures["gave_up"] = len(sent.gave_up)
    figures["gave_up_but_in_topic"] = len(sent.gave_up & set(in_topic))

    readers = {"warehouse": _check_warehouse, "crm": _check_crm, "alerts": _check_alerts}
    sinks: dict[str, SinkFigures] = {}
    for name in cluster.sinks:
        dlq = await _dlq(bootstrap, f"{cluster.topic}.{name}.dlq")
        sinks[name] = await readers[name](cluster, in_topic, alert_ids, dlq)
        sinks[name].dead_lettered = len(dlq)
        sinks[name].dlq_reasons = dict(Counter(dlq.values()))

    for name, f in sinks.items():
        properties.append(
            Property(
                f"{name}: every event delivered or dead-lettered",
                f.missing == 0,
                f"{f.delivered} delivered, {f.dead_lettered} on its DLQ, {f.missing} in no place"
                + (f" ({', '.join(f.missing_ids)})" if f.missing_ids else ""),
            )
        )
        if name == "crm":
            properties.append(
                Property(
                    "crm: no event written twice",
                    f.twice == 0,
                    f"{f.twice} ids with more than one communication; {f.attempts} successful "
                    f"creates, {f.extra_attempts} beyond one per id",
                )
            )
        elif name == "warehouse":
            # The primary key makes a second row impossible; what the sink proposed is counted
            # (BEFORE INSERT) and shown, so a change that leans on the key more is visible.
            properties.append(
                Property(
                    "warehouse: one row per id",
                    f.twice == 0,
                    f"{f.twice} ids inserted more than once; {f.attempts} rows proposed, "
                    f"{f.extra_attempts} beyond one per id (Onoff's copies and batches read "
                    "again, absorbed by the primary key)",
                )
            )
    figures["sinks"] = {name: asdict(f) for name, f in sinks.items()}
    figures["delivered_twice"] = {name: f.twice for name, f in sinks.items()}
    figures["dead_lettered"] = {name: f.dead_lettered for name, f in sinks.items()}
    figures["missing"] = {name: f.missing for name, f in sinks.items()}
    return Verdict(properties, figures)


async def _check_warehouse(
    cluster: Cluster, in_topic: Counter[str], _: set[str], dlq: dict[str, str]
) -> SinkFigures:
    f = SinkFigures()
    rows, inserted, proposed = await _warehouse(cluster.postgres.url)
    for event_id in in_topic:
        if rows[event_id] == 1:
            f.delivered += 1
        elif event_id not in dlq:
            f.missing += 1
            f.missing_ids = sorted([*f.missing_ids, event_id])[:5]
    # Rows are unique by the primary key: the AFTER INSERT count sees a second write anyway.
    f.twice = sum(1 for n in inserted.values() if n > 1) + sum(1 for n in rows.values() if n > 1)
    f.attempts = sum(proposed.values())
    f.extra_attempts = sum(n - 1 for n in proposed.values() if n > 1)
    return f


async def _check_crm(
    cluster: Cluster, in_topic: Counter[str], _: set[str], dlq: dict[str, str]
) -> SinkFigures:
    f = SinkFigures()
    state: Any = await cluster.hubspot_call("/__fault/state")
    stored: dict[str, int] = state["communications"]
    creates: dict[str, int] = state["successful_creates"]
    for event_id in in_topic:
        if stored.get(event_id, 0) >= 1:
            f.delivered += 1
        elif event_id not in dlq:
            f.missing += 1
            f.missing_ids = sorted([*f.missing_ids, event_id])[:5]
    # The fake has no unique key: a second create is a second communication on the timeline.
    f.twice = sum(1 for n in stored.values() if n > 1)
    f.attempts = sum(creates.values())
    f.extra_attempts = sum(n - 1 for n in creates.values() if n > 1)
    return f


async def _check_alerts(
    cluster: Cluster, _: Counter[str], alert_ids: set[str], dlq: dict[str, str]
) -> SinkFigures:
    f = SinkFigures()
    received, held = await _alertmanager_received(cluster.alertmanager_url)
    expected = len(alert_ids - set(dlq))
    # Alertmanager keeps one alert per label set (rule, sender), so ids cannot be matched one
    # by one: the count of alerts it received is compared with the matching events, and it
    # must hold the rule's alerts.
    f.attempts = int(received)
    f.delivered = min(expected, int(received))
    f.missing = max(0, expected - int(received))
    if expected and not held:
        f.missing = max(f.missing, 1)
    f.extra_attempts = max(0, int(received) - expected)
    f.twice = f.extra_attempts
    return f
