"""Running blocking database calls (SQLite, DuckDB) in a worker thread, one at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_serialised(lock: asyncio.Lock, work: Callable[..., T], *args: object) -> T:
    """Run ``work(*args)`` in a thread while holding ``lock``.

    If the caller is cancelled, the lock is still held until the thread has finished: a
    connection must never be used (or closed) by two threads at once.
    """
    async with lock:
        job = asyncio.ensure_future(asyncio.to_thread(work, *args))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait({job})
            raise
