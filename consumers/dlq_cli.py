"""``onoff-dlq``: what sits on the dead-letter topics, and sending it back, without jq.

    onoff-dlq stats [--topic T …] [filters]            counts by topic, reason, key label, day
    onoff-dlq list [--topic T …] [filters]             one line per record (no body)
    onoff-dlq show TOPIC:PARTITION:OFFSET [--show-values]   one record, values masked
    onoff-dlq redrive [--topic T] [filters] [--dry-run]     send records back where they belong

Filters: ``--reason R`` (repeatable), ``--key-label L``, ``--since TIME``, ``--before TIME``
(the DLQ record's time, RFC 3339), ``--offset P:O`` (repeatable, on one topic).

The topics are ``sms-events.dlq`` (the gateway's) and ``sms-events.<sink>.dlq`` for each
sink, named from ``KAFKA_TOPIC``. Kafka is reached with the services' own settings
(``KAFKA_*``, SASL/TLS). Values from a body (numbers, e-mails, messages) are masked unless
``--show-values`` is given: a string becomes ``<str 12>``, a number ``<num>``; keys, reasons,
ids and times are shown.

``redrive`` takes the gateway's DLQ by default: each record is checked against the schema in
force and, if it passes, published on ``sms-events`` with its original id, key and
CloudEvents headers plus ``ce_redriven``. With ``--topic sms-events.<sink>.dlq`` the records'
source events are replayed into that sink only (its settings come from the environment, as
for ``onoff-consumer <sink>``). What was moved is written to the ledger topic
(``sms-events.redriven``): a second re-drive skips it. See consumers/redrive.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from consumers.redrive import (
    DlqRecord,
    Filters,
    Republished,
    ledger_entry,
    recheck,
    replay_sources,
    sink_of,
)
from consumers.replay import ReplayError, parse_position, plan_range, replay, replay_settings
from consumers.service import build_target
from consumers.settings import ConsumerSettings
from consumers.sinks import SINKS, SinkConfigError
from onoff_events import logs
from onoff_events import settings as s
from onoff_events.cloudevents import rfc3339_now
from onoff_events.event_kinds import CALL, KINDS, SMS, EventKind
from onoff_events.kafka import KafkaSettings, topic_partitions
from onoff_events.sms_event import EventChecker

__all__ = ["DlqRecord", "main", "masked", "shown", "summary"]

# Fields of a DLQ record that are ours (never a value from a body): shown as they are.
RECORD_FIELDS = frozenset(
    {
        "dlq_version",
        "stage",
        "reason",
        "detail",
        "event_id",
        "received_at",
        "rejected_at",
        "key_label",
        "source",
        "errors",
    }
)
READ_TIMEOUT_SECONDS = 60.0
SEND_TIMEOUT_SECONDS = 60.0


class RedriveError(Exception):
    """The re-drive cannot start (no ledger topic, a DLQ topic of no known kind)."""


def masked(value: Any) -> Any:
    """``value`` with every string and number replaced by its kind (and a string's length):
    the shape of a body without its content."""
    if isinstance(value, dict):
        return {str(k): masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return f"<str {len(value)}>"
    return "<num>"


def shown(record: DlqRecord, *, show_values: bool) -> dict[str, Any]:
    """One record as the tool prints it: our fields as they are, the body masked."""
    try:
        body = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        body = None
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key.decode(errors="replace") if record.key is not None else None,
        "headers": {k: v.decode(errors="replace") for k, v in record.headers},
    }
    if not isinstance(body, dict):
        raw = record.value or b""
        out["value"] = base64.b64encode(raw).decode() if show_values else f"<bytes {len(raw)}>"
        return out
    for name, field in body.items():
        if name in RECORD_FIELDS or show_values:
            out[name] = field
        else:
            out[name] = masked(field)
    return out


def listed(record: DlqRecord, redriven: bool) -> dict[str, Any]:
    """One line of ``list``: where, when, why; never a value from the body."""
    fields = record.fields()
    return {
        "where": record.where,
        "time": _time(record.timestamp_ms),
        "reason": record.reason(),
        "key_label": record.key_label(),
        "event_id": fields.get("event_id"),
        "redriven": redriven,
    }


def summary(records: Sequence[DlqRecord]) -> list[dict[str, Any]]:
    """Counts by topic, reason, key label and UTC day (of the record's Kafka timestamp)."""
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for record in records:
        day = _time(record.timestamp_ms)[:10]
        counts[(record.topic, record.reason(), record.key_label(), day)] += 1
    return [
        {"topic": t, "reason": r, "key_label": k, "day": d, "records": n}
        for (t, r, k, d), n in sorted(counts.items())
    ]


def _time(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def events_topic(env: Mapping[str, str], kind: EventKind = SMS) -> str:
    """The kind's topic, named as the services name it (``KAFKA_TOPIC``, ``KAFKA_CALL_TOPIC``)."""
    if kind is CALL:
        return s.text(env, "KAFKA_CALL_TOPIC", CALL.topic)
    return s.text(env, "KAFKA_TOPIC", SMS.topic)


def gateway_dlq(env: Mapping[str, str], kind: EventKind = SMS) -> str:
    variable = "KAFKA_CALL_DLQ_TOPIC" if kind is CALL else "KAFKA_DLQ_TOPIC"
    return s.text(env, variable, f"{events_topic(env, kind)}.dlq")


def dlq_topics(env: Mapping[str, str]) -> list[str]:
    """Every DLQ: each kind's gateway DLQ, then its sinks' DLQs."""
    return [
        topic
        for kind in KINDS
        for topic in (
            gateway_dlq(env, kind),
            *(f"{events_topic(env, kind)}.{sink}.dlq" for sink in SINKS),
        )
    ]


def dlq_kind(env: Mapping[str, str], topic: str) -> tuple[EventKind, str | None] | None:
    """What ``topic`` is: a kind's gateway DLQ (kind, None) or a sink's DLQ (kind, sink)."""
    for kind in KINDS:
        if topic == gateway_dlq(env, kind):
            return kind, None
        sink = sink_of(topic, events_topic(env, kind), SINKS)
        if sink is not None:
            return kind, sink
    return None


def ledger_topic(env: Mapping[str, str]) -> str:
    return s.text(env, "KAFKA_REDRIVEN_TOPIC", f"{events_topic(env)}.redriven")


# --- reading ---------------------------------------------------------------------------------


async def read_all(kafka: KafkaSettings, topics: Sequence[str]) -> list[DlqRecord]:
    """Every record of ``topics`` up to their end offsets when called (topics that do not
    exist are skipped), read without a consumer group: nothing is committed."""
    found = await topic_partitions(kafka, topics)
    partitions = [TopicPartition(topic, p) for topic in topics for p in found.get(topic, [])]
    return await _read(kafka, partitions, None)


async def read_one(kafka: KafkaSettings, where: TopicPartition, offset: int) -> DlqRecord | None:
    found = await _read(kafka, [where], offset, limit=1)
    return found[0] if found and found[0].offset == offset else None


async def read_ledger(kafka: KafkaSettings, topic: str) -> set[str]:
    """The DLQ records re-driven so far (``topic:partition:offset``)."""
    found = await topic_partitions(kafka, [topic])
    if topic not in found:
        raise RedriveError(
            f"the ledger topic {topic} does not exist: create it (deploy/k8s/base/kafka/"
            "topics.yaml, or `python -m onoff_events.topics` on a development broker)"
        )
    records = await _read(kafka, [TopicPartition(topic, p) for p in found[topic]], None)
    return {r.key.decode(errors="replace") for r in records if r.key is not None}


async def _read(
    kafka: KafkaSettings,
    partitions: list[TopicPartition],
    start: int | None,
    limit: int | None = None,
) -> list[DlqRecord]:
    """The records of ``partitions`` from ``start`` (None: the beginning) to their end
    offsets, or the first ``limit``; no consumer group, nothing committed."""
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(
        **kafka.client_options(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        return await _read_assigned(consumer, partitions, start, limit)
    finally:
        await consumer.stop()


async def _read_assigned(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    start: int | None,
    limit: int | None,
) -> list[DlqRecord]:
    consumer.assign(partitions)
    ends = await consumer.end_offsets(partitions)
    if start is None:
        # One call for all partitions: seeking them one at a time left the first one at its
        # end offset (seen reading two DLQ topics: its records were never read).
        await consumer.seek_to_beginning(*partitions)
    else:
        for tp in partitions:
            consumer.seek(tp, start)
    out: list[DlqRecord] = []
    async with asyncio.timeout(READ_TIMEOUT_SECONDS):
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out += [
                    DlqRecord(
                        r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers
                    )
                    for r in records
                    if r.offset < ends[TopicPartition(r.topic, r.partition)]
                ]
            if limit is not None and len(out) >= limit:
                break
    return out


# --- re-driving ------------------------------------------------------------------------------


async def redrive(
    env: Mapping[str, str],
    kafka: KafkaSettings,
    topic: str,
    filters: Filters,
    *,
    dry_run: bool,
) -> dict[str, Any]:
    """Re-drive the records of ``topic`` that ``filters`` take and no earlier re-drive moved;
    return the counts."""
    what = dlq_kind(env, topic)
    if what is None:
        raise RedriveError(f"{topic} is not a DLQ topic of this deployment: {dlq_topics(env)}")
    kind, sink = what
    events = events_topic(env, kind)
    ledger = ledger_topic(env)
    done = await read_ledger(kafka, ledger)
    chosen = [r for r in await read_all(kafka, [topic]) if filters.matches(r)]
    todo = [r for r in chosen if r.where not in done]
    counts: dict[str, Any] = {
        "topic": topic,
        "dry_run": dry_run,
        "matched": len(chosen),
        "already_redriven": len(chosen) - len(todo),
    }
    now = rfc3339_now()
    if sink is None:
        checker = EventChecker(kind)
        verdicts = [recheck(r, checker, kind, now) for r in todo]
        moving = [v for v in verdicts if isinstance(v, Republished)]
        counts["still_failing"] = dict(Counter(v for v in verdicts if isinstance(v, str)))
        counts["moved" if not dry_run else "would_move"] = len(moving)
        if not dry_run and moving:
            await _publish(kafka, events, ledger, moving, now)
        return counts
    # The sink's own service settings, for the kind of the DLQ.
    sink_env = {**env, "CONSUMER_EVENT_KIND": kind.name}
    return counts | await _redrive_to_sink(sink_env, sink, todo, ledger, now, dry_run=dry_run)


async def _publish(
    kafka: KafkaSettings,
    events: str,
    ledger: str,
    moving: Sequence[Republished],
    now: str,
) -> None:
    """Publish on the events topic (acks=all, idempotent), then, once all are acknowledged,
    write the ledger: a stop in between re-publishes (the consumers' dedupe drops the copy)
    and never marks a record moved that was not."""
    producer = AIOKafkaProducer(**kafka.client_options(), acks="all", enable_idempotence=True)
    await producer.start()
    try:
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
            sent = [
                await producer.send(events, m.value, key=m.key, headers=m.headers) for m in moving
            ]
            await asyncio.gather(*sent)
            marks = [ledger_entry(m.where, events, now) for m in moving]
            written = [await producer.send(ledger, value, key=key) for key, value in marks]
            await asyncio.gather(*written)
    finally:
        await producer.stop()


async def _redrive_to_sink(
    env: Mapping[str, str],
    sink_name: str,
    todo: Sequence[DlqRecord],
    ledger: str,
    now: str,
    *,
    dry_run: bool,
) -> dict[str, Any]:
    """Replay the source events of ``todo`` into ``sink_name`` only."""
    live = ConsumerSettings.from_env(sink_name, env)
    settings = replay_settings(live)
    events = settings.topic
    sources = replay_sources(todo, events)
    counts: dict[str, Any] = {"sink": sink_name, "no_source": len(todo) - len(sources)}
    if not sources:
        return counts | {"moved" if not dry_run else "would_move": 0}
    found = await topic_partitions(settings.kafka, [events])
    partitions = [TopicPartition(events, p) for p in found.get(events, [])]
    offsets = set(sources.values())
    consumer = AIOKafkaConsumer(**settings.kafka.client_options(), group_id=None)
    await consumer.start()
    try:
        beginnings = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    first = {tp.partition: o for tp, o in beginnings.items()}
    held = {
        o for o in offsets if first.get(o[0], 0) <= o[1] < ends.get(TopicPartition(events, o[0]), 0)
    }
    counts["source_gone"] = len(offsets - held)  # deleted by retention, or never there
    if not held:
        return counts | {"moved" if not dry_run else "would_move": 0}
    plan = plan_range(
        events,
        first,
        {tp.partition: o for tp, o in ends.items()},
        {p: min(o for q, o in held if q == p) for p in {q for q, _ in held}},
        {p: max(o for q, o in held if q == p) + 1 for p in {q for q, _ in held}},
    )
    if dry_run:
        return counts | {"would_move": len(held)}
    sink, dedupe = build_target(live, env, CollectorRegistry())
    result = await replay(settings, sink, dedupe, plan, only=frozenset(held))
    counts |= {
        "moved": result.read,
        "delivered": result.delivered,
        "already_present": result.already_present,
        "dead_lettered_again": result.dead_lettered,
        "complete": result.complete,
    }
    if result.complete:
        moved = [where for where, source in sources.items() if source in held]
        producer = AIOKafkaProducer(**settings.kafka.client_options(), acks="all")
        await producer.start()
        try:
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                marks = [ledger_entry(where, sink_name, now) for where in moved]
                await asyncio.gather(
                    *[await producer.send(ledger, value, key=key) for key, value in marks]
                )
        finally:
            await producer.stop()
    return counts


# --- the command -----------------------------------------------------------------------------


def _parse_where(text: str) -> tuple[TopicPartition, int]:
    topic, _, rest = text.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic or not partition.isdigit() or not rest.isdigit():
        raise ValueError("expected TOPIC:PARTITION:OFFSET, e.g. sms-events.dlq:0:42")
    return TopicPartition(topic, int(partition)), int(rest)


def _moment_ms(text: str) -> int:
    try:
        moment = parse_position(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(moment, datetime):
        raise argparse.ArgumentTypeError(f"expected an RFC 3339 time, got {text!r}")
    return int(moment.timestamp() * 1000)


def _offsets(text: str) -> dict[int, int]:
    try:
        position = parse_position(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(position, dict):
        raise argparse.ArgumentTypeError(f"expected PARTITION:OFFSET, got {text!r}")
    return position


def _filters(args: argparse.Namespace) -> Filters:
    offsets = {pair for chosen in args.offset or () for pair in chosen.items()}
    if offsets and len(args.topic or []) != 1:
        raise ValueError("--offset needs exactly one --topic")
    return Filters(
        reasons=frozenset(args.reason or ()),
        key_label=args.key_label,
        since_ms=args.since,
        before_ms=args.before,
        offsets=frozenset(offsets),
    )


def _redrive_topic(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.topic and len(args.topic) > 1:
        raise ValueError("redrive takes one --topic at a time")
    return str(args.topic[0]) if args.topic else gateway_dlq(env)


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onoff-dlq", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = argparse.ArgumentParser(add_help=False)
    chosen.add_argument("--topic", action="append", help="a DLQ topic (default: all of them)")
    chosen.add_argument("--reason", action="append", help="only records with this reason")
    chosen.add_argument("--key-label", help="only records received with this API key label")
    chosen.add_argument(
        "--since", metavar="TIME", type=_moment_ms, help="only records dead-lettered from TIME"
    )
    chosen.add_argument(
        "--before", metavar="TIME", type=_moment_ms, help="only records dead-lettered before it"
    )
    chosen.add_argument(
        "--offset", action="append", metavar="P:O,…", type=_offsets, help="only these records"
    )
    commands.add_parser("stats", parents=[chosen], help="counts by topic, reason, label and day")
    commands.add_parser("list", parents=[chosen], help="one line per record, no body")
    show = commands.add_parser("show", help="one record, values masked")
    show.add_argument("where", help="TOPIC:PARTITION:OFFSET")
    show.add_argument("--show-values", action="store_true", help="print the body's values")
    again = commands.add_parser(
        "redrive",
        parents=[chosen],
        help="send records back where they belong (default topic: the gateway's DLQ)",
    )
    again.add_argument("--dry-run", action="store_true", help="count; move nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _arguments().parse_args(argv)
    env = os.environ
    # Results on stdout, logs on stderr: warnings only for the read-only commands, progress
    # too for a re-drive (unless LOG_LEVEL says otherwise).
    quiet = "INFO" if args.command == "redrive" else "WARNING"
    try:
        logs.configure(s.log_level(env) if "LOG_LEVEL" in env else quiet, sys.stderr)
        kafka = KafkaSettings.from_env(env, client_id="onoff-dlq")
        if args.command == "show":
            return _show(kafka, *_parse_where(args.where), show_values=args.show_values)
        filters = _filters(args)
        if args.command == "redrive":
            topic = _redrive_topic(args, env)
            counts = asyncio.run(redrive(env, kafka, topic, filters, dry_run=args.dry_run))
            print(orjson.dumps(counts).decode())
            return 0 if counts.get("complete", True) else 130
        topics = args.topic or dlq_topics(env)
        records = [r for r in asyncio.run(read_all(kafka, topics)) if filters.matches(r)]
        if args.command == "list":
            done = asyncio.run(_ledger_or_empty(kafka, ledger_topic(env)))
            rows = [listed(r, r.where in done) for r in records]
        else:
            rows = summary(records)
    except (s.SettingsError, ValueError, SinkConfigError) as exc:
        print(f"onoff-dlq: {exc}", file=sys.stderr)
        return 2
    except (RedriveError, ReplayError) as exc:
        print(f"onoff-dlq: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, OSError, TimeoutError) as exc:
        print(f"onoff-dlq: Kafka: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for row in rows:
        print(orjson.dumps(row).decode())
    if not rows:
        print(f"onoff-dlq: no records on {', '.join(topics)}", file=sys.stderr)
    return 0


async def _ledger_or_empty(kafka: KafkaSettings, topic: str) -> set[str]:
    try:
        return await read_ledger(kafka, topic)
    except RedriveError:
        return set()  # nothing was ever re-driven here


def _show(kafka: KafkaSettings, where: TopicPartition, offset: int, *, show_values: bool) -> int:
    try:
        record = asyncio.run(read_one(kafka, where, offset))
    except (KafkaError, OSError, TimeoutError) as exc:
        print(f"onoff-dlq: Kafka: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if record is None:
        print(f"onoff-dlq: no record at {where.topic}:{where.partition}:{offset}", file=sys.stderr)
        return 1
    print(orjson.dumps(shown(record, show_values=show_values), option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
