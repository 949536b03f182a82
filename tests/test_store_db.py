"""Engine set-up: SQLite pragmas, folders, and URLs."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from store.db import create_engine, is_sqlite, sqlite_file
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
