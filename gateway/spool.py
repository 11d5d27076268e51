"""The spool: records Kafka has not acknowledged in time, kept on local disk until it does.

A webhook is answered 200 only once its record is durable: acknowledged by Kafka
(``acks=all``) or, when Kafka is away or slow, written here and fsynced. The store is SQLite
in WAL mode with ``synchronous=FULL``: every commit is fsynced before it returns, and a
crash or a write cut short loses only the transaction that had not returned (SQLite's WAL
checksums every frame; recovery stops at the first bad one). Its crash safety is tested far
beyond what a hand-written segment log could claim.

Group commit: appends are queued, and one writer thread commits everything queued since its
last commit in one transaction (one fsync), so the fsync cost is shared by every request that
arrived while the previous one ran. No timer: under light load a record is committed at once.

The table is plain SQL so a file can be read by hand (docs/operations.md):
``sqlite3 spool.db 'SELECT seq, topic, key, spooled_at, length(value) FROM spool'``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import orjson

from onoff_events.cloudevents import Headers
from onoff_events.logs import log_event
from onoff_events.sqlite import transaction

log = logging.getLogger("gateway.spool")
T = TypeVar("T")

SPOOL_FILE = "spool.db"
FAILING_SECONDS = 30.0  # how long a failed write keeps the spool out of readiness
READ_BATCH_BYTES = 16 * 1024 * 1024  # the most a replay round reads into memory
DISK_RESERVE_BYTES = 2 * 1024 * 1024
REMOVE_CHUNK_BYTES = 256 * 1024  # records deleted per transaction: bounds its WAL growth
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024  # the WAL is cut back to this after a checkpoint
SPOOLED_TIME = "ce_spooledtime"
"""Extension attribute: when the gateway spooled the record (RFC 3339, UTC, milliseconds)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers TEXT NOT NULL,
    size INTEGER NOT NULL,
    spooled_at REAL NOT NULL
)
"""


class SpoolFailed(Exception):
    """The record is not on disk: answer 503. ``reason`` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    seq: int
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    spooled_at: float  # Unix time


@dataclass(slots=True)
class _Append:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    size: int
    done: asyncio.Future[None] = field(repr=False)


@dataclass(frozen=True, slots=True)
class SpoolStats:
    records: int
    bytes: int
    oldest_spooled_at: float | None


def record_size(key: bytes | None, value: bytes, headers: Headers) -> int:
    """What a record counts against GATEWAY_SPOOL_MAX_BYTES: its key, value and headers."""
    return len(key or b"") + len(value) + sum(len(k) + len(v) for k, v in headers)


def encode_headers(headers: Headers) -> str:
    """Headers as JSON text: ``[[name, base64 value], ...]`` (readable with sqlite3 and jq)."""
    return orjson.dumps([[k, base64.b64encode(v).decode()] for k, v in headers]).decode()


def decode_headers(text: str) -> Headers:
    return [(str(k), base64.b64decode(v)) for k, v in orjson.loads(text)]


def failure_reason(exc: sqlite3.Error) -> str:
    """A bounded metric label for what the disk said."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith("SQLITE_FULL"):
        return "disk_full"
    if name.startswith("SQLITE_READONLY"):
        return "read_only"
    if name.startswith("SQLITE_IOERR"):
        return "io_error"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return "corrupt"
    return "disk_error"


class _NoRoomOnDisk(Exception):
    """The volume's free space is below the reserve: refused before anything is written."""


def _free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "read_only"
    if exc.errno == errno.ENOSPC:
        return "disk_full"
    return "disk_error"


class Spool:
    """One SQLite file, used from one worker thread. Open with ``await Spool.open(...)``."""

    def __init__(
        self,
        folder: Path,
        max_bytes: int,
        on_commit: Callable[[int, float], None] | None = None,
        reserve_bytes: int = DISK_RESERVE_BYTES,
    ) -> None:
        self.path = folder / SPOOL_FILE
        self.max_bytes = max_bytes
        # Free space an append leaves on the volume: a delete writes its pages to the WAL
        # before it frees anything, so a spool that filled its disk could never drain.
        self.reserve_bytes = reserve_bytes
        # (records, seconds) of each group commit: the metrics' hook, kept out of this module.
        self._on_commit = on_commit
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._queue: list[_Append] = []
        self._writer: asyncio.Task[None] | None = None
        # Written only by the worker thread, in the order its transactions commit; read by
        # the event loop (one tuple, swapped whole).
        self._stats = SpoolStats(0, 0, None)
        self._queued_bytes = 0  # the event loop's: appends not committed yet
        self._closed = False
        self._refusal_logged = 0.0
        self._failed_at: float | None = None  # monotonic time of the last failed write
        # Set whenever records are committed: the replay waits on it while the spool is empty.
        self.appended = asyncio.Event()

    @classmethod
    async def open(
        cls,
        folder: Path,
        max_bytes: int,
        on_commit: Callable[[int, float], None] | None = None,
        reserve_bytes: int = DISK_RESERVE_BYTES,
    ) -> Spool:
        spool = cls(folder, max_bytes, on_commit, reserve_bytes)
        try:
            await spool._call(spool._open_sync)
        except (sqlite3.Error, OSError) as exc:
            spool._thread.shutdown(wait=False)
            reason = failure_reason(exc) if isinstance(exc, sqlite3.Error) else _os_reason(exc)
            raise SpoolFailed(reason) from exc
        if spool.stats.records:
            spool.appended.set()
        return spool

    @property
    def stats(self) -> SpoolStats:
        return self._stats

    def has_room(self, size: int) -> bool:
        """Whether a record of ``size`` bytes fits now (counting appends not yet committed)."""
        return self._stats.bytes + self._queued_bytes + size <= self.max_bytes

    @property
    def failing(self) -> bool:
        """A write failed (full disk, I/O error, read-only volume) less than FAILING_SECONDS
        ago and none succeeded since: readiness counts on Kafka alone meanwhile. Past that
        the spool is tried again (a freed disk, a remounted volume)."""
        failed_at = self._failed_at
        return failed_at is not None and time.monotonic() - failed_at < FAILING_SECONDS

    async def append(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers,
        within: float = 10.0,
    ) -> None:
        """Return once the record is committed and fsynced; else raise SpoolFailed, at the
        latest after ``within`` seconds (a stalled disk must not hold the webhook past
        Onoff's patience: the record may still be committed later, and be sent twice)."""
        if self._closed:
            raise SpoolFailed("closed")
        size = record_size(key, value, headers)
        if not self.has_room(size):
            raise SpoolFailed("full")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Append(topic, key, value, headers, size, done))
        self._queued_bytes += size
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name="spool-writer")
        try:
            # Shielded: a client that hangs up must not cancel the commit of its batch-mates.
            async with asyncio.timeout(within):
                await asyncio.shield(done)
        except TimeoutError:
            raise SpoolFailed("timeout") from None

    async def oldest(self, limit: int) -> list[SpooledRecord]:
        """Up to ``limit`` records, oldest first."""
        return await self._call(self._oldest_sync, limit)

    async def remove(self, records: Sequence[SpooledRecord]) -> None:
        """Drop records Kafka has acknowledged."""
        if records:
            seqs = [r.seq for r in records]
            sizes = [record_size(r.key, r.value, r.headers) for r in records]
            await self._call(self._remove_sync, seqs, sizes)

    async def close(self, within: float = 10.0) -> None:
        """Commit what is queued (within a bound: a stalled disk must not hold the stop),
        then close the file."""
        self._closed = True
        if self._writer is not None:
            await asyncio.wait([self._writer], timeout=within)
        try:
            async with asyncio.timeout(within):
                await self._call(self._close_sync)
        except (sqlite3.Error, OSError, TimeoutError) as exc:
            log_event(log, "spool_close_failed", logging.ERROR, error=type(exc).__name__)
        self._thread.shutdown(wait=False)

    # --- the writer -----------------------------------------------------------------------

    async def _write_queued(self) -> None:
        """Commit everything queued, in groups, until the queue is empty. Whatever ends it,
        no append is left waiting: an unexpected error fails the group and the queue."""
        group: list[_Append] = []
        try:
            await self._write_groups(group)
        except BaseException as exc:
            log_event(log, "spool_writer_failed", logging.ERROR, error=type(exc).__name__)
            self._failed_at = time.monotonic()
            left, self._queue = [*group, *self._queue], []
            self._queued_bytes = 0  # everything queued is failed here
            for append in left:
                if not append.done.done():
                    append.done.set_exception(SpoolFailed("disk_error"))
            if not isinstance(exc, Exception):
                raise

    async def _write_groups(self, group: list[_Append]) -> None:
        """The writer's loop; ``group`` holds the group being written (for _write_queued)."""
        while self._queue:
            group[:], self._queue = self._queue, []
            group_bytes = sum(a.size for a in group)
            started = time.perf_counter()
            try:
                await self._call(self._append_sync, group)
            except _NoRoomOnDisk:
                self._refuse(group, "disk_full", free_bytes_below=self.reserve_bytes)
                continue
            except (sqlite3.Error, OSError) as exc:
                reason = failure_reason(exc) if isinstance(exc, sqlite3.Error) else _os_reason(exc)
                # After a failed write or fsync the file's state in the page cache cannot be
                # trusted (PostgreSQL's "fsyncgate"): reopen before the next write.
                await self._reopen()
                self._refuse(group, reason, error=type(exc).__name__)
                continue
            finally:
                self._queued_bytes -= group_bytes
            seconds = time.perf_counter() - started
            self._failed_at = None
            if self._on_commit is not None:
                self._on_commit(len(group), seconds)
            self.appended.set()
            for append in group:
                if not append.done.done():
                    append.done.set_result(None)

    def _refuse(self, group: list[_Append], reason: str, **detail: object) -> None:
        now = self._failed_at = time.monotonic()
        if now - self._refusal_logged >= 5.0:  # one line per 5 s; the metric counts each
            self._refusal_logged = now
            log_event(
                log,
                "spool_write_failed",
                logging.ERROR,
                reason=reason,
                records=len(group),
                **detail,
            )
        for append in group:
            if not append.done.done():
                append.done.set_exception(SpoolFailed(reason))

    async def _reopen(self) -> None:
        try:
            await self._call(self._close_sync)
            await self._call(self._open_sync)
        except (sqlite3.Error, OSError) as exc:
            # The next append tries again; until the disk is back every one gets a 503.
            log_event(log, "spool_reopen_failed", logging.ERROR, error=type(exc).__name__)

    async def _call(self, work: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    # --- in the worker thread -------------------------------------------------------------

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if os.statvfs(self.path.parent).f_flag & os.ST_RDONLY:
            # SQLite would only say "unable to open database file".
            raise OSError(errno.EROFS, "the spool's volume is mounted read-only")
        # A short busy timeout: the only other user is an operator reading the file by hand.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=1)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit, so a commit that returned survives a
            # power cut (NORMAL would only survive a process crash).
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            db.execute(_SCHEMA)
            count, size, oldest = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(spooled_at) FROM spool"
            ).fetchone()
        except BaseException:
            db.close()
            raise
        self._db = db
        self._stats = SpoolStats(int(count), int(size), oldest)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._open_sync()  # after a failed reopen
        assert self._db is not None  # noqa: S101 # set by _open_sync or it raised
        return self._db

    def _append_sync(self, group: list[_Append]) -> None:
        db = self._connection()
        # Each record costs about twice its size before a checkpoint (WAL frame, then page).
        needed = 2 * sum(a.size for a in group) + self.reserve_bytes
        if _free_bytes(self.path.parent) < needed:
            # The WAL may hold the space: copied into the file's free pages, it is given back
            # (on a volume nearly full, before every group: slower, never wrong).
            self._checkpoint(db)
        if self._room(db) < needed:
            raise _NoRoomOnDisk
        now = time.time()
        with transaction(db):
            db.executemany(
                "INSERT INTO spool (topic, key, value, headers, size, spooled_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(a.topic, a.key, a.value, encode_headers(a.headers), a.size, now) for a in group],
            )
        before = self._stats
        self._stats = SpoolStats(
            before.records + len(group),
            before.bytes + sum(a.size for a in group),
            now if before.oldest_spooled_at is None else before.oldest_spooled_at,
        )

    def _oldest_sync(self, limit: int) -> list[SpooledRecord]:
        """Up to ``limit`` records and about READ_BATCH_BYTES, oldest first (at least one)."""
        rows = self._connection().execute(
            "SELECT seq, topic, key, value, headers, spooled_at FROM spool ORDER BY seq LIMIT ?",
            (limit,),
        )
        records: list[SpooledRecord] = []
        read = 0
        for seq, topic, key, value, headers, spooled_at in rows:
            records.append(
                SpooledRecord(seq, topic, key, value, self._headers_of(seq, headers), spooled_at)
            )
            read += len(value) + len(key or b"")
            if read >= READ_BATCH_BYTES:
                break
        return records

    def _headers_of(self, seq: int, text: str) -> Headers:
        """A row's headers; a row edited by hand into something unreadable is still sent
        (its key and value are what matter), without headers, and said so."""
        try:
            return decode_headers(text)
        except (ValueError, TypeError) as exc:  # orjson and base64 errors are ValueErrors
            log_event(
                log, "spool_headers_unreadable", logging.ERROR, seq=seq, error=type(exc).__name__
            )
            return []

    def _remove_sync(self, seqs: list[int], sizes: list[int]) -> None:
        """Delete ``seqs`` in transactions of about REMOVE_CHUNK_BYTES, so that on a nearly
        full volume each fits the reserve; the counts follow each commit."""
        db = self._connection()
        start = 0
        while start < len(seqs):
            end, chunk_bytes = start, 0
            while end < len(seqs) and (
                end == start or (chunk_bytes < REMOVE_CHUNK_BYTES and end - start < 500)
            ):
                chunk_bytes += sizes[end]
                end += 1
            self._remove_chunk(db, seqs[start:end])
            start = end
            if _free_bytes(self.path.parent) < 2 * self.reserve_bytes:
                self._checkpoint(db)

    def _remove_chunk(self, db: sqlite3.Connection, seqs: list[int]) -> None:
        """One transaction: delete ``seqs`` (at most 500, by primary key: no scan of a large
        spool) and count what went."""
        marks = ",".join("?" * len(seqs))
        with transaction(db):
            count, size = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool WHERE seq IN ({marks})",  # noqa: S608 # placeholders only
                seqs,
            ).fetchone()
            db.execute(f"DELETE FROM spool WHERE seq IN ({marks})", seqs)  # noqa: S608
            row = db.execute("SELECT spooled_at FROM spool ORDER BY seq LIMIT 1").fetchone()
        before = self._stats
        self._stats = SpoolStats(
            before.records - int(count), before.bytes - int(size), row[0] if row else None
        )

    def _room(self, db: sqlite3.Connection) -> int:
        """Free bytes on the volume plus the free pages inside the file (SQLite reuses them
        but never shrinks the file: a spool emptied after filling its disk has its room
        there, not on the volume)."""
        (free_pages,) = db.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        return _free_bytes(self.path.parent) + int(free_pages) * int(page_size)

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy the WAL into the file and cut it to zero, giving its space back. Only an
        optimisation: a reader in the way (an operator's sqlite3) or a full disk leaves it."""
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _close_sync(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
