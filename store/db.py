"""Engines and sessions, and what a person is told when the database cannot be used.

The migrations are run by `migrations.runner`. `database_errors` turns the failures of
connecting to and migrating a database (SQLAlchemy, asyncpg, sqlite3, OSError) into one
`ConfigError` line that names the setting to change and what to do; a URL in such a line
always has its password masked.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from core.errors import ConfigError, UserError

# How long a SQLite connection waits on another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0

# The settings a database message names (see core/settings.py).
DATABASE_URL_SETTING = "SWITCHBOARD_DATABASE_URL"
DATA_DIR_SETTING = "SWITCHBOARD_DATA_DIR"

# The drivers Switchboard runs on; the settings turn sqlite:// and postgresql:// into these.
DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
URL_EXAMPLES = "sqlite:///path/to/switchboard.db or postgresql://user:password@host:5432/dbname"

# PostgreSQL error codes (SQLSTATE) that mean the URL or the server is wrong, not the code.
_PG_LOGIN = {"28P01", "28000"}  # wrong password; no such role, or pg_hba refuses it
_PG_NO_DATABASE = "3D000"
_PG_NO_PRIVILEGE = "42501"
_PG_UNAVAILABLE = {"53300", "57P03"}  # too many connections; starting up or shutting down


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


def shown_url(url: str | URL) -> str:
    """`url` as it may be shown to a person or logged: the password masked."""
    return make_url(url).render_as_string(hide_password=True)


def database_place(url: str | URL, setting: str) -> str:
    """ "the database in SETTING (where)", for messages: a SQLite file's path, else the masked URL."""
    return f"the database in {setting} ({sqlite_file(url) or shown_url(url)})"


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
    event.listen(engine.sync_engine, "before_cursor_execute", _begin_before_writing)
    event.listen(engine.sync_engine, "commit", _transaction_ended)
    event.listen(engine.sync_engine, "rollback", _transaction_ended)
    # A connection back in the pool was rolled back by the pool itself, without the event.
    event.listen(engine.sync_engine.pool, "checkin", _returned)
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
    # The sqlite3 module begins transactions on its own, without telling SQLAlchemy, and
    # that breaks SAVEPOINTs (the exchange log isolates a bad exchange in one). Take BEGIN
    # over (see _begin_before_writing), as SQLAlchemy's SQLite documentation recommends.
    dbapi_connection.isolation_level = None


# Statements that write: a transaction begins right before the first one.
_WRITES = re.compile(
    r"\s*(INSERT|UPDATE|DELETE|REPLACE|SAVEPOINT|CREATE|DROP|ALTER)\b", re.IGNORECASE
)


def _begin_before_writing(
    connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """BEGIN IMMEDIATE before a transaction's first write; reads before it stay lock-free.

    IMMEDIATE takes the write lock at once, waiting (the busy timeout) for another writer
    to finish. A transaction that read first and took it later could find another writer's
    commit in between and fail at once with "database is locked", whatever the timeout.
    """
    if not connection.info.get("sqlite_writing") and _WRITES.match(statement):
        cursor.execute("BEGIN IMMEDIATE")
        connection.info["sqlite_writing"] = True


def _transaction_ended(connection: Any) -> None:
    connection.info["sqlite_writing"] = False


def _returned(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info["sqlite_writing"] = False


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


def check_database_url(url: str, setting: str = DATABASE_URL_SETTING) -> None:
    """Refuse a URL Switchboard cannot use (unparseable, another database, a sync driver)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not shown: an unparseable URL cannot have its password masked.
        raise ConfigError(f"{setting} is not a database URL: write it as {URL_EXAMPLES}.") from None
    backend = parsed.get_backend_name()
    if backend not in DRIVERS:
        raise ConfigError(
            f"{setting} names a {backend!r} database ({shown_url(parsed)}); Switchboard works "
            f"with SQLite and PostgreSQL: set it to {URL_EXAMPLES}."
        )
    if parsed.drivername != DRIVERS[backend]:
        raise ConfigError(
            f"{setting} asks for the {parsed.drivername!r} driver ({shown_url(parsed)}); "
            f"Switchboard uses {DRIVERS[backend]!r}: write the URL as {backend}://..."
        )


def prepare_folder(path: Path, setting: str) -> None:
    """Create `path` if needed and check that a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: root passes access checks on a read-only mount.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"The folder in {setting} cannot be used: {_path_reason(exc)}. Set {setting} "
            "to a folder Switchboard may write to."
        ) from exc


@contextmanager
def database_errors(url: str, setting: str = DATABASE_URL_SETTING) -> Iterator[None]:
    """Turn a failure to reach, open or write the database at `url` into a ConfigError.

    Anything else (a bug, a failing revision) passes through unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        problem = database_problem(exc, url, setting)
        if problem is None:
            raise
        raise problem from exc


def database_problem(exc: BaseException, url: str, setting: str) -> ConfigError | None:
    """The one line for a failure at connect or migrate time; None when it is not one."""
    parsed = make_url(url)
    path = sqlite_file(parsed)
    where = database_place(parsed, setting)
    subject = where[0].upper() + where[1:]
    for cause in _causes(exc):
        if isinstance(cause, sqlite3.DatabaseError):
            return _sqlite_problem(cause, path, setting)
        code = getattr(cause, "sqlstate", None)
        if code in _PG_LOGIN:
            return ConfigError(
                f"{subject} refused the login ({_reason(cause)}): "
                f"check the user name and password in {setting}."
            )
        if code == _PG_NO_DATABASE:
            return ConfigError(
                f"{subject} does not exist ({_reason(cause)}): create it "
                f"(createdb {parsed.database}) or fix the database name in {setting}."
            )
        if code == _PG_NO_PRIVILEGE:
            return ConfigError(
                f"The user in {setting} ({shown_url(parsed)}) may not change the schema "
                f"({_reason(cause)}): let it own the database, or use one that does."
            )
        if code in _PG_UNAVAILABLE:
            return ConfigError(
                f"{subject} does not take connections now ({_reason(cause)}): try again in a moment."
            )
        if isinstance(cause, socket.gaierror):
            return ConfigError(
                f"The host {parsed.host!r} of {where} cannot be found ({_os_reason(cause)}): "
                f"check the host name in {setting}."
            )
        if isinstance(cause, OSError) and cause.filename is not None:
            return ConfigError(
                f"{subject} cannot be made: {_path_reason(cause)}. Set {setting} to a place "
                "Switchboard may write to."
            )
        if _refused(cause):
            return ConfigError(
                f"Nothing is listening at {parsed.host or 'localhost'}:{parsed.port or 5432}, "
                f"{where}: start the database server, or set {setting} to one that is running."
            )
        if isinstance(cause, OSError | TimeoutError):
            return ConfigError(
                f"Cannot reach {where} ({_os_reason(cause)}): check that it is running and "
                f"reachable from here, or set {setting} to one that is."
            )
    return None


def _sqlite_problem(
    exc: sqlite3.DatabaseError, path: Path | None, setting: str
) -> ConfigError | None:
    """What a sqlite3 error at connect or migrate time means for the file at `path`."""
    name = str(path) if path is not None else "the SQLite database"
    reason = _reason(exc)
    if "locked" in reason or "busy" in reason:
        return ConfigError(
            f"{name} is locked by another process ({reason}; Switchboard waits up to "
            f"{SQLITE_BUSY_TIMEOUT_S:.0f} s): stop what holds it (another Switchboard, a "
            "database browser) and try again."
        )
    if "readonly" in reason or "read-only" in reason:
        return ConfigError(
            f"{name} cannot be written ({reason}): make it and its folder writable, or set "
            f"{setting} to another place."
        )
    if "unable to open" in reason:
        return ConfigError(
            f"{name} cannot be opened ({reason}): check that its folder exists and may be "
            f"written, or set {setting} to another place."
        )
    if "disk is full" in reason or "disk I/O" in reason:
        return ConfigError(
            f"{name} cannot be written ({reason}): free space on its disk, or set {setting} "
            "to another place."
        )
    if "not a database" in reason or "malformed" in reason or "encrypted" in reason:
        return ConfigError(
            f"{name} is not a usable SQLite database ({reason}); it was left untouched: move "
            f"it away (a new one is made on the next start) or set {setting} to another place."
        )
    return None  # a constraint, a missing table, a bug: not the file's fault


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it wraps: the driver's error (`.orig`), its causes and contexts."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (getattr(current, "orig", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                todo.append(inner)


def _refused(exc: BaseException) -> bool:
    """Whether `exc` says nothing listens at the address (asyncpg may join several)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    return isinstance(exc, OSError) and (
        exc.errno == errno.ECONNREFUSED or "Connect call failed" in str(exc)
    )


def _reason(exc: BaseException) -> str:
    """The first line of an error's own message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _path_reason(exc: OSError) -> str:
    """What went wrong with the path an OSError names, in words."""
    name = exc.filename if exc.filename is not None else "it"
    if isinstance(exc, FileExistsError) or (
        exc.filename is not None and Path(exc.filename).is_file()
    ):
        return f"{name} is a file, not a folder"
    if isinstance(exc, NotADirectoryError):
        return f"{name} is inside a file, not a folder"
    return f"{name}: {_os_reason(exc)}"


def _os_reason(exc: BaseException) -> str:
    """An OSError's reason without its errno number; anything else's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _reason(exc)


def backup_sqlite(path: Path, folder: Path, label: str) -> Path:
    """Copy the SQLite file at `path` into `folder`, consistently (WAL included); the copy's path.

    The copy is named after the file, `label` (e.g. its revision) and the time, in UTC.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    target = folder / f"{path.stem}-{label}-{stamp}{path.suffix}"
    counter = 1
    while target.exists():
        counter += 1
        target = folder / f"{path.stem}-{label}-{stamp}-{counter}{path.suffix}"
    # SQLite's backup API, not a file copy: the file alone lacks what is still in its WAL.
    source = sqlite3.connect(path)
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
    finally:
        source.close()
    return target
