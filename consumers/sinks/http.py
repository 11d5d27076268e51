"""What the HTTP sinks (HubSpot, Slack, PagerDuty, Alertmanager) share: one way to call a
JSON API and sort its answers, per-target rate limits, and per-target metrics.

Answers are sorted into: success; *rate limited* (429: wait ``Retry-After`` and try again, a
few times, before handing the batch back to the runner); *transient* (5xx, timeouts,
connection errors: the runner retries the batch with backoff); *auth* (401/403: the token is
wrong; the runner retries with backoff, never skipping events, and the service is unready);
*rejected* (other 4xx: this payload can never be accepted, it goes to the DLQ).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiolimiter import AsyncLimiter
from prometheus_client import CollectorRegistry, Counter

from consumers.sinks import TransientSinkError
from onoff_events.logs import log_event

log = logging.getLogger("consumers.http")
MAX_RATE_LIMITED_TRIES = 5


class RequestRejected(Exception):
    """The API refused this payload for good (4xx other than 401/403/408/429)."""

    def __init__(self, target: str, status: int, category: str = "") -> None:
        super().__init__(f"{target} answered {status}{f' {category}' if category else ''}")
        self.status = status
        self.category = category


class AuthRejected(TransientSinkError):
    """401/403: the credentials are wrong or lack a scope. Nothing moves until they are fixed."""

    configuration = True


class TargetMisconfigured(TransientSinkError):
    """A redirect, 404, 405 or 410: the configured address is wrong (a removed Slack webhook,
    a proxy's login page, a wrong path). Like bad credentials, events wait; none is skipped
    or dead-lettered for a mistake in our settings."""

    configuration = True


# Answers that mean our settings are wrong, not the payload.
MISCONFIGURED = frozenset({404, 405, 410})
# A 429 asking for longer than this is handed to the runner, whose wait a rebalance or a
# shutdown can interrupt; short ones are waited here.
MAX_INLINE_WAIT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class TargetMetrics:
    requests: Counter
    rate_limit_waits: Counter
    rate_limit_wait_seconds: Counter
    delivered: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> TargetMetrics:
        p = "onoff_consumer_target_"
        return cls(
            requests=Counter(
                p + "requests",
                "Requests to a sink's API, by outcome "
                "(ok, rate_limited, transient, auth, config, rejected).",
                ["sink", "target", "outcome"],
                registry=registry,
            ),
            rate_limit_waits=Counter(
                p + "rate_limit_waits",
                "Waits before a request: the client-side limiter or a 429.",
                ["sink", "target", "cause"],
                registry=registry,
            ),
            rate_limit_wait_seconds=Counter(
                p + "rate_limit_wait_seconds",
                "Time spent waiting for rate limits.",
                ["sink", "target"],
                registry=registry,
            ),
            delivered=Counter(
                p + "delivered",
                "Items a target accepted (communications, alerts, messages, events).",
                ["sink", "target"],
                registry=registry,
            ),
        )


class JsonApi:
    """One vendor API: a session, a client-side rate limiter, answers sorted as above."""

    def __init__(
        self,
        sink: str,
        target: str,
        metrics: TargetMetrics,
        *,
        limiter: AsyncLimiter | None = None,
        headers: dict[str, str] | None = None,
        timeout_seconds: float = 10.0,
    ) -> None:
        self.sink = sink
        self.target = target
        self._metrics = metrics
        self._limiter = limiter
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, connect=3)
        self._session: aiohttp.ClientSession | None = None
        self._auth_logged = 0.0

    def count_delivered(self, items: int = 1) -> None:
        self._metrics.delivered.labels(self.sink, self.target).inc(items)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def call(
        self, method: str, url: str, body: Any, also_limited_by: AsyncLimiter | None = None
    ) -> tuple[int, bytes]:
        """Send ``body`` as JSON; return (status, body bytes) of a 2xx answer, else raise.

        Every request waits for the API's limiter; ``also_limited_by`` adds a stricter one
        for endpoints with a limit of their own (HubSpot's searches count toward both)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        payload = orjson.dumps(body)
        for attempt in range(MAX_RATE_LIMITED_TRIES):
            await self._wait_for(self._limiter)
            await self._wait_for(also_limited_by)
            try:
                # No redirects: aiohttp would resend a POST as a GET, and a proxy's login
                # page would then look like success.
                async with self._session.request(
                    method, url, data=payload, allow_redirects=False
                ) as response:
                    data = await response.read()
                    status = response.status
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._count("transient")
                raise TransientSinkError(f"{self.target}: {type(exc).__name__}") from exc
            if status < 300:
                self._count("ok")
                return status, data
            if status == 429:
                self._count("rate_limited")
                wait = retry_after if retry_after is not None else 2.0**attempt
                self._metrics.rate_limit_waits.labels(self.sink, self.target, "429").inc()
                self._metrics.rate_limit_wait_seconds.labels(self.sink, self.target).inc(wait)
                if attempt == MAX_RATE_LIMITED_TRIES - 1 or wait > MAX_INLINE_WAIT_SECONDS:
                    break
                await asyncio.sleep(wait)
                continue
            return self._refuse(status, data, retry_after)
        raise TransientSinkError(f"{self.target}: rate limited", retry_after=retry_after)

    def _refuse(self, status: int, data: bytes, retry_after: float | None) -> tuple[int, bytes]:
        if status in (401, 403):
            self._count("auth")
            self._log_setup_problem(
                "credentials_rejected",
                status,
                "fix the token or its scopes; events wait, none are skipped",
            )
            raise AuthRejected(f"{self.target}: credentials rejected ({status})")
        if status in MISCONFIGURED or 300 <= status < 400:
            self._count("config")
            self._log_setup_problem(
                "target_address_rejected",
                status,
                "check the target's URL setting; events wait, none are skipped",
            )
            raise TargetMisconfigured(f"{self.target}: address rejected ({status})")
        if status >= 500 or status == 408:
            self._count("transient")
            raise TransientSinkError(f"{self.target}: {status}", retry_after=retry_after)
        self._count("rejected")
        raise RequestRejected(self.target, status, _category(data))

    def _log_setup_problem(self, event: str, status: int, detail: str) -> None:
        now = time.monotonic()
        if now - self._auth_logged > 60:  # one clear line a minute, not one per retry
            self._auth_logged = now
            log_event(
                log,
                event,
                logging.ERROR,
                sink=self.sink,
                target=self.target,
                status=status,
                detail=detail,
            )

    async def _wait_for(self, limiter: AsyncLimiter | None) -> None:
        if limiter is None:
            return
        if limiter.has_capacity():
            await limiter.acquire()
            return
        started = time.monotonic()
        self._metrics.rate_limit_waits.labels(self.sink, self.target, "client").inc()
        await limiter.acquire()
        self._metrics.rate_limit_wait_seconds.labels(self.sink, self.target).inc(
            time.monotonic() - started
        )

    def _count(self, outcome: str) -> None:
        self._metrics.requests.labels(self.sink, self.target, outcome).inc()


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _category(data: bytes) -> str:
    """The vendor's error category (HubSpot's ``category``), never its message: messages
    can quote the payload."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return ""
    category = body.get("category") or body.get("status") if isinstance(body, dict) else ""
    return str(category)[:64] if category else ""


def json_field(data: bytes, name: str, target: str) -> str:
    """A field of a 2xx JSON answer; an answer without it is treated as transient (a proxy or
    an outage page), never as a crash."""
    try:
        return str(orjson.loads(data)[name])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise TransientSinkError(f"{target}: unexpected answer ({type(exc).__name__})") from exc
