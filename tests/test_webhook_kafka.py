"""The webhook end to end against a real Kafka broker: HTTP answer, then the record itself."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from typing import Any

import jsonschema_rs
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from onoff_events import schemas
from onoff_events.cloudevents import SMS_EVENT_TYPE
from tests.conftest import ROTATED_KEY, TEST_KEY, RunningGateway, Topics
from tests.kafka_reader import read_records
from tests.payloads import ONOFF_SAMPLE, sms_body, sms_event

WEBHOOK = "/v1/onoff/sms"
RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


async def post(
    gw: RunningGateway, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    sent = {"Authorization": f"x-api-key {TEST_KEY}", "Content-Type": "application/json"}
    if headers is not None:
        sent = headers
    async with gw.http.post(gw.url.rstrip("/") + WEBHOOK, data=body, headers=sent) as response:
        return response.status, orjson.loads(await response.read()), dict(response.headers)


def headers_of(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


@pytest.mark.parametrize(
    ("auth_headers", "label"),
    [
        ({"Authorization": f"x-api-key {TEST_KEY}"}, "primary"),
        ({"Authorization": f"X-API-KEY {ROTATED_KEY}"}, "rotated"),
        ({"X-API-Key": TEST_KEY}, "primary"),
    ],
    ids=["onoff-authorization-header", "scheme-case-insensitive-rotated-key", "bare-x-api-key"],
)
async def test_onoff_sample_is_acknowledged_then_on_the_topic_with_key_value_and_headers(
    gateway: RunningGateway,
    topics: Topics,
    kafka_bootstrap: str,
    auth_headers: dict[str, str],
    label: str,
) -> None:
    """Onoff's own sample → 200, then one record: key = id, value = the body byte for byte,
    CloudEvents binary-mode headers with the key's label and the receive time."""
    status, answer, _ = await post(gateway, ONOFF_SAMPLE, auth_headers)
    assert (status, answer) == (200, {"status": "accepted"})

    [record] = await read_records(kafka_bootstrap, topics.events, count=1)
    assert record.key == b"12345"
    assert record.value == ONOFF_SAMPLE
    headers = headers_of(record)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == b"12345"
    assert headers["ce_type"] == SMS_EVENT_TYPE.encode()
    assert headers["ce_source"] == gateway.settings.ce_source.encode()
    assert headers["ce_time"] == b"2023-05-20T14:30:00Z"
    assert headers["content-type"] == b"application/json"
    assert headers["ce_keylabel"] == label.encode()
    assert RFC3339_MS.match(headers["ce_receivedtime"].decode())


@pytest.mark.parametrize(
    ("auth_headers", "reason"),
    [
        ({}, "missing"),
        ({"Authorization": "x-api-key not-the-right-key-at-all"}, "unknown_key"),
        ({"X-API-Key": "not-the-right-key-at-all"}, "unknown_key"),
        ({"Authorization": f"Bearer {TEST_KEY}"}, "malformed"),
        ({"Authorization": "x-api-key"}, "malformed"),
        ({"Authorization": TEST_KEY}, "malformed"),
    ],
    ids=[
        "missing",
        "wrong-key",
        "wrong-bare-key",
        "bearer-scheme",
        "scheme-without-key",
        "no-scheme",
    ],
)
async def test_bad_or_missing_key_is_401_and_nothing_is_published(
    gateway: RunningGateway,
    topics: Topics,
    kafka_bootstrap: str,
    auth_headers: dict[str, str],
    reason: str,
) -> None:
    status, answer, headers = await post(gateway, sms_body(), auth_headers)
    assert status == 401
    assert answer["error"] == "unauthorized"
    assert headers["WWW-Authenticate"] == "x-api-key"
    assert TEST_KEY not in orjson.dumps(answer).decode()
    assert _sample(gateway, "onoff_gateway_auth_failures_total", reason=reason) == 1
    assert await read_records(kafka_bootstrap, topics.events, seconds=2) == []
    assert await read_records(kafka_bootstrap, topics.dlq, seconds=1) == []


async def test_body_over_the_limit_is_413(gateway: RunningGateway) -> None:
    limit = gateway.settings.max_body_bytes
    big = sms_body(body="x" * limit)
    status, answer, _ = await post(gateway, big)
    assert status == 413
    assert answer["error"] == "too_large"

    # Without a Content-Length (chunked), the limit still holds while reading.
    async def chunks() -> Any:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    async with gateway.http.post(
        gateway.url.rstrip("/") + WEBHOOK,
        data=chunks(),
        headers={"Authorization": f"x-api-key {TEST_KEY}"},
    ) as response:
        assert response.status == 413


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "invalid_json"),
        (b"{not json", "invalid_json"),
        (b'{"id": "1",}', "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"[]", "not_object"),
        (b'"a string"', "not_object"),
        (b"42", "not_object"),
        (b"null", "not_object"),
    ],
    ids=["empty", "truncated", "trailing-comma", "not-utf8", "array", "string", "number", "null"],
)
async def test_malformed_body_is_400_and_kept_raw_on_the_dlq(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str, body: bytes, reason: str
) -> None:
    status, answer, _ = await post(gateway, body)
    assert status == 400
    assert answer["error"] == reason
    assert answer["problems"]

    [record] = await read_records(kafka_bootstrap, topics.dlq, count=1)
    dlq = orjson.loads(record.value)
    assert dlq["reason"] == reason
    assert base64.b64decode(dlq["raw_body_base64"]) == body
    assert dlq["key_label"] == "primary"
    assert record.key is None
    schemas.validator(schemas.DLQ_RECORD).validate(dlq)
    assert _sample(gateway, "onoff_gateway_quarantined_events_total", reason=reason) == 1
    assert await read_records(kafka_bootstrap, topics.events, seconds=1) == []


@pytest.mark.parametrize(
    ("event", "paths"),
    [
        ({"smsDirection": "SIDEWAYS"}, {"/smsDirection"}),
        ({"date": "yesterday"}, {"/date"}),
        ({"eventName": "CDR"}, {"/eventName"}),
        ({"id": ""}, {"/id"}),
        ({"id": 12345}, {"/id"}),
        ({"id": "has space"}, {"/id"}),
        ({"body": None, "externalNumber": 5}, {"/body", "/externalNumber"}),
    ],
    ids=[
        "direction",
        "date",
        "event-name",
        "empty-id",
        "numeric-id",
        "id-with-space",
        "two-fields",
    ],
)
async def test_object_breaking_the_schema_is_200_with_reasons_and_on_the_dlq(
    gateway: RunningGateway,
    topics: Topics,
    kafka_bootstrap: str,
    event: dict[str, Any],
    paths: set[str],
) -> None:
    payload = sms_event(**event)
    status, answer, _ = await post(gateway, orjson.dumps(payload))
    assert status == 200
    assert answer["status"] == "quarantined"
    assert {p["path"] for p in answer["problems"]} == paths

    [record] = await read_records(kafka_bootstrap, topics.dlq, count=1)
    dlq = orjson.loads(record.value)
    assert dlq["reason"] == "schema_violation"
    assert dlq["payload"] == payload
    assert {e["path"] for e in dlq["errors"]} == paths
    schemas.validator(schemas.DLQ_RECORD).validate(dlq)
    usable_id = "/id" not in paths
    assert dlq["event_id"] == (payload["id"] if usable_id else None)
    assert record.key == (payload["id"].encode() if usable_id else None)
    assert await read_records(kafka_bootstrap, topics.events, seconds=1) == []


async def test_missing_fields_are_each_named_once_and_values_never_echoed(
    gateway: RunningGateway,
) -> None:
    """Onoff's activation test payload has an undocumented shape: it still gets 200."""
    status, answer, _ = await post(gateway, b'{"test": true, "phone": "+33612345678"}')
    assert status == 200
    paths = [p["path"] for p in answer["problems"]]
    assert sorted(paths) == sorted(
        f"/{name}" for name in schemas.load(schemas.SMS_EVENT)["required"]
    )
    status, answer, _ = await post(gateway, sms_body(date="+33612345678"))
    assert status == 200
    assert "+33612345678" not in orjson.dumps(answer).decode()


@pytest.mark.parametrize(
    "text",
    [
        "Héllo wörld — ça va? 你好，世界 Привет",
        "Emoji 😀👍🏽👨‍👩‍👧‍👦 and flags 🇫🇷🇬🇧",
        'Quotes " and \\ backslash, tab\t newline\n slash / and \u2028 separators',
        "x" * 1600,
        "",
    ],
    ids=["accents-cjk-cyrillic", "emoji-zwj", "escapes", "1600-chars", "empty"],
)
async def test_body_text_comes_back_unchanged(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str, text: str
) -> None:
    raw = orjson.dumps(sms_event(body=text))
    assert (await post(gateway, raw))[0] == 200
    [record] = await read_records(kafka_bootstrap, topics.events, count=1)
    assert record.value == raw
    assert orjson.loads(record.value)["body"] == text


async def test_escaped_unicode_in_the_json_is_forwarded_byte_for_byte(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str
) -> None:
    raw = (
        b'{"id":"esc-1","eventName":"SMS","onoffUserName":"A","onoffUserEmail":"a@example.com",'
        b'"onoffUserNumber":"1","externalNumber":"2","date":"2024-01-01T00:00:00+01:00",'
        b'"smsDirection":"RECEIVED","body":"\\u00e9\\ud83d\\ude00 \\"q\\"","company":"ACME"}'
    )
    assert (await post(gateway, raw))[0] == 200
    [record] = await read_records(kafka_bootstrap, topics.events, count=1)
    assert record.value == raw
    decoded = orjson.loads(record.value)
    assert decoded["body"] == 'é😀 "q"'
    assert decoded["company"] == "ACME"  # unknown fields are kept


async def test_same_id_sent_again_is_acknowledged_again(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str
) -> None:
    """Onoff retries: the gateway acknowledges each copy; consumers dedupe by key."""
    raw = sms_body()
    for _ in range(3):
        assert (await post(gateway, raw))[0] == 200
    records = await read_records(kafka_bootstrap, topics.events, count=3)
    assert len({r.key for r in records}) == 1
    assert len({(r.partition) for r in records}) == 1  # same key, same partition, in order


async def test_concurrent_requests_share_produce_requests(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str
) -> None:
    """Many webhooks in flight at once go out in far fewer produce requests than records."""
    from aiokafka.protocol.produce import ProduceRequest  # noqa: PLC0415

    producer = gateway.app[__import__("gateway.app").app.PUBLISHER]._producer
    client = producer.client
    real_send = client.send
    produce_requests = 0

    async def counting_send(node_id: Any, request: Any, **kwargs: Any) -> Any:
        nonlocal produce_requests
        if isinstance(request, ProduceRequest):
            produce_requests += 1
        return await real_send(node_id, request, **kwargs)

    client.send = counting_send
    try:
        bodies = [sms_body() for _ in range(300)]
        answers = await asyncio.gather(*(post(gateway, b) for b in bodies))
    finally:
        client.send = real_send
    assert [a[0] for a in answers] == [200] * 300
    assert produce_requests <= 300 / 4, produce_requests
    records = await read_records(kafka_bootstrap, topics.events, count=300)
    assert sorted(r.value for r in records) == sorted(bodies)


async def test_metrics_parse_and_count_what_was_sent(gateway: RunningGateway) -> None:
    for _ in range(3):
        await post(gateway, sms_body())
    await post(gateway, b"[]")
    await post(gateway, orjson.dumps(sms_event(smsDirection="NOPE")))
    await post(gateway, sms_body(), {})
    async with gateway.http.get(gateway.url.rstrip("/") + "/readyz") as response:
        assert response.status == 200

    async with gateway.http.get(gateway.url.rstrip("/") + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample_name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    requests = "onoff_gateway_http_requests"
    assert value(requests, requests + "_total", route=WEBHOOK, status="200") == 4
    assert value(requests, requests + "_total", route=WEBHOOK, status="400") == 1
    assert value(requests, requests + "_total", route=WEBHOOK, status="401") == 1
    assert value(requests, requests + "_total", route="/readyz", status="200") == 1
    assert (
        value(
            "onoff_gateway_accepted_events",
            "onoff_gateway_accepted_events_total",
            key_label="primary",
        )
        == 3
    )
    quarantined = "onoff_gateway_quarantined_events"
    assert value(quarantined, quarantined + "_total", reason="not_object") == 1
    assert value(quarantined, quarantined + "_total", reason="schema_violation") == 1
    duration = "onoff_gateway_http_request_duration_seconds"
    assert value(duration, duration + "_count", route=WEBHOOK) == 6
    publish = "onoff_gateway_publish_duration_seconds"
    assert value(publish, publish + "_count", topic=gateway.settings.topic) == 3
    assert value(publish, publish + "_count", topic=gateway.settings.dlq_topic) == 2
    assert value("onoff_gateway_producer_connected", "onoff_gateway_producer_connected") == 1
    # No label value anywhere looks like personal data or an id.
    for family in families.values():
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                assert "@" not in label_value
                if label != "topic":  # topic names are configuration (random hex in tests)
                    assert not re.search(r"\d{6,}", label_value), (sample.name, label_value)


async def test_health_ready_and_unknown_routes(gateway: RunningGateway) -> None:
    base = gateway.url.rstrip("/")
    async with gateway.http.get(base + "/healthz") as response:
        assert response.status == 200
    async with gateway.http.get(base + "/readyz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ready"})
    async with gateway.http.get(base + WEBHOOK) as response:
        assert response.status == 405
    async with gateway.http.get(base + "/nope/12345") as response:
        assert response.status == 404
    # Neither the 405 nor the 404 matched a route: the raw path never becomes a label.
    assert _sample(gateway, "onoff_gateway_http_requests_total", route="unmatched") == 2


def _sample(gw: RunningGateway, name: str, **labels: str) -> float:
    value = gw.registry.get_sample_value(name, labels)
    if value is not None:
        return value
    # Sum over the labels not given.
    total = 0.0
    for family in gw.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_dlq_schema_accepts_only_one_of_payload_or_raw() -> None:
    validator: jsonschema_rs.Draft202012Validator = schemas.validator(schemas.DLQ_RECORD)
    base = {
        "dlq_version": 1,
        "stage": "gateway",
        "reason": "invalid_json",
        "errors": [],
        "received_at": "2024-01-01T00:00:00Z",
        "key_label": "k",
    }
    assert not validator.is_valid(base)
    assert validator.is_valid({**base, "raw_body_base64": "AA=="})
    assert not validator.is_valid({**base, "raw_body_base64": "AA==", "payload": {}})


async def test_logs_never_carry_bodies_numbers_emails_ids_or_keys(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Every kind of answer is logged, if at all, without personal data or secrets."""
    from onoff_events.logs import JsonFormatter, quiet_libraries  # noqa: PLC0415

    personal = {
        "id": "id-7d1e0c2a",
        "onoffUserEmail": "alice@example.com",
        "onoffUserNumber": "+33612345678",
        "externalNumber": "+447700900123",
        "body": "my secret message",
    }
    quiet_libraries()  # what logs.configure() does in the real process
    caplog.set_level("DEBUG")
    await post(gateway, orjson.dumps(sms_event(**personal)))
    await post(gateway, orjson.dumps(sms_event(**personal, smsDirection="+33612345678")))
    await post(gateway, orjson.dumps(sms_event(**personal))[:-5])
    await post(gateway, orjson.dumps(sms_event(**personal)), {"X-API-Key": "wrong-key-" + TEST_KEY})
    lines = [JsonFormatter().format(record) for record in caplog.records]
    assert any('"event":"quarantined"' in line for line in lines)
    text = "\n".join(lines)
    for value in [*personal.values(), TEST_KEY]:
        assert value not in text
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)
