"""The SMS event contract as pure functions: bytes in, a verdict out. No I/O, no event loop.

An event is either *valid* (it goes to ``sms-events``) or *quarantined* with the reasons
(it goes to ``sms-events.dlq``). Reasons never echo a value from the body: bodies, numbers
and e-mails are personal data and these reasons reach logs, HTTP answers and the DLQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import jsonschema_rs
import orjson

from onoff_events import schemas

QuarantineReason = Literal["invalid_json", "not_object", "schema_violation"]


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    """One thing wrong with a body: where (JSON Pointer), which rule, and what the rule wants."""

    path: str
    keyword: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "keyword": self.keyword, "message": self.message}


class ValidSmsEvent(NamedTuple):
    """A body that meets the schema. ``raw`` is forwarded to Kafka byte for byte. (A named
    tuple: one is built per request, and a frozen dataclass takes five times as long.)"""

    event_id: str
    date: str
    raw: bytes
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A body that cannot go to ``sms-events``; ``payload`` is set when it is a JSON object."""

    reason: QuarantineReason
    problems: tuple[SchemaProblem, ...]
    event_id: str | None
    payload: dict[str, Any] | None
    raw: bytes


SmsEventVerdict = ValidSmsEvent | Quarantined


class SmsEventChecker:
    """Checks webhook bodies against ``schemas/onoff-sms-event.schema.json``."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        self._schema = schema if schema is not None else schemas.load(schemas.SMS_EVENT)
        self._validator = jsonschema_rs.Draft202012Validator(self._schema, validate_formats=True)

    def check(self, raw: bytes) -> SmsEventVerdict:
        """Parse and validate one body."""
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # orjson's message gives a position, never the offending text.
            problem = SchemaProblem("", "json", f"not valid UTF-8 JSON: {_position(exc)}")
            return Quarantined("invalid_json", (problem,), None, None, raw)
        if not isinstance(document, dict):
            kind = type(document).__name__
            problem = SchemaProblem(
                "", "type", f"must be a JSON object, got a JSON {_json_kind(kind)}"
            )
            return Quarantined("not_object", (problem,), None, None, raw)
        # The common case costs one compiled validation; errors are described only when present.
        if self._validator.is_valid(document):
            return ValidSmsEvent(document["id"], document["date"], raw, document)
        problems = tuple(self._describe(document))
        id_ok = not any(p.path == "/id" for p in problems)
        event_id = document.get("id") if id_ok and isinstance(document.get("id"), str) else None
        return Quarantined("schema_violation", problems, event_id, document, raw)

    def _describe(self, document: dict[str, Any]) -> list[SchemaProblem]:
        problems: list[SchemaProblem] = []
        for error in self._validator.iter_errors(document):
            keyword = str(error.schema_path[-1]) if error.schema_path else ""
            rule = _walk(self._schema, error.schema_path)
            if keyword == "required":
                problems.extend(
                    SchemaProblem(_pointer([*error.instance_path, name]), "required", "is required")
                    for name in rule
                    if name not in _walk(document, error.instance_path)
                )
                continue
            problems.append(
                SchemaProblem(_pointer(error.instance_path), keyword, _wants(keyword, rule))
            )
        # A validator may report one 'required' error per missing property, each naming the
        # whole list; keep every problem once, in a stable order.
        return sorted(set(problems), key=lambda p: (p.path, p.keyword, p.message))


def _wants(keyword: str, rule: Any) -> str:
    """What the rule asks for, from the schema alone (so no body value leaks into it)."""
    dumped = orjson.dumps(rule).decode()
    messages = {
        "type": f"must be of type {dumped}",
        "const": f"must be {dumped}",
        "enum": f"must be one of {dumped}",
        "format": f"must be a valid {rule}",
        "pattern": f"must match the pattern {dumped}",
        "minLength": f"must have at least {rule} characters",
        "maxLength": f"must have at most {rule} characters",
    }
    return messages.get(keyword, f"breaks the {keyword} rule")


def _walk(node: Any, path: list[str | int]) -> Any:
    for step in path:
        node = node[step]
    return node


def _pointer(path: list[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _position(exc: orjson.JSONDecodeError) -> str:
    return f"line {exc.lineno} column {exc.colno} (char {exc.pos})"


def _json_kind(python_type: str) -> str:
    return {
        "list": "array",
        "str": "string",
        "int": "number",
        "float": "number",
        "bool": "boolean",
        "NoneType": "null",
    }.get(python_type, python_type)
