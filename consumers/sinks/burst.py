"""State of the burst rules: how many messages one sender sent within a rule's window, and
whether the rule already fired for that sender in the current window.

The state lives in the same kind of store as the dedupe marks (Redis, or a SQLite file), not
in the consumer's memory per partition: partitions are keyed by event id, so one sender's
messages spread over every partition and a per-partition count would see a fraction of them.
A shared store counts them all, survives restarts and moves with no rebuild when partitions
change hands. Counting is idempotent (a message is a member of a set, by event id), so a
re-read batch never counts twice. Times are the events' own (``date``): a replay behaves like
the original traffic.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from consumers.blocking import run_serialised
from consumers.sinks import TransientSinkError

T = TypeVar("T")
NEVER_FIRED = float("-inf")
"""``fired_until`` of a key whose rule never fired. Not 0: an event dated before 1970 has a
negative time, and a 0 there kept such bursts from ever firing."""

# KEYS[1] the sender's set; ARGV: event time, event id, window (s), ttl (ms). Returns the
# times of the sender's messages within one window either side of the event.
_RECORD = """
local at, window = tonumber(ARGV[1]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], at, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (at - 2 * window))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (at - window), '(' .. (at + window),
                  'WITHSCORES')
"""


class BurstStore(Protocol):
    async def record(self, key: str, event_id: str, at: float, window: float) -> list[float]:
        """Record the message (once per event id); return the times of the key's messages
        in (at - window, at + window): every window that contains this message."""
        ...

    async def fired_until(self, key: str) -> float:
        """Event time until which the rule must not fire again for the key (NEVER_FIRED:
        never fired)."""
        ...

    async def mark_fired(self, key: str, until: float, window: float) -> None: ...

    async def close(self) -> None: ...


class RedisBurstStore:
    def __init__(self, url: str, namespace: str) -> None:
        self._client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        self._prefix = f"onoff:burst:{namespace}:"
        self._record = self._client.register_script(_RECORD)

    async def record(self, key: str, event_id: str, at: float, window: float) -> list[float]:
        ttl_ms = int(window * 3000) + 60_000
        try:
            flat = await self._record(
                keys=[self._prefix + key], args=[repr(at), event_id, repr(window), ttl_ms]
            )
        except (RedisError, OSError) as exc:
            raise TransientSinkError(f"burst state: {type(exc).__name__}") from exc
        return [float(score) for score in flat[1::2]]

    async def fired_until(self, key: str) -> float:
        try:
            value = await self._client.get(self._prefix + key + ":fired")
        except (RedisError, OSError) as exc:
            raise TransientSinkError(f"burst state: {type(exc).__name__}") from exc
        return float(value) if value is not None else NEVER_FIRED

    async def mark_fired(self, key: str, until: float, window: float) -> None:
        try:
            await self._client.set(
                self._prefix + key + ":fired", until, px=int(window * 2000) + 60_000
            )
        except (RedisError, OSError) as exc:
            raise TransientSinkError(f"burst state: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._client.aclose()


class SqliteBurstStore:
    def __init__(self, path: Path, namespace: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS burst_messages (key TEXT, event_id TEXT,"
            " at REAL, PRIMARY KEY (key, event_id))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS burst_fired (key TEXT PRIMARY KEY, until REAL)"
        )
        self._prefix = namespace + ":"
        self._lock = asyncio.Lock()

    async def record(self, key: str, event_id: str, at: float, window: float) -> list[float]:
        def work() -> list[float]:
            k = self._prefix + key
            self._db.execute(
                "INSERT OR IGNORE INTO burst_messages VALUES (?, ?, ?)", (k, event_id, at)
            )
            self._db.execute(
                "DELETE FROM burst_messages WHERE key = ? AND at < ?", (k, at - 2 * window)
            )
            rows = self._db.execute(
                "SELECT at FROM burst_messages WHERE key = ? AND at > ? AND at < ?",
                (k, at - window, at + window),
            ).fetchall()
            return [float(r[0]) for r in rows]

        return await self._run(work)

    async def fired_until(self, key: str) -> float:
        def work() -> float:
            row = self._db.execute(
                "SELECT until FROM burst_fired WHERE key = ?", (self._prefix + key,)
            ).fetchone()
            return float(row[0]) if row else NEVER_FIRED

        return await self._run(work)

    async def mark_fired(self, key: str, until: float, window: float) -> None:
        def work() -> None:
            self._db.execute(
                "INSERT INTO burst_fired VALUES (?, ?) ON CONFLICT (key) DO "
                "UPDATE SET until = excluded.until",
                (self._prefix + key, until),
            )

        await self._run(work)

    async def close(self) -> None:
        await run_serialised(self._lock, self._db.close)

    async def _run(self, work: Callable[[], T]) -> T:
        try:
            return await run_serialised(self._lock, work)
        except sqlite3.Error as exc:
            raise TransientSinkError(f"burst state: {type(exc).__name__}") from exc


def burst_store_from_url(url: str, namespace: str) -> BurstStore:
    """Same URL forms as the dedupe store: redis://… or sqlite:///path."""
    if url.startswith(("redis://", "rediss://")):
        return RedisBurstStore(url, namespace)
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteBurstStore(Path(url[len("sqlite:///") :]), namespace)
    raise ValueError("expected redis://… or sqlite:///path")
