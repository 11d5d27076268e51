"""A fake Slack incoming webhook: ``POST /services/{T…}/{B…}/{secret}``.

Follows https://api.slack.com/messaging/webhooks and its error list
(https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks): answers are
short plain strings, not JSON — 200 ``ok``; 400 ``invalid_payload`` (body not a JSON object, as
JSON or as the form field ``payload``), 400 ``no_text`` (no ``text``, ``blocks`` or
``attachments``), 400 ``invalid_blocks``; 403 ``invalid_token`` (known team and hook, wrong
secret); 404 ``no_service`` (unknown hook). Rate limit, per https://api.slack.com/docs/rate-limits:
about one message a second per webhook; over it, 429 ``rate_limited`` with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.base import FakeServer, RollingWindowLimiter, load_json, retry_after_header

DEFAULT_WEBHOOK = "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"


def _text(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    # Slack sends these strings as text/html.
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)


@dataclass(frozen=True)
class SlackMessage:
    """A message Slack accepted: the hook's ``T…/B…/secret`` path and the JSON payload."""

    webhook: str
    payload: dict[str, Any]


class FakeSlack(FakeServer):
    """Slack incoming webhooks on a local port. See the module doc."""

    def __init__(
        self,
        *,
        webhooks: Iterable[str] = (DEFAULT_WEBHOOK,),
        rate_limit: int = 1,
        rate_window: float = 1.0,
    ) -> None:
        super().__init__()
        self.webhooks = set(webhooks)
        self.messages: list[SlackMessage] = []
        self._limiter = RollingWindowLimiter(rate_limit, rate_window)

    def webhook_url(self, webhook: str = DEFAULT_WEBHOOK) -> str:
        """The full URL of a hook on this server (call after :meth:`start`)."""
        return f"{self.base_url}/services/{webhook}"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/services/{webhook:.+}", self._post)]

    def rate_limited_response(self, retry_after: float) -> web.Response:
        return _text(429, "rate_limited", retry_after_header(retry_after))

    def server_error_response(self, status: int) -> web.Response:
        return _text(status, "rollup_error" if status == 500 else "service_unavailable")

    async def _post(self, request: web.Request) -> web.Response:
        """POST /services/T…/B…/secret: post one message."""
        webhook = request.match_info["webhook"]
        if webhook not in self.webhooks:
            hook = webhook.rpartition("/")[0]
            known_hook = any(w.rpartition("/")[0] == hook for w in self.webhooks)
            return _text(403, "invalid_token") if known_hook else _text(404, "no_service")
        payload = await _payload(request)
        if payload is None:
            return _text(400, "invalid_payload")
        blocks = payload.get("blocks")
        if blocks is not None and not _valid_blocks(blocks):
            return _text(400, "invalid_blocks")
        text = payload.get("text")
        if (
            not (isinstance(text, str) and text.strip())
            and not blocks
            and not payload.get("attachments")
        ):
            return _text(400, "no_text")
        wait = self._limiter.retry_after(webhook)
        if wait > 0:
            return self.rate_limited_response(wait)
        self._limiter.admit(webhook)
        self.messages.append(SlackMessage(webhook, payload))
        return _text(200, "ok")


async def _payload(request: web.Request) -> dict[str, Any] | None:
    """The message object, sent as JSON or as the form field ``payload``; None if malformed."""
    if request.content_type == "application/x-www-form-urlencoded":
        raw = (await request.post()).get("payload")
        data = raw.encode() if isinstance(raw, str) else b""
    else:
        data = await request.read()
    try:
        payload = load_json(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _valid_blocks(blocks: Any) -> bool:
    """Layout blocks: a list of at most 50 objects, each with a string ``type``."""
    return (
        isinstance(blocks, list)
        and 0 < len(blocks) <= 50
        and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in blocks)
    )
