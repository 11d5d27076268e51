"""What the fake vendor servers share: a local aiohttp server, a request log, rate limits, faults.

Each fake (``hubspot``, ``slack``, ``pagerduty``) subclasses :class:`FakeServer`, names its routes
and says how its vendor words a rate-limit answer and a server error. The base class then gives
every fake the same test controls:

* ``requests`` — every request received, in order (method, path, time, headers, body, status);
* ``status_counts`` — how many responses were sent with each status;
* ``fail_next(n, status, path=...)`` — answer the next ``n`` requests with 429 or a 5xx;
* ``response_delay`` and ``pause()`` / ``resume()`` — slow responses down, or hold them.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RecordedRequest:
    """One request as the fake received it; ``status`` is filled in once it is answered."""

    method: str
    path: str
    at: float  # time.monotonic() when it arrived
    headers: Mapping[str, str]
    body: bytes
    json: Any  # the parsed body, or None when it was not JSON
    status: int | None = None


class RollingWindowLimiter:
    """At most ``limit`` admitted requests per key in any rolling ``window`` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._hits: defaultdict[Hashable, deque[float]] = defaultdict(deque)

    def retry_after(self, key: Hashable = None) -> float:
        """Seconds until ``key`` may make another request; 0 when it may now. Admits nothing."""
        hits = self._hits[key]
        now = time.monotonic()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) < self.limit:
            return 0.0
        return hits[0] + self.window - now

    def admit(self, key: Hashable = None) -> None:
        """Count one request for ``key`` (call after :meth:`retry_after` said 0)."""
        self._hits[key].append(time.monotonic())


def retry_after_header(seconds: float) -> dict[str, str]:
    """A ``Retry-After`` header in whole seconds, never less than 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def load_json(raw: bytes) -> Any:
    """The JSON value in ``raw``; raises ``ValueError`` when it is not JSON."""
    return json.loads(raw)


@dataclass
class _Fault:
    status: int
    remaining: int
    path: str | None
    retry_after: float
    body: bytes | None = None  # an answer of our choosing (a proxy's page, a wrong shape)


class FakeServer:
    """A real HTTP server on 127.0.0.1 (a free port) for one fake vendor API."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.status_counts: Counter[int] = Counter()
        self.response_delay: float = 0.0
        self.base_url = ""
        self._faults: list[_Fault] = []
        self._open = asyncio.Event()
        self._open.set()
        self._runner: web.AppRunner | None = None

    def routes(self) -> list[web.RouteDef]:
        """The vendor's endpoints."""
        raise NotImplementedError

    def rate_limited_response(self, retry_after: float) -> web.Response:
        """The vendor's 429 answer."""
        raise NotImplementedError

    def server_error_response(self, status: int) -> web.Response:
        """The vendor's answer for an injected 5xx."""
        raise NotImplementedError

    async def start(self, port: int = 0) -> str:
        """Start listening (on a free port unless ``port`` is given); returns the base URL,
        e.g. ``http://127.0.0.1:54321``."""
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        return self.base_url

    async def close(self) -> None:
        """Release any held requests and stop the server."""
        self._open.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def fail_next(
        self, count: int, status: int = 503, *, path: str | None = None, retry_after: float = 1
    ) -> None:
        """Answer the next ``count`` requests (to ``path`` only, if given) with ``status``.

        429 uses the vendor's rate-limit body and ``Retry-After: retry_after``; other statuses
        use the vendor's server-error body. Injected answers do not touch stores or limits.
        """
        self._faults.append(_Fault(status, count, path, retry_after))

    def answer_next(self, count: int, status: int, body: bytes, *, path: str | None = None) -> None:
        """Answer the next ``count`` requests (to ``path`` only, if given) with ``status`` and
        ``body`` as JSON content: what a proxy or a vendor's bad day may send."""
        self._faults.append(_Fault(status, count, path, 0.0, body))

    def clear_faults(self) -> None:
        """Forget every injected answer not yet given (ends a storm of ``fail_next``)."""
        self._faults.clear()

    def pause(self) -> None:
        """Hold every request not yet being handled (new ones too) until :meth:`resume`."""
        self._open.clear()

    def resume(self) -> None:
        """Let held requests go on."""
        self._open.set()

    def _take_fault(self, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.remaining > 0 and fault.path in (None, path):
                fault.remaining -= 1
                return fault
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = load_json(body) if body else None
        except ValueError:
            parsed = None
        record = RecordedRequest(
            request.method, request.path, time.monotonic(), dict(request.headers), body, parsed
        )
        self.requests.append(record)
        try:
            await self._open.wait()
            if self.response_delay > 0:
                await asyncio.sleep(self.response_delay)
            fault = self._take_fault(request.path)
            if fault is None:
                response = await handler(request)
            elif fault.body is not None:
                response = web.Response(
                    status=fault.status, body=fault.body, content_type="application/json"
                )
            elif fault.status == 429:
                response = self.rate_limited_response(fault.retry_after)
            else:
                response = self.server_error_response(fault.status)
        except web.HTTPException as error:
            record.status = error.status
            self.status_counts[error.status] += 1
            raise
        record.status = response.status
        self.status_counts[response.status] += 1
        return response
