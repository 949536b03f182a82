"""Running the Alembic migrations from code (the bot on start-up, `switchboard db`, tests).

This lives with the revisions, not in `store`: the migrations import `store.models`, so
the store must not import the migrations back. Failures a person can fix (the database
cannot be reached or opened, it is at a revision these scripts do not know, a target
revision that does not exist) come out as one `ConfigError` line naming the setting.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RangeNotAncestorError, ResolutionError, RevisionError
from alembic.util import CommandError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from core.errors import ConfigError
from store.db import (
    DATABASE_URL_SETTING,
    SQLITE_BUSY_TIMEOUT_S,
    check_database_url,
    database_errors,
    database_place,
    sqlite_file,
)

# "-1", "-2": steps back from the database's revision (as Alembic reads them).
_STEPS_BACK = re.compile(r"^-(\d+)$")


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


def scripts() -> ScriptDirectory:
    """The revision scripts."""
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def known_revisions() -> str:
    """The revisions a person may name, oldest first, for messages."""
    script = scripts()
    ids = [rev.revision for rev in reversed(list(script.walk_revisions()))]
    head = script.get_current_head()
    return ", ".join(f"{rev} (head)" if rev == head else rev for rev in ids)


async def upgrade_database(
    url: str, revision: str = "head", *, setting: str = DATABASE_URL_SETTING
) -> None:
    """Migrate the database at `url` up to `revision`, creating a SQLite file if needed.

    Processes migrating one database at once take turns (`migrations.lock`).
    """
    check_database_url(url, setting)
    with database_errors(url, setting):
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        await _known_revision(url, setting)
        try:
            # env.py runs its own event loop, so it cannot share the caller's: use a thread.
            await asyncio.to_thread(command.upgrade, alembic_config(url), revision)
        except (CommandError, RevisionError) as exc:
            raise _bad_target("upgrade", revision, exc) from exc


async def downgrade_database(
    url: str, revision: str, *, setting: str = DATABASE_URL_SETTING
) -> None:
    """Migrate the database at `url` down to `revision` ("base" removes everything).

    This drops what the undone revisions made, data included: `plan_downgrade` says what.
    """
    check_database_url(url, setting)
    with database_errors(url, setting):
        await _known_revision(url, setting)
        try:
            await asyncio.to_thread(command.downgrade, alembic_config(url), revision)
        except (CommandError, RevisionError) as exc:
            raise _bad_target("downgrade", revision, exc) from exc


async def database_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None when it has never been migrated."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return None
    engine = _reader(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def _reader(url: str) -> AsyncEngine:
    """An engine for a few reads; on SQLite it waits out a migration's write lock."""
    if sqlite_file(url) is not None:
        return create_async_engine(
            url, poolclass=NullPool, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}
        )
    return create_async_engine(url, poolclass=NullPool)


@dataclass(frozen=True)
class Dropped:
    """A table or column a downgrade drops, and how many rows hold data in it."""

    table: str
    column: str | None
    rows: int

    def __str__(self) -> str:
        name = self.table if self.column is None else f"{self.table}.{self.column}"
        return f"{name} ({self.rows:,} row{'' if self.rows == 1 else 's'})"


@dataclass(frozen=True)
class DowngradePlan:
    """What `db downgrade` to a revision would do to the database as it is now."""

    current: str | None
    target: str | None  # None: base, no tables
    undone: tuple[str, ...]  # the revisions undone, newest first
    dropped: tuple[Dropped, ...]  # every table and column dropped

    @property
    def losing(self) -> tuple[Dropped, ...]:
        """The dropped tables and columns that hold data."""
        return tuple(drop for drop in self.dropped if drop.rows > 0)


async def plan_downgrade(
    url: str, revision: str, *, setting: str = DATABASE_URL_SETTING
) -> DowngradePlan:
    """Which revisions a downgrade of `url` to `revision` undoes and what data it drops.

    Reads the database, changes nothing. The schemas at the two revisions come from
    running the scripts on a scratch in-memory SQLite database, so the tables and columns
    compared are exactly those the revisions make, on either backend.
    """
    check_database_url(url, setting)
    with database_errors(url, setting):
        current = await _known_revision(url, setting)
        undone = _revisions_undone(current, revision)
        if current is None or not undone:
            return DowngradePlan(current, current, (), ())
        target = undone[-1].down_revision
        if not (target is None or isinstance(target, str)):
            raise ConfigError(f"Downgrading to {revision} would cross a merge of revisions.")
        before, after = await asyncio.to_thread(_schemas, current, target)
        drops: list[tuple[str, str | None]] = [
            (table, None) for table in sorted(before.keys() - after.keys())
        ]
        drops += [
            (table, column)
            for table in sorted(before.keys() & after.keys())
            for column in sorted(before[table] - after[table])
        ]
        counts = await _count(url, drops)
        return DowngradePlan(
            current,
            target,
            tuple(rev.revision for rev in undone),
            tuple(
                Dropped(table, column, rows)
                for (table, column), rows in zip(drops, counts, strict=True)
            ),
        )


async def _known_revision(url: str, setting: str) -> str | None:
    """The database's revision; a ConfigError when these scripts do not know it."""
    current = await database_revision(url)
    if current is not None:
        try:
            scripts().get_revision(current)
        except (CommandError, RevisionError):
            place = database_place(url, setting)
            raise ConfigError(
                f"{place[0].upper()}{place[1:]} is at revision {current!r}, which this version "
                f"of Switchboard does not know (it knows {known_revisions()}); it was "
                f"probably migrated by a newer Switchboard: run that version, or set "
                f"{setting} to another database. Nothing was changed."
            ) from None
    return current


def _revisions_undone(current: str | None, revision: str) -> list[Script]:
    """The revisions a downgrade from `current` to `revision` undoes, newest first."""
    script = scripts()
    steps = _STEPS_BACK.match(revision)
    try:
        if current is None:
            # Nothing to undo; still refuse a target that does not exist.
            if revision != "base" and steps is None:
                script.get_revisions(revision)
            return []
        return list(script.iterate_revisions(current, revision, select_for_downgrade=True))
    except RangeNotAncestorError as exc:
        raise ConfigError(
            f"{revision} is not below the database's revision {current}: db downgrade only "
            f"goes down (db upgrade {revision} goes up)."
        ) from exc
    except (CommandError, ResolutionError) as exc:
        raise _bad_target("downgrade", revision, exc) from exc
    except RevisionError as exc:
        if steps is not None:
            depth = len(list(script.iterate_revisions(current, "base")))
            raise ConfigError(
                f"{revision} goes below base: the database is at {current}, {depth} "
                f"revision{'' if depth == 1 else 's'} above base (db downgrade base undoes "
                "them all)."
            ) from exc
        raise _bad_target("downgrade", revision, exc) from exc


def _bad_target(verb: str, revision: str, exc: BaseException) -> ConfigError:
    """One line for a target revision Alembic cannot use."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"Cannot {verb} to {revision!r} ({reason}): name one of {known_revisions()} or base "
        "(no tables), or a step such as -1 (downgrade) or +1 (upgrade)."
    )


def _schemas(current: str, target: str | None) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The tables and their columns at `current` and at `target` (None: base)."""
    return _schema_at(current), _schema_at(target)


def _schema_at(revision: str | None) -> dict[str, set[str]]:
    """The tables (and their columns) that the scripts make up to `revision`."""
    engine = sa.create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            if revision is not None:
                config = alembic_config("sqlite://")
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
            inspector = sa.inspect(connection)
            return {
                table: {column["name"] for column in inspector.get_columns(table)}
                for table in inspector.get_table_names()
                if table != "alembic_version"
            }
    finally:
        engine.dispose()


async def _count(url: str, drops: list[tuple[str, str | None]]) -> list[int]:
    """Rows in each table, or rows with a value in each column, of the database at `url`."""
    if not drops:
        return []
    engine = _reader(url)
    try:
        async with engine.connect() as connection:
            counts = []
            for name, column in drops:
                table = sa.table(name, *([sa.column(column)] if column else []))
                query = sa.select(sa.func.count()).select_from(table)
                if column is not None:
                    query = query.where(table.c[column].is_not(None))
                counts.append(int(await connection.scalar(query) or 0))
            return counts
    finally:
        await engine.dispose()
