"""Running the Alembic migrations from code (the bot on start-up, `switchboard db`, tests).

This lives with the revisions, not in `store`: the migrations import `store.models`, so
the store must not import the migrations back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from store.db import sqlite_file


def migrations_dir() -> Path:
    """The folder of the installed `migrations` package (Alembic's script location)."""
    # __file__ of this module, not the package's __path__: the file is always a real one,
    # while an editable install may present the package as a namespace package.
    folder = Path(__file__).resolve().parent
    if not (folder / "env.py").is_file():
        raise RuntimeError(f"migrations/env.py not found in {folder}")
    return folder


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
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return None
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()
