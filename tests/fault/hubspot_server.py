"""The tests' HubSpot fake as a process of its own, for fault runs: the CRM consumer talks to
it over HTTP as to HubSpot, and the checker and the scenarios use a second port to read what
it stored and to start storms of 429 or 503.

    python -m tests.fault.hubspot_server API_PORT CONTROL_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter

from aiohttp import web

from tests.fakes.hubspot import FakeHubSpot
from tests.fault.cluster import HUBSPOT_TOKEN
from tests.fault.sender import PHONE_POOL, external_number


def build_fake() -> FakeHubSpot:
    # HubSpot's own limits (100 requests per 10 s, 5 searches per second) and a search index
    # that shows a new record 2 s after its create, as HubSpot's does (seconds, undocumented).
    fake = FakeHubSpot(token=HUBSPOT_TOKEN, search_lag=2.0)
    for i in range(PHONE_POOL):
        fake.seed_contact({"phone": external_number(i)})
    return fake


def control_app(fake: FakeHubSpot) -> web.Application:
    storm: list[asyncio.Task[None]] = []

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"base_url": fake.base_url})

    async def state(_: web.Request) -> web.Response:
        # Every successful create, single or batch, stores one communication (the fake has
        # no unique key): the log of creates is the store's own count per id.
        creates: Counter[str] = Counter(
            c.properties.get("onoff_event_id", "") for c in fake.communications
        )
        stored: Counter[str] = Counter(
            c.properties.get("onoff_event_id", "") for c in fake.communications
        )
        return web.json_response(
            {
                "communications": dict(stored),
                "successful_creates": dict(creates),
                "status_counts": {str(k): v for k, v in fake.status_counts.items()},
                "requests": len(fake.requests),
            }
        )

    async def start_storm(request: web.Request) -> web.Response:
        body = await request.json()
        status, seconds = int(body["status"]), float(body["seconds"])
        fake.fail_next(10**9, status, retry_after=float(body.get("retry_after", 1)))

        async def end() -> None:
            await asyncio.sleep(seconds)
            fake.clear_faults()

        storm.append(asyncio.create_task(end()))
        return web.json_response({"status": status, "seconds": seconds})

    app = web.Application()
    app.add_routes(
        [
            web.get("/__fault/ready", ready),
            web.post("/__fault/state", state),
            web.post("/__fault/storm", start_storm),
        ]
    )
    return app


async def serve(api_port: int, control_port: int) -> None:
    fake = build_fake()
    await fake.start(api_port)
    runner = web.AppRunner(control_app(fake), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await runner.cleanup()
    await fake.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
