"""A consumer service's lifecycle: the runner plus /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from consumers.dedupe import DedupeStore, dedupe_from_url
from consumers.metrics import ConsumerMetrics
from consumers.runner import Runner
from consumers.settings import ConsumerSettings
from consumers.sinks import SINKS, Sink, SinkConfigError
from onoff_events.logs import log_event

log = logging.getLogger("consumers")


def build_target(
    settings: ConsumerSettings, env: Mapping[str, str], registry: CollectorRegistry
) -> tuple[Sink, DedupeStore]:
    """The service's sink (if it delivers the service's event kind) and its dedupe store,
    one namespace per live consumer group (a replay marks what it delivers there too).
    Raises SinkConfigError, or ValueError for DEDUPE_URL."""
    sink = SINKS[settings.sink](env, registry)
    kinds = getattr(sink, "event_kinds", frozenset({"sms"}))
    if settings.kind.name not in kinds:
        raise SinkConfigError(
            f"CONSUMER_EVENT_KIND: the {settings.sink} sink delivers "
            f"{', '.join(sorted(kinds))} events, not {settings.kind.name}"
        )
    dedupe = dedupe_from_url(
        settings.dedupe_url, settings.group_id, settings.dedupe_ttl_seconds, sink
    )
    return sink, dedupe


def build_http(runner: Runner, registry: CollectorRegistry) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        if not runner.alive:
            # The batch loop stopped beating and a new Kafka consumer did not help: only a
            # new process will (Kubernetes restarts the pod on this answer).
            return web.json_response({"status": "stuck"}, status=503)
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        ready = runner.ready
        return web.json_response(
            {"status": "ready" if ready else "not_ready"}, status=200 if ready else 503
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(
    settings: ConsumerSettings,
    sink: Sink,
    dedupe: DedupeStore,
    registry: CollectorRegistry,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``); return the process exit code."""
    runner = Runner(settings, sink, dedupe, ConsumerMetrics.create(registry))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = web.AppRunner(build_http(runner, registry), handle_signals=False, access_log=None)
    await http.setup()
    run = asyncio.create_task(runner.run(), name=f"{settings.sink}-runner")
    stopped = asyncio.create_task(stop.wait())
    exit_code = 0
    try:
        await web.TCPSite(http, settings.host, settings.port).start()
        log_event(log, "listening", sink=settings.sink, port=settings.port)
        await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            # The runner only returns on stop(); ending by itself means it crashed.
            exc = run.exception()
            log_event(
                log,
                "runner_crashed",
                logging.ERROR,
                error_type=type(exc).__name__ if exc else "None",
            )
            return 1
        log_event(log, "draining", sink=settings.sink)
        runner.stop()
        try:
            await asyncio.wait_for(asyncio.shield(run), settings.shutdown_timeout_seconds)
        except TimeoutError:
            # The batch in progress is abandoned uncommitted: its records are read again.
            log_event(log, "shutdown_timeout", logging.WARNING, sink=settings.sink)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    finally:
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopped
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
        await http.cleanup()
        log_event(log, "stopped", sink=settings.sink)
    return exit_code
