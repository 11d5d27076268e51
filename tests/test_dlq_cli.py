"""``onoff-dlq stats`` and ``show`` against the real broker: records the real gateway
quarantined, and a sink's DLQ record, counted by reason, key label and day; a record shown
with its body's values masked unless asked for."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import given
from hypothesis import strategies as st

from consumers.dlq_cli import main, masked
from onoff_events.kafka import KafkaSettings, ensure_topics
from tests.conftest import TEST_KEY, Topics, gateway_env
from tests.live_gateway import GatewayThread, fresh_topics, read_topic

PERSONAL_NUMBER = "+33611223344"


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(  # noqa: S310 # our own gateway on 127.0.0.1
        url + "/v1/onoff/sms",
        data=body,
        headers={"Authorization": f"x-api-key {TEST_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return int(response.status)


@pytest.fixture
def quarantined(kafka_bootstrap: str) -> Topics:
    """Three schema-breaking webhooks through the real gateway, and one record on the
    warehouse's DLQ in the runner's format."""
    topics = fresh_topics(kafka_bootstrap)
    with GatewayThread(gateway_env(kafka_bootstrap, topics)) as gateway:
        for i in range(3):
            body = orjson.dumps({"id": f"q{i}", "externalNumber": PERSONAL_NUMBER})  # no eventName
            assert post(gateway.url, body) == 200
    sink_record = {
        "dlq_version": 1,
        "stage": "warehouse",
        "reason": "rejected_by_sink",
        "detail": "warehouse: value too long",
        "event_id": "w1",
        "rejected_at": "2026-11-27T10:00:00.000Z",
        "source": {"topic": topics.events, "partition": 0, "offset": 7},
        "payload": {"id": "w1", "externalNumber": PERSONAL_NUMBER, "body": "hello there"},
    }

    async def produce() -> None:
        kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
        await ensure_topics(kafka, {f"{topics.events}.warehouse.dlq": 1})
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                f"{topics.events}.warehouse.dlq", orjson.dumps(sink_record), key=b"w1"
            )
        finally:
            await producer.stop()

    asyncio.run(produce())
    assert len(read_topic(kafka_bootstrap, topics.dlq)) == 3
    return topics


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    bootstrap: str,
    topics: Topics,
    *args: str,
) -> tuple[int, str, str]:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("KAFKA_TOPIC", topics.events)
    monkeypatch.setenv("KAFKA_DLQ_TOPIC", topics.dlq)
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_count_by_topic_reason_label_and_day(
    quarantined: Topics,
    kafka_bootstrap: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run(capsys, monkeypatch, kafka_bootstrap, quarantined, "stats")
    assert not err, err
    assert code == 0
    rows = [orjson.loads(line) for line in out.splitlines()]
    by_topic = {(r["topic"], r["reason"], r["key_label"]): r["records"] for r in rows}
    assert by_topic == {
        (quarantined.dlq, "schema_violation", "primary"): 3,
        (f"{quarantined.events}.warehouse.dlq", "rejected_by_sink", "-"): 1,
    }
    assert PERSONAL_NUMBER not in out
    assert all(len(r["day"]) == 10 for r in rows)


def test_show_masks_the_body_unless_asked(
    quarantined: Topics,
    kafka_bootstrap: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    where = f"{quarantined.events}.warehouse.dlq:0:0"
    code, out, _ = run(capsys, monkeypatch, kafka_bootstrap, quarantined, "show", where)
    assert code == 0
    shown = orjson.loads(out)
    assert shown["reason"] == "rejected_by_sink"
    assert shown["event_id"] == "w1"
    assert shown["payload"] == {"id": "<str 2>", "externalNumber": "<str 12>", "body": "<str 11>"}
    assert PERSONAL_NUMBER not in out
    code, out, _ = run(
        capsys, monkeypatch, kafka_bootstrap, quarantined, "show", where, "--show-values"
    )
    assert code == 0
    assert orjson.loads(out)["payload"]["externalNumber"] == PERSONAL_NUMBER


def test_show_names_a_missing_record_and_a_bad_address(
    quarantined: Topics,
    kafka_bootstrap: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, err = run(
        capsys, monkeypatch, kafka_bootstrap, quarantined, "show", f"{quarantined.dlq}:0:99"
    )
    assert code == 1
    assert "no record at" in err
    code, _, err = run(capsys, monkeypatch, kafka_bootstrap, quarantined, "show", "nonsense")
    assert code == 2
    assert "TOPIC:PARTITION:OFFSET" in err


leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
bodies = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@given(body=bodies)
def test_masked_keeps_the_shape_and_no_value(body: Any) -> None:
    out = masked(body)
    for leaf in _leaves(out):
        assert (
            leaf is None
            or isinstance(leaf, bool)
            or leaf == "<num>"
            or (isinstance(leaf, str) and leaf.startswith("<str ") and leaf.endswith(">"))
        )
    assert len(list(_leaves(out))) == len(list(_leaves(body)))
