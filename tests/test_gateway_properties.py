"""Properties of the gateway over any input: it never answers 5xx to a body it could read, every
answer is a documented one, and every 200/400 leaves exactly one record (events topic or DLQ).

The first tests are the cases that once failed (a 500 and a lost body for a deep object; an
event every consumer dead-letters because of its date); hypothesis then looks for more, first
against the pure checker and DLQ builder, then over HTTP against the real app and broker.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator
from datetime import UTC
from typing import Any, NamedTuple

import jsonschema_rs
import orjson
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumers.records import RecordDecoder, SmsRecord
from onoff_events import schemas
from onoff_events.dlq import quarantine_message
from onoff_events.sms_event import EventChecker, Quarantined, ValidEvent
from tests.conftest import ROTATED_KEY, TEST_KEY, RunningGateway, Topics, gateway_env
from tests.kafka_reader import read_records
from tests.live_gateway import GatewayThread, fresh_topics, read_topic
from tests.payloads import ONOFF_SAMPLE, sms_body, sms_event

WEBHOOK = "/v1/onoff/sms"
RECEIVED_AT = "2024-01-01T00:00:00.000Z"
CHECKER = EventChecker()
DECODER = RecordDecoder()
DLQ_RECORD = schemas.validator(schemas.DLQ_RECORD)
OPENAPI: dict[str, Any] = orjson.loads(
    (schemas.schemas_dir() / "gateway.openapi.json").read_bytes()
)
WEBHOOK_ANSWERS: dict[str, Any] = OPENAPI["paths"][WEBHOOK]["post"]["responses"]
DOCUMENTED = {int(status) for status in WEBHOOK_ANSWERS}


def _answer_validator(status: int) -> Any:
    """The documented JSON schema of the webhook's answer body for ``status``."""
    ref = WEBHOOK_ANSWERS[str(status)]["content"]["application/json"]["schema"]["$ref"]
    return jsonschema_rs.Draft202012Validator({"$ref": ref, "components": OPENAPI["components"]})


ANSWER_SCHEMAS = {status: _answer_validator(status) for status in DOCUMENTED}


def _nested(depth: int, field: str = "x") -> bytes:
    return b'{"id":"n","' + field.encode() + b'":' + b"[" * depth + b"]" * depth + b"}"


async def _post(gw: RunningGateway, body: bytes) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"x-api-key {TEST_KEY}", "Content-Type": "application/json"}
    async with gw.http.post(gw.url.rstrip("/") + WEBHOOK, data=body, headers=headers) as answer:
        text = await answer.read()
        assert answer.content_type == "application/json", (answer.status, text)
        return answer.status, orjson.loads(text)


# --- The cases that once failed --------------------------------------------------------------


@pytest.mark.parametrize("depth", [253, 300, 600, 1022])
async def test_a_deeply_nested_object_is_quarantined_with_its_exact_bytes_not_a_500(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str, depth: int
) -> None:
    """A schema-breaking object nested 253-1023 levels once got 500 and reached no topic."""
    body = _nested(depth)
    status, answer = await _post(gateway, body)
    assert status == 200, answer
    assert answer["status"] == "quarantined"
    [record] = await read_records(kafka_bootstrap, topics.dlq, count=1)
    dlq = orjson.loads(record.value)
    DLQ_RECORD.validate(dlq)
    assert record.key == b"n"
    assert base64.b64decode(dlq["raw_body_base64"]) == body
    assert await read_records(kafka_bootstrap, topics.events, seconds=1) == []


async def test_an_object_that_grows_when_rewritten_is_quarantined_with_its_exact_bytes(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str
) -> None:
    """orjson writes 1e9 back as 1000000000.0: a 60 kB object of them re-serialised is three
    times its size, past the producer's request limit (once a 413 and nothing kept). The DLQ
    record keeps the bytes Onoff sent instead, and there is exactly one."""
    body = b'{"id":"n","x":[' + b",".join([b"1e9"] * 15_000) + b"]}"
    assert len(body) < gateway.settings.max_body_bytes
    status, answer = await _post(gateway, body)
    assert (status, answer.get("status")) == (200, "quarantined"), answer
    records = await read_records(kafka_bootstrap, topics.dlq, count=2, seconds=3)
    assert len(records) == 1
    dlq = orjson.loads(records[0].value)
    DLQ_RECORD.validate(dlq)
    assert base64.b64decode(dlq["raw_body_base64"]) == body


@pytest.mark.parametrize(
    "date",
    ["9999-12-31T23:59:59-01:00", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00"],
    ids=["utc-overflows-year-9999", "year-0000", "utc-underflows-year-0001"],
)
async def test_a_date_no_consumer_can_convert_to_utc_is_quarantined_at_the_gateway(
    gateway: RunningGateway, topics: Topics, kafka_bootstrap: str, date: str
) -> None:
    """Once 200'd onto sms-events, then a crash loop (CRM) or a DLQ record in every sink."""
    event = sms_event(date=date)
    status, answer = await _post(gateway, orjson.dumps(event))
    assert (status, answer["status"]) == (200, "quarantined")
    assert [(p["path"], p["keyword"]) for p in answer["problems"]] == [("/date", "format")]
    [record] = await read_records(kafka_bootstrap, topics.dlq, count=1)
    dlq = orjson.loads(record.value)
    assert (dlq["reason"], dlq["event_id"], dlq["payload"]) == (
        "schema_violation",
        event["id"],
        event,
    )
    assert dlq["errors"] == answer["problems"]
    assert await read_records(kafka_bootstrap, topics.events, seconds=1) == []


# --- Generated input ---------------------------------------------------------------------------


def _json_char(char: str, escape: bool) -> str:
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF or code < 0x20 or (escape and code <= 0xFFFF):
        # Lone surrogates can only exist in JSON text as escapes (and must be refused there).
        return f"\\u{code:04x}"
    if escape:
        high, low = divmod(code - 0x10000, 0x400)
        return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"
    return {'"': '\\"', "\\": "\\\\"}.get(char, char)


# Every plane, surrogates included; each character written raw or as a \u escape.
json_strings = st.lists(
    st.tuples(st.characters(exclude_categories=()), st.booleans()), max_size=12
).map(lambda chars: '"' + "".join(_json_char(c, e) for c, e in chars) + '"')

json_scalars = st.one_of(
    st.sampled_from(["null", "true", "false", "0", "-0", "1e400", "-1.5e-300"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    json_strings,
)


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"


# Hypothesis probes st.recursive's extend with a stand-in strategy and, seeing it only
# through .map(), warns that extend "doesn't use it" (it does: nested arrays and objects are
# generated, see deep_values). Under filterwarnings=error that false alarm would fail the run.
pytestmark = pytest.mark.filterwarnings(
    "ignore:extend=.*doesn't use it:hypothesis.errors.HypothesisDeprecationWarning"
)

# Keys drawn from a small set too, so the same key often appears twice in one object.
json_keys = st.one_of(st.sampled_from(['"id"', '"date"', '"body"', '"a"']), json_strings)

json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(json_keys, children), max_size=5).map(_object),
    ),
    max_leaves=20,
)


@st.composite
def deep_values(draw: st.DrawFn) -> str:
    """Up to ~1100 levels of arrays or objects around a value (orjson reads 1024)."""
    depth = draw(st.one_of(st.integers(0, 1100), st.sampled_from([252, 253, 254, 255, 1023])))
    inner = draw(json_values)
    if draw(st.booleans()):
        return "[" * depth + inner + "]" * depth
    return '{"k":' * depth + inner + "}" * depth


huge_arrays = st.tuples(st.integers(0, 20_000), json_scalars).map(
    lambda n_item: "[" + ",".join([n_item[1]] * n_item[0]) + "]"
)
many_keys = st.integers(0, 4_000).map(lambda n: _object([(f'"k{i}"', str(i)) for i in range(n)]))
any_json = st.one_of(json_values, deep_values(), huge_arrays, many_keys)


def _rfc3339(
    months: st.SearchStrategy[int], days: st.SearchStrategy[int], hours: st.SearchStrategy[int]
) -> st.SearchStrategy[str]:
    """RFC 3339-like dates (as JSON text) around the edges of what datetime can hold."""
    return st.builds(
        "{:04d}-{:02d}-{:02d}{}{:02d}:{:02d}:{:02d}{}{}".format,
        st.one_of(st.sampled_from([0, 1, 2, 1970, 2023, 9998, 9999]), st.integers(0, 9999)),
        months,
        days,
        st.sampled_from(["T", "t", " "]),
        hours,
        st.integers(0, 59),
        st.sampled_from([0, 30, 59, 60]),
        st.sampled_from(["", ".5", ".999999", ".1234567890"]),
        st.one_of(
            st.sampled_from(["Z", "z", "", "+00:00", "-00:00"]),
            st.builds(
                "{}{:02d}:{:02d}".format,
                st.sampled_from("+-"),
                hours,
                st.sampled_from([0, 1, 30, 59]),
            ),
        ),
    ).map(lambda date: f'"{date}"')


# Mostly well-formed (so the schema accepts many, and the UTC edges are reached), some not.
rfc3339_dates = st.one_of(
    _rfc3339(st.sampled_from([1, 12]), st.sampled_from([1, 28, 31]), st.sampled_from([0, 23])),
    _rfc3339(st.integers(1, 12), st.integers(1, 28), st.integers(0, 23)),
    _rfc3339(st.integers(0, 13), st.integers(0, 32), st.integers(0, 25)),
)


@st.composite
def event_shaped(draw: st.DrawFn) -> str:
    """Onoff's sample with some fields replaced, dropped, repeated or added (deep, wide,
    huge), and a date from anywhere in (or just out of) datetime's range."""
    fields = [(f'"{k}"', orjson.dumps(v).decode()) for k, v in sms_event().items()]
    pairs: list[tuple[str, str]] = []
    for key, value in fields:
        fate = draw(st.sampled_from(["keep"] * 12 + ["junk", "drop"]))
        if key == '"date"' and fate == "keep":
            pairs.append((key, draw(st.one_of(st.just(value), rfc3339_dates))))
        elif fate != "drop":
            pairs.append((key, value if fate == "keep" else draw(json_values)))
    # Extra fields: unknown ones (kept by the schema), and now and then a repeated known one.
    extra_keys = st.one_of(json_strings, json_strings, json_keys)
    pairs.extend(draw(st.lists(st.tuples(extra_keys, any_json), max_size=2)))
    return _object(draw(st.permutations(pairs)) if draw(st.booleans()) else pairs)


@st.composite
def well_formed_events(draw: st.DrawFn) -> str:
    """Every required field right, only the date and the unknown fields generated."""
    pairs = [(f'"{k}"', orjson.dumps(v).decode()) for k, v in sms_event().items()]
    pairs = [(k, draw(rfc3339_dates) if k == '"date"' else v) for k, v in pairs]
    pairs.extend(draw(st.lists(st.tuples(json_strings, any_json), max_size=2)))
    return _object(pairs)


bodies = st.one_of(
    st.binary(max_size=300),
    any_json.map(str.encode),
    event_shaped().map(str.encode),
    well_formed_events().map(str.encode),
)


class _Record(NamedTuple):
    """The parts of a Kafka record the consumers' decoder reads."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    topic: str = "sms-events"
    partition: int = 0
    offset: int = 0


PURE_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PURE_SETTINGS
@given(raw=bodies)
def test_any_body_gets_a_verdict_and_a_quarantined_one_a_dlq_record_of_its_schema(
    raw: bytes,
) -> None:
    """check() and quarantine_message() never raise; a valid event decodes in the consumers
    (one definition of valid); a DLQ record matches its schema and gives the body back."""
    verdict = CHECKER.check(raw)
    if isinstance(verdict, ValidEvent):
        assert verdict.at.astimezone(UTC).tzinfo is UTC
        decoded = DECODER.decode(_Record(verdict.event_id.encode(), raw, []))
        assert isinstance(decoded, SmsRecord), decoded
        return
    assert isinstance(verdict, Quarantined)
    assert verdict.problems
    key, value, _ = quarantine_message(verdict, RECEIVED_AT, "onoff", "/gateway")
    record = orjson.loads(value)
    DLQ_RECORD.validate(record)
    assert key == (None if verdict.event_id is None else verdict.event_id.encode())
    assert _dlq_body(record) == _normalised(raw)


def _normalised(raw: bytes) -> bytes:
    """A body as the DLQ keeps it: a JSON object re-written (orjson, sorted keys) when it can
    be, else the bytes themselves."""
    try:
        document = orjson.loads(raw)
        if isinstance(document, dict):
            return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        pass
    return raw


def _dlq_body(record: dict[str, Any]) -> bytes:
    if "payload" in record:
        return orjson.dumps(record["payload"], option=orjson.OPT_SORT_KEYS)
    return _normalised(base64.b64decode(record["raw_body_base64"]))


# --- Over HTTP, against the real app and broker -------------------------------------------------


@pytest.fixture(scope="module")
def live_gateway(kafka_bootstrap: str) -> Iterator[tuple[GatewayThread, Topics]]:
    topics = fresh_topics(kafka_bootstrap)
    with GatewayThread(gateway_env(kafka_bootstrap, topics)) as gateway:
        yield gateway, topics


auth_headers = st.sampled_from(
    [{"Authorization": f"x-api-key {TEST_KEY}"}] * 6
    + [
        {"X-API-Key": ROTATED_KEY},
        {},
        {"Authorization": "x-api-key not-a-key"},
        {"Authorization": f"Bearer {TEST_KEY}"},
    ]
)


def test_over_http_every_answer_is_documented_and_each_200_or_400_leaves_one_record(
    live_gateway: tuple[GatewayThread, Topics], kafka_bootstrap: str
) -> None:
    """Any body, any key: the status and body are in the OpenAPI document, never a 5xx but
    503; then the topics hold exactly one record per 200 (accepted: sms-events; quarantined:
    the DLQ) and per 400 (the DLQ), and none for 401/413."""
    gateway, topics = live_gateway
    expected: Counter[tuple[str, bytes]] = Counter()
    unavailable: Counter[tuple[str, bytes]] = Counter()
    statuses: Counter[int] = Counter()

    with requests.Session() as http:
        # No shrinking: each step is a real request and a Kafka record; the failing body is
        # printed as generated.
        @settings(PURE_SETTINGS, max_examples=200, phases=[Phase.explicit, Phase.generate])
        @given(raw=st.one_of(bodies, st.just(ONOFF_SAMPLE), st.just(sms_body())), auth=auth_headers)
        def post_one(raw: bytes, auth: dict[str, str]) -> None:
            headers = {"Content-Type": "application/json", **auth}
            answer = http.post(gateway.url + WEBHOOK, data=raw, headers=headers, timeout=30)
            status = answer.status_code
            assert status in DOCUMENTED, (status, answer.text)
            assert answer.headers["Content-Type"].startswith("application/json")
            document = answer.json()
            ANSWER_SCHEMAS[status].validate(document)
            statuses[status] += 1
            if status == 200 and document["status"] == "accepted":
                expected[("events", raw)] += 1
            elif status in (200, 400):
                expected[("dlq", _normalised(raw))] += 1
            elif status == 503:
                # Kafka did not acknowledge in time: the record may or may not exist.
                unavailable[("events", raw)] += 1
                unavailable[("dlq", _normalised(raw))] += 1

        post_one()

    found: Counter[tuple[str, bytes]] = Counter()
    for record in read_topic(kafka_bootstrap, topics.events):
        found[("events", record.value)] += 1
    for record in read_topic(kafka_bootstrap, topics.dlq):
        dlq = orjson.loads(record.value)
        DLQ_RECORD.validate(dlq)
        found[("dlq", _dlq_body(dlq))] += 1
    assert found - expected <= unavailable, "records no 200/400 answer accounts for"
    assert expected - found == Counter(), "200/400 answers without their record"
    assert statuses[200] > 0
    assert statuses[400] > 0
