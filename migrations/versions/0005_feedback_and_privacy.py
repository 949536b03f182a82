"""Feedback and privacy: votes, corrections, alternatives, opted-out people, anonymous
counts, and the places that log nothing or keep exchanges for a while.

- `votes` (one per person per answer; +1 or -1, an optional reason and comment).
- `messages.kind` may be "correction" (a person's better answer to a prompt), and
  `messages.alternative_to` names the answer a retry or a correction is another try at
  (SET NULL when that answer is deleted: the alternative derives from the prompt).
- `people` (opted out or not) and `anonymous_counts` (what was answered but not stored).
- `channel_settings.log_enabled` and `channel_settings.retention_days`.

Downgrade drops the new tables and columns. Corrections have no place in 0004 (its kinds
do not allow them), so they are deleted with their input links; every other message stays.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 22:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a revision must not change when the code does.
OLD_KINDS = ("prompt", "answer", "attempt", "alternative", "comparison", "battle")
NEW_KINDS = (*OLD_KINDS, "correction")
REASONS = ("wrong", "unhelpful", "unsafe", "off_topic", "too_long", "refused", "other")


def _kinds(kinds: Sequence[str]) -> str:
    return "kind IN (" + ", ".join(f"'{kind}'" for kind in kinds) + ")"


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_constraint(op.f("ck_messages_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_messages_kind"), _kinds(NEW_KINDS))
        batch_op.add_column(sa.Column("alternative_to", sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_messages_alternative_to_messages"),
            "messages",
            ["alternative_to"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index(op.f("ix_messages_alternative_to"), ["alternative_to"])
    with op.batch_alter_table("channel_settings") as batch_op:
        batch_op.add_column(sa.Column("log_enabled", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("retention_days", sa.Integer(), nullable=True))
    op.create_table(
        "votes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("answer_id", sa.String(length=32), nullable=False),
        sa.Column("voter_id", sa.BigInteger(), nullable=False),
        sa.Column("voter_name", sa.String(length=200), nullable=True),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("value IN (-1, 1)", name=op.f("ck_votes_value")),
        sa.CheckConstraint(
            "reason IS NULL OR reason IN (" + ", ".join(f"'{r}'" for r in REASONS) + ")",
            name=op.f("ck_votes_reason"),
        ),
        sa.ForeignKeyConstraint(
            ["answer_id"],
            ["messages.id"],
            name=op.f("fk_votes_answer_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
        sa.UniqueConstraint("answer_id", "voter_id", name=op.f("uq_votes_answer_id_voter_id")),
    )
    op.create_index(op.f("ix_votes_answer_id"), "votes", ["answer_id"])
    op.create_index(op.f("ix_votes_voter_id"), "votes", ["voter_id"])
    op.create_index(op.f("ix_votes_guild_id"), "votes", ["guild_id"])
    op.create_index(op.f("ix_votes_created_at"), "votes", ["created_at"])
    op.create_table(
        "people",
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("opted_out", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_people")),
    )
    op.create_table(
        "anonymous_counts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("exchanges", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_anonymous_counts")),
        sa.UniqueConstraint(
            "day",
            "guild_id",
            "model_name",
            name=op.f("uq_anonymous_counts_day_guild_id_model_name"),
        ),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("anonymous_counts")
    op.drop_table("people")
    op.drop_index(op.f("ix_votes_created_at"), table_name="votes")
    op.drop_index(op.f("ix_votes_guild_id"), table_name="votes")
    op.drop_index(op.f("ix_votes_voter_id"), table_name="votes")
    op.drop_index(op.f("ix_votes_answer_id"), table_name="votes")
    op.drop_table("votes")
    with op.batch_alter_table("channel_settings") as batch_op:
        batch_op.drop_column("retention_days")
        batch_op.drop_column("log_enabled")
    # 0004 has no kind for a correction: they go (their input links cascade with them).
    op.execute(
        sa.text(
            "DELETE FROM message_inputs WHERE answer_id IN (SELECT id FROM messages WHERE kind = 'correction')"
        )
    )
    op.execute(sa.text("DELETE FROM messages WHERE kind = 'correction'"))
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_index(op.f("ix_messages_alternative_to"))
        batch_op.drop_constraint(op.f("fk_messages_alternative_to_messages"), type_="foreignkey")
        batch_op.drop_column("alternative_to")
        batch_op.drop_constraint(op.f("ck_messages_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_messages_kind"), _kinds(OLD_KINDS))
