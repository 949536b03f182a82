"""Index messages by the Discord message they came from.

A Discord message deleted anywhere the bot can see is looked up by its id (a person's
deleted message deletes its prompt and what derives from it), and the bot hears of every
deletion in every channel; without an index each one would read the whole table.
Downgrade drops the index; no data is lost either way.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index(op.f("ix_messages_discord_message_id"), "messages", ["discord_message_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_messages_discord_message_id"), table_name="messages")
