"""Engines and sessions (the migrations are run by `migrations.runner`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

# How long a SQLite connection waits on another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0


def is_sqlite(url: str | URL) -> bool:
    """Whether `url` names a SQLite database."""
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(url: str | URL) -> Path | None:
    """The file a SQLite URL points at; None for memory databases and other backends."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """An async engine; on SQLite with foreign keys on, WAL, and a generous busy timeout.

    A SQLite file that exists when the engine is made is opened read-write only, never
    created again: if it is deleted while the bot runs, writes fail (and are kept and
    retried) instead of going to a new empty file, or on into the deleted one.
    """
    if not is_sqlite(url):
        return _create_async_engine(url, echo=echo, pool_pre_ping=True)
    path = sqlite_file(url)
    connect_url: str | URL = url
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            driver = make_url(url).drivername
            connect_url = f"{driver}:///file:{quote(str(path.resolve()))}?mode=rw&uri=true"
    engine = _create_async_engine(
        connect_url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}
    )
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_begin)
    if path is not None:
        event.listen(engine.sync_engine, "connect", _remember_file(path))
        event.listen(engine.sync_engine.pool, "checkout", _check_file(path))
    return engine


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _remember_file(path: Path) -> Any:
    def remember(dbapi_connection: Any, connection_record: Any) -> None:
        connection_record.info["sqlite_inode"] = _inode(path)

    return remember


def _check_file(path: Path) -> Any:
    def check(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
        # A connection opened on a file that has since been deleted (or replaced) would
        # read and write a file nobody will ever see: drop it and open the path again.
        if connection_record.info.get("sqlite_inode") != _inode(path):
            raise DisconnectionError(f"{path} was deleted or replaced")

    return check


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    """SQLite enforces foreign keys only when asked, per connection."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL lets readers run while the log writer commits; NORMAL is safe with WAL.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()
    # The sqlite3 module begins transactions on its own, late and without telling
    # SQLAlchemy, which breaks SAVEPOINTs (the exchange log isolates a bad exchange in
    # one). Take BEGIN over, as SQLAlchemy's SQLite documentation recommends.
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


# PostgreSQL SQLSTATEs that mean "not now" rather than "not this": a connection problem
# (08), a read-only transaction (25006), no room (53: disk full, too many connections),
# an operator or a restart (57), a transaction to retry (40), a table not there (42P01,
# such as a database restored without its schema yet).
_OUTAGE_STATES = ("08", "25006", "53", "57", "40", "42P01")


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error (None for SQLite and other failures)."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return str(code) if code else None


def is_outage(exc: BaseException) -> bool:
    """Whether a database call failed because the database is away, locked, read-only or
    restarting (worth trying again later), rather than because of what was asked."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    code = sqlstate(exc)
    if code is not None:
        return code.startswith(_OUTAGE_STATES)
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | ConnectionError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OSError | TimeoutError)


def failure_reason(exc: BaseException) -> str:
    """Why a database call failed, in one short line: the driver's message, without the
    statement and parameters SQLAlchemy adds (they may hold what a person wrote)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
