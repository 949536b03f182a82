"""Engine set-up: SQLite pragmas, folders, and URLs."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from core.errors import ConfigError
from store.db import (
    check_database_url,
    create_engine,
    database_errors,
    is_sqlite,
    shown_url,
    sqlite_file,
)
from tests.fixtures.store import sqlite_url


async def test_sqlite_engine_makes_its_folder_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "switchboard.db"
    engine = create_engine(sqlite_url(path))
    try:
        async with engine.connect() as connection:
            journal = await connection.scalar(text("PRAGMA journal_mode"))
            foreign_keys = await connection.scalar(text("PRAGMA foreign_keys"))
            busy_ms = await connection.scalar(text("PRAGMA busy_timeout"))
    finally:
        await engine.dispose()
    assert path.parent.is_dir()
    assert (journal, foreign_keys) == ("wal", 1)
    assert busy_ms >= 10_000


def test_url_helpers() -> None:
    assert sqlite_file("sqlite+aiosqlite:////data/x.db") == Path("/data/x.db")
    assert sqlite_file("sqlite+aiosqlite:///:memory:") is None
    assert sqlite_file("postgresql+asyncpg://u:p@h/db") is None
    assert is_sqlite("sqlite+aiosqlite:///x.db") and not is_sqlite("postgresql+asyncpg://h/db")


def test_only_failures_a_person_can_fix_become_one_line() -> None:
    url = "postgresql+asyncpg://me:s3cret@db.example:5433/switchboard"
    refused = ConnectionRefusedError(111, "Connect call failed ('10.0.0.1', 5433)")
    with pytest.raises(ConfigError) as caught, database_errors(url):
        raise refused
    assert caught.value.message.startswith("Nothing is listening at db.example:5433")
    assert "me:***@db.example" in caught.value.message and "s3cret" not in caught.value.message
    # A bug, or a constraint a revision breaks, is not the database's address or file.
    for bug in (KeyError("x"), sqlite3.IntegrityError("UNIQUE constraint failed: t.id")):
        with pytest.raises(type(bug)), database_errors(url):
            raise bug
    assert shown_url(url) == "postgresql+asyncpg://me:***@db.example:5433/switchboard"


def test_check_database_url_refuses_what_switchboard_cannot_use() -> None:
    check_database_url("sqlite+aiosqlite:///x.db")
    check_database_url("postgresql+asyncpg://u:p@h/db")
    for url, says in (
        ("mysql://u:pw@h/db", "names a 'mysql' database"),
        ("postgresql+psycopg2://u:pw@h/db", "asks for the 'postgresql+psycopg2' driver"),
        ("not a url", "is not a database URL"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)) as caught:
            check_database_url(url, "SWITCHBOARD_DATABASE_URL")
        assert "pw" not in caught.value.message
