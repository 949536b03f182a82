"""Engines, sessions, and running the Alembic migrations from code."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
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
    """An async engine; on SQLite with foreign keys on, WAL, and a generous busy timeout."""
    if not is_sqlite(url):
        return _create_async_engine(url, echo=echo, pool_pre_ping=True)
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = _create_async_engine(url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


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


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """The installed `migrations` package folder (Alembic's script location)."""
    import migrations

    # __path__, not __file__: an editable install may present it as a namespace package.
    for entry in migrations.__path__:
        if (Path(entry) / "env.py").is_file():
            return Path(entry).resolve()
    raise RuntimeError(f"migrations/env.py not found in {list(migrations.__path__)}")


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that finds the scripts wherever the package is installed."""
    config = Config()
    # ConfigParser interpolates '%', so a path containing one must be escaped.
    config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    # Passed as an attribute, not an option, so a password with '%' survives.
    config.attributes["url"] = url
    return config


async def upgrade_database(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`, creating a SQLite file if needed."""
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # env.py runs its own event loop, so it cannot share the caller's: use a thread.
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def downgrade_database(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" removes everything)."""
    await asyncio.to_thread(command.downgrade, alembic_config(url), revision)


async def database_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None when it has never been migrated."""
    from alembic.runtime.migration import MigrationContext

    path = sqlite_file(url)
    if path is not None and not path.exists():
        return None
    engine = _create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()
