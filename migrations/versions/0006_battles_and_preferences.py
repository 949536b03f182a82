"""Comparing models: blind battles and their votes, and side-by-side preferences.

- `battles`: a prompt answered anonymously by two models (A and B), the pool they were
  drawn from, the place, who asked, and why it is invalid if an answer gave its model away.
- `battle_votes`: one per person per battle: a, b, tie or bad, with an optional reason.
- `preferences`: in a side-by-side comparison, the answer one person found best.
- `channel_settings.arena_pool`: the models a place's battles draw from.

Downgrade drops the three tables and the column (the answers stay, as messages).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 22:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _message(column: str, table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], ["messages.id"], name=op.f(f"fk_{table}_{column}_messages"), ondelete="CASCADE"
    )


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("channel_settings") as batch_op:
        batch_op.add_column(sa.Column("arena_pool", sa.JSON(none_as_null=True), nullable=True))
    op.create_table(
        "battles",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("prompt_id", sa.String(length=32), nullable=False),
        sa.Column("answer_a", sa.String(length=32), nullable=False),
        sa.Column("answer_b", sa.String(length=32), nullable=False),
        sa.Column("model_a", sa.String(length=200), nullable=False),
        sa.Column("model_b", sa.String(length=200), nullable=False),
        sa.Column("pool", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=True),
        sa.Column("thread_id", sa.BigInteger(), nullable=True),
        sa.Column("asked_by", sa.BigInteger(), nullable=True),
        sa.Column("invalid", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _message("prompt_id", "battles"),
        _message("answer_a", "battles"),
        _message("answer_b", "battles"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_battles")),
    )
    op.create_index(op.f("ix_battles_prompt_id"), "battles", ["prompt_id"])
    op.create_index(op.f("ix_battles_guild_id"), "battles", ["guild_id"])
    op.create_index(op.f("ix_battles_asked_by"), "battles", ["asked_by"])
    op.create_index(op.f("ix_battles_created_at"), "battles", ["created_at"])
    op.create_table(
        "battle_votes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("battle_id", sa.String(length=32), nullable=False),
        sa.Column("voter_id", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('a', 'b', 'tie', 'bad')", name=op.f("ck_battle_votes_outcome")
        ),
        sa.ForeignKeyConstraint(
            ["battle_id"],
            ["battles.id"],
            name=op.f("fk_battle_votes_battle_id_battles"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_battle_votes")),
        sa.UniqueConstraint(
            "battle_id", "voter_id", name=op.f("uq_battle_votes_battle_id_voter_id")
        ),
    )
    op.create_index(op.f("ix_battle_votes_battle_id"), "battle_votes", ["battle_id"])
    op.create_index(op.f("ix_battle_votes_voter_id"), "battle_votes", ["voter_id"])
    op.create_index(op.f("ix_battle_votes_created_at"), "battle_votes", ["created_at"])
    op.create_table(
        "preferences",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("prompt_id", sa.String(length=32), nullable=False),
        sa.Column("chosen_id", sa.String(length=32), nullable=False),
        sa.Column("voter_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _message("prompt_id", "preferences"),
        _message("chosen_id", "preferences"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preferences")),
        sa.UniqueConstraint(
            "prompt_id", "voter_id", name=op.f("uq_preferences_prompt_id_voter_id")
        ),
    )
    op.create_index(op.f("ix_preferences_prompt_id"), "preferences", ["prompt_id"])
    op.create_index(op.f("ix_preferences_voter_id"), "preferences", ["voter_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("preferences")
    op.drop_table("battle_votes")
    op.drop_table("battles")
    with op.batch_alter_table("channel_settings") as batch_op:
        batch_op.drop_column("arena_pool")
