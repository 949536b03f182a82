"""One migration at a time per database, whichever process starts it.

Bot shards and a CLI run beside the bot all migrate on start-up; on a new database they
would race to create Alembic's version table. PostgreSQL serialises them with a
transaction-level advisory lock taken before Alembic reads the version; SQLite with a
file lock beside the database file (held until the migration has committed), and the
migration's transaction takes SQLite's write lock up front (`BEGIN IMMEDIATE` in env.py).
A process that finds the lock taken waits, then sees the schema the other one made.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from sqlalchemy import text
from sqlalchemy.engine import Connection

from store.db import sqlite_file

log = logging.getLogger(__name__)

# Any fixed 64-bit number, the same in every process: b"switchbd" read as an integer.
POSTGRES_LOCK_KEY = int.from_bytes(b"switchbd", "big", signed=True)


def lock_file(database: Path) -> Path:
    """The lock file that migrations of the SQLite file `database` hold."""
    return database.with_name(database.name + ".migrations.lock")


@contextmanager
def sqlite_migration_lock(url: str) -> Iterator[None]:
    """Hold the migration lock of the SQLite file at `url` (nothing for other databases)."""
    path = sqlite_file(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # preserve_lock_file: a plain flock on a file that stays, never a marker file that a
    # killed process would leave behind as a lock nobody holds.
    lock = FileLock(lock_file(path), preserve_lock_file=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is migrating %s; waiting for it", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def lock_postgres(connection: Connection) -> None:
    """Wait for other migrations of this PostgreSQL database; held until this transaction ends."""
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_LOCK_KEY})
