"""A fake HubSpot CRM v3 API: contacts, communications (SMS / WhatsApp / LinkedIn messages)
and calls (``/crm/v3/objects/calls``: call→contact is HUBSPOT_DEFINED 194).

Endpoints, as documented by HubSpot:

* ``POST /crm/v3/objects/{contacts|communications}`` — create a record; 201 with the record
  (https://developers.hubspot.com/docs/api/crm/communications for communications: the
  properties ``hs_communication_channel_type`` in SMS / WHATS_APP / LINKEDIN_MESSAGE,
  ``hs_communication_logged_from`` = CRM, ``hs_timestamp`` (epoch ms or UTC ISO 8601), and
  ``associations`` with ``to.id`` and ``types`` — communication→contact is HUBSPOT_DEFINED 81).
  A second contact with an existing email gets 409 CONFLICT "Contact already exists. Existing ID".
* ``POST /crm/v3/objects/{contacts|communications}/search`` — ``filterGroups`` ORed, ``filters``
  ANDed within a group (https://developers.hubspot.com/docs/api-reference/2026-03/crm/search-the-crm);
  at most 5 groups, 10 filters a group, 25 in all (changelog, August 2024); ``limit`` ≤ 200.

Errors use HubSpot's body ``{"status": "error", "message", "correlationId", "category"}``
(https://developers.hubspot.com/docs/api-reference/error-handling): 401 INVALID_AUTHENTICATION,
403 MISSING_SCOPES, 400 VALIDATION_ERROR ("Property values were not valid: [...]"), 409 CONFLICT.
Rate limits: a rolling 10-second window (100 by default) and the search endpoints' own per-second
limit (5 by default); 429 carries ``errorType: RATE_LIMIT`` and ``policyName`` as HubSpot's API
usage guidelines show, plus ``Retry-After``.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aiohttp import web

from tests.fakes.base import FakeServer, RollingWindowLimiter, load_json, retry_after_header

DEFAULT_TOKEN = "pat-na1-fake-token"  # noqa: S105 # the fake's own, known to the tests
CHANNEL_TYPES = ("SMS", "WHATS_APP", "LINKEDIN_MESSAGE")
BATCH_LIMIT = 100  # inputs per batch request, as HubSpot's CRM batch endpoints allow
COMMUNICATION_TO_CONTACT = 81  # HUBSPOT_DEFINED association type id
CALL_TO_CONTACT = 194  # HUBSPOT_DEFINED, calls → contacts
ASSOCIATION_TO_CONTACT = {"communications": COMMUNICATION_TO_CONTACT, "calls": CALL_TO_CONTACT}
# The calls engagement (https://developers.hubspot.com/docs/api/crm/calls): hs_timestamp
# required; hs_call_duration in milliseconds; hs_call_direction and hs_call_status enumerated.
CALL_PROPERTIES = frozenset(
    {"hs_timestamp", "hs_call_title", "hs_call_body", "hs_call_direction", "hs_call_duration"}
    | {"hs_call_status", "hs_call_recording_url", "hs_call_from_number", "hs_call_to_number"}
    | {"hubspot_owner_id"}
)
CALL_DIRECTIONS = ("INBOUND", "OUTBOUND")
CALL_STATUSES = (
    "BUSY", "CALLING_CRM_USER", "CANCELED", "COMPLETED", "CONNECTING", "FAILED",
    "IN_PROGRESS", "NO_ANSWER", "QUEUED", "RINGING",
)  # fmt: skip
CONTACT_PROPERTIES = frozenset(
    {"email", "firstname", "lastname", "phone", "mobilephone", "company", "website"}
    | {"jobtitle", "lifecyclestage", "hs_whatsapp_phone_number", "hubspot_owner_id"}
)
COMMUNICATION_PROPERTIES = frozenset(
    {"hs_communication_channel_type", "hs_communication_logged_from", "hs_communication_body"}
    | {"hs_timestamp", "hubspot_owner_id"}
)
SYSTEM_PROPERTIES = {
    "contacts": ("hs_object_id", "createdate", "lastmodifieddate"),
    "communications": ("hs_object_id", "hs_createdate", "hs_lastmodifieddate"),
    "calls": ("hs_object_id", "hs_createdate", "hs_lastmodifieddate"),
}
DEFAULT_SEARCH_PROPERTIES = {  # what a search returns when it names no properties
    "contacts": (
        "createdate",
        "email",
        "firstname",
        "hs_object_id",
        "lastmodifieddate",
        "lastname",
    ),
    "communications": SYSTEM_PROPERTIES["communications"],
    "calls": SYSTEM_PROPERTIES["calls"],
}
OPERATORS = frozenset({"EQ", "NEQ", "IN", "NOT_IN", "HAS_PROPERTY", "NOT_HAS_PROPERTY"})
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, category: str, message: str, **extra: Any) -> web.Response:
    body = {"status": "error", "message": message, "correlationId": str(uuid.uuid4())}
    return web.json_response({**body, "category": category, **extra}, status=status)


class Refusal(NamedTuple):
    """Why HubSpot refuses one create: its HTTP status, error category and message."""

    status: int
    category: str
    message: str


def _refused(message: str) -> Refusal:
    return Refusal(400, "VALIDATION_ERROR", message)


def _invalid(message: str) -> web.Response:
    return _error(400, "VALIDATION_ERROR", message)


def _problem(name: str, error: str, message: str) -> dict[str, Any]:
    return {"isValid": False, "message": message, "error": error, "name": name}


@dataclass
class CrmRecord:
    """One stored CRM object; ``associations`` holds ``{"toObjectId", "associationTypeId",
    "associationCategory"}`` entries (communication→contact ones for communications)."""

    id: str
    properties: dict[str, str]
    created_at: str
    updated_at: str
    created: float = field(default_factory=time.monotonic, repr=False)
    associations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def contact_ids(self) -> list[str]:
        return [
            a["toObjectId"]
            for a in self.associations
            if a["associationTypeId"] in ASSOCIATION_TO_CONTACT.values()
        ]

    def to_json(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        props = (
            dict(self.properties) if names is None else {n: self.properties.get(n) for n in names}
        )
        return {
            "id": self.id,
            "properties": props,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "archived": False,
        }


class FakeHubSpot(FakeServer):
    """HubSpot CRM v3 for contacts and communications, on a local port. See the module doc."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        forbidden_tokens: Iterable[str] = (),
        rate_limit: int = 100,
        rate_window: float = 10.0,
        search_rate_limit: int = 5,
        search_window: float = 1.0,
        custom_properties: Iterable[str] = ("onoff_event_id",),
        search_lag: float = 0.0,
    ) -> None:
        super().__init__()
        self.token = token
        self.forbidden_tokens = set(forbidden_tokens)  # valid, but lacking the CRM scopes: 403
        self.search_lag = search_lag  # seconds before a new record shows in search, as in HubSpot
        self.contacts: list[CrmRecord] = []
        self.communications: list[CrmRecord] = []
        self.calls: list[CrmRecord] = []
        self.properties: dict[str, set[str]] = {
            "contacts": set(CONTACT_PROPERTIES),
            "communications": set(COMMUNICATION_PROPERTIES) | set(custom_properties),
            "calls": set(CALL_PROPERTIES) | set(custom_properties),
        }
        self._limiter = RollingWindowLimiter(rate_limit, rate_window)
        self._search_limiter = RollingWindowLimiter(search_rate_limit, search_window)
        self._ids = itertools.count(100001)

    def define_property(self, object_type: str, name: str) -> None:
        """Define a custom property on ``contacts`` or ``communications``."""
        self.properties[object_type].add(name)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/crm/v3/objects/{object_type}", self._create),
            web.post("/crm/v3/objects/{object_type}/batch/create", self._batch_create),
            web.post("/crm/v3/objects/{object_type}/search", self._search),
        ]

    def rate_limited_response(self, retry_after: float, *, search: bool = False) -> web.Response:
        policy = "SECONDLY" if search else "TEN_SECONDLY_ROLLING"
        body = {
            "status": "error",
            "message": f"You have reached your {policy.lower()} limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": policy,
            "requestId": str(uuid.uuid4()),
        }
        return web.json_response(body, status=429, headers=retry_after_header(retry_after))

    def server_error_response(self, status: int) -> web.Response:
        return _error(status, "INTERNAL_ERROR", "internal error")

    def _store(self, request: web.Request) -> tuple[str, list[CrmRecord]]:
        object_type = request.match_info["object_type"]
        if object_type == "contacts":
            return object_type, self.contacts
        if object_type == "communications":
            return object_type, self.communications
        if object_type == "calls":
            return object_type, self.calls
        raise web.HTTPNotFound

    def _guard(self, request: web.Request, *, search: bool) -> web.Response | None:
        """Authentication (private-app bearer token), then the rate limits."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in {self.token, *self.forbidden_tokens}:
            return _error(
                401,
                "INVALID_AUTHENTICATION",
                "Authentication credentials not found. This API supports OAuth 2.0 authentication"
                " and you can find more details at"
                " https://developers.hubspot.com/docs/methods/auth/oauth-overview",
            )
        if token in self.forbidden_tokens:
            return _error(
                403,
                "MISSING_SCOPES",
                "This app hasn't been granted all required scopes to make this call."
                " Read more about required scopes here: https://developers.hubspot.com/scopes.",
                errors=[{"message": "One or more of the following scopes are required."}],
                links={"scopes": "https://developers.hubspot.com/scopes"},
            )
        wait = self._limiter.retry_after()
        search_wait = self._search_limiter.retry_after() if search else 0.0
        if wait > 0 or search_wait > 0:
            return self.rate_limited_response(max(wait, search_wait), search=search_wait > wait)
        self._limiter.admit()
        if search:
            self._search_limiter.admit()
        return None

    async def _admit(self, request: web.Request, *, search: bool) -> dict[str, Any] | web.Response:
        """The request's JSON object, or the answer refusing it (auth, rate limit, bad JSON)."""
        refusal = self._guard(request, search=search)
        if refusal is not None:
            return refusal
        try:
            body = load_json(await request.read())
        except json.JSONDecodeError as error:
            return _invalid(f"Invalid input JSON on line {error.lineno}, column {error.colno}")
        except ValueError:
            return _invalid("Invalid input JSON: the body is not UTF-8 JSON")
        return (
            body if isinstance(body, dict) else _invalid("Invalid input JSON: expected an object")
        )

    async def _create(self, request: web.Request) -> web.Response:
        """POST /crm/v3/objects/{object_type} (HubSpot's basic create endpoint)."""
        object_type, store = self._store(request)
        body = await self._admit(request, search=False)
        if isinstance(body, web.Response):
            return body
        checked = self._checked_input(object_type, body)
        if isinstance(checked, Refusal):
            return _error(checked.status, checked.category, checked.message)
        record = self._new_record(object_type, *checked)
        store.append(record)
        return web.json_response(record.to_json(), status=201)

    async def _batch_create(self, request: web.Request) -> web.Response:
        """POST /crm/v3/objects/{object_type}/batch/create: up to 100 ``inputs``, one request.

        Without ``objectWriteTraceId`` on the inputs, one refused input refuses the whole
        batch (its error, nothing created). With them (HubSpot's multi-status mode), the
        valid inputs are created and the answer is 207 with ``results`` (each carrying its
        input's ``objectWriteTraceId``) and ``errors`` (each naming its input's trace id in
        ``context.objectWriteTraceId``, HubSpot's map of lists of strings)."""
        object_type, store = self._store(request)
        body = await self._admit(request, search=False)
        if isinstance(body, web.Response):
            return body
        inputs = body.get("inputs")
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, dict) for i in inputs)
        ):
            return _invalid("Invalid input JSON: 'inputs' must be a non-empty array of objects")
        if len(inputs) > BATCH_LIMIT:
            return _invalid(f"Too many inputs: {len(inputs)} is more than {BATCH_LIMIT}")
        traces = [i.get("objectWriteTraceId") for i in inputs]
        multi_status = all(isinstance(t, str) and t for t in traces)
        accepted: list[tuple[str | None, dict[str, str], list[dict[str, Any]]]] = []
        errors: list[dict[str, Any]] = []
        taken_emails: set[str] = set()
        for trace, item in zip(traces, inputs, strict=True):
            checked = self._checked_input(object_type, item, taken_emails)
            if isinstance(checked, Refusal):
                if not multi_status:
                    return _error(checked.status, checked.category, checked.message)
                errors.append(
                    {
                        "status": "error",
                        "category": checked.category,
                        "message": checked.message,
                        "context": {"objectWriteTraceId": [trace]},
                    }
                )
                continue
            values, associations = checked
            if "email" in values:
                taken_emails.add(values["email"])
            accepted.append((trace, values, associations))
        started = _now_iso()
        results = []
        for trace, values, associations in accepted:
            record = self._new_record(object_type, values, associations)
            store.append(record)
            results.append({**record.to_json(), **({"objectWriteTraceId": trace} if trace else {})})
        answer: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": _now_iso(),
        }
        if errors:
            answer |= {"errors": errors, "numErrors": len(errors)}
        return web.json_response(answer, status=207 if errors else 201)

    def _checked_input(
        self, object_type: str, body: dict[str, Any], taken_emails: set[str] | None = None
    ) -> tuple[dict[str, str], list[dict[str, Any]]] | Refusal:
        """One create's properties and associations as HubSpot would store them, or why it
        refuses them. ``taken_emails``: e-mails earlier inputs of the same batch claim."""
        properties = body.get("properties")
        if not isinstance(properties, dict):
            return Refusal(
                400, "VALIDATION_ERROR", "Invalid input JSON: 'properties' must be an object"
            )
        values = {
            k: str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in properties.items()
            if v is not None
        }
        problems = self._property_problems(object_type, values)
        if problems:
            message = (
                f"Property values were not valid: {json.dumps(problems, separators=(',', ':'))}"
            )
            return Refusal(400, "VALIDATION_ERROR", message)
        associations = self._associations(object_type, body.get("associations", []))
        if isinstance(associations, Refusal):
            return associations
        if "hs_timestamp" in values:
            values["hs_timestamp"] = _timestamp(values["hs_timestamp"]) or values["hs_timestamp"]
        if object_type == "contacts" and "email" in values:
            values["email"] = values["email"].lower()
            existing = next(
                (c for c in self.contacts if c.properties.get("email") == values["email"]), None
            )
            if existing is not None:
                return Refusal(
                    409, "CONFLICT", f"Contact already exists. Existing ID: {existing.id}"
                )
            if values["email"] in (taken_emails or ()):
                return Refusal(409, "CONFLICT", "Contact already exists in this batch")
        return values, associations

    def _property_problems(self, object_type: str, values: dict[str, str]) -> list[dict[str, Any]]:
        problems = [
            _problem(name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')
            for name in values
            if name not in self.properties[object_type]
        ]
        if object_type == "contacts":
            email = values.get("email")
            if email is not None and not EMAIL.match(email):
                problems.append(
                    _problem("email", "INVALID_EMAIL", f"Email address {email} is invalid")
                )
            return problems
        if object_type == "calls":
            return problems + self._call_problems(values)
        required = {
            "hs_communication_channel_type": CHANNEL_TYPES,
            "hs_communication_logged_from": ("CRM",),
        }
        for name, allowed in required.items():
            if name not in values:
                problems.append(_problem(name, "REQUIRED_PROPERTY", f"{name} is required"))
            elif values[name] not in allowed:
                message = f"{values[name]} was not one of the allowed options: {list(allowed)}"
                problems.append(_problem(name, "INVALID_OPTION", message))
        return problems + _timestamp_problems(values)

    @staticmethod
    def _call_problems(values: dict[str, str]) -> list[dict[str, Any]]:
        problems = _timestamp_problems(values)
        for name, allowed in (
            ("hs_call_direction", CALL_DIRECTIONS),
            ("hs_call_status", CALL_STATUSES),
        ):
            if name in values and values[name] not in allowed:
                message = f"{values[name]} was not one of the allowed options: {list(allowed)}"
                problems.append(_problem(name, "INVALID_OPTION", message))
        duration = values.get("hs_call_duration")
        if duration is not None and not str(duration).isdigit():
            problems.append(
                _problem(
                    "hs_call_duration", "INVALID_INTEGER", f"{duration} is not a valid integer"
                )
            )
        return problems

    def _associations(self, object_type: str, raw: Any) -> list[dict[str, Any]] | Refusal:
        if not isinstance(raw, list):
            return _refused("Invalid input JSON: 'associations' must be an array")
        if object_type == "contacts":
            return [a for a in raw if isinstance(a, dict)]  # kept as sent; the fake checks none
        contact_ids = {c.id for c in self.contacts}
        result: list[dict[str, Any]] = []
        for item in raw:
            to = item.get("to") if isinstance(item, dict) else None
            types = item.get("types") if isinstance(item, dict) else None
            if (
                not isinstance(to, dict)
                or "id" not in to
                or not isinstance(types, list)
                or not types
            ):
                return _refused("Invalid input JSON: an association needs 'to.id' and 'types'")
            for kind in types:
                pair = (
                    (kind.get("associationCategory"), kind.get("associationTypeId"))
                    if isinstance(kind, dict)
                    else None
                )
                expected = ASSOCIATION_TO_CONTACT[object_type]
                if pair != ("HUBSPOT_DEFINED", expected):
                    return _refused(
                        f"Association type {pair} is not valid from {object_type} to contacts"
                    )
                if str(to["id"]) not in contact_ids:
                    return _refused(f"Association target contact {to['id']} does not exist")
                result.append(
                    {
                        "toObjectId": str(to["id"]),
                        "associationCategory": "HUBSPOT_DEFINED",
                        "associationTypeId": expected,
                    }
                )
        return result

    def seed_contact(self, properties: dict[str, str]) -> str:
        """A contact that was in the CRM before the test: already in the search index (a
        seeded record subject to ``search_lag`` would be invisible to the first searches and
        read as an unknown contact). Returns its id."""
        contact = self._new_record("contacts", dict(properties), [])
        contact.created -= self.search_lag
        self.contacts.append(contact)
        return contact.id

    def _new_record(
        self, object_type: str, values: dict[str, str], associations: list[dict[str, Any]]
    ) -> CrmRecord:
        record_id, now = str(next(self._ids)), _now_iso()
        system = dict(zip(SYSTEM_PROPERTIES[object_type], (record_id, now, now), strict=True))
        return CrmRecord(record_id, {**values, **system}, now, now, associations=associations)

    async def _search(self, request: web.Request) -> web.Response:
        """POST /crm/v3/objects/{object_type}/search (HubSpot's CRM search endpoint)."""
        object_type, store = self._store(request)
        body = await self._admit(request, search=True)
        if isinstance(body, web.Response):
            return body
        groups = self._filter_groups(object_type, body.get("filterGroups", []))
        if isinstance(groups, web.Response):
            return groups
        limit, after = body.get("limit", 10), str(body.get("after", "0"))
        if not isinstance(limit, int) or not 0 < limit <= 200 or not after.isdigit():
            return _invalid("'limit' must be 1 to 200 and 'after' a non-negative integer")
        names = body.get("properties") or DEFAULT_SEARCH_PROPERTIES[object_type]
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            return _invalid("'properties' must be an array of property names")
        names = [n for n in names if n in self.properties[object_type]] + list(
            SYSTEM_PROPERTIES[object_type]
        )
        visible_before = time.monotonic() - self.search_lag
        matches = [
            r
            for r in store
            if r.created <= visible_before and (not groups or any(_matches(r, g) for g in groups))
        ]
        start = int(after)
        response: dict[str, Any] = {
            "total": len(matches),
            "results": [r.to_json(dict.fromkeys(names)) for r in matches[start : start + limit]],
        }
        if start + limit < len(matches):
            response["paging"] = {"next": {"after": str(start + limit)}}
        return web.json_response(response)

    def _filter_groups(
        self, object_type: str, raw: Any
    ) -> list[list[dict[str, Any]]] | web.Response:
        if not isinstance(raw, list) or len(raw) > 5:
            return _invalid("'filterGroups' must be an array of at most 5 filter groups")
        groups: list[list[dict[str, Any]]] = []
        for group in raw:
            filters = group.get("filters") if isinstance(group, dict) else None
            if not isinstance(filters, list) or len(filters) > 10:
                return _invalid("each filter group needs 'filters', at most 10 of them")
            if not all(isinstance(f, dict) for f in filters):
                return _invalid("each filter must be an object")
            groups.append(filters)
        if sum(len(g) for g in groups) > 25:
            return _invalid("a search may have at most 25 filters in all")
        for search_filter in itertools.chain.from_iterable(groups):
            problem = self._filter_problem(object_type, search_filter)
            if problem:
                return _invalid(problem)
        return groups

    def _filter_problem(self, object_type: str, search_filter: dict[str, Any]) -> str | None:
        name, operator = search_filter.get("propertyName"), search_filter.get("operator")
        known = self.properties[object_type] | set(SYSTEM_PROPERTIES[object_type])
        if name not in known:
            return f"There was a problem with the request: unknown property {name!r}"
        if operator not in OPERATORS:
            return f"Operator {operator!r} is not one this fake supports: {sorted(OPERATORS)}"
        if operator in ("IN", "NOT_IN") and not isinstance(search_filter.get("values"), list):
            return f"Operator {operator} needs 'values', an array"
        if operator in ("EQ", "NEQ") and "value" not in search_filter:
            return f"Operator {operator} needs a 'value'"
        return None


def _timestamp_problems(values: dict[str, str]) -> list[dict[str, Any]]:
    """``hs_timestamp``, required on every engagement: epoch ms or ISO 8601 UTC."""
    stamp = values.get("hs_timestamp")
    if stamp is None:
        return [_problem("hs_timestamp", "REQUIRED_PROPERTY", "hs_timestamp is required")]
    if _timestamp(stamp) is None:
        message = f"{stamp} is not a valid epoch millisecond or ISO 8601 UTC datetime"
        return [_problem("hs_timestamp", "INVALID_DATETIME", message)]
    return []


def _timestamp(value: str) -> str | None:
    """``hs_timestamp`` (epoch milliseconds or ISO 8601) as HubSpot returns it; None if neither."""
    try:
        when = (
            datetime.fromtimestamp(int(value) / 1000, UTC)
            if value.isdigit()
            else datetime.fromisoformat(value)
        )
    except (ValueError, OverflowError):
        return None
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _matches(record: CrmRecord, filters: list[dict[str, Any]]) -> bool:
    """True when the record meets every filter (string comparisons ignore case)."""
    for search_filter in filters:
        actual = record.properties.get(search_filter["propertyName"])
        wanted = {str(v).lower() for v in search_filter.get("values", [search_filter.get("value")])}
        found = actual is not None and actual.lower() in wanted
        results = {
            "EQ": found,
            "IN": found,
            "NEQ": not found,
            "NOT_IN": not found,
            "HAS_PROPERTY": actual is not None,
            "NOT_HAS_PROPERTY": actual is None,
        }
        if not results[search_filter["operator"]]:
            return False
    return True
