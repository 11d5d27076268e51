"""``onoff-consumer <sink>`` / ``python -m consumers <sink>``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from consumers.dedupe import dedupe_from_url
from consumers.service import serve
from consumers.settings import ConsumerSettings
from consumers.sinks import SINKS, SinkConfigError
from onoff_events import logs
from onoff_events.logs import log_event
from onoff_events.runtime import tune_garbage_collector
from onoff_events.settings import SettingsError

log = logging.getLogger("consumers")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in SINKS:
        print(f"usage: onoff-consumer {{{'|'.join(SINKS)}}}", file=sys.stderr)
        return 2
    name = args[0]
    registry = CollectorRegistry()
    try:
        settings = ConsumerSettings.from_env(name, os.environ)
        sink = SINKS[name](os.environ, registry)
        # One namespace per consumer group: each group delivers each id once to its sink.
        dedupe = dedupe_from_url(
            settings.dedupe_url, settings.group_id, settings.dedupe_ttl_seconds, sink
        )
    except (SettingsError, SinkConfigError) as exc:
        print(f"onoff-consumer: invalid setting: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"onoff-consumer: invalid setting: DEDUPE_URL: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    log_event(log, "starting", settings=settings.describe())
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    tune_garbage_collector()
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.run(serve(settings, sink, dedupe, registry))
    except ImportError:
        return asyncio.run(serve(settings, sink, dedupe, registry))


if __name__ == "__main__":
    sys.exit(main())
