"""Baseline (a): the framework's ceiling. A bare aiohttp handler that parses the JSON body
and answers 200, no auth, no schema, no Kafka. Same event loop (uvloop) as the gateway."""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web


async def receive(request: web.Request) -> web.Response:
    orjson.loads(await request.read())
    return web.Response(body=b"{}", content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/onoff/sms", receive)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
