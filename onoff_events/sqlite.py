"""One SQLite transaction, for the stores the services keep in a file (the gateway's spool,
the consumers' embedded dedupe store): connections opened with ``isolation_level=None``."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (the write lock up front: no upgrade that can fail half-way), then
    COMMIT; ROLLBACK on any exception, whose own failure never hides the first one."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
