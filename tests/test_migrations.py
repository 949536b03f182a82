"""The Alembic migrations: up, down, up again, and agreement with the models."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from migrations import (
    alembic_config,
    database_revision,
    downgrade_database,
    migrations_dir,
    upgrade_database,
)
from store.db import create_engine, create_session_factory
from store.models import Base, Message
from tests.fixtures.store import sqlite_url

REPO = Path(__file__).resolve().parent.parent
TABLES = {
    "channel_settings",
    "setting_changes",
    "conversations",
    "messages",
    "discord_messages",
    "registered_models",
}


def head_revision() -> str:
    """The newest revision among the migration scripts."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


async def table_names(url: str) -> set[str]:
    """The tables that exist in the database at `url`."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def differences(url: str, metadata: MetaData) -> list[Any]:
    """What autogenerate would change to make the database at `url` match `metadata`."""

    def compare(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "target_metadata": metadata}
        )
        return list(compare_metadata(context, metadata))

    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def up_down_up(url: str) -> None:
    """Upgrade to head, downgrade to base, upgrade again, checking the tables each time."""
    assert await database_revision(url) is None
    await upgrade_database(url)
    assert TABLES <= await table_names(url)
    assert await database_revision(url) == head_revision()

    await downgrade_database(url, "base")
    assert await table_names(url) <= {"alembic_version"}
    assert await database_revision(url) is None

    await upgrade_database(url)
    assert TABLES <= await table_names(url)
    assert await database_revision(url) == head_revision()


async def test_sqlite_upgrade_downgrade_upgrade(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "new" / "folder" / "switchboard.db")
    await up_down_up(url)
    assert (tmp_path / "new" / "folder" / "switchboard.db").is_file()


@pytest.mark.postgres
async def test_postgres_upgrade_downgrade_upgrade(postgres_url: str) -> None:
    await up_down_up(postgres_url)


async def test_sqlite_models_and_migrations_agree(database_url: str) -> None:
    assert await differences(database_url, Base.metadata) == []


@pytest.mark.postgres
async def test_postgres_models_and_migrations_agree(migrated_postgres_url: str) -> None:
    assert await differences(migrated_postgres_url, Base.metadata) == []


async def test_the_comparison_sees_a_model_change(database_url: str) -> None:
    """Guards the agreement tests: a column only the models have must show up."""
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["messages"].append_column(Column("rating", Integer, nullable=True))

    found = await differences(database_url, changed)

    assert [(diff[0], diff[3].name) for diff in found] == [("add_column", "rating")]


async def test_upgrade_is_idempotent(database_url: str) -> None:
    await upgrade_database(database_url)
    assert await database_revision(database_url) == head_revision()


async def test_alembic_cli_config_reads_the_url_from_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `alembic upgrade head` at the repo root does: the URL comes from the environment."""
    url = sqlite_url(tmp_path / "cli.db")
    monkeypatch.setenv("SWITCHBOARD_DATABASE_URL", url)
    config = Config(str(REPO / "alembic.ini"))

    await asyncio.to_thread(command.upgrade, config, "head")

    assert TABLES <= await table_names(url)


async def test_migrated_sqlite_enforces_foreign_keys(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            session.add(Message(conversation_id="0" * 32, role="user", content="orphan"))
            with pytest.raises(IntegrityError):
                await session.commit()
    finally:
        await engine.dispose()


async def test_a_failing_revision_leaves_sqlite_as_it_was(tmp_path: Path) -> None:
    """SQLite DDL runs inside the migration's transaction, so a half-done revision rolls back."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_broken.py").write_text(
        textwrap.dedent(
            f'''
            import sqlalchemy as sa
            from alembic import op

            revision = "9999"
            down_revision = "{head_revision()}"
            branch_labels = None
            depends_on = None


            def upgrade() -> None:
                op.create_table("half_done", sa.Column("id", sa.Integer, primary_key=True))
                raise RuntimeError("this revision breaks half way")


            def downgrade() -> None:
                pass
            '''
        )
    )
    url = sqlite_url(tmp_path / "switchboard.db")
    await upgrade_database(url)
    config = alembic_config(url)
    config.set_main_option("script_location", str(scripts))

    with pytest.raises(RuntimeError, match="half way"):
        await asyncio.to_thread(command.upgrade, config, "head")

    assert "half_done" not in await table_names(url)
    assert await database_revision(url) == head_revision()
