"""The database going away mid-session: replies go on, nothing is lost, people are told once.

Real SQLite files deleted and restored under a running service; a real PostgreSQL
database turned read-only; real shutdowns with writes still pending.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bot.app import App, open_app
from core.errors import StorageUnavailable
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from migrations import upgrade_database
from store.db import create_engine, create_session_factory, sqlite_file
from store.models import Battle, Message
from tests.fakes.openai_server import FakeOpenAI

PLACE = Place(10, 20)
ALICE, MOD = Author(1, "alice"), Author(3, "mod")


def ask(text_: str, discord_id: int) -> ChatRequest:
    return ChatRequest(PLACE, ALICE, text_, discord_message_id=discord_id)


def quick_retries(app: App) -> None:
    """Give up on a write after one quick try and retry kept writes before every later one."""
    app.writer.retries = 0
    app.writer.backoff = 0
    app.writer.retry_interval = 0


def backup(db: Path, to: Path) -> None:
    """A consistent copy of a SQLite file (its WAL included), as `sqlite3 .backup` makes."""
    source, target = sqlite3.connect(db), sqlite3.connect(to)
    with target:
        source.backup(target)
    source.close()
    target.close()


def delete(db: Path) -> None:
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)


async def count_messages(url: str) -> int:
    engine = create_engine(url)
    try:
        async with create_session_factory(engine)() as session:
            return int(await session.scalar(select(func.count()).select_from(Message)) or 0)
    finally:
        await engine.dispose()


async def test_a_deleted_sqlite_file_delays_the_log_and_says_so_until_it_is_back(
    service_settings: Settings, tmp_path: Path
) -> None:
    db = sqlite_file(service_settings.sqlalchemy_url)
    assert db is not None
    async with open_app(service_settings, knowledge=False) as app:
        quick_retries(app)
        first = await app.service.answer(ask("before", 1))
        await app.writer.drain()
        assert first.log_problem is None and app.service.log_problem is None
        backup(db, tmp_path / "backup.db")
        told: list[str | None] = []
        app.service.watch_log(told.append)

        delete(db)
        second = await app.service.answer(ask("during", 2))
        assert second.error is None and second.reply == "Echo: during", "replies go on"
        await app.writer.drain()
        assert told and told[-1] is not None and "Not saved yet" in told[-1]
        third = await app.service.answer(ask("still during", 3))
        assert (
            third.error is None
            and third.log_problem
            and "database cannot be written" in third.log_problem
        )
        assert not db.exists(), "no new empty database appears in its place"
        # A settings command says so in one line and changes nothing.
        with pytest.raises(StorageUnavailable, match="could not be saved"):
            await app.service.set_model(PLACE, "channel", "solo", MOD)

        shutil.copy(tmp_path / "backup.db", db)  # the operator restores it
        fourth = await app.service.answer(ask("after", 4))
        await app.writer.drain()
        assert app.service.log_problem is None and told[-1] is None, "told once when it is back too"
        assert len(told) == 2
        assert fourth.error is None
    # Nothing was lost: two messages of each of the four exchanges.
    assert await count_messages(service_settings.sqlalchemy_url) == 8


async def test_what_is_still_unwritten_at_shutdown_is_kept_and_written_at_the_next_start(
    service_settings: Settings, tmp_path: Path
) -> None:
    db = sqlite_file(service_settings.sqlalchemy_url)
    assert db is not None
    async with open_app(service_settings, knowledge=False) as app:
        quick_retries(app)
        first = await app.service.answer(ask("before", 1))
        await app.service.link_discord_messages(first.message_id, first.conversation_id, [9001])
        await app.writer.drain()
        backup(db, tmp_path / "backup.db")
        delete(db)
        second = await app.service.answer(ask("reply to the first", 2))
        await app.service.link_discord_messages(second.message_id, second.conversation_id, [9002])
        await app.writer.drain()
    spilled = list((service_settings.data_dir / "unwritten").glob("unwritten-*.jsonl"))
    assert len(spilled) == 1 and "reply to the first" in spilled[0].read_text()

    shutil.copy(tmp_path / "backup.db", db)
    async with open_app(service_settings, knowledge=False) as app:
        await app.writer.drain()
        assert not list((service_settings.data_dir / "unwritten").glob("*.jsonl"))
        assert await app.service.is_conversation_message(9002)
    assert await count_messages(service_settings.sqlalchemy_url) == 4


async def test_a_battle_during_an_outage_is_kept_over_a_shutdown_and_votable_after(
    service_settings: Settings, tmp_path: Path
) -> None:
    db = sqlite_file(service_settings.sqlalchemy_url)
    assert db is not None
    async with open_app(service_settings, knowledge=False) as app:
        quick_retries(app)
        # Her choice is read before the outage: someone never read is taken as opted out
        # while the database is away (privacy fails closed), and nothing of theirs is kept.
        assert not await app.service.privacy.opted_out(ALICE.id)
        backup(db, tmp_path / "backup.db")
        delete(db)
        battle = await app.service.battle(PLACE, ALICE, "during the outage")
        await app.writer.drain()
        later = await app.service.compare(PLACE, ALICE, "still away", ["main", "solo"])
        assert later.log_problem and "database cannot be written" in later.log_problem
    spilled = list((service_settings.data_dir / "unwritten").glob("unwritten-*.jsonl"))
    records = [line for path in spilled for line in path.read_text().splitlines()]
    assert [json.loads(line)["kind"] for line in records] == ["exchange", "battle", "exchange"], (
        "the battle after its exchange"
    )

    shutil.copy(tmp_path / "backup.db", db)
    async with open_app(service_settings, knowledge=False) as app:
        verdict = await app.service.battle_vote(battle.id, MOD, "a")
        async with app.sessions() as session:
            row = await session.get(Battle, battle.id)
        assert row is not None and (verdict.model_a, verdict.model_b) == (row.model_a, row.model_b)
        assert (row.answer_a, row.answer_b) == (battle.a.answer_id, battle.b.answer_id)


@pytest.mark.postgres
async def test_a_postgres_database_turned_read_only_mid_session(
    migrated_postgres_url: str, postgres_server_url: str, service_settings: Settings
) -> None:
    settings = service_settings.model_copy(update={"database_url": migrated_postgres_url})
    database = migrated_postgres_url.rsplit("/", 1)[1]
    # From the server's own database: a session in the read-only one could not undo it.
    admin = create_async_engine(
        postgres_server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
    )

    async def read_only(on: bool) -> None:
        async with admin.connect() as connection:
            await connection.execute(
                text(
                    f'ALTER DATABASE "{database}" SET default_transaction_read_only = {"on" if on else "off"}'
                )
            )
            # Sessions already open keep their setting: end them, as a restart would.
            await connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            )

    try:
        async with open_app(settings, knowledge=False) as app:
            quick_retries(app)
            await app.service.answer(ask("before", 1))
            await app.writer.drain()
            await read_only(True)
            during = await app.service.answer(ask("during", 2))
            await app.writer.drain()
            assert during.error is None and during.reply == "Echo: during"
            later = await app.service.answer(ask("later", 3))
            assert later.log_problem and "read-only" in later.log_problem
            with pytest.raises(StorageUnavailable):
                await app.service.set_system_prompt(PLACE, "channel", "Be brief.", MOD)
            await read_only(False)
            await app.service.answer(ask("after", 4))
            await app.writer.drain()
            assert app.service.log_problem is None
        assert await count_messages(migrated_postgres_url) == 8
    finally:
        await admin.dispose()


async def test_the_migrated_fixture_is_untouched_by_these_tests(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    # A sanity check of the helpers above on a fresh file: backup and delete really do that.
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    await upgrade_database(url)
    db = tmp_path / "x.db"
    backup(db, tmp_path / "y.db")
    delete(db)
    assert not db.exists() and (tmp_path / "y.db").stat().st_size > 0
