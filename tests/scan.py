"""Search every text column of every table for a piece of text: what "forgotten" is checked by.

The columns are read from the database's own catalogue (SQLAlchemy's inspector), not from
our models, so a table or column added later is searched too without changing this: the
arena's `battles` (model names, pool, why invalid), `battle_votes` (reasons) and
`preferences` are, as `tests/test_store_privacy.py` checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import JSON, String, Text, Unicode, UnicodeText, inspect, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.sqltypes import TypeEngine

TEXT_TYPES: tuple[type[TypeEngine[object]], ...] = (String, Text, Unicode, UnicodeText, JSON)


@dataclass(frozen=True)
class Found:
    """A row whose column holds the text."""

    table: str
    column: str
    value: str


def _is_text(column_type: TypeEngine[object]) -> bool:
    # Reflected PostgreSQL types are VARCHAR/TEXT/JSON subclasses; SQLite's are too.
    return isinstance(column_type, TEXT_TYPES)


async def text_columns(sessions: async_sessionmaker[AsyncSession]) -> dict[str, list[str]]:
    """Every table's text and JSON columns, as the database itself describes them."""
    async with sessions() as session:
        connection = await session.connection()

        def read(sync_connection: object) -> dict[str, list[str]]:
            inspector = inspect(sync_connection)
            found: dict[str, list[str]] = {}
            for table in inspector.get_table_names():
                columns = [c["name"] for c in inspector.get_columns(table) if _is_text(c["type"])]
                if columns:
                    found[table] = columns
            return found

        return await connection.run_sync(read)


async def find_text(sessions: async_sessionmaker[AsyncSession], needle: str) -> list[Found]:
    """Every (table, column) whose value contains `needle` (JSON searched as its text, with
    the text also as JSON escapes it)."""
    forms = {needle, json.dumps(needle)[1:-1]}
    found: list[Found] = []
    columns = await text_columns(sessions)
    assert "messages" in columns and "content" in columns["messages"], columns
    async with sessions() as session:
        dialect = session.get_bind().dialect.name
        for table, names in columns.items():
            for name in names:
                value = f'CAST("{name}" AS TEXT)' if dialect == "postgresql" else f'"{name}"'
                for form in forms:
                    rows = await session.execute(
                        text(f'SELECT {value} AS value FROM "{table}" WHERE {value} LIKE :needle'),
                        {"needle": f"%{form}%"},
                    )
                    found.extend(Found(table, name, str(row.value)) for row in rows)
    return found
