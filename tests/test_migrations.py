"""The Alembic migrations: up, down, up again, and agreement with the models."""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import shutil
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Text,
    column,
    delete,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy import table as sql_table
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from migrations import (
    alembic_config,
    database_revision,
    downgrade_database,
    migrations_dir,
    plan_downgrade,
    upgrade_database,
)
from store.db import create_engine, create_session_factory
from store.models import Base, Message, MessageInput, UTCDateTime
from tests.fixtures.store import sqlite_url

REPO = Path(__file__).resolve().parent.parent
TABLES = {
    "channel_settings",
    "setting_changes",
    "conversations",
    "messages",
    "message_inputs",
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


# --- several processes migrating one new database at once -----------------------------


def _start_together(url: str, barrier: Any, results: Any) -> None:
    """One process of a start-up: migrate, then query as `open_app` does (in a child process)."""

    async def start() -> None:
        await upgrade_database(url)
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT count(*) FROM registered_models"))
        finally:
            await engine.dispose()

    barrier.wait(timeout=120)
    try:
        asyncio.run(start())
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def start_together(url: str, processes: int = 4) -> list[str]:
    """Start `processes` real processes on `url`, released at the same instant; their outcomes."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(processes), spawn.Queue()
    children = [
        spawn.Process(target=_start_together, args=(url, barrier, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
    return outcomes


async def version_rows(url: str) -> list[str]:
    """Every row of alembic_version."""
    return [row[0] for row in await fetch(url, text("SELECT version_num FROM alembic_version"))]


async def test_processes_starting_together_on_a_new_sqlite_file_take_turns(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path / "data" / "switchboard.db")
    assert await asyncio.to_thread(start_together, url) == ["ok"] * 4
    assert await version_rows(url) == [head_revision()]
    assert TABLES <= await table_names(url)


@pytest.mark.postgres
async def test_processes_starting_together_on_a_new_postgres_database_take_turns(
    postgres_url: str,
) -> None:
    assert await asyncio.to_thread(start_together, postgres_url) == ["ok"] * 4
    assert await version_rows(postgres_url) == [head_revision()]
    assert TABLES <= await table_names(postgres_url)


# --- 0002: message kinds, message_inputs, cascading parent links ------------------------

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
# 0001's messages table, written without the models (they describe head).
V1_MESSAGES = sql_table(
    "messages",
    column("id", String),
    column("conversation_id", String),
    column("parent_id", String),
    column("role", String),
    column("content", Text),
    column("author_id", BigInteger),
    column("created_at", UTCDateTime()),
    column("model_name", String),
    column("status", String),
    column("request_messages", JSON(none_as_null=True)),
)
V1_CONVERSATIONS = sql_table(
    "conversations",
    column("id", String),
    column("origin", String),
    column("created_at", UTCDateTime()),
)
V1_DISCORD = sql_table(
    "discord_messages",
    column("discord_message_id", BigInteger),
    column("message_id", String),
    column("conversation_id", String),
)
SYSTEM = {"role": "system", "content": "Be brief."}


def sent(*turns: str) -> list[dict[str, str]]:
    """request_messages as 0001 stored them: the system prompt, then the turns."""
    return [SYSTEM, *({"role": "user", "content": turn} for turn in turns)]


# (id, conversation, parent, role, content, request_messages); created_at in this order.
V1_ROWS: list[tuple[str, str, str | None, str, str, list[dict[str, str]] | None]] = [
    ("u1", "c1", None, "user", "What is 2+2?", None),
    ("a1x", "c1", "u1", "assistant", "", sent("What is 2+2?")),  # failed; a fallback followed
    ("a1", "c1", "u1", "assistant", "4", sent("What is 2+2?")),
    ("u2", "c1", "a1", "user", "Times 3?", None),
    ("a2", "c1", "u2", "assistant", "12", sent("What is 2+2?", "4", "Times 3?")),
    ("u3", "c1", "a2", "user", "And now?", None),
    ("a3", "c1", "u3", "assistant", "Still 12.", sent("And now?")),  # older turns trimmed
    # A thread started from a1 continues its line in another conversation.
    ("u4", "c2", "a1", "user", "In a thread", None),
    ("a4", "c2", "u4", "assistant", "Yes", None),  # nothing stored: the whole line
    # An answer that failed with no fallback (no text), which a person replied to.
    ("u5", "c3", None, "user", "Hello?", None),
    ("a5", "c3", "u5", "assistant", "", sent("Hello?")),
    ("u6", "c3", "a5", "user", "Anyone?", None),
    ("a6", "c3", "u6", "assistant", "Here.", sent("Hello?", "Anyone?")),
]
EXPECTED_KINDS = {
    "u1": "prompt", "a1x": "attempt", "a1": "answer", "u2": "prompt", "a2": "answer",
    "u3": "prompt", "a3": "answer", "u4": "prompt", "a4": "answer", "u5": "prompt",
    "a5": "answer", "u6": "prompt", "a6": "answer",
}  # fmt: skip
EXPECTED_INPUTS = {
    "a1x": ["u1"],
    "a1": ["u1"],
    "a2": ["u1", "a1", "u2"],
    "a3": ["u3"],
    "a4": ["u1", "a1", "u4"],
    "a5": ["u5"],
    "a6": ["u5", "u6"],  # a5 has no text, so it was not replayed
}


def mid(name: str) -> str:
    """A 32-character message id that reads as its short name."""
    return name.ljust(32, "_")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend: SQLite always, PostgreSQL when configured."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "switchboard.db")
    return request.getfixturevalue("postgres_url")


async def seed_v1(url: str) -> None:
    """Conversations as 0001 stored them, with fallbacks, a thread and a trimmed history."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                insert(V1_CONVERSATIONS),
                [{"id": mid(c), "origin": "discord", "created_at": T0} for c in ("c1", "c2", "c3")],
            )
            await connection.execute(
                insert(V1_MESSAGES),
                [
                    {"id": mid(name), "conversation_id": mid(conv),
                     "parent_id": mid(parent) if parent else None, "role": role,
                     "content": content, "author_id": 7 if role == "user" else None,
                     "created_at": T0 + timedelta(seconds=index),
                     "model_name": "m" if role == "assistant" else None,
                     "status": "ok" if content or role == "user" else "error",
                     "request_messages": request}
                    for index, (name, conv, parent, role, content, request) in enumerate(V1_ROWS)
                ],
            )  # fmt: skip
            await connection.execute(
                insert(V1_DISCORD),
                [
                    {
                        "discord_message_id": 900,
                        "message_id": mid("a1"),
                        "conversation_id": mid("c1"),
                    }
                ],
            )
    finally:
        await engine.dispose()


async def fetch(url: str, statement: Any) -> list[Any]:
    """The rows a query returns on the database at `url`."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return list((await connection.execute(statement)).all())
    finally:
        await engine.dispose()


async def v1_snapshot(url: str) -> list[Any]:
    """Every 0001 column of every message, in id order."""
    return await fetch(url, select(V1_MESSAGES).order_by(V1_MESSAGES.c.id))


async def kinds_and_inputs(url: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The kind of each message and the inputs of each answer, by short name."""
    kinds = await fetch(url, select(Message.id, Message.kind))
    links = await fetch(
        url,
        select(MessageInput.answer_id, MessageInput.input_id).order_by(
            MessageInput.answer_id, MessageInput.position
        ),
    )
    inputs: dict[str, list[str]] = {}
    for answer_id, input_id in links:
        inputs.setdefault(answer_id.rstrip("_"), []).append(input_id.rstrip("_"))
    return {id.rstrip("_"): kind for id, kind in kinds}, inputs


async def parent_ondelete(url: str) -> str | None:
    """The ON DELETE rule of messages.parent_id."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            keys = await connection.run_sync(
                lambda sync: inspect(sync).get_foreign_keys("messages")
            )
    finally:
        await engine.dispose()
    (parent,) = [key for key in keys if key["constrained_columns"] == ["parent_id"]]
    return (parent.get("options") or {}).get("ondelete")


async def test_0002_backfills_and_downgrades_keeping_the_data(empty_database_url: str) -> None:
    url = empty_database_url
    await upgrade_database(url, "0001")
    await seed_v1(url)
    before = await v1_snapshot(url)

    await upgrade_database(url, "0002")
    assert await kinds_and_inputs(url) == (EXPECTED_KINDS, EXPECTED_INPUTS)
    assert (await parent_ondelete(url) or "").upper() == "CASCADE"

    await downgrade_database(url, "0001")
    assert await v1_snapshot(url) == before
    assert "message_inputs" not in await table_names(url)
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda sync: inspect(sync).get_columns("messages"))
    finally:
        await engine.dispose()
    assert "kind" not in {c["name"] for c in columns}
    assert (await parent_ondelete(url) or "").upper() == "SET NULL"

    # Up again: the same kinds and links, rebuilt from the kept rows.
    await upgrade_database(url)
    assert await kinds_and_inputs(url) == (EXPECTED_KINDS, EXPECTED_INPUTS)
    assert await v1_snapshot(url) == before
    assert await differences(url, Base.metadata) == []


async def message_columns(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda sync: inspect(sync).get_columns("messages"))
    finally:
        await engine.dispose()
    return {c["name"] for c in columns}


async def test_0003_records_cleaned_text_and_downgrades_keeping_the_data(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await upgrade_database(url, "0001")
    await seed_v1(url)
    before = await v1_snapshot(url)
    await upgrade_database(url, "0003")
    assert "cleaned" in await message_columns(url)
    assert {row.cleaned for row in await fetch(url, select(Message.cleaned))} == {None}, (
        "not known for old rows"
    )
    await downgrade_database(url, "0002")
    assert "cleaned" not in await message_columns(url)
    assert await v1_snapshot(url) == before
    assert await kinds_and_inputs(url) == (EXPECTED_KINDS, EXPECTED_INPUTS)


async def test_0002_deleting_a_prompt_deletes_what_derives_from_it(empty_database_url: str) -> None:
    url = empty_database_url
    await upgrade_database(url, "0001")
    await seed_v1(url)
    await upgrade_database(url)

    # Plain SQL, so this is the database's own cascade (foreign keys on, as the app runs).
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(delete(Message).where(Message.id == mid("u1")))
    finally:
        await engine.dispose()

    kinds, inputs = await kinds_and_inputs(url)
    # u1's answers, the line built on them (u2..a3), and the thread continued from a1 (c2).
    assert set(kinds) == {"u5", "a5", "u6", "a6"}
    assert inputs == {"a5": ["u5"], "a6": ["u5", "u6"]}
    assert await fetch(url, select(V1_DISCORD)) == []
    # The conversations stay: deleting messages is not deleting a conversation.
    assert len(await fetch(url, select(V1_CONVERSATIONS))) == 3


async def test_0002_offline_sql_renders() -> None:
    """`alembic upgrade --sql` for PostgreSQL: the kinds backfill is SQL, the links are skipped.

    (SQLite's batch mode must read the table it recreates, so it has no offline mode.)
    """
    output = io.StringIO()
    config = alembic_config("postgresql+asyncpg://nobody@nowhere/switchboard")
    config.output_buffer = output
    await asyncio.to_thread(command.upgrade, config, "0001:0002", sql=True)
    script = output.getvalue()
    assert "message_inputs" in script and "'attempt'" in script


SETTINGS = sql_table(
    "channel_settings",
    column("id", String),
    column("scope", String),
    column("scope_id", BigInteger),
    column("guild_id", BigInteger),
    column("model", String),
    column("updated_at", UTCDateTime),
)


async def settings_rows(url: str) -> set[tuple[Any, ...]]:
    """(scope, scope_id, guild_id, model) of every settings row."""
    statement = select(SETTINGS.c.scope, SETTINGS.c.scope_id, SETTINGS.c.guild_id, SETTINGS.c.model)
    return {tuple(row) for row in await fetch(url, statement)}


async def insert_settings(url: str, *rows: dict[str, Any]) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(SETTINGS), list(rows))
    finally:
        await engine.dispose()


def setting(
    name: str, scope: str, scope_id: int, guild_id: int | None, at: int = 0
) -> dict[str, Any]:
    return {"id": mid(name), "scope": scope, "scope_id": scope_id, "guild_id": guild_id,
            "model": name, "updated_at": T0 + timedelta(seconds=at)}  # fmt: skip


async def test_0004_keys_settings_by_server_and_downgrades_keeping_the_newest(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await upgrade_database(url, "0003")
    before = [
        setting("g1", "guild", 1, 1),
        setting("c5", "channel", 5, 1),
        setting("dm9", "channel", 9, None),
    ]
    await insert_settings(url, *before)
    await upgrade_database(url, "0004")
    assert await settings_rows(url) == {
        ("guild", 1, 1, "g1"), ("channel", 5, 1, "c5"), ("channel", 9, None, "dm9"),
    }  # fmt: skip

    # Channel 5 of server 2 is another channel now; a DM channel still has one row.
    await insert_settings(url, setting("c5-two", "channel", 5, 2, at=10))
    with pytest.raises(IntegrityError):
        await insert_settings(url, setting("c5-again", "channel", 5, 1))
    with pytest.raises(IntegrityError):
        await insert_settings(url, setting("dm9-again", "channel", 9, None))

    await downgrade_database(url, "0003")
    # The old key holds one row per (scope, id): the most recently updated one stays.
    assert await settings_rows(url) == {
        ("guild", 1, 1, "g1"), ("channel", 5, 2, "c5-two"), ("channel", 9, None, "dm9"),
    }  # fmt: skip
    with pytest.raises(IntegrityError):
        await insert_settings(url, setting("c5-three", "channel", 5, 3))
    await upgrade_database(url)
    assert await database_revision(url) == head_revision()


async def test_0005_feedback_tables_and_corrections_down_and_up(empty_database_url: str) -> None:
    from store.models import Vote

    url = empty_database_url
    await upgrade_database(url, "0001")
    await seed_v1(url)
    before = await v1_snapshot(url)
    await upgrade_database(url, "0005")
    assert {"votes", "people", "anonymous_counts"} <= await table_names(url)
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                insert(Message.__table__),
                [
                    {"id": mid("fix"), "conversation_id": mid("c1"), "parent_id": mid("u1"),
                     "role": "assistant", "kind": "correction", "content": "better", "created_at": T0,
                     "alternative_to": mid("a1")},
                ],
            )  # fmt: skip
            await connection.execute(
                insert(Vote.__table__),
                [{"id": mid("v1"), "answer_id": mid("a1"), "voter_id": 7, "value": 1,
                  "source": "button", "created_at": T0, "updated_at": T0}],
            )  # fmt: skip
    finally:
        await engine.dispose()
    await downgrade_database(url, "0004")
    assert "votes" not in await table_names(url)
    assert "alternative_to" not in await message_columns(url)
    assert await v1_snapshot(url) == before, "every message but the correction stays"
    await upgrade_database(url)
    assert await differences(url, Base.metadata) == []


async def test_0006_battles_down_and_up(empty_database_url: str) -> None:
    url = empty_database_url
    await upgrade_database(url, "0005")
    await upgrade_database(url, "0006")
    assert {"battles", "battle_votes", "preferences"} <= await table_names(url)
    await downgrade_database(url, "0005")
    assert not {"battles", "battle_votes", "preferences"} & await table_names(url)
    await upgrade_database(url)
    assert await differences(url, Base.metadata) == []


async def test_0007_indexes_discord_message_ids_down_and_up(empty_database_url: str) -> None:
    url = empty_database_url
    await upgrade_database(url, "0001")
    await seed_v1(url)
    before = await v1_snapshot(url)
    await upgrade_database(url, "0007")
    plan = await plan_downgrade(url, "0006")
    assert plan.undone == ("0007",) and plan.dropped == ()  # an index holds no data
    await downgrade_database(url, "0006")
    assert await v1_snapshot(url) == before
    await upgrade_database(url)
    assert await differences(url, Base.metadata) == []
