"""Alembic environment (async template): runs the revisions against one database.

The URL comes from the caller (`migrations.upgrade_database` passes it as the config
attribute "url"), else from `sqlalchemy.url` in the ini file, else from the
environment through `core.settings.Settings` (the alembic CLI case).

Every migration run here holds the database's migration lock (`migrations.lock`), so
processes starting together on a new database take turns instead of failing.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import event, pool
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from migrations.lock import lock_postgres, sqlite_migration_lock
from store.db import SQLITE_BUSY_TIMEOUT_S
from store.models import Base, UTCDateTime

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    """The URL to migrate: the caller's, the ini file's, or the settings' default."""
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return str(url)
    from core.settings import Settings

    return Settings().sqlalchemy_url


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Write our UTC timestamp type as the plain column type it stores as."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(**kwargs: Any) -> None:
    """Configure the context the same way online and offline."""
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        render_as_batch=True,
        render_item=render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (`alembic upgrade head --sql`)."""
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the revisions on a sync connection (inside `run_sync`)."""
    if connection.dialect.name == "sqlite":
        # SQLite's DDL is transactional once we emit BEGIN ourselves (see below),
        # so a failed revision leaves the file as it was.
        configure(connection=connection, transactional_ddl=True)
    else:
        configure(connection=connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Before Alembic reads the version table; released when this transaction ends.
            lock_postgres(connection)
        context.run_migrations()


def _sqlite_for_migrations(engine_sync: Any) -> None:
    """Make SQLite migrations atomic, and keep batch mode's table copies from cascading."""

    @event.listens_for(engine_sync, "connect")
    def _connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Dropping a table with foreign keys on runs its ON DELETE CASCADEs; batch
        # mode drops and recreates tables, so turn them off (only possible outside BEGIN).
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=OFF")
        cursor.close()
        # Take over BEGIN from the driver, which would leave DDL outside the transaction.
        dbapi_connection.isolation_level = None

    @event.listens_for(engine_sync, "begin")
    def _begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock now, waiting out other writers (the busy timeout),
        # rather than failing "database is locked" at the first DDL of a read transaction.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


async def run_async_migrations() -> None:
    """Open an async connection and run the revisions through it."""
    url = database_url()
    sqlite = make_url(url).get_backend_name() == "sqlite"
    # The busy timeout: how long to wait for the write lock that BEGIN IMMEDIATE takes.
    connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S} if sqlite else {}
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    if sqlite:
        _sqlite_for_migrations(engine.sync_engine)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run the revisions: on a connection the caller lent us, or on a new engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        # No SQLite file lock here: the lender opened its connection without one.
        do_run_migrations(connection)
    else:
        with sqlite_migration_lock(database_url()):
            asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
