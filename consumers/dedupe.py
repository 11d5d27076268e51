"""Dedupe stores: which event ids a sink already has.

The protocol per batch: ``claim`` the ids (one round trip; answers which are already done),
deliver the rest, ``confirm`` what was delivered, ``release`` the claims of a batch that is
abandoned. A claim records who is delivering; a *done* mark is kept for ``ttl_seconds``
(default 7 days, well past Onoff's retry window and any replay a team would run).

A claim is a *lease*: it names its owner and when it was last renewed. Another owner's claim
is a leftover from a consumer that crashed or lost the partition, or a member that still
delivers after the group moved its partitions (evicted past the rebalance timeout). For a
sink whose own idempotency is immediate (the warehouse's primary key) it is taken over at
once. For a sink whose idempotency check lags behind its writes (HubSpot's search index shows
a communication seconds after its create) the store is built with ``settle_seconds``: a claim
of another owner renewed less than that long ago is *held* (``ClaimHeld``, retried later),
and the owner renews its claims while it delivers (``refresh``). A dead owner's writes are
then all searchable before anyone takes its ids over, and a live one finishes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from consumers.blocking import run_serialised
from onoff_events.sqlite import transaction

T = TypeVar("T")
DEFAULT_TTL_SECONDS = 7 * 24 * 3600
CLAIM_TTL_SECONDS = 15 * 60


class DedupeUnavailable(Exception):
    """The store cannot answer now: the runner pauses the batch and retries."""


class ClaimHeld(DedupeUnavailable):
    """Some ids are leased by another consumer, renewed less than ``settle_seconds`` ago:
    retry after ``retry_after`` seconds (nothing was claimed)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"ids leased by another consumer; retry in {retry_after:.1f} s")
        self.retry_after = retry_after


class DedupeStore(Protocol):
    async def claim(self, ids: Sequence[str]) -> set[str]:
        """Claim ``ids`` for delivery; return those already done (duplicates)."""
        ...

    async def confirm(self, ids: Sequence[str]) -> None:
        """Mark ``ids`` done for the TTL."""

    async def release(self, ids: Sequence[str]) -> None:
        """Drop our claims on ``ids`` (not done marks)."""

    async def refresh(self, ids: Sequence[str]) -> None:
        """Renew our leases on ``ids`` (while a batch is delivered)."""

    async def ping(self) -> None:
        """Raise DedupeUnavailable when the store does not answer."""

    async def close(self) -> None: ...


# A claim's value is "<owner>|<renewed at, Redis's own clock in seconds>".
# KEYS: the ids' keys. ARGV[1]: this consumer's owner tag, ARGV[2]: claim TTL in seconds,
# ARGV[3]: settle seconds. Returns {-1, seconds to wait} when another owner's lease is younger
# than the settle time (nothing claimed), else per key 1 when it was already done (a
# duplicate), 0 when it is now claimed by us.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local settle = tonumber(ARGV[3])
if settle > 0 then
  local wait = 0
  for _, key in ipairs(KEYS) do
    local value = redis.call('GET', key)
    if value and value ~= 'done' then
      local owner, at = string.match(value, '^(.*)|([%d%.]+)$')
      if owner and owner ~= ARGV[1] then
        local left = tonumber(at) + settle - now
        if left > wait then wait = left end
      end
    end
  end
  if wait > 0 then return {-1, tostring(wait)} end
end
local done = {}
local lease = ARGV[1] .. '|' .. string.format('%.3f', now)
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == 'done' then
    done[i] = 1
  else
    redis.call('SET', key, lease, 'EX', ARGV[2])
    done[i] = 0
  end
end
return done
"""
# Renew our own leases only (ARGV[1] owner tag, ARGV[2] claim TTL).
_REFRESH = """
local t = redis.call('TIME')
local lease = ARGV[1] .. '|' .. string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
for _, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
    redis.call('SET', key, lease, 'EX', ARGV[2])
  end
end
return 0
"""
# Mark every key done for ARGV[1] seconds: one reply for the whole batch (a pipeline of
# SETs costs a reply, and its parsing, per id).
_CONFIRM = """
for _, key in ipairs(KEYS) do
  redis.call('SET', key, 'done', 'EX', ARGV[1])
end
return 0
"""
# Release only our own claims; a done mark or another consumer's claim stays.
_RELEASE = """
for _, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then redis.call('DEL', key) end
end
return 0
"""


class RedisDedupe:
    """The production store: one round trip per batch for each step (a Lua script or a
    pipeline). The keys of one batch go to one server, so use a single Redis (with a replica
    or Sentinel), not Redis Cluster."""

    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        settle_seconds: float = 0.0,
    ) -> None:
        self._client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        self._prefix = f"onoff:dedupe:{namespace}:"
        self._ttl = ttl_seconds
        self._settle = settle_seconds
        self._owner = f"claim:{uuid.uuid4().hex}"
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)
        self._refresh = self._client.register_script(_REFRESH)
        self._confirm = self._client.register_script(_CONFIRM)

    async def claim(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        keys = [self._prefix + i for i in ids]
        try:
            flags = await self._claim(
                keys=keys, args=[self._owner, CLAIM_TTL_SECONDS, self._settle]
            )
        except (RedisError, OSError) as exc:
            raise DedupeUnavailable(f"redis: {type(exc).__name__}") from exc
        if flags and int(flags[0]) == -1:
            raise ClaimHeld(float(flags[1]))
        return {i for i, flag in zip(ids, flags, strict=True) if int(flag) == 1}

    async def refresh(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        try:
            await self._refresh(
                keys=[self._prefix + i for i in ids], args=[self._owner, CLAIM_TTL_SECONDS]
            )
        except (RedisError, OSError) as exc:
            raise DedupeUnavailable(f"redis: {type(exc).__name__}") from exc

    async def confirm(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        try:
            await self._confirm(keys=[self._prefix + i for i in ids], args=[self._ttl])
        except (RedisError, OSError) as exc:
            raise DedupeUnavailable(f"redis: {type(exc).__name__}") from exc

    async def release(self, ids: Sequence[str]) -> None:
        if not ids or self._settle > 0:
            # A lease that settles is left to age: the batch may have written before it was
            # abandoned (a create whose answer timed out), and the next owner must wait.
            return
        try:
            await self._release(keys=[self._prefix + i for i in ids], args=[self._owner])
        except (RedisError, OSError) as exc:
            raise DedupeUnavailable(f"redis: {type(exc).__name__}") from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise DedupeUnavailable(f"redis: {type(exc).__name__}") from exc

    async def close(self) -> None:
        await self._client.aclose()


class SqliteDedupe:
    """The embedded single-node default: a SQLite file, so ``make run`` needs no Redis.

    One connection used from one worker thread at a time; each step is one transaction.
    """

    def __init__(
        self,
        path: Path,
        namespace: str = "",
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        settle_seconds: float = 0.0,
    ) -> None:
        # One file may serve several consumer groups: ids are kept per namespace (group).
        self._prefix = f"{namespace}:"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS dedupe ("
            " id TEXT PRIMARY KEY, state TEXT NOT NULL, expires_at REAL NOT NULL)"
        )
        self._ttl = ttl_seconds
        self._settle = settle_seconds
        self._owner = f"claim:{uuid.uuid4().hex}"
        self._lock = asyncio.Lock()
        self._last_purge = 0.0

    async def claim(self, ids: Sequence[str]) -> set[str]:
        done = await self._run(self._claim_sync, self._keys(ids))
        return {k[len(self._prefix) :] for k in done}

    async def confirm(self, ids: Sequence[str]) -> None:
        await self._run(self._mark_sync, self._keys(ids))

    async def release(self, ids: Sequence[str]) -> None:
        if self._settle > 0:
            return  # left to age, as in RedisDedupe.release
        await self._run(self._release_sync, self._keys(ids))

    async def refresh(self, ids: Sequence[str]) -> None:
        await self._run(self._refresh_sync, self._keys(ids))

    def _keys(self, ids: Sequence[str]) -> list[str]:
        return [self._prefix + i for i in ids]

    async def ping(self) -> None:
        await self._run(self._db.execute, "SELECT 1")

    async def close(self) -> None:
        await run_serialised(self._lock, self._db.close)

    async def _run(self, work: Callable[..., T], *args: object) -> T:
        try:
            return await run_serialised(self._lock, work, *args)
        except sqlite3.Error as exc:
            raise DedupeUnavailable(f"sqlite: {type(exc).__name__}") from exc

    def _claim_sync(self, ids: list[str]) -> set[str]:
        now = time.time()
        with self._transaction():
            states = {
                row[0]: row[1]
                for chunk in _chunks(ids)
                for row in self._db.execute(
                    f"SELECT id, state FROM dedupe WHERE expires_at > ? "  # noqa: S608 # placeholders only
                    f"AND id IN ({','.join('?' * len(chunk))})",
                    (now, *chunk),
                )
            }
            done = {i for i, state in states.items() if state == "done"}
            if self._settle > 0:
                wait = max(
                    (self._settle - (now - at) for at in self._foreign_leases(states.values())),
                    default=0.0,
                )
                if wait > 0:
                    raise ClaimHeld(wait)
            self._db.executemany(
                "INSERT INTO dedupe (id, state, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "expires_at = excluded.expires_at",
                [
                    (i, f"{self._owner}|{now}", now + CLAIM_TTL_SECONDS)
                    for i in ids
                    if i not in done
                ],
            )
        return done

    def _foreign_leases(self, states: Iterable[str]) -> Iterator[float]:
        """Renewal times of the leases other owners hold among ``states``."""
        for state in states:
            owner, _, at = state.rpartition("|")
            if owner and owner != self._owner:
                with contextlib.suppress(ValueError):
                    yield float(at)

    def _refresh_sync(self, ids: list[str]) -> None:
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "UPDATE dedupe SET state = ?, expires_at = ? WHERE id = ? AND state LIKE ?",
                [
                    (f"{self._owner}|{now}", now + CLAIM_TTL_SECONDS, i, f"{self._owner}|%")
                    for i in ids
                ],
            )

    def _mark_sync(self, ids: list[str]) -> None:
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT INTO dedupe (id, state, expires_at) VALUES (?, 'done', ?) "
                "ON CONFLICT (id) DO UPDATE SET state = 'done', expires_at = excluded.expires_at",
                [(i, now + self._ttl) for i in ids],
            )
            if now - self._last_purge > 600:
                self._db.execute("DELETE FROM dedupe WHERE expires_at < ?", (now,))
                self._last_purge = now

    def _release_sync(self, ids: list[str]) -> None:
        with self._transaction():
            self._db.executemany(
                "DELETE FROM dedupe WHERE id = ? AND state LIKE ?",
                [(i, f"{self._owner}|%") for i in ids],
            )

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return transaction(self._db)


def _chunks(ids: list[str], size: int = 500) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


class SinkDedupe:
    """``DEDUPE_URL=sink``: the sink is its own dedupe store (the warehouse's primary key).
    Its insert drops the ids it already holds and says which they were (``Delivery``), so
    there is no second store to run, to lose or to wait for: two round trips per batch fewer.
    Only for sinks that declare ``idempotent_by_key``."""

    async def claim(self, ids: Sequence[str]) -> set[str]:
        return set()  # the sink's insert answers this, in the same statement

    async def confirm(self, ids: Sequence[str]) -> None:
        return None  # the sink's row is the mark

    async def release(self, ids: Sequence[str]) -> None:
        return None  # nothing was claimed outside the sink

    async def refresh(self, ids: Sequence[str]) -> None:
        return None

    async def ping(self) -> None:
        return None  # the sink's own health is the runner's concern

    async def close(self) -> None:
        return None


def dedupe_from_url(
    url: str, namespace: str, ttl_seconds: int, sink: object | None = None
) -> DedupeStore:
    """``redis://host:port/db`` (or ``rediss://``), ``sqlite:///path/to/file``, or ``sink``
    for a sink that is its own dedupe store (see SinkDedupe). A sink whose idempotency check
    lags its writes says by how much (``takeover_settle_seconds``): leases settle that long."""
    settle = float(getattr(sink, "takeover_settle_seconds", 0.0))
    if url == "sink":
        if not getattr(sink, "idempotent_by_key", False):
            raise ValueError("'sink' needs a sink with a unique key of its own (the warehouse)")
        return SinkDedupe()
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss"):
        return RedisDedupe(url, namespace, ttl_seconds, settle)
    if scheme == "sqlite":
        # sqlite:///relative/path or sqlite:////absolute/path, as SQLAlchemy spells them.
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ValueError("a sqlite dedupe store needs a file: sqlite:///path/to/file")
        return SqliteDedupe(Path(path), namespace, ttl_seconds, settle)
    raise ValueError(f"unsupported dedupe store {scheme!r}: use redis://, sqlite:/// or sink")
