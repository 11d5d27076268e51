"""``python -m bench.crm [--quick]``: SMS per second the CRM sink logs into a HubSpot-like
server at HubSpot's default budget (90 requests per 10 s, 4 searches per second, as
CRM_REQUESTS_PER_10S and CRM_SEARCHES_PER_SECOND default), and the requests per 100 SMS.

The sink is the bottleneck by three orders of magnitude (Kafka and the runner move thousands
of events a second), so it is driven directly, in batches as the runner hands them over
(``max_batch_events``), against the HubSpot fake of tests/fakes (HubSpot's own limits: 100
requests per 10 s, 5 searches per second; answers in ~1 ms). Three cases: every contact
known but not yet cached (a fresh pod), every contact new (CRM_UNKNOWN_CONTACT=create), and
a steady state where customers text again (contacts cached). Writes bench/results/crm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from bench.run import machine, write_results
from consumers.records import SmsRecord
from consumers.sinks.crm import CrmSink
from tests.fakes.hubspot import DEFAULT_TOKEN, FakeHubSpot
from tests.payloads import sms_event


def records(phones: list[str]) -> list[SmsRecord]:
    out = []
    for i, phone in enumerate(phones):
        event = sms_event(externalNumber=phone, externalEmail=f"customer{i}@example.com")
        now = datetime.now(UTC)
        out.append(SmsRecord(event["id"], event, orjson.dumps(event), now, now, "bench", 0, i))
    return out


async def run_case(name: str, count: int, *, known: bool, repeat: bool) -> dict[str, Any]:
    fake = FakeHubSpot()  # HubSpot's limits: 100 requests per 10 s, 5 searches per second
    await fake.start()
    sink = CrmSink(
        CollectorRegistry(),
        token=DEFAULT_TOKEN,
        base_url=fake.base_url,
        create_missing_contacts=True,
    )
    distinct = max(1, count // 10) if repeat else count
    phones = [f"+3361{i % distinct:07d}" for i in range(count)]
    if known:
        for phone in sorted(set(phones)):
            fake.seed_contact({"phone": phone})
    events = records(phones)
    batch = sink.max_batch_events
    try:
        if repeat:  # the steady state: the contacts were looked up once already
            await sink.deliver(records(sorted(set(phones))))
            fake.requests.clear()
            fake.communications.clear()
        started = time.monotonic()
        rejected = 0
        for i in range(0, len(events), batch):
            outcome = await sink.deliver(events[i : i + batch])
            rejected += len(outcome.rejected)
        seconds = time.monotonic() - started
    finally:
        await sink.close()
        await fake.close()
    paths = Counter(r.path for r in fake.requests)
    requests = sum(paths.values())
    return {
        "name": name,
        "sms": count,
        "logged": len({c.properties["onoff_event_id"] for c in fake.communications}),
        "rejected": rejected,
        "seconds": round(seconds, 1),
        "sms_per_second": round(count / seconds, 1),
        "requests": requests,
        "requests_per_100_sms": round(100 * requests / count, 2),
        "searches": sum(v for k, v in paths.items() if k.endswith("/search")),
        "answered_429": sum(1 for r in fake.requests if r.status == 429),
        "by_path": dict(paths),
        "batch_events": batch,
    }


async def main_async(count: int) -> dict[str, Any]:
    cases = [
        await run_case("contacts_known_not_cached", count, known=True, repeat=False),
        await run_case("contacts_new_created", count, known=False, repeat=False),
        await run_case("contacts_cached_customers_text_again", count, known=True, repeat=True),
    ]
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "budget": {"requests_per_10s": 90, "searches_per_second": 4},
        "cases": cases,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# CRM sink benchmark ({report['when']})",
        "",
        "| case | SMS | SMS/s | requests per 100 SMS | searches | 429s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in report["cases"]:
        lines.append(
            f"| {c['name']} | {c['sms']:,} | {c['sms_per_second']} | "
            f"{c['requests_per_100_sms']} | {c['searches']} | {c['answered_429']} |"
        )
    return "\n".join([*lines, ""])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(main_async(300 if args.quick else 3000))
    name = "crm-quick" if args.quick else "crm"
    write_results(name, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
