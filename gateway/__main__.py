"""``onoff-gateway`` / ``python -m gateway``: read settings, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from gateway.app import LIFECYCLE, build_app, build_runner
from gateway.settings import GatewaySettings
from onoff_events import logs
from onoff_events.logs import log_event
from onoff_events.runtime import tune_garbage_collector
from onoff_events.settings import SettingsError

log = logging.getLogger("gateway")


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT, then drain: readiness off, wait, finish requests, flush."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    app = build_app(settings, registry)
    runner = build_runner(app, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        await site.start()
        log_event(log, "listening", host=settings.host, port=settings.port)
        await stop.wait()
        # /readyz answers 503 from now on, so the load balancer stops sending; requests that
        # still arrive during the drain delay are served as usual.
        app[LIFECYCLE].draining = True
        log_event(log, "draining", drain_seconds=settings.drain_seconds)
        await asyncio.sleep(settings.drain_seconds)
    finally:
        # Closes the listener, waits for in-flight requests (bounded by shutdown_timeout),
        # then runs the cleanup context: the producer flushes and closes.
        await runner.cleanup()
    log_event(log, "stopped")


def main() -> int:
    try:
        settings = GatewaySettings.from_env(os.environ)
    except SettingsError as exc:
        print(f"onoff-gateway: invalid setting: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    log_event(log, "starting", settings=settings.describe())
    if settings.insecure_no_auth:
        log_event(
            log,
            "insecure_no_auth",
            logging.WARNING,
            detail="GATEWAY_INSECURE_DEV_NO_AUTH is set: every request is accepted unauthenticated",
        )
    tune_garbage_collector()
    try:
        import uvloop  # noqa: PLC0415 # optional speed-up; absent on some platforms

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
