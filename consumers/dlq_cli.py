"""``onoff-dlq``: what sits on the dead-letter topics, without jq and without reading bodies.

    onoff-dlq stats [--topic T …]                      counts by topic, reason, key label, day
    onoff-dlq show TOPIC:PARTITION:OFFSET [--show-values]   one record, values masked

The topics are ``sms-events.dlq`` (the gateway's) and ``sms-events.<sink>.dlq`` for each
sink, named from ``KAFKA_TOPIC``. Kafka is reached with the services' own settings
(``KAFKA_*``, SASL/TLS). Values from a body (numbers, e-mails, messages) are masked unless
``--show-values`` is given: a string becomes ``<str 12>``, a number ``<num>``; keys, reasons,
ids and times are shown. Re-driving records is the next step of this tool (docs/operations.md
keeps the manual procedure meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from consumers.sinks import SINKS
from onoff_events import settings as s
from onoff_events.kafka import KafkaSettings, topic_partitions

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
READ_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class DlqRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


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


def summary(records: Sequence[DlqRecord]) -> list[dict[str, Any]]:
    """Counts by topic, reason, key label and UTC day (of the record's Kafka timestamp)."""
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for record in records:
        try:
            body = orjson.loads(record.value or b"")
        except orjson.JSONDecodeError:
            body = None
        fields: Mapping[str, Any] = body if isinstance(body, dict) else {}
        headers = dict(record.headers)
        label = fields.get("key_label") or headers.get("ce_keylabel", b"").decode(errors="replace")
        day = _day(record.timestamp_ms)
        counts[(record.topic, str(fields.get("reason", "unreadable")), str(label or "-"), day)] += 1
    return [
        {"topic": t, "reason": r, "key_label": k, "day": d, "records": n}
        for (t, r, k, d), n in sorted(counts.items())
    ]


def _day(timestamp_ms: int) -> str:
    from datetime import UTC, datetime  # noqa: PLC0415 # only the CLI formats days

    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).date().isoformat()


def dlq_topics(env: Mapping[str, str]) -> list[str]:
    events = s.text(env, "KAFKA_TOPIC", "sms-events")
    return [s.text(env, "KAFKA_DLQ_TOPIC", f"{events}.dlq")] + [
        f"{events}.{sink}.dlq" for sink in SINKS
    ]


async def read_all(kafka: KafkaSettings, topics: Sequence[str]) -> list[DlqRecord]:
    """Every record of ``topics`` up to their end offsets when called (topics that do not
    exist are skipped), read without a consumer group: nothing is committed."""
    found = await topic_partitions(kafka, topics)
    partitions = [TopicPartition(topic, p) for topic in topics for p in found.get(topic, [])]
    return await _read(kafka, partitions, None)


async def read_one(kafka: KafkaSettings, where: TopicPartition, offset: int) -> DlqRecord | None:
    found = await _read(kafka, [where], offset, limit=1)
    return found[0] if found and found[0].offset == offset else None


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
                ]
            if limit is not None and len(out) >= limit:
                break
    return out


def _parse_where(text: str) -> tuple[TopicPartition, int]:
    topic, _, rest = text.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic or not partition.isdigit() or not rest.isdigit():
        raise ValueError("expected TOPIC:PARTITION:OFFSET, e.g. sms-events.dlq:0:42")
    return TopicPartition(topic, int(partition)), int(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onoff-dlq", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="counts by topic, reason, key label and day")
    stats.add_argument("--topic", action="append", help="a DLQ topic (default: all of them)")
    show = commands.add_parser("show", help="one record, values masked")
    show.add_argument("where", help="TOPIC:PARTITION:OFFSET")
    show.add_argument("--show-values", action="store_true", help="print the body's values")
    args = parser.parse_args(argv)
    try:
        kafka = KafkaSettings.from_env(os.environ, client_id="onoff-dlq")
        topics = args.topic if args.command == "stats" and args.topic else dlq_topics(os.environ)
        where = _parse_where(args.where) if args.command == "show" else None
    except (s.SettingsError, ValueError) as exc:
        print(f"onoff-dlq: {exc}", file=sys.stderr)
        return 2
    try:
        if where is None:
            rows = summary(asyncio.run(read_all(kafka, topics)))
            for row in rows:
                print(orjson.dumps(row).decode())
            if not rows:
                print(f"onoff-dlq: no records on {', '.join(topics)}", file=sys.stderr)
            return 0
        record = asyncio.run(read_one(kafka, *where))
    except (KafkaError, OSError, TimeoutError) as exc:
        print(f"onoff-dlq: Kafka: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if record is None:
        print(f"onoff-dlq: no record at {args.where}", file=sys.stderr)
        return 1
    shown_record = shown(record, show_values=args.show_values)
    print(orjson.dumps(shown_record, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
