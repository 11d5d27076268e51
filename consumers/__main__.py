"""``onoff-consumer <sink>`` / ``python -m consumers <sink>``: the consumer service.

``onoff-consumer <sink> --replay-from <time | partition:offset,…> [--until …] [--dry-run]``
replays a range of the events topic into that sink and exits (docs/operations.md,
"Replaying a sink").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import orjson
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from consumers.dedupe import DedupeStore
from consumers.replay import (
    Position,
    ReplayError,
    dry_run,
    format_offsets,
    parse_position,
    replay,
    replay_settings,
    resolve_range,
)
from consumers.service import build_target, serve
from consumers.settings import ConsumerSettings
from consumers.sinks import SINKS, Sink, SinkConfigError
from onoff_events import logs
from onoff_events.logs import log_event
from onoff_events.runtime import tune_garbage_collector
from onoff_events.settings import SettingsError

log = logging.getLogger("consumers")
T = TypeVar("T")


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onoff-consumer",
        description="Deliver the events topic to one sink; or replay a range of it and exit.",
    )
    parser.add_argument("sink", choices=list(SINKS))
    parser.add_argument(
        "--replay-from",
        metavar="TIME|P:O,…",
        type=_position,
        help="replay from this RFC 3339 time or these partition:offset pairs, then exit",
    )
    parser.add_argument(
        "--until",
        metavar="TIME|P:O,…",
        type=_position,
        help="stop before this time or these offsets (default: the end offsets at start)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what the replay would read; deliver nothing"
    )
    return parser


def _position(text: str) -> Position:
    try:
        return parse_position(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _arguments()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.replay_from is None and (args.until is not None or args.dry_run):
        print("onoff-consumer: --until and --dry-run go with --replay-from", file=sys.stderr)
        return 2
    name = args.sink
    registry = CollectorRegistry()
    try:
        settings = ConsumerSettings.from_env(name, os.environ)
        if args.replay_from is not None and args.dry_run:
            return _replay(replay_settings(settings), None, args.replay_from, args.until)
        sink, dedupe = build_target(settings, os.environ, registry)
    except (SettingsError, SinkConfigError) as exc:
        print(f"onoff-consumer: invalid setting: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"onoff-consumer: invalid setting: DEDUPE_URL: {exc}", file=sys.stderr)
        return 2
    if args.replay_from is not None:
        return _replay(replay_settings(settings), (sink, dedupe), args.replay_from, args.until)
    logs.configure(settings.log_level)
    log_event(log, "starting", settings=settings.describe())
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    tune_garbage_collector()
    return _run(serve(settings, sink, dedupe, registry))


def _replay(
    settings: ConsumerSettings,
    target: tuple[Sink, DedupeStore] | None,
    start: Position,
    until: Position | None,
) -> int:
    """Plan the range, then deliver it to ``target`` (or count it, without one: a dry run);
    print the summary as one JSON line on stdout (logs and progress go to stderr)."""
    logs.configure(settings.log_level, sys.stderr)

    async def go() -> Mapping[str, Any]:
        plan = await resolve_range(settings.kafka, settings.topic, start, until)
        log_event(
            log,
            "replay_planned",
            sink=settings.sink,
            topic=plan.topic,
            start=format_offsets(plan.start),
            until=format_offsets(plan.until),
            total=plan.total,
        )
        if target is None:
            counted = await dry_run(settings.kafka, plan, kind=settings.kind)
            return {"sink": settings.sink, "dry_run": True, "total": plan.total} | counted
        log_event(log, "replay_starting", settings=settings.describe())
        return (await replay(settings, *target, plan)).as_json()

    try:
        summary = _run(go())
    except ReplayError as exc:
        print(f"onoff-consumer: {exc}", file=sys.stderr)
        return 2
    except (KafkaError, OSError, TimeoutError) as exc:
        print(f"onoff-consumer: Kafka: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(summary).decode())
    if summary.get("complete") is False:
        print(
            f"onoff-consumer: stopped before the end; resume with: {summary['resume']}",
            file=sys.stderr,
        )
        return 130
    return 0


def _run(work: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # noqa: PLC0415

        return uvloop.run(work)
    except ImportError:
        return asyncio.run(work)


if __name__ == "__main__":
    sys.exit(main())
