"""The gateway's aiohttp application: routes, the webhook's request path, lifecycle.

Composition only: the decisions (auth, parsing, validation, DLQ records, headers) are pure
functions elsewhere; this module maps them to HTTP answers and Kafka records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.auth import AuthFailure
from gateway.durability import DURABILITY_HEADER, DurableStore
from gateway.metrics import GatewayMetrics
from gateway.publisher import ProducerOptions, Publisher, PublishFailed
from gateway.settings import GatewaySettings, Route
from onoff_events.cloudevents import EventHeaders, rfc3339_now
from onoff_events.dlq import quarantine_message
from onoff_events.event_kinds import SMS
from onoff_events.logs import log_event
from onoff_events.sms_event import EventChecker, ValidEvent

log = logging.getLogger("gateway")

WEBHOOK_PATH = SMS.path
DEV_KEY_LABEL = "insecure-dev"


@dataclass(slots=True)
class Lifecycle:
    """Mutable state of one running gateway."""

    draining: bool = False


PUBLISHER = web.AppKey("publisher", Publisher)
STORE = web.AppKey("store", DurableStore)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", GatewayMetrics)


_ACCEPTED = orjson.dumps({"status": "accepted"})
# The 200's header saying where the record was durable when it was answered.
_DURABLE_IN = {
    "kafka": {DURABILITY_HEADER: "kafka"},
    "spool": {DURABILITY_HEADER: "spool"},
}


def _json(
    status: int, body: dict[str, object], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


@dataclass(slots=True)
class InFlight:
    """Webhook requests between entering and leaving receive(), over every route: plain ints,
    as the event loop runs one handler at a time; the gauge reads them at scrape time."""

    requests: int = 0
    body_bytes: int = 0  # their bodies: Content-Length, or the limit when unknown


class Webhook:
    """``POST /v1/onoff/sms`` (or another kind's path): authenticate, check, make durable,
    then answer. One per route; every route shares the in-flight bounds."""

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        store: DurableStore,
        route: Route,
        in_flight: InFlight,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._store = store
        self._kind = route.kind
        self._topic = route.topic
        self._dlq_topic = route.dlq_topic
        self._source = route.ce_source
        self._checker = EventChecker(route.kind)
        self._headers = EventHeaders(route.ce_source, route.kind)
        self._unavailable = {"Retry-After": str(settings.retry_after_seconds)}
        self._in_flight = in_flight

    async def receive(self, request: web.Request) -> web.Response:
        settings, in_flight = self._settings, self._in_flight
        length = request.content_length
        size = settings.max_body_bytes if length is None else min(length, settings.max_body_bytes)
        if in_flight.requests >= settings.max_in_flight:
            return self._refuse("in_flight_limit")
        if in_flight.body_bytes + size > settings.max_in_flight_bytes:
            return self._refuse("in_flight_bytes_limit")
        in_flight.requests += 1
        in_flight.body_bytes += size
        try:
            return await self._receive(request)
        finally:
            in_flight.requests -= 1
            in_flight.body_bytes -= size

    def _refuse(self, reason: str) -> web.Response:
        # Before the key check and without reading the body: the cheapest answer there is.
        # aiohttp then reads and discards the rest of the body (for at most lingering_time,
        # see build_runner) so the connection stays usable.
        self._metrics.count_refused(reason)
        return _json(
            503,
            {"error": "unavailable", "detail": "too many requests in flight"},
            self._unavailable,
        )

    async def _receive(self, request: web.Request) -> web.Response:
        received_at = rfc3339_now()
        label = self._authenticate(request)
        if isinstance(label, AuthFailure):
            self._metrics.auth_failures.labels(label.value).inc()
            return _json(
                401,
                {"error": "unauthorized", "detail": _AUTH_DETAIL[label]},
                {"WWW-Authenticate": "x-api-key"},
            )
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._too_large()
        try:
            raw = await self._read_body(request)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except TimeoutError:
            return await self._body_timed_out(request)

        verdict = self._checker.check(raw)
        try:
            if isinstance(verdict, ValidEvent):
                durability = await self._store.make_durable(
                    self._topic,
                    verdict.event_id.encode(),
                    raw,
                    self._headers.build(verdict.event_id, verdict.time, received_at, label),
                )
                self._metrics.count_accepted(self._kind.name, label, durability)
                return web.Response(
                    body=_ACCEPTED, content_type="application/json", headers=_DURABLE_IN[durability]
                )
            key, value, headers = quarantine_message(
                verdict, received_at, label, self._source, self._kind
            )
            durability = await self._store.make_durable(self._dlq_topic, key, value, headers)
        except PublishFailed as exc:
            if exc.reason == "message_too_large":
                # Kafka refuses the record for its size: a retry can never pass, so no 503.
                return _json(
                    413,
                    {"error": "too_large", "detail": "over Kafka's message size limit"},
                )
            return _json(
                503,
                {"error": "unavailable", "detail": f"not made durable: {exc.reason}"},
                self._unavailable,
            )

        self._metrics.quarantined_events.labels(self._kind.name, verdict.reason).inc()
        problems = [p.as_json() for p in verdict.problems]
        log_event(
            log,
            "quarantined",
            logging.WARNING,
            kind=self._kind.name,
            reason=verdict.reason,
            problems=[f"{p['path']} {p['keyword']}" for p in problems],
        )
        if verdict.reason == "schema_violation":
            # Onoff retrying a well-formed object that breaks the schema could never help, and
            # its activation test payload (shape undocumented) must pass: 200, reasons attached.
            return _json(
                200, {"status": "quarantined", "problems": problems}, _DURABLE_IN[durability]
            )
        return _json(400, {"error": verdict.reason, "problems": problems})

    def _authenticate(self, request: web.Request) -> str | AuthFailure:
        if self._settings.insecure_no_auth:
            return DEV_KEY_LABEL
        return self._settings.api_keys.authenticate(
            request.headers.get("Authorization"), request.headers.get("X-API-Key")
        )

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content.is_eof():
            # The whole body came with the headers (Onoff's does): nothing to wait for, and no
            # timer to arm and cancel on the hot path.
            return await request.read()
        async with asyncio.timeout(self._settings.body_read_timeout_seconds):
            return await request.read()

    async def _body_timed_out(self, request: web.Request) -> web.Response:
        """408 with ``Connection: close``, sent now, then the connection dropped."""
        self._metrics.count_refused("body_timeout")
        seconds = self._settings.body_read_timeout_seconds
        response = _json(
            408,
            {"error": "body_timeout", "detail": f"the body did not arrive within {seconds:g} s"},
        )
        response.force_close()
        # Left to aiohttp, a response to a request whose body is unread is followed by reading
        # and discarding what the client still trickles in ("lingering"); this client has had
        # its time, so the connection closes as soon as the answer is written.
        with contextlib.suppress(ConnectionError):  # the client left: nothing to answer
            await response.prepare(request)
            await response.write_eof()
        request.protocol.force_close()
        return response

    def _too_large(self) -> web.Response:
        return _json(
            413,
            {"error": "too_large", "detail": f"body over {self._settings.max_body_bytes} bytes"},
        )


_AUTH_DETAIL = {
    AuthFailure.MISSING: "send the header 'Authorization: x-api-key <key>'",
    AuthFailure.MALFORMED: "expected 'Authorization: x-api-key <key>' or 'X-API-Key: <key>'",
    AuthFailure.UNKNOWN_KEY: "the API key is not valid",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by route template (never the raw path)."""
    metrics = request.app[METRICS]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        with metrics.http_requests_in_flight.track_inprogress():
            response = await handler(request)
    except web.HTTPException as exc:
        status = exc.status
        raise
    else:
        status = response.status
        return response
    finally:
        metrics.observe_request(route, request.method, status, time.perf_counter() - started)


async def _healthz(request: web.Request) -> web.Response:
    # A dead producer supervisor never reconnects nor replaces the producer: only a restart
    # helps, which is what a failing liveness probe gets.
    if not request.app[STORE].alive:
        return _json(503, {"status": "producer_supervisor_or_replay_stopped"})
    return _json(200, {"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return _json(503, {"status": "draining"})
    store = request.app[STORE]
    if not store.ready:
        # Kafka away, and no spool (or a full one): a webhook would get 503.
        return _json(503, {"status": "kafka_unavailable"})
    if store.spool is not None and not store.kafka_ready:
        return _json(200, {"status": "ready", "durability": "spool"})
    return _json(200, {"status": "ready"})


def build_runner(app: web.Application, settings: GatewaySettings) -> web.AppRunner:
    """The server around the gateway, with its bounds on slow and idle clients."""
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        # Also the bound on a request line and headers that never complete: aiohttp's server
        # has no header timeout of its own, it closes a connection still waiting for a whole
        # request at the keep-alive deadline (see GatewaySettings).
        keepalive_timeout=settings.keepalive_timeout_seconds,
        # How long aiohttp reads and discards a body the handler answered without reading
        # (401, 413, 503): 10 s by default. A client gets no longer to send a body nobody
        # reads than one the webhook reads.
        lingering_time=settings.body_read_timeout_seconds,
    )


def build_app(
    settings: GatewaySettings,
    registry: CollectorRegistry,
    producer_options: ProducerOptions | None = None,
) -> web.Application:
    """Compose the gateway. Nothing connects until the app starts (its cleanup context)."""
    metrics = GatewayMetrics.create(registry)
    options = replace(
        producer_options
        or ProducerOptions(
            linger_ms=settings.linger_ms,
            compression_type=None
            if settings.compression_type == "none"
            else settings.compression_type,
        ),
        # Always from the body limit, or a large body is refused by the producer itself.
        max_request_size=settings.max_request_bytes,
    )
    publisher = Publisher(
        settings.kafka,
        [t for route in settings.routes for t in (route.topic, route.dlq_topic)],
        metrics,
        options,
        settings.record_bytes_needed,
    )
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_observe])
    app[METRICS] = metrics
    store = DurableStore(
        publisher,
        metrics,
        publish_timeout=settings.publish_timeout_seconds,
        spool_dir=settings.spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        spool_after=settings.spool_after_seconds,
        drain_seconds=settings.spool_drain_seconds,
        largest_record=settings.max_body_bytes,
    )
    app[PUBLISHER] = publisher
    app[STORE] = store
    app[LIFECYCLE] = Lifecycle()

    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def store_lifecycle(_: web.Application) -> AsyncIterator[None]:
        await store.start()
        yield
        await store.close()

    in_flight = InFlight()
    metrics.webhook_requests_in_flight.set_function(lambda: in_flight.requests)
    for route in settings.routes:
        webhook = Webhook(settings, metrics, store, route, in_flight)
        app.router.add_post(route.kind.path, webhook.receive)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.cleanup_ctx.append(store_lifecycle)
    return app
