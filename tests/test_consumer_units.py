"""The consumers' pure pieces and the dedupe stores (SQLite, and a real Redis)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from consumers.backoff import Backoff
from consumers.dedupe import (
    ClaimHeld,
    DedupeStore,
    RedisDedupe,
    SinkDedupe,
    SqliteDedupe,
    dedupe_from_url,
)
from consumers.metrics import SECONDS_BUCKETS, BatchHistogram
from consumers.records import PoisonRecord, RecordDecoder, SmsRecord, first_of_each_id, next_offsets
from consumers.settings import ConsumerSettings
from consumers.sinks.crm import communication_body, hubspot_timestamp
from consumers.sinks.warehouse import COLUMNS, _duck_row, _split, warehouse_row
from onoff_events.cloudevents import SmsEventHeaders
from onoff_events.sms_event import EventChecker, ValidEvent
from tests.payloads import sms_event


def kafka_record(value: bytes | None, partition: int = 0, offset: int = 0, **kw: Any) -> Any:
    return SimpleNamespace(
        topic="t",
        partition=partition,
        offset=offset,
        key=kw.get("key"),
        value=value,
        headers=kw.get("headers", []),
    )


def test_backoff_grows_exponentially_within_jitter_and_caps() -> None:
    b = Backoff(initial_seconds=1, max_seconds=10, jitter=0.2)
    assert [b.delay(n, unit=0.5) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert b.delay(0, unit=0.0) == pytest.approx(0.8)
    assert b.delay(0, unit=0.999999) == pytest.approx(1.2, rel=1e-3)


def test_backoff_never_retries_before_retry_after() -> None:
    b = Backoff(initial_seconds=1, max_seconds=10)
    assert b.delay(0, retry_after=7, unit=0.5) == 7
    assert b.delay(5, retry_after=2, unit=0.5) == 10


def test_decoder_reads_event_and_gateway_receive_time() -> None:
    event = sms_event()
    headers = SmsEventHeaders("/s").build(
        event["id"], event["date"], "2024-01-02T03:04:05.678Z", "k"
    )
    decoded = RecordDecoder().decode(kafka_record(orjson.dumps(event), 2, 9, headers=headers))
    assert isinstance(decoded, SmsRecord)
    assert (decoded.event_id, decoded.partition, decoded.offset) == (event["id"], 2, 9)
    assert decoded.received_at is not None
    assert decoded.received_at.isoformat() == "2024-01-02T03:04:05.678000+00:00"
    assert decoded.sent_at.isoformat() == "2023-05-20T14:30:00+00:00"


@pytest.mark.parametrize(
    "value",
    [None, b"not json", b"[1]", orjson.dumps(sms_event(smsDirection="X"))],
    ids=["tombstone", "not-json", "array", "schema-violation"],
)
def test_decoder_turns_unusable_values_into_poison_with_a_reason(value: bytes | None) -> None:
    decoded = RecordDecoder().decode(kafka_record(value))
    assert isinstance(decoded, PoisonRecord)
    assert decoded.reason == "invalid_event"
    assert "X" not in decoded.detail.replace("SMS", "")  # the reason quotes no value


def test_first_of_each_id_keeps_order_and_splits_copies() -> None:
    def rec(i: str, offset: int) -> SmsRecord:
        return SmsRecord(i, {}, b"", None, None, "t", 0, offset)  # type: ignore[arg-type]

    unique, copies = first_of_each_id([rec("a", 0), rec("b", 1), rec("a", 2), rec("c", 3)])
    assert [(r.event_id, r.offset) for r in unique] == [("a", 0), ("b", 1), ("c", 3)]
    assert [(r.event_id, r.offset) for r in copies] == [("a", 2)]


def test_next_offsets_is_one_past_the_last_record_per_partition() -> None:
    records = [kafka_record(b"", 0, 5), kafka_record(b"", 1, 7), kafka_record(b"", 0, 6)]
    assert next_offsets(records) == {("t", 0): 7, ("t", 1): 8}


@pytest.fixture(params=["sqlite", "redis"])
async def store_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Two consumers' handles on one store (one namespace)."""
    namespace = f"ns-{tmp_path.name}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/dedupe.sqlite3"
        stores: list[DedupeStore] = [dedupe_from_url(url, namespace, 3600) for _ in range(2)]
        assert all(isinstance(s, SqliteDedupe) for s in stores)
    else:
        url = request.getfixturevalue("redis_url")
        stores = [dedupe_from_url(url, namespace, 3600) for _ in range(2)]
        assert all(isinstance(s, RedisDedupe) for s in stores)
    yield stores
    for store in stores:
        await store.close()


async def test_dedupe_claim_confirm_release_and_takeover(store_pair: list[DedupeStore]) -> None:
    first, second = store_pair
    assert await first.claim(["a", "b", "c"]) == set()
    await first.confirm(["a"])
    await first.release(["c"])
    # "a" is done; "b" is claimed by the first consumer, who died: the second takes it over.
    assert await second.claim(["a", "b", "c", "d"]) == {"a"}
    await second.confirm(["b", "c", "d"])
    assert await first.claim(["a", "b", "c", "d", "e"]) == {"a", "b", "c", "d"}
    # Releasing never undoes a done mark, nor another consumer's claim.
    await first.release(["a", "e"])
    assert await second.claim(["a"]) == {"a"}
    await first.ping()


@pytest.fixture(params=["sqlite", "redis"])
async def leased_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Two consumers' handles on one store whose leases settle for 1.5 s (as the CRM's do)."""
    namespace = f"lease-{tmp_path.name}"
    url = (
        f"sqlite:///{tmp_path}/dedupe.sqlite3"
        if request.param == "sqlite"
        else request.getfixturevalue("redis_url")
    )
    settling = SimpleNamespace(takeover_settle_seconds=1.5)
    stores = [dedupe_from_url(url, namespace, 3600, settling) for _ in range(2)]
    yield stores
    for store in stores:
        await store.close()


async def test_a_young_lease_of_another_consumer_is_waited_out_never_taken_over(
    leased_pair: list[DedupeStore],
) -> None:
    """While its owner renews it, a lease holds off every other consumer (nothing claimed,
    a wait hinted); released or not, it is taken over only once it is older than the settle
    time; done marks answer at once as ever."""
    first, second = leased_pair
    assert await first.claim(["a", "b"]) == set()
    await first.confirm(["a"])
    with pytest.raises(ClaimHeld) as held:
        await second.claim(["a", "b", "c"])
    assert 0 < held.value.retry_after <= 1.5
    await asyncio.sleep(1.0)
    await first.refresh(["b"])  # the owner still delivers
    await first.release(["b"])  # a settling lease is left to age, even when released
    await asyncio.sleep(1.0)
    with pytest.raises(ClaimHeld):
        await second.claim(["b"])  # 2 s since the claim, 1 s since the renewal
    await asyncio.sleep(0.7)
    assert await second.claim(["a", "b", "c"]) == {"a"}  # the owner stopped renewing
    with pytest.raises(ClaimHeld):
        await first.claim(["b"])  # now the second's lease holds the first off


def test_dedupe_urls_are_checked() -> None:
    with pytest.raises(ValueError, match="redis://, sqlite:/// or sink"):
        dedupe_from_url("memcached://x", "n", 60)
    with pytest.raises(ValueError, match="needs a file"):
        dedupe_from_url("sqlite://", "n", 60)


def test_only_a_sink_keyed_by_event_id_can_be_its_own_dedupe_store() -> None:
    class Keyed:
        idempotent_by_key = True

    assert isinstance(dedupe_from_url("sink", "n", 60, Keyed()), SinkDedupe)
    with pytest.raises(ValueError, match="unique key of its own"):
        dedupe_from_url("sink", "n", 60, object())
    assert ConsumerSettings.from_env("warehouse", {}).dedupe_url == "sink"
    assert ConsumerSettings.from_env("crm", {}).dedupe_url.startswith("sqlite:///")


@pytest.mark.parametrize(
    "header",
    [b"2024-01-01T00:00:00", b"\xff\xfe", None, b"yesterday"],
    ids=["naive-time", "not-utf8", "null-value", "not-a-time"],
)
def test_an_unusable_receive_time_header_is_ignored_not_fatal(header: bytes | None) -> None:
    event = sms_event()
    record = kafka_record(orjson.dumps(event), headers=[("ce_receivedtime", header)])
    decoded = RecordDecoder().decode(record)
    assert isinstance(decoded, SmsRecord)
    assert decoded.received_at is None


@pytest.mark.parametrize(
    ("date", "expected"),
    [
        ("2023-05-20t14:30:00z", "2023-05-20T14:30:00+00:00"),
        ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59.999999+00:00"),
        ("2016-12-31T23:59:60.5Z", "2016-12-31T23:59:59.999999+00:00"),
    ],
    ids=["lower-case", "leap-second", "leap-second-fraction"],
)
def test_rfc3339_dates_the_gateway_accepts_are_read_by_consumers(date: str, expected: str) -> None:
    decoded = RecordDecoder().decode(kafka_record(orjson.dumps(sms_event(date=date))))
    assert isinstance(decoded, SmsRecord)
    assert decoded.sent_at.isoformat() == expected


async def test_sqlite_dedupe_keeps_consumer_groups_apart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.sqlite3"
    warehouse, crm = (
        dedupe_from_url(url, "onoff-warehouse", 60),
        dedupe_from_url(url, "onoff-crm", 60),
    )
    try:
        await warehouse.claim(["a"])
        await warehouse.confirm(["a"])
        assert await warehouse.claim(["a"]) == {"a"}
        assert await crm.claim(["a"]) == set()
    finally:
        await warehouse.close()
        await crm.close()


def test_masked_numbers_keep_the_country_code_and_two_digits() -> None:
    from consumers.phones import masked  # noqa: PLC0415

    assert masked("+33612345678") == "+33•••••••78"
    assert masked("+14155550123") == "+1••••••••23"
    assert masked("not a number") == "•••"


def test_a_batch_splits_into_at_most_n_contiguous_parts_in_order() -> None:
    events = [sms_event()["id"] for _ in range(7)]
    parts = _split(events, 3)  # type: ignore[arg-type] # only order and sizes matter here
    assert [len(p) for p in parts] == [3, 3, 1]
    assert [e for p in parts for e in p] == events
    assert _split(events[:2], 3) == [events[:1], events[1:2]]  # type: ignore[arg-type]
    assert _split([], 3) == []


def test_batch_histogram_scrapes_exactly_like_a_prometheus_client_histogram() -> None:
    """Same values in, same exposition out: dashboards and alert rules cannot tell them apart
    (bucket edges included: a value equal to a bound counts in that bound's bucket)."""
    values = [0.0, 0.004, 0.005, 0.0051, 0.3, 1.0, 59.9, 300.0, 301.0, 7200.0]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("e2e_seconds", "doc", SECONDS_BUCKETS, ours)
    batch.observe_many("warehouse", values[:4])
    batch.observe_many("warehouse", values[4:])
    batch.observe_many("crm", [0.2])
    reference = Histogram("e2e_seconds", "doc", ["sink"], buckets=SECONDS_BUCKETS, registry=theirs)
    for value in values:
        reference.labels("warehouse").observe(value)
    reference.labels("crm").observe(0.2)

    def samples(registry: CollectorRegistry) -> list[str]:
        lines = generate_latest(registry).decode().splitlines()
        return sorted(line for line in lines if not line.startswith("#") and "_created" not in line)

    assert samples(ours) == samples(theirs)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
# The edges named in issue 11, always tried: no UTC time (refused), and just inside.
@example(moment=datetime(9999, 12, 31, 23, 59, 59), offset_minutes=-60, leap=False, lower=False)
@example(moment=datetime(1, 1, 1, 0, 0, 0), offset_minutes=60, leap=False, lower=False)
@example(moment=datetime(1, 1, 1, 1, 0, 0), offset_minutes=60, leap=False, lower=True)
@example(moment=datetime(9999, 12, 31, 23, 59, 59), offset_minutes=0, leap=True, lower=False)
@given(
    moment=st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
    ),
    offset_minutes=st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
    leap=st.booleans(),
    lower=st.booleans(),
)
def test_every_date_the_gateway_accepts_is_read_by_consumers_in_utc(
    moment: datetime, offset_minutes: int, leap: bool, lower: bool
) -> None:
    """Any RFC 3339 date-time at any offset, across years 0001-9999 (where year 9999 at -01:00
    and year 0001 at +01:00 have no UTC time): whatever the gateway's checker accepts, the
    consumers' decoder reads as an event whose date converts to UTC; whatever it refuses, the
    decoder poisons. One definition of valid, never a crash. Replaces a hand-picked list that
    missed the overflowing dates."""
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    # Zero-padded by hand: strftime("%Y") writes year 1 as "1", which no checker accepts.
    seconds = "60" if leap else f"{moment.second:02d}"
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{seconds}.{moment.microsecond:06d}{sign}{hours:02d}:{minutes:02d}"
    )
    if lower:
        text = text.lower()
    raw = orjson.dumps(sms_event(date=text))
    accepted = isinstance(EventChecker().check(raw), ValidEvent)
    decoded = RecordDecoder().decode(kafka_record(raw))
    note(f"{text} accepted={accepted}")
    event("accepted" if accepted else "refused")
    if accepted:
        assert isinstance(decoded, SmsRecord), text
        assert decoded.sent_at.astimezone(UTC).tzinfo is UTC
        # ... and maps in the warehouse and the CRM (the alerts' mappings have their own
        # property test in tests/test_alert_properties.py).
        assert len(warehouse_row(decoded)) == len(COLUMNS)
        assert _duck_row(decoded)[3] is not None
        assert hubspot_timestamp(decoded).endswith("Z")
        orjson.dumps(communication_body(decoded.payload))
    else:
        assert isinstance(decoded, PoisonRecord), text
