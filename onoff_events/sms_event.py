"""The webhook event contract as pure functions: bytes in, a verdict out. No I/O, no event
loop. One checker per event kind (onoff_events/event_kinds.py: the SMS, the call); the module
keeps its first kind's name.

An event is either *valid* (it goes to its topic, ``sms-events``) or *quarantined* with the
reasons (it goes to the topic's DLQ, ``sms-events.dlq``). Reasons never echo a value from the
body: bodies, numbers and e-mails are personal data and these reasons reach logs, HTTP answers
and the DLQ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import jsonschema_rs
import orjson

from onoff_events import schemas
from onoff_events.cloudevents import parse_rfc3339
from onoff_events.event_kinds import SMS, EventKind

QuarantineReason = Literal["invalid_json", "not_object", "schema_violation"]


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    """One thing wrong with a body: where (JSON Pointer), which rule, and what the rule wants."""

    path: str
    keyword: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "keyword": self.keyword, "message": self.message}


class ValidEvent(NamedTuple):
    """A body that meets its kind's schema. ``raw`` is forwarded to Kafka byte for byte. (A
    named tuple: one is built per request, and a frozen dataclass takes five times as long.)

    ``time`` is the kind's time field as sent (an SMS's ``date``, a call's ``callStarted``),
    None when a call has none; ``at`` is it parsed, with its own offset. It always converts
    to UTC (the checker refuses a time that does not), so every sink can use it as it is.
    """

    event_id: str
    time: str | None
    raw: bytes
    payload: dict[str, Any]
    at: datetime | None


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A body that cannot go to ``sms-events``; ``payload`` is set when it is a JSON object."""

    reason: QuarantineReason
    problems: tuple[SchemaProblem, ...]
    event_id: str | None
    payload: dict[str, Any] | None
    raw: bytes


EventVerdict = ValidEvent | Quarantined


class EventChecker:
    """Checks webhook bodies of one kind against its schema (``schemas/``)."""

    def __init__(self, kind: EventKind = SMS, schema: dict[str, Any] | None = None) -> None:
        self._schema = schema if schema is not None else schemas.load(kind.schema)
        self._validator = jsonschema_rs.Draft202012Validator(self._schema, validate_formats=True)
        self._time_field = kind.time_field
        self._other_times = kind.other_time_fields
        self._undescribed = SchemaProblem(
            "", "schema", f"breaks {kind.schema} (nested too deeply to say where)"
        )
        # With only these keywords at the top, a property the schema does not name can never
        # be the cause of a problem: bodies are described from the properties it names.
        top_level_only = set(self._schema) <= _KNOWN_ONLY_KEYWORDS
        self._known: tuple[str, ...] | None = (
            tuple(self._schema.get("properties", {}))
            if top_level_only and self._schema.get("additionalProperties", True) is True
            else None
        )

    def check(self, raw: bytes) -> EventVerdict:
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
        # The common case costs one compiled validation and one date parse; errors are
        # described only when present.
        if self._validator.is_valid(document):
            # The schema's date-time format admits years 0000-9999 with any offset; a sink
            # needs a UTC instant (years 0001-9999). Refusing it here, where Onoff gets an
            # answer, is what keeps one such event from being dead-lettered by every sink.
            time = document.get(self._time_field)
            at = None
            if isinstance(time, str):
                at = _utc_convertible(time)
                if at is None:
                    return self._out_of_range(self._time_field, document, raw)
            else:
                time = None  # a call without a start time: the record takes the receive time
            for field in self._other_times:
                if _unconvertible(document.get(field)):
                    return self._out_of_range(field, document, raw)
            return ValidEvent(document["id"], time, raw, document, at)
        problems = tuple(self._describe(document))
        id_ok = not any(p.path == "/id" for p in problems)
        event_id = document.get("id") if id_ok and isinstance(document.get("id"), str) else None
        return Quarantined("schema_violation", problems, event_id, document, raw)

    def _out_of_range(self, field: str, document: dict[str, Any], raw: bytes) -> Quarantined:
        problem = SchemaProblem(
            f"/{field}",
            "format",
            "must be an RFC 3339 date-time between years 0001 and 9999 in UTC",
        )
        return Quarantined("schema_violation", (problem,), document["id"], document, raw)

    def _describe(self, document: dict[str, Any]) -> list[SchemaProblem]:
        """The problems of an invalid document; never raises.

        jsonschema_rs turns each error's instance into Python objects (the whole body for a
        missing property: milliseconds for a large one) and gives up past its recursion limit
        (an object nested a few hundred levels). The schema only constrains the first levels
        of the properties it names, so the problems of a copy of those, cut at
        ``_DESCRIBE_DEPTH``, are the same; if even that fails, one generic problem still says
        the body breaks the schema.
        """
        for candidate in self._described_parts(document):
            try:
                problems = self._problems(candidate)
            except ValueError:
                continue
            if problems:
                return problems
        return [self._undescribed]

    def _described_parts(self, document: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """What to describe, cheapest first; each built only when the one before failed."""
        if self._known is not None:
            yield _shallow({k: document[k] for k in self._known if k in document}, _DESCRIBE_DEPTH)
            return
        yield document
        yield _shallow(document, _DESCRIBE_DEPTH)

    def _problems(self, document: dict[str, Any]) -> list[SchemaProblem]:
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


_DESCRIBE_DEPTH = 32
"""Levels of a body kept when describing its problems (the schema constrains only two)."""

_KNOWN_ONLY_KEYWORDS = frozenset(
    {
        "$schema",
        "$id",
        "title",
        "description",
        "type",
        "required",
        "properties",
        "additionalProperties",
    }
)


def _unconvertible(value: Any) -> bool:
    """A date-time text with no UTC instant (absent, null and other types are the schema's
    concern)."""
    return isinstance(value, str) and _utc_convertible(value) is None


def _utc_convertible(date: str) -> datetime | None:
    """``date`` parsed, when it is an instant every sink can convert to UTC; else None."""
    sent_at = parse_rfc3339(date)
    if sent_at is None:
        return None
    if 1 < sent_at.year < 9999:  # an offset under a day moves the instant less than a year
        return sent_at
    try:
        sent_at.astimezone(UTC)
    except OverflowError:
        return None
    return sent_at


def _shallow(node: Any, depth: int) -> Any:
    """``node`` with every array or object ``depth`` levels down replaced by an empty one
    (same JSON type, so a type rule on it still gives the same answer)."""
    if isinstance(node, dict):
        return {k: _shallow(v, depth - 1) for k, v in node.items()} if depth > 0 else {}
    if isinstance(node, list):
        return [_shallow(v, depth - 1) for v in node] if depth > 0 else []
    return node


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
