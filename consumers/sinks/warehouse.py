"""The warehouse sink: one row per unique event id, in PostgreSQL or embedded DuckDB.

``WAREHOUSE_URL`` picks the engine: ``postgresql://…`` (production, through asyncpg) or
``duckdb:///path/to/file.duckdb`` (the single-node default). The table is created and
migrated at start, idempotently; inserts are batched and ``ON CONFLICT (id) DO NOTHING``, so
the primary key makes delivery idempotent even when a consumer dies between delivering and
confirming in the dedupe store. The table is documented in docs/warehouse.md.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from consumers.blocking import run_serialised
from consumers.records import CallRecord, EventRecord, SmsRecord
from consumers.sinks import Delivery, SinkConfigError, TransientSinkError
from onoff_events import settings as s
from onoff_events.event_kinds import CALL

COLUMNS = (
    "id", "event_name", "direction", "sent_at", "user_name", "user_email", "user_number",
    "external_number", "external_name", "external_email", "body", "payload",
    "kafka_topic", "kafka_partition", "kafka_offset", "received_at",
)  # fmt: skip
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Each migration runs once, in order, under a lock: replicas may start together.
POSTGRES_MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS {schema}.sms_events (
        id              text        PRIMARY KEY,
        event_name      text        NOT NULL,
        direction       text        NOT NULL CHECK (direction IN ('SENT', 'RECEIVED')),
        sent_at         timestamptz NOT NULL,
        user_name       text,
        user_email      text,
        user_number     text,
        external_number text,
        external_name   text,
        external_email  text,
        body            text,
        payload         jsonb       NOT NULL,
        kafka_topic     text        NOT NULL,
        kafka_partition integer     NOT NULL,
        kafka_offset    bigint      NOT NULL,
        received_at     timestamptz,
        inserted_at     timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS sms_events_sent_at_idx ON {schema}.sms_events (sent_at);
    CREATE INDEX IF NOT EXISTS sms_events_user_number_idx
        ON {schema}.sms_events (user_number, sent_at);
    CREATE INDEX IF NOT EXISTS sms_events_external_number_idx
        ON {schema}.sms_events (external_number, sent_at);
    """,
    """
    CREATE TABLE IF NOT EXISTS {schema}.onoff_calls (
        id                          text        PRIMARY KEY,
        event_name                  text        NOT NULL,
        direction                   text,
        status                      text,
        started_at                  timestamptz,
        ended_at                    timestamptz,
        duration_seconds            double precision,
        user_name                   text,
        user_email                  text,
        user_number                 text,
        external_number             text,
        external_name               text,
        external_email              text,
        notes                       text,
        voicemail_url               text,
        voicemail_duration_seconds  double precision,
        recording_url               text,
        tags                        jsonb,
        payload                     jsonb       NOT NULL,
        kafka_topic                 text        NOT NULL,
        kafka_partition             integer     NOT NULL,
        kafka_offset                bigint      NOT NULL,
        received_at                 timestamptz,
        inserted_at                 timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS onoff_calls_started_at_idx ON {schema}.onoff_calls (started_at);
    CREATE INDEX IF NOT EXISTS onoff_calls_external_number_idx
        ON {schema}.onoff_calls (external_number, started_at);
    """,
)

DUCKDB_MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS sms_events (
        id              VARCHAR     PRIMARY KEY,
        event_name      VARCHAR     NOT NULL,
        direction       VARCHAR     NOT NULL CHECK (direction IN ('SENT', 'RECEIVED')),
        sent_at         TIMESTAMPTZ NOT NULL,
        user_name       VARCHAR,
        user_email      VARCHAR,
        user_number     VARCHAR,
        external_number VARCHAR,
        external_name   VARCHAR,
        external_email  VARCHAR,
        body            VARCHAR,
        payload         JSON        NOT NULL,
        kafka_topic     VARCHAR     NOT NULL,
        kafka_partition INTEGER     NOT NULL,
        kafka_offset    BIGINT      NOT NULL,
        received_at     TIMESTAMPTZ,
        inserted_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
    );
    CREATE INDEX IF NOT EXISTS sms_events_sent_at_idx ON sms_events (sent_at);
    CREATE INDEX IF NOT EXISTS sms_events_user_number_idx ON sms_events (user_number);
    CREATE INDEX IF NOT EXISTS sms_events_external_number_idx ON sms_events (external_number);
    """,
    """
    CREATE TABLE IF NOT EXISTS onoff_calls (
        id                          VARCHAR     PRIMARY KEY,
        event_name                  VARCHAR     NOT NULL,
        direction                   VARCHAR,
        status                      VARCHAR,
        started_at                  TIMESTAMPTZ,
        ended_at                    TIMESTAMPTZ,
        duration_seconds            DOUBLE,
        user_name                   VARCHAR,
        user_email                  VARCHAR,
        user_number                 VARCHAR,
        external_number             VARCHAR,
        external_name               VARCHAR,
        external_email              VARCHAR,
        notes                       VARCHAR,
        voicemail_url               VARCHAR,
        voicemail_duration_seconds  DOUBLE,
        recording_url               VARCHAR,
        tags                        JSON,
        payload                     JSON        NOT NULL,
        kafka_topic                 VARCHAR     NOT NULL,
        kafka_partition             INTEGER     NOT NULL,
        kafka_offset                BIGINT      NOT NULL,
        received_at                 TIMESTAMPTZ,
        inserted_at                 TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
    );
    CREATE INDEX IF NOT EXISTS onoff_calls_started_at_idx ON onoff_calls (started_at);
    CREATE INDEX IF NOT EXISTS onoff_calls_external_number_idx ON onoff_calls (external_number);
    """,
)


# The columns taken from the Onoff payload, and its field for each: warehouse_row reads them
# in Python (DuckDB, COPY); PostgreSQL's insert extracts the same fields itself (_PG_SELECT).
FROM_PAYLOAD = {
    "event_name": "eventName",
    "direction": "smsDirection",
    "user_name": "onoffUserName",
    "user_email": "onoffUserEmail",
    "user_number": "onoffUserNumber",
    "external_number": "externalNumber",
    "external_name": "externalName",
    "external_email": "externalEmail",
    "body": "body",
}


def warehouse_row(event: SmsRecord) -> tuple[Any, ...]:
    """The ``sms_events`` row of one event, in COLUMNS order (pure)."""
    return _row(event, COLUMNS, FROM_PAYLOAD, {"sent_at": event.sent_at})


def _row(
    event: EventRecord,
    columns: Sequence[str],
    from_payload: Mapping[str, str],
    own: Mapping[str, Any],
) -> tuple[Any, ...]:
    """A row in ``columns`` order: what every table keeps of where the event was read, the
    event's ``own`` columns, and the rest from the payload (pure)."""
    known = {
        "id": event.event_id,
        "payload": event.raw.decode(),
        "kafka_topic": event.topic,
        "kafka_partition": event.partition,
        "kafka_offset": event.offset,
        "received_at": event.received_at,
        **own,
    }
    p = event.payload
    return tuple(known[c] if c in known else p.get(from_payload[c]) for c in columns)


CALL_COLUMNS = (
    "id", "event_name", "direction", "status", "started_at", "ended_at", "duration_seconds",
    "user_name", "user_email", "user_number", "external_number", "external_name",
    "external_email", "notes", "voicemail_url", "voicemail_duration_seconds", "recording_url",
    "tags", "payload", "kafka_topic", "kafka_partition", "kafka_offset", "received_at",
)  # fmt: skip
CALL_FROM_PAYLOAD = {
    "event_name": "eventName",
    "direction": "callDirection",
    "status": "callStatus",
    "duration_seconds": "callDuration",
    "user_name": "onoffUserName",
    "user_email": "onoffUserEmail",
    "user_number": "onoffUserNumber",
    "external_number": "externalNumber",
    "external_name": "externalName",
    "external_email": "externalEmail",
    "notes": "callNotes",
    "voicemail_url": "voicemailUrl",
    "voicemail_duration_seconds": "voicemailDuration",
    "recording_url": "callRecordingUrl",
    "tags": "tags",
}


def call_row(event: CallRecord) -> tuple[Any, ...]:
    """The ``onoff_calls`` row of one call event, in CALL_COLUMNS order (pure)."""
    own = {"started_at": event.started_at, "ended_at": event.ended_at}
    return _row(event, CALL_COLUMNS, CALL_FROM_PAYLOAD, own)


@dataclass(frozen=True, slots=True)
class Table:
    """One event kind's table: its columns, how PostgreSQL builds them from the payload and
    the parameters, and the rows in Python (DuckDB)."""

    name: str
    columns: tuple[str, ...]
    params: tuple[tuple[str, str], ...]
    """PostgreSQL's unnested parameters after the payload ``p``: (name, element type)."""
    pg_select: Mapping[str, str]
    """Column → SQL over ``t.p`` (the payload, jsonb) and ``t.<param>``; others: ``t.<column>``."""
    pg_params: Callable[[Any], tuple[Any, ...]]
    row: Callable[[Any], tuple[Any, ...]]
    duck_casts: Mapping[str, str]

    def pg_insert(self, schema: str) -> str:
        names = ["p", *(n for n, _ in self.params)]
        types = ["jsonb", *(t for _, t in self.params)]
        arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, 1))
        select = ", ".join(self.pg_select.get(c, f"t.{c}") for c in self.columns)
        return (
            f"INSERT INTO {schema}.{self.name} ({', '.join(self.columns)}) SELECT {select} "  # noqa: S608 # identifiers checked by the caller
            f"FROM unnest({arrays}) AS t({', '.join(names)}) "
            "ON CONFLICT (id) DO NOTHING RETURNING id"
        )

    def duck_insert(self) -> str:
        columns = ", ".join(
            f"unnest(${i}::VARCHAR[]){self.duck_casts.get(c, '')}"
            for i, c in enumerate(self.columns, 1)
        )
        return (
            f"INSERT INTO {self.name} ({', '.join(self.columns)}) SELECT * FROM (SELECT {columns}) "  # noqa: S608
            "ON CONFLICT (id) DO NOTHING RETURNING id"
        )

    def duck_row(self, event: Any) -> tuple[Any, ...]:
        """The row as DuckDB takes it: instants as ISO 8601 text (it parses them into
        TIMESTAMPTZ itself; aware datetimes would need pytz at run time), JSON as text."""
        return tuple(_duck_value(v) for v in self.row(event))


def _duck_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:
            # Deeper than orjson writes (254 levels, tags' items may hold anything): the
            # column stays empty, the payload column keeps them as sent.
            return None
    return value


def _permanent(exc: BaseException) -> bool:
    """Errors about the row itself: SQLSTATE classes 22 (data), 23 (integrity) and 54
    (program limit, e.g. an index row too large). Retrying the same row can never work.
    Everything else (connection, shutdown, timeouts, resources) is transient and retried."""
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in ("22", "23", "54")


class PostgresWarehouse:
    name = "warehouse"

    def __init__(
        self,
        url: str,
        schema: str = "public",
        pool_size: int = 4,
        parallel_inserts: int = 3,
        table: Table | None = None,
    ) -> None:
        if not _IDENT.match(schema):
            raise SinkConfigError(f"WAREHOUSE_SCHEMA: not a plain identifier: {schema!r}")
        self._url = url
        self._schema = schema
        self._pool_size = pool_size
        self._parallel_inserts = min(parallel_inserts, pool_size)
        self._pool: asyncpg.Pool | None = None
        self._table = table or SMS_TABLE
        # One statement per batch. Each event travels as its JSON payload plus what is not in
        # it, and PostgreSQL extracts the text columns itself: six array parameters instead of
        # sixteen (encoding those arrays was the consumer's largest cost per insert). jsonb[]
        # (not text[] cast per use): each payload is parsed once, on the way in.
        self._insert = self._table.pg_insert(schema)

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=30,
                timeout=10,
            )
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('onoff_warehouse'))")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._schema}.warehouse_migrations "
                    "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                applied = {
                    r["version"]
                    for r in await conn.fetch(
                        f"SELECT version FROM {self._schema}.warehouse_migrations"  # noqa: S608
                    )
                }
                for version, sql in enumerate(POSTGRES_MIGRATIONS, 1):
                    if version not in applied:
                        await conn.execute(sql.format(schema=self._schema))
                        await conn.execute(
                            f"INSERT INTO {self._schema}.warehouse_migrations (version) "  # noqa: S608
                            "VALUES ($1)",
                            version,
                        )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self.close()
            raise TransientSinkError(f"postgres start: {type(exc).__name__}") from exc

    event_kinds = frozenset({"sms", "call"})  # sms_events, onoff_calls
    # The table's primary key is the dedupe store of DEDUPE_URL=sink: an insert says which ids
    # were new (RETURNING), so a duplicate costs no extra round trip.
    idempotent_by_key = True
    # Rows are keyed and nothing is read back, so batches may overlap: the runner delivers the
    # next batch while this one's last statement and commit finish.
    overlapping_batches = True

    async def deliver(self, events: Sequence[EventRecord]) -> Delivery:
        assert self._pool is not None, "start() first"  # noqa: S101 # programming error
        # A batch goes in as a few statements on separate connections at once: the driver
        # encodes one part while PostgreSQL writes another. The runner passes each id once
        # per batch, so the parts never contend for the same key. Rows go in in id order:
        # the statements of two batches in hand may share ids (copies in both), and taking
        # the keys in one order makes one wait for the other instead of deadlocking.
        parts = _split(sorted(events, key=_event_id), self._parallel_inserts)
        results = await asyncio.gather(
            *(self._insert_rows([self._table.pg_params(e) for e in part]) for part in parts),
            return_exceptions=True,
        )
        new: set[str] = set()
        spoiled: list[EventRecord] = []
        for part, result in zip(parts, results, strict=True):
            if isinstance(result, BaseException):
                if not _permanent(result):
                    # The whole batch is retried; rows a sibling part wrote now are counted as
                    # already held then (a metric detail, never a lost or doubled row).
                    raise TransientSinkError(f"postgres: {type(result).__name__}") from result
                spoiled.extend(part)
            else:
                new |= result
        # A row spoils its part's statement: find it (and any other) row by row.
        rejected: dict[str, str] = {}
        for event in spoiled:
            try:
                new |= await self._insert_rows([self._table.pg_params(event)])
            except Exception as exc:
                if not _permanent(exc):
                    raise TransientSinkError(f"postgres: {type(exc).__name__}") from exc
                rejected[event.event_id] = f"postgres {exc.sqlstate}: {type(exc).__name__}"  # type: ignore[attr-defined]
        return Delivery(rejected, _held([e.event_id for e in events], new, rejected))

    async def _insert_rows(self, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert; return the ids that were new (the others were already there)."""
        assert self._pool is not None  # noqa: S101
        inserted = await self._pool.fetch(self._insert, *zip(*rows, strict=True))
        return {r[0] for r in inserted}

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


class DuckDbWarehouse:
    """Embedded: one file, one writer process. DuckDB calls block, so they run in a thread."""

    name = "warehouse"

    def __init__(self, path: Path, table: Table | None = None) -> None:
        self._path = path
        self._db: Any = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._deliveries = asyncio.Lock()  # one batch at a time
        self._table = table or SMS_TABLE
        # One statement per batch: each column is a list parameter, unnested side by side
        # (DuckDB's executemany runs one insert per row, about 500 times slower).
        self._insert = self._table.duck_insert()

    async def start(self) -> None:
        import duckdb  # noqa: PLC0415 # only the embedded warehouse needs it

        def open_and_migrate() -> Any:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = duckdb.connect(str(self._path))
            db.execute("SET TimeZone = 'UTC'")
            for sql in DUCKDB_MIGRATIONS:
                db.execute(sql)
            return db

        try:
            self._db = await asyncio.to_thread(open_and_migrate)
        except duckdb.Error as exc:
            raise TransientSinkError(f"duckdb start: {type(exc).__name__}") from exc

    event_kinds = frozenset({"sms", "call"})
    idempotent_by_key = True  # see PostgresWarehouse
    overlapping_batches = True  # see PostgresWarehouse; one statement at a time all the same

    async def deliver(self, events: Sequence[EventRecord]) -> Delivery:
        import duckdb  # noqa: PLC0415

        rows = [self._table.duck_row(e) for e in events]
        async with self._deliveries:
            try:
                inserted = await run_serialised(self._lock, self._insert_all, rows)
            except (
                duckdb.ConversionException,
                duckdb.ConstraintException,
                duckdb.InvalidInputException,
            ):
                pass  # a bad row: find it below
            except duckdb.Error as exc:
                raise TransientSinkError(f"duckdb: {type(exc).__name__}") from exc
            else:
                return Delivery(already_held=_held([r[0] for r in rows], inserted))
            rejected: dict[str, str] = {}
            new: set[str] = set()
            for row in rows:
                try:
                    new |= await run_serialised(self._lock, self._insert_all, [row])
                except (
                    duckdb.ConversionException,
                    duckdb.ConstraintException,
                    duckdb.InvalidInputException,
                ) as exc:
                    rejected[row[0]] = f"duckdb: {type(exc).__name__}"
                except duckdb.Error as exc:
                    raise TransientSinkError(f"duckdb: {type(exc).__name__}") from exc
            return Delivery(rejected, _held([r[0] for r in rows], new, rejected))

    def _insert_all(self, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert; return the ids that were new."""
        columns = [
            [None if v is None else str(v) for v in column] for column in zip(*rows, strict=True)
        ]
        return {r[0] for r in self._db.execute(self._insert, columns).fetchall()}

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await run_serialised(self._lock, db.close)


# The text columns PostgreSQL extracts from the payload (``t.p``); the other columns are the
# unnested parameters themselves (``t.<column>``).
_PG_SELECT = {
    "id": "t.p->>'id'",
    "payload": "t.p",
    **{column: f"t.p->>'{field}'" for column, field in FROM_PAYLOAD.items()},
}


def _pg_row(event: SmsRecord) -> tuple[Any, ...]:
    """What PostgreSQL needs for an SMS, in the insert's parameter order (pure)."""
    return _pg_params(event, event.sent_at)


def _pg_params(event: EventRecord, *own: Any) -> tuple[Any, ...]:
    """The payload, the table's own parameters, then where the event was read: the order of
    every table's ``params`` (pure)."""
    return (event.raw.decode(), *own, event.topic, event.partition, event.offset,
            event.received_at)  # fmt: skip


_event_id = attrgetter("event_id")


def _split(events: Sequence[EventRecord], parts: int) -> list[Sequence[EventRecord]]:
    """``events`` in at most ``parts`` contiguous slices of near-equal size (pure)."""
    size = max(1, -(-len(events) // max(parts, 1)))
    return [events[i : i + size] for i in range(0, len(events), size)]


def _held(
    ids: Sequence[str], new: set[str], rejected: Mapping[str, str] | None = None
) -> frozenset[str]:
    """The ids the table already had: neither reported new by the insert nor rejected."""
    return frozenset(i for i in ids if i not in new and i not in (rejected or {}))


def _duck_row(event: SmsRecord) -> tuple[Any, ...]:
    return SMS_TABLE.duck_row(event)


SMS_TABLE = Table(
    name="sms_events",
    columns=COLUMNS,
    params=(
        ("sent_at", "timestamptz"),
        ("kafka_topic", "text"),
        ("kafka_partition", "int"),
        ("kafka_offset", "bigint"),
        ("received_at", "timestamptz"),
    ),
    pg_select=_PG_SELECT,
    pg_params=_pg_row,
    row=warehouse_row,
    duck_casts={
        "sent_at": "::TIMESTAMPTZ",
        "received_at": "::TIMESTAMPTZ",
        "payload": "::JSON",
        "kafka_partition": "::INTEGER",
        "kafka_offset": "::BIGINT",
    },
)


def _call_pg_params(event: CallRecord) -> tuple[Any, ...]:
    return _pg_params(event, event.started_at, event.ended_at)


CALL_TABLE = Table(
    name="onoff_calls",
    columns=CALL_COLUMNS,
    params=(
        ("started_at", "timestamptz"),
        ("ended_at", "timestamptz"),
        ("kafka_topic", "text"),
        ("kafka_partition", "int"),
        ("kafka_offset", "bigint"),
        ("received_at", "timestamptz"),
    ),
    pg_select={
        "id": "t.p->>'id'",
        "payload": "t.p",
        **{c: f"t.p->>'{f}'" for c, f in CALL_FROM_PAYLOAD.items()},
        # The schema allows only numbers (or null) here.
        "duration_seconds": "(t.p->>'callDuration')::double precision",
        "voicemail_duration_seconds": "(t.p->>'voicemailDuration')::double precision",
        # JSON null becomes SQL NULL, as an absent field does (and as DuckDB stores both).
        "tags": "NULLIF(t.p->'tags', 'null'::jsonb)",
    },
    pg_params=_call_pg_params,
    row=call_row,
    duck_casts={
        "started_at": "::TIMESTAMPTZ",
        "ended_at": "::TIMESTAMPTZ",
        "received_at": "::TIMESTAMPTZ",
        "duration_seconds": "::DOUBLE",
        "voicemail_duration_seconds": "::DOUBLE",
        "tags": "::JSON",
        "payload": "::JSON",
        "kafka_partition": "::INTEGER",
        "kafka_offset": "::BIGINT",
    },
)


def warehouse_from_env(env: Mapping[str, str]) -> PostgresWarehouse | DuckDbWarehouse:
    # The service's event kind (consumers/settings.py) picks the table; embedded, each kind
    # has its own file (DuckDB takes one writer per file).
    calls = env.get("CONSUMER_EVENT_KIND", "").strip() == CALL.name
    table = CALL_TABLE if calls else SMS_TABLE
    default = (
        "duckdb:///.data/warehouse-calls.duckdb" if calls else "duckdb:///.data/warehouse.duckdb"
    )
    url = s.text(env, "WAREHOUSE_URL", default)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresWarehouse(
            url,
            schema=s.text(env, "WAREHOUSE_SCHEMA", "public"),
            pool_size=s.number(env, "WAREHOUSE_POOL_SIZE", 4, int, minimum=1, maximum=100),
            parallel_inserts=s.number(
                env, "WAREHOUSE_PARALLEL_INSERTS", 3, int, minimum=1, maximum=100
            ),
            table=table,
        )
    if url.startswith("duckdb:///"):
        path = url[len("duckdb:///") :]
        if not path:
            raise SinkConfigError("WAREHOUSE_URL: duckdb:///path/to/file.duckdb needs a path")
        return DuckDbWarehouse(Path(path), table)
    raise SinkConfigError("WAREHOUSE_URL: expected postgresql://… or duckdb:///path/to/file.duckdb")
