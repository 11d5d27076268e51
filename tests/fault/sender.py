"""A load generator that behaves like Onoff Business's webhook sender.

What Onoff documents (../shared/onoff-docs): one POST per SMS, a 1 s connect timeout and a 10 s
read timeout, 4 more tries after a 4xx/5xx answer, then the event is thrown away. What it does
not document, and we assume: the pause between tries (``retry_delay_seconds``, 1 s by default,
so five tries at our 5 s publish deadline span about 30 s) and that a timeout or a refused
connection counts as a failed try like a 5xx.

The sender is open loop: event ``i`` leaves at ``start + i / rate`` whatever the answers to the
earlier ones, as a real sender does (a slow gateway does not slow Onoff's customers down). A
share of the events is sent twice, byte for byte (Onoff retrying one it believes failed, or
sending one twice): the checker must see them once per sink.

It records every id that got a 200, every id it gave up on, and per second: answers by status,
requests in flight and the latency of every answered try.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

PHONE_POOL = 40  # external numbers the events use: the CRM fake knows each as a contact
ALERT_WORD = "URGENT"  # a share of the bodies contains it; the alerts rule matches on it


def external_number(i: int) -> str:
    return f"+3361200{i % PHONE_POOL:04d}"


def sms_body(event_id: str, i: int, *, alert: bool) -> bytes:
    """An Onoff-shaped SMS event (the fields of Onoff's own sample), its date now."""
    text = f"{ALERT_WORD} call me back about order {i}" if alert else f"Order {i} is on its way"
    return orjson.dumps(
        {
            "id": event_id,
            "eventName": "SMS",
            "onoffUserName": "Fault Suite",
            "onoffUserEmail": "fault.suite@example.com",
            "onoffUserNumber": "+33100000000",
            "externalNumber": external_number(i),
            "externalName": "Customer",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "smsDirection": "RECEIVED",
            "body": text,
        }
    )


@dataclass(frozen=True)
class SenderConfig:
    urls: Sequence[str]  # gateways' webhook URLs, used round robin (a load balancer's part)
    api_key: str
    rate: float  # events per second, open loop
    seconds: float  # how long events are offered
    duplicate_share: float = 0.05
    alert_share: float = 0.05
    connect_timeout_seconds: float = 1.0
    read_timeout_seconds: float = 10.0
    retries: int = 4
    retry_delay_seconds: float = 1.0
    max_connections: int = 3000
    seed: int = 12


@dataclass
class SendResult:
    """What the sender saw. Times are seconds since the sender started."""

    sent_ids: list[str] = field(default_factory=list)  # every unique event id offered
    copies: int = 0  # events sent a second time, byte for byte
    requests: int = 0  # tries, all events and copies
    acknowledged: set[str] = field(default_factory=set)  # ids with at least one 200
    gave_up: set[str] = field(default_factory=set)  # ids whose every try and copy failed
    alert_ids: set[str] = field(default_factory=set)  # ids whose body the alerts rule matches
    answers: Counter[str] = field(default_factory=Counter)  # "200", "503", "timeout", …
    durability: Counter[str] = field(default_factory=Counter)  # 200s by where: kafka, spool
    durability_per_second: defaultdict[int, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    per_second: defaultdict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    in_flight: list[tuple[float, int]] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (answered at, seconds)
    disconnects_mid_request: int = 0  # the server closed the socket before its answer
    duration: float = 0.0

    def p99_ms(self, start: float = 0.0, end: float = float("inf")) -> float:
        """The 99th percentile latency of tries answered within [start, end), in ms."""
        values = sorted(s for at, s in self.latencies if start <= at < end)
        if not values:
            return 0.0
        return 1000 * values[min(len(values) - 1, int(0.99 * len(values)))]

    def to_json(self) -> dict[str, Any]:
        return {
            "unique_events": len(self.sent_ids),
            "copies": self.copies,
            "requests": self.requests,
            "acknowledged": len(self.acknowledged),
            "gave_up": len(self.gave_up),
            "answers": dict(self.answers),
            "durability": dict(self.durability),
            "disconnects_mid_request": self.disconnects_mid_request,
            "duration_seconds": round(self.duration, 2),
        }


class OnoffSender:
    """Sends SMS webhooks like Onoff; see the module doc."""

    def __init__(self, config: SenderConfig) -> None:
        self.config = config
        self.result = SendResult()
        self._random = random.Random(config.seed)  # noqa: S311 # load shape, not security
        self._in_flight = 0
        self._url_turn = 0
        self._urls = list(config.urls)
        self._started = 0.0
        self._stopped = asyncio.Event()

    def route_to(self, urls: Sequence[str]) -> None:
        """Change the gateways behind the 'load balancer' (a rolling update's endpoints)."""
        self._urls = list(urls)

    def now(self) -> float:
        return time.monotonic() - self._started

    async def run(self, on_tick: Callable[[float], None] | None = None) -> SendResult:
        config = self.config
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.connect_timeout_seconds,
            sock_read=config.read_timeout_seconds,
        )
        connector = aiohttp.TCPConnector(limit=config.max_connections, force_close=False)
        self._started = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        sampler = asyncio.create_task(self._sample(on_tick))
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            total = int(config.rate * config.seconds)
            earlier: list[tuple[str, bytes]] = []
            for i in range(total):
                due = i / config.rate
                delay = due - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                if earlier and self._random.random() < config.duplicate_share:
                    event_id, body = self._random.choice(earlier[-2000:])
                    self.result.copies += 1
                else:
                    event_id = str(uuid.uuid4())
                    alert = self._random.random() < config.alert_share
                    body = sms_body(event_id, i, alert=alert)
                    if alert:
                        self.result.alert_ids.add(event_id)
                    self.result.sent_ids.append(event_id)
                    earlier.append((event_id, body))
                task = asyncio.create_task(self._deliver(http, event_id, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            # The last events get their whole retry window, as Onoff gives them.
            if tasks:
                await asyncio.gather(*tasks)
        self.result.duration = self.now()
        self._stopped.set()
        await sampler
        # An id is given up only when no copy of it was acknowledged.
        self.result.gave_up -= self.result.acknowledged
        return self.result

    async def _sample(self, on_tick: Callable[[float], None] | None) -> None:
        while not self._stopped.is_set():
            now = self.now()
            self.result.in_flight.append((now, self._in_flight))
            if on_tick is not None:
                on_tick(now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), 0.5)

    def _next_url(self) -> str:
        self._url_turn += 1
        return self._urls[self._url_turn % len(self._urls)]

    async def _deliver(self, http: aiohttp.ClientSession, event_id: str, body: bytes) -> None:
        config = self.config
        headers = {
            "Authorization": f"x-api-key {config.api_key}",
            "Content-Type": "application/json",
        }
        for attempt in range(1 + config.retries):
            if attempt:
                await asyncio.sleep(config.retry_delay_seconds)
            outcome = await self._try(http, self._next_url(), body, headers)
            if outcome == "200":
                self.result.acknowledged.add(event_id)
                return
        self.result.gave_up.add(event_id)

    async def _try(
        self, http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
    ) -> str:
        self._in_flight += 1
        self.result.requests += 1
        sent_at = time.monotonic()
        try:
            async with http.post(url, data=body, headers=headers) as response:
                await response.read()
                outcome = str(response.status)
                if response.status == 200:
                    where = response.headers.get("Onoff-Events-Durability", "unsaid")
                    self.result.durability[where] += 1
                    self.result.durability_per_second[int(self.now())][where] += 1
            self.result.latencies.append((self.now(), time.monotonic() - sent_at))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            if isinstance(error, aiohttp.ClientConnectorError):
                outcome = "refused"  # never connected: nothing was sent
            else:
                # The gateway closed or reset a connection it had taken the request on.
                self.result.disconnects_mid_request += 1
                outcome = "disconnected"
        except aiohttp.ConnectionTimeoutError:
            # No connection within 1 s (Onoff's connect timeout). Also what a sender whose own
            # loop stalled past that second reports, so it is kept apart from read timeouts.
            outcome = "connect_timeout"
        except aiohttp.ClientConnectorError:
            outcome = "refused"
        except (TimeoutError, aiohttp.ServerTimeoutError):
            outcome = "timeout"  # connected and sent, no answer within 10 s
        except aiohttp.ClientError:
            outcome = "client_error"
        finally:
            self._in_flight -= 1
        self.result.answers[outcome] += 1
        self.result.per_second[int(self.now())][outcome] += 1
        return outcome
