"""``python -m tests.fault``: run the fault scenarios, print one line per property, write the
run's JSON and (with ``--report``) docs/reliability.md with a timeline PNG per scenario.

    python -m tests.fault                    every scenario (make fault)
    python -m tests.fault --quick            the subset make test runs
    python -m tests.fault --only broker-kill-15s consumer-kill
    python -m tests.fault --scale 0.5        shorter loads (a smoke run)

Exit status 0 only when every property of every scenario held.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from tests.fault.run_info import git_commit, machine, utc_now
from tests.fault.scenarios import SCENARIOS, run_scenario
from tests.services import ROOT


async def main(argv: list[str]) -> int:
    # The lag sampler's clients retry through every broker outage: their connection errors
    # are expected, and at WARNING they would bury the suite's own lines.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(prog="python -m tests.fault")
    parser.add_argument("--quick", action="store_true", help="the subset make test runs")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply load durations (fault times stay: below about 0.7 a late fault "
        "may fall after the load)",
    )
    parser.add_argument("--out", type=Path, default=None, help="the run's JSON file")
    parser.add_argument("--report", action="store_true", help="write docs/reliability.md")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)

    chosen = [s for s in SCENARIOS if (not args.quick or s.quick)]
    if args.only:
        unknown = set(args.only) - {s.name for s in SCENARIOS}
        if unknown:
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        chosen = [s for s in chosen if s.name in args.only]
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:24} {'quick ' if s.quick else '      '}{s.title}")
        return 0

    run: dict[str, Any] = {
        "started_at": utc_now(),
        "git_commit": git_commit(),
        "machine": machine(),
        "quick": args.quick,
        "scale": args.scale,
        "scenarios": [],
    }
    # A failed scenario's logs are kept here; its scratch folder is not.
    logs = ROOT / ".data" / "fault" / "logs"
    with tempfile.TemporaryDirectory(prefix="onoff-fault-") as scratch:
        for scenario in chosen:
            print(f"== {scenario.name}: {scenario.title}", flush=True)
            result = await run_scenario(scenario, Path(scratch), scale=args.scale, keep_logs=logs)
            run["scenarios"].append(result)
            if result["error"]:
                print(f"ERROR  {result['error']}", flush=True)
            if "logs" in result:
                print(f"       logs: {result['logs']}", flush=True)
            for p in result["properties"]:
                print(f"{'PASS' if p['ok'] else 'FAIL'}  {p['name']}: {p['detail']}", flush=True)
            figures = result["figures"]
            summary = {
                k: figures.get(k)
                for k in (
                    "lost",
                    "gave_up",
                    "delivered_twice",
                    "dead_lettered",
                    "recover_seconds",
                    "p99_ms_calm",
                    "p99_ms_fault",
                )
            }
            print(
                f"       {orjson.dumps(summary).decode()} in {result['wall_seconds']} s", flush=True
            )
    run["finished_at"] = utc_now()
    ok = all(s["ok"] and not s["error"] for s in run["scenarios"])
    run["ok"] = ok
    out = args.out or ROOT / ".data" / "fault" / "last-run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2))
    print(f"{'PASS' if ok else 'FAIL'}: {len(run['scenarios'])} scenarios; JSON in {out}")
    if args.report:
        from tests.fault.report import write_report  # noqa: PLC0415 # needs matplotlib

        docs = ROOT / "docs"
        (docs / "reliability").mkdir(parents=True, exist_ok=True)
        (docs / "reliability" / "last-run.json").write_bytes(
            orjson.dumps(run, option=orjson.OPT_INDENT_2)
        )
        write_report(run, docs)
        print(f"report: {docs / 'reliability.md'}")
    return 0 if ok else 1


async def _main_until_signalled(argv: list[str]) -> int:
    """``main``, cancelled by SIGTERM or SIGINT so every scenario's ``finally`` stops its
    cluster: an interrupted run leaves no broker, database or service behind."""
    task = asyncio.current_task()
    assert task is not None  # always inside asyncio.run
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await main(argv)
    except asyncio.CancelledError:
        print("interrupted: clusters stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(asyncio.run(_main_until_signalled(sys.argv[1:])))
