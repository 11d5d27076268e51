"""The files in schemas/ are valid documents of their kind, and the code loads them."""

from __future__ import annotations

import jsonschema_rs
import orjson
from openapi_spec_validator import validate as validate_openapi

from onoff_events import schemas
from onoff_events.event_kinds import KINDS

SCHEMA_FILES = [
    schemas.SMS_EVENT,
    schemas.CALL_EVENT,
    schemas.DLQ_RECORD,
    schemas.SINK_DLQ_RECORD,
]


def test_every_json_schema_is_valid_2020_12() -> None:
    for name in SCHEMA_FILES:
        schema = schemas.load(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema_rs.meta.validate(schema)


def test_openapi_document_is_valid_3_1_and_references_the_schema_files() -> None:
    document = orjson.loads((schemas.schemas_dir() / "gateway.openapi.json").read_bytes())
    assert document["openapi"].startswith("3.1")
    validate_openapi(document)
    paths = document["paths"]
    assert set(paths) == {"/v1/onoff/sms", "/v1/onoff/cdr", "/healthz", "/readyz", "/metrics"}
    for kind in KINDS:
        answers = paths[kind.path]["post"]["responses"]
        assert set(answers) == {"200", "400", "401", "408", "413", "503"}
        body = paths[kind.path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == kind.schema
