"""A small async client for Toxiproxy's HTTP API, and the server's process (scripts/toxiproxy.sh).

Toxiproxy (Shopify) is a TCP proxy whose faults are set over HTTP: a *proxy* listens on one
port and forwards to an upstream; *toxics* on it delay, drop or reset the data of one direction
(``downstream``: upstream → client; ``upstream``: client → upstream). The shapes used here are
those of its README and api.go (v2.12.0):

* ``POST /proxies`` ``{name, listen, upstream, enabled}`` → 201, the proxy as created (a listen
  port of 0 is replaced by the one the server picked);
* ``PATCH /proxies/{name}`` ``{enabled}`` takes a proxy down (its listener and every open
  connection are closed) or brings it back; the README still says POST, which v2.12.0 accepts
  but logs as deprecated;
* ``POST /proxies/{name}/toxics`` ``{name?, type, stream, toxicity, attributes}`` → 200, the toxic
  (its name defaults to ``<type>_<stream>``); ``GET`` lists them; ``DELETE
  /proxies/{name}/toxics/{toxic}`` → 204;
* ``POST /reset`` → 204: every proxy enabled, every toxic removed; ``GET /version``;
* errors: ``{"error": message, "status": code}`` with that HTTP status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "toxiproxy.sh"

Stream = Literal["upstream", "downstream"]


class ToxiproxyError(RuntimeError):
    """The server refused a request, or its process could not be started or stopped."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Proxy:
    name: str
    listen: str  # host:port the proxy accepts clients on
    upstream: str  # host:port it forwards to
    enabled: bool

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True, slots=True)
class Toxic:
    name: str
    type: str
    stream: str
    toxicity: float
    attributes: Mapping[str, Any]


def _proxy(data: Any) -> Proxy:
    return Proxy(
        str(data["name"]), str(data["listen"]), str(data["upstream"]), bool(data["enabled"])
    )


def _toxic(data: Any) -> Toxic:
    return Toxic(
        str(data["name"]),
        str(data["type"]),
        str(data["stream"]),
        float(data["toxicity"]),
        dict(data["attributes"] or {}),
    )


class Toxiproxy:
    """A Toxiproxy server on 127.0.0.1:``port``.

    With ``folder``, ``start()`` runs the server with scripts/toxiproxy.sh (pid file and log in
    that folder) and ``stop()`` ends it; without, they only open and close the HTTP session, for
    a server someone else runs. ``async with Toxiproxy(...) as toxiproxy:`` does both.
    """

    def __init__(self, port: int, folder: Path | None = None, *, host: str = "127.0.0.1") -> None:
        self.port = port
        self.folder = folder
        self.host = host
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- the process -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the server (when ours) and wait until it answers; ToxiproxyError, with the
        script's message, when it cannot (``scripts/toxiproxy.sh install`` not run, port taken)."""
        if self.folder is not None:
            await _script("start", str(self.folder), str(self.port))
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        await self.version()

    async def stop(self) -> None:
        """Close the session and stop the server (when ours): no process is left behind."""
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.folder is not None:
            await _script("stop", str(self.folder))

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- the API ---------------------------------------------------------------------------

    async def version(self) -> str:
        return str((await self._request("GET", "/version"))["version"])

    async def create_proxy(self, name: str, listen_port: int, upstream: str) -> Proxy:
        """A proxy on 127.0.0.1:``listen_port`` (0: any free port, see ``Proxy.port``) to
        ``upstream`` (host:port), enabled."""
        body = {
            "name": name,
            "listen": f"{self.host}:{listen_port}",
            "upstream": upstream,
            "enabled": True,
        }
        return _proxy(await self._request("POST", "/proxies", body))

    async def proxy(self, name: str) -> Proxy:
        return _proxy(await self._request("GET", f"/proxies/{name}"))

    async def delete_proxy(self, name: str) -> None:
        await self._request("DELETE", f"/proxies/{name}")

    async def cut(self, name: str) -> Proxy:
        """Take the proxy down: open connections are closed and new ones refused."""
        return _proxy(await self._request("PATCH", f"/proxies/{name}", {"enabled": False}))

    async def restore(self, name: str) -> Proxy:
        """Bring a cut proxy back on the same port."""
        return _proxy(await self._request("PATCH", f"/proxies/{name}", {"enabled": True}))

    async def add_toxic(
        self,
        name: str,
        type_: str,
        attributes: Mapping[str, int | float],
        *,
        stream: Stream = "downstream",
        toxicity: float = 1.0,
        toxic_name: str | None = None,
    ) -> Toxic:
        """Any toxic; its name defaults to ``<type>_<stream>`` (one of each per proxy)."""
        body: dict[str, Any] = {
            "type": type_,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": dict(attributes),
        }
        if toxic_name is not None:
            body["name"] = toxic_name
        return _toxic(await self._request("POST", f"/proxies/{name}/toxics", body))

    async def latency(
        self, name: str, ms: int, jitter: int = 0, stream: Stream = "downstream"
    ) -> Toxic:
        """Delay each chunk of data by ``ms`` ± ``jitter`` milliseconds."""
        return await self.add_toxic(
            name, "latency", {"latency": ms, "jitter": jitter}, stream=stream
        )

    async def reset_peer(
        self, name: str, timeout_ms: int = 0, stream: Stream = "downstream"
    ) -> Toxic:
        """Connections are reset (TCP RST, "connection reset by peer"): at once, or
        ``timeout_ms`` after they open; new connections too, until the toxic is removed."""
        return await self.add_toxic(name, "reset_peer", {"timeout": timeout_ms}, stream=stream)

    async def black_hole(self, name: str, stream: Stream = "downstream") -> Toxic:
        """The ``timeout`` toxic with timeout 0: data is dropped and connections stay open,
        hanging, until the toxic is removed."""
        return await self.add_toxic(name, "timeout", {"timeout": 0}, stream=stream)

    async def toxics(self, name: str) -> list[Toxic]:
        return [_toxic(t) for t in await self._request("GET", f"/proxies/{name}/toxics")]

    async def remove_toxic(self, name: str, toxic: str) -> None:
        await self._request("DELETE", f"/proxies/{name}/toxics/{toxic}")

    async def clear(self, name: str) -> None:
        """Remove every toxic of the proxy (it stays as it is, enabled or cut)."""
        for toxic in await self.toxics(name):
            await self.remove_toxic(name, toxic.name)

    async def reset(self) -> None:
        """Every proxy enabled again and every toxic removed."""
        await self._request("POST", "/reset")

    async def _request(self, method: str, path: str, body: object = None) -> Any:
        if self._http is None:
            raise ToxiproxyError("Toxiproxy client not started: call start() first")
        async with self._http.request(method, self.url + path, json=body) as response:
            text = await response.text()
            if response.status >= 400:
                raise ToxiproxyError(
                    f"{method} {path} answered {response.status}: {text.strip()}", response.status
                )
            if response.status == 204 or not text:
                return None
            return await response.json(content_type=None)


async def _script(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    if process.returncode != 0:
        raise ToxiproxyError(
            f"scripts/toxiproxy.sh {' '.join(args)} failed ({process.returncode}): "
            + output.decode(errors="replace").strip()
        )
