"""Loading the JSON Schema files in ``schemas/``: the files are the contract, code compiles them."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

SMS_EVENT = "onoff-sms-event.schema.json"
CALL_EVENT = "onoff-call-event.schema.json"
DLQ_RECORD = "dlq-record.schema.json"
SINK_DLQ_RECORD = "sink-dlq-record.schema.json"


def schemas_dir() -> Path:
    """``$ONOFF_SCHEMAS_DIR`` when set (container images), else the repository's ``schemas/``."""
    override = os.environ.get("ONOFF_SCHEMAS_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "schemas"


@cache
def load(name: str) -> dict[str, Any]:
    """The parsed schema file ``name``."""
    schema: dict[str, Any] = orjson.loads((schemas_dir() / name).read_bytes())
    return schema


@cache
def validator(name: str) -> jsonschema_rs.Draft202012Validator:
    """A compiled 2020-12 validator for ``name`` that also checks ``format`` (date-time)."""
    return jsonschema_rs.Draft202012Validator(load(name), validate_formats=True)
