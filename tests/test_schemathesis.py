"""schemas/gateway.openapi.json against the running gateway (real app, real broker): requests
generated from the document, in and out of its schemas, never get a server error or an answer
the document does not describe (status, content type, body schema, headers).

The document is the truth: when this test finds an answer it does not describe, fix the
document (if the answer is right) or the gateway, never this test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from onoff_events import schemas
from onoff_events.event_kinds import KINDS
from tests.conftest import TEST_KEY, Topics, gateway_env
from tests.live_gateway import GatewayThread, fresh_topics

SPEC = schemas.schemas_dir() / "gateway.openapi.json"
# Not negative_data_rejection: by design (DESIGN.md, Answers) a JSON object that breaks the
# schema is answered 200 "quarantined", so Onoff does not retry what can never pass.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,
]
VALID_AUTH = {"Authorization": f"x-api-key {TEST_KEY}"}
OPERATIONS: dict[str, Any] = {
    operation.label: operation
    for operation in (
        result.ok() for result in schemathesis.openapi.from_path(SPEC).get_all_operations()
    )
}


@pytest.fixture(scope="module")
def live_gateway(kafka_bootstrap: str) -> Iterator[tuple[GatewayThread, Topics]]:
    """Both webhooks on, each kind with topics of its own."""
    topics, calls = fresh_topics(kafka_bootstrap), fresh_topics(kafka_bootstrap)
    env = gateway_env(
        kafka_bootstrap,
        topics,
        GATEWAY_EVENT_KINDS="sms,call",
        KAFKA_CALL_TOPIC=calls.events,
        KAFKA_CALL_DLQ_TOPIC=calls.dlq,
    )
    with GatewayThread(env) as gateway:
        yield gateway, topics


# Generating data outside the schema needs something to break: only the webhook takes input.
RUNS = [(label, schemathesis.GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (f"POST {kind.path}", schemathesis.GenerationMode.NEGATIVE) for kind in KINDS
]


@pytest.mark.parametrize(("label", "mode"), RUNS, ids=[f"{label}-{mode}" for label, mode in RUNS])
def test_every_answer_to_generated_requests_is_described_by_the_openapi_document(
    live_gateway: tuple[GatewayThread, Topics], label: str, mode: schemathesis.GenerationMode
) -> None:
    """Most requests carry a valid key (so the body is what gets checked; ignored_auth then
    also sends them without a key and with a wrong one), the others a generated key."""
    gateway, _ = live_gateway
    operation = OPERATIONS[label]
    seen: Counter[int] = Counter()

    with requests.Session() as http:

        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            derandomize=True,
            # No shrinking: each step is a real request (and a Kafka record), and a failure
            # already comes with a curl command that reproduces it.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(
            case=operation.as_strategy(mode), authenticated=st.sampled_from([True] * 4 + [False])
        )
        def call_and_validate(case: schemathesis.Case, authenticated: bool) -> None:
            auth = VALID_AUTH if authenticated else None
            response = case.call(base_url=gateway.url, session=http, headers=auth, timeout=30)
            seen[response.status_code] += 1
            case.validate_response(
                response, checks=CHECKS, headers=auth, transport_kwargs={"base_url": gateway.url}
            )

        call_and_validate()

    # The run proves something only if the gateway took the generated bodies in.
    assert seen[200] > 0, dict(seen)
