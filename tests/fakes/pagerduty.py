"""A fake PagerDuty Events API v2: ``POST /v2/enqueue`` with alert events.

Follows PagerDuty's "Send an Alert Event" page and Events API v2 OpenAPI (PagerDuty/developer-docs
``docs/events-API-v2/02-Trigger-Events.md``, PagerDuty/api-schema
``reference/events-v2/openapiv3.json``): ``routing_key`` (32 characters) and ``event_action``
(trigger / acknowledge / resolve) are required; ``dedup_key`` is at most 255 characters, required
for acknowledge and resolve, and made up (a UUID) for a trigger without one; a trigger needs
``payload.summary`` (≤ 1024 characters), ``payload.source`` and ``payload.severity`` (critical,
error, warning, info). Answers: 202 ``{"status": "success", "message": "Event processed",
"dedup_key"}``; 400 ``{"status": "invalid event", "message": "Event object is invalid",
"errors": [...]}``; 400 "Unrecognized object" for a body that is not a JSON object; 429 over the
per-routing-key limit (about 120 events a minute, ``05-Rate-Limits.md``).

Alert de-duplication as documented: a trigger opens an alert or adds to the open one with its
``dedup_key``; acknowledge and resolve apply to the open alert sent with the same routing key and
are otherwise dropped; after a resolve, a trigger with the same key opens a new alert.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer, RollingWindowLimiter, load_json, retry_after_header

DEFAULT_ROUTING_KEY = "0123456789abcdef0123456789abcdef"
ACTIONS = ("trigger", "acknowledge", "resolve")
SEVERITIES = ("critical", "error", "warning", "info")


@dataclass
class Incident:
    """One alert: the events that shaped it and where it stands."""

    dedup_key: str
    routing_key: str
    summary: str
    source: str
    severity: str
    status: str = "triggered"  # then "acknowledged" or "resolved"
    events: list[dict[str, Any]] = field(default_factory=list)


class FakePagerDuty(FakeServer):
    """PagerDuty's Events API v2 on a local port. See the module doc.

    ``routing_keys`` are the integration keys that exist; None accepts any 32-character key.
    """

    def __init__(
        self,
        *,
        routing_keys: Iterable[str] | None = (DEFAULT_ROUTING_KEY,),
        rate_limit: int = 120,
        rate_window: float = 60.0,
    ) -> None:
        super().__init__()
        self.routing_keys = None if routing_keys is None else set(routing_keys)
        self.events: list[dict[str, Any]] = []  # accepted events, dedup_key filled in
        self.dropped: list[dict[str, Any]] = []  # accepted, but matched no open alert
        self.incidents: list[Incident] = []  # every alert, oldest first, resolved ones too
        self._limiter = RollingWindowLimiter(rate_limit, rate_window)

    def open_incident(self, dedup_key: str) -> Incident | None:
        """The alert with this key that is not resolved, if any."""
        return next(
            (i for i in self.incidents if i.dedup_key == dedup_key and i.status != "resolved"),
            None,
        )

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v2/enqueue", self._enqueue)]

    def rate_limited_response(self, retry_after: float) -> web.Response:
        body = {
            "status": "throttle event",
            "message": "Requests for this service are arriving too quickly. Please retry later.",
        }
        return web.json_response(body, status=429, headers=retry_after_header(retry_after))

    def server_error_response(self, status: int) -> web.Response:
        body = {"status": "internal error", "message": "An internal error occurred", "errors": []}
        return web.json_response(body, status=status)

    async def _enqueue(self, request: web.Request) -> web.Response:
        """POST /v2/enqueue: one alert event."""
        try:
            event = load_json(await request.read())
        except ValueError:
            event = None
        if not isinstance(event, dict):
            body = {
                "status": "Unrecognized object",
                "message": "Event object format is unrecognized",
                "errors": ["JSON parse error"],
            }
            return web.json_response(body, status=400)
        errors = self._problems(event)
        if errors:
            body = {
                "status": "invalid event",
                "message": "Event object is invalid",
                "errors": errors,
            }
            return web.json_response(body, status=400)
        routing_key = event["routing_key"]
        wait = self._limiter.retry_after(routing_key)
        if wait > 0:
            return self.rate_limited_response(wait)
        self._limiter.admit(routing_key)
        event = {**event, "dedup_key": event.get("dedup_key") or str(uuid.uuid4())}
        self.events.append(event)
        self._apply(event)
        body = {"status": "success", "message": "Event processed", "dedup_key": event["dedup_key"]}
        return web.json_response(body, status=202)

    def _problems(self, event: dict[str, Any]) -> list[str]:
        errors: list[str] = []
        key, action, dedup_key = (
            event.get(k) for k in ("routing_key", "event_action", "dedup_key")
        )
        if not isinstance(key, str) or len(key) != 32:
            errors.append("Length of 'routing_key' is incorrect (should be 32 characters)")
        elif self.routing_keys is not None and key not in self.routing_keys:
            errors.append("Invalid routing key")
        if action not in ACTIONS:
            errors.append(
                "'event_action' is invalid (must be one of trigger, acknowledge, resolve)"
            )
        if dedup_key is not None and (not isinstance(dedup_key, str) or len(dedup_key) > 255):
            errors.append("'dedup_key' must be a string of at most 255 characters")
        elif action in ("acknowledge", "resolve") and not dedup_key:
            errors.append("'dedup_key' is missing or blank")
        if action == "trigger":
            errors.extend(_payload_problems(event.get("payload")))
        return errors

    def _apply(self, event: dict[str, Any]) -> None:
        action, dedup_key, routing_key = (
            event["event_action"],
            event["dedup_key"],
            event["routing_key"],
        )
        incident = self.open_incident(dedup_key)
        if action == "trigger":
            payload = event["payload"]
            if incident is None:
                incident = Incident(
                    dedup_key,
                    routing_key,
                    payload["summary"],
                    payload["source"],
                    payload["severity"],
                )
                self.incidents.append(incident)
            incident.summary, incident.severity = payload["summary"], payload["severity"]
        elif incident is not None and incident.routing_key == routing_key:
            incident.status = "acknowledged" if action == "acknowledge" else "resolved"
        else:
            self.dropped.append(event)
            return
        incident.events.append(event)


def _payload_problems(payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        return ["'payload' is missing or is not an object"]
    errors = [
        f"'payload.{name}' is missing or blank"
        for name in ("summary", "source")
        if not isinstance(payload.get(name), str) or not payload[name].strip()
    ]
    if isinstance(payload.get("summary"), str) and len(payload["summary"]) > 1024:
        errors.append(
            "Length of 'payload.summary' is incorrect (should be at most 1024 characters)"
        )
    if payload.get("severity") not in SEVERITIES:
        errors.append(
            "'payload.severity' is invalid (must be one of critical, error, warning, info)"
        )
    return errors
