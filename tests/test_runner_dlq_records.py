"""The DLQ record of an event a sink rejected, when the event is nested deeper than orjson
can write back (254 levels)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumers.dedupe import dedupe_from_url
from consumers.metrics import ConsumerMetrics
from consumers.records import SmsRecord
from consumers.runner import Runner
from consumers.settings import ConsumerSettings
from consumers.sinks.warehouse import DuckDbWarehouse
from tests.payloads import sms_event

DEPTH = 300


def test_a_rejected_event_too_deep_for_orjson_goes_to_the_dlq_as_its_raw_bytes(
    tmp_path: Path,
) -> None:
    settings = ConsumerSettings.from_env("warehouse", {"DEDUPE_URL": "sink"})
    sink = DuckDbWarehouse(tmp_path / "never-opened.duckdb")  # opens nothing until start()
    dedupe = dedupe_from_url(settings.dedupe_url, settings.group_id, 3600, sink)
    runner = Runner(settings, sink, dedupe, ConsumerMetrics.create(CollectorRegistry()))

    fields = sms_event()
    # Written by hand: orjson itself cannot write it. A space inside keeps the bytes our own.
    raw = orjson.dumps(fields)[:-1] + b', "thread": ' + b"[" * DEPTH + b" " + b"]" * DEPTH + b"}"
    payload: dict[str, Any] = orjson.loads(raw)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(payload)  # the premise: deeper than orjson writes
    record = SmsRecord(fields["id"], payload, raw, datetime.now(UTC), None, "sms-events", 2, 7)

    key, value = runner._rejected_record(record, "duckdb: ConversionException")

    assert key == fields["id"].encode()
    dlq = orjson.loads(value)
    assert "payload" not in dlq
    assert base64.b64decode(dlq["raw_value_base64"], validate=True) == raw
    assert dlq["event_id"] == fields["id"]
    assert (dlq["stage"], dlq["reason"], dlq["detail"]) == (
        "warehouse",
        "rejected_by_sink",
        "duckdb: ConversionException",
    )
    assert dlq["source"] == {"topic": "sms-events", "partition": 2, "offset": 7}
