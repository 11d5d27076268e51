"""Every topic's schema against its last released version (schemas/released/): a change that
could make a record on the topic unreadable, or a reader of either version wrong, fails here
unless the contract's version is bumped (docs/topics.md, "Changing a schema")."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema_rs
import orjson
import pytest

from onoff_events import schemas
from onoff_events.event_kinds import CALL, KINDS, SMS
from tests.payloads import CALL_SAMPLE, ONOFF_SAMPLE
from tests.schema_compat import breaking_changes

RELEASED = schemas.schemas_dir() / "released"
TOPIC_SCHEMAS = [k.schema for k in KINDS] + [schemas.DLQ_RECORD, schemas.SINK_DLQ_RECORD]


def current_version(name: str) -> str:
    """The contract version the code writes now: the kind's ce_type, or the DLQ record's
    dlq_version."""
    for kind in KINDS:
        if kind.schema == name:
            return kind.ce_type
    return f"dlq_version {schemas.load(name)['properties']['dlq_version']['const']}"


def released(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads((RELEASED / name).read_bytes())
    return schema


@pytest.mark.parametrize("name", TOPIC_SCHEMAS)
def test_each_topic_schema_is_compatible_with_its_release_or_its_version_is_bumped(
    name: str,
) -> None:
    versions = orjson.loads((RELEASED / "versions.json").read_bytes())
    assert name in versions, f"{name} has no released version in schemas/released/"
    if current_version(name) != versions[name]:
        return  # a new contract version: anything goes (its readers are new too)
    breaks = breaking_changes(released(name), schemas.load(name))
    assert not breaks, (
        f"{name} breaks its released version {versions[name]}:\n  "
        + "\n  ".join(breaks)
        + "\nMake it compatible, or bump the version (docs/topics.md, 'Changing a schema')."
    )


def test_every_schema_file_of_a_topic_is_released() -> None:
    kept = {p.name for p in RELEASED.glob("*.schema.json")}
    assert kept == set(TOPIC_SCHEMAS)


# --- the check itself: it finds each kind of break, and lets compatible changes through ----


def _set(path: list[str], value: Any) -> Any:
    """A change: set the property at ``path`` (under ``properties``) to ``value``."""

    def change(schema: dict[str, Any]) -> None:
        node = schema["properties"]
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value

    return change


def _add_required(schema: dict[str, Any]) -> None:
    schema["required"].append("smsDirection2")
    schema["properties"]["smsDirection2"] = {"type": "string"}


CHANGES: dict[str, Any] = {
    "new required field": _add_required,
    "required field dropped": lambda schema: schema["required"].remove("body"),
    "narrowed type": _set(["externalName", "type"], "string"),
    "removed enum value": _set(["smsDirection", "enum"], ["SENT"]),
    "tighter maxLength": _set(["id", "maxLength"], 64),
    "changed pattern": _set(["id", "pattern"], "^[0-9a-f-]+$"),
    "closed to additional properties": lambda schema: schema.update(additionalProperties=False),
    "new bound": _set(["body", "maxLength"], 1600),
    "wider maxLength": _set(["onoffUserName", "maxLength"], 1024),
    "new optional property": _set(["companyName"], {"type": ["string", "null"]}),
    "new enum value": _set(["smsDirection", "enum"], ["SENT", "RECEIVED", "FAILED"]),
    "widened type": _set(["body", "type"], ["string", "null"]),
    "described better": _set(["body", "description"], "The message."),
}


def _changed(schema: dict[str, Any], change: str) -> dict[str, Any]:
    new = copy.deepcopy(schema)
    CHANGES[change](new)
    return new


BREAKING = [
    "new required field",
    "required field dropped",
    "narrowed type",
    "removed enum value",
    "tighter maxLength",
    "changed pattern",
    "closed to additional properties",
    "new bound",
]
COMPATIBLE = [
    "wider maxLength",
    "new optional property",
    "new enum value",
    "widened type",
    "described better",
]


@pytest.mark.parametrize("change", BREAKING)
def test_a_breaking_change_is_found(change: str) -> None:
    sms = schemas.load(SMS.schema)
    assert breaking_changes(sms, _changed(sms, change)), change


@pytest.mark.parametrize("change", COMPATIBLE)
def test_a_compatible_change_passes_and_still_reads_what_the_release_read(change: str) -> None:
    sms = schemas.load(SMS.schema)
    new = _changed(sms, change)
    assert breaking_changes(sms, new) == []
    validator = jsonschema_rs.Draft202012Validator(new, validate_formats=True)
    assert validator.is_valid(orjson.loads(ONOFF_SAMPLE))


def test_the_call_schema_reads_the_sample_and_nested_items_are_checked() -> None:
    call = schemas.load(CALL.schema)
    assert jsonschema_rs.Draft202012Validator(call, validate_formats=True).is_valid(
        orjson.loads(CALL_SAMPLE)
    )
    narrowed = copy.deepcopy(call)
    narrowed["properties"]["tags"]["items"]["properties"]["tagId"]["type"] = "string"
    assert breaking_changes(call, narrowed) == [
        "/tags/items/tagId: type ['integer', 'null', 'number'] no longer allowed"
    ]
