"""Message kinds, the stored messages each answer was built from, cascading parent links,
and indexes for the export filters.

- `messages.kind` (NOT NULL, CHECK ck_messages_kind): backfilled from what 0001 stored:
  a user row is a "prompt"; an assistant row with a later assistant sibling (same
  parent, later created_at) is a failed fallback "attempt"; any other assistant row
  is the "answer".
- `message_inputs` (answer_id, position, input_id): backfilled best-effort, since 0001
  did not record which stored messages went into an answer. For each assistant row: its
  line of ancestors (parent links, oldest first) that have text, as the bot replayed
  them; when its `request_messages` are stored, only the newest as many as the
  non-system messages it was sent (the bot dropped the oldest turns to fit the model).
  `--sql` (offline, PostgreSQL only: SQLite's batch mode reads the table it recreates)
  cannot read the rows, so it leaves existing answers unlinked.
- `messages.parent_id` ON DELETE CASCADE (was SET NULL): deleting a message deletes what
  derives from it. SQLite recreates the table (batch mode; env.py turns foreign keys off).
- Indexes on messages.created_at, guild_id, channel_id and model_name.

Downgrade keeps every message (their kinds are dropped) and drops `message_inputs`,
which 0001 has no place for; upgrading again rebuilds the best-effort links.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported: a revision must not change when the code does.
KINDS = ("prompt", "answer", "attempt", "alternative", "comparison", "battle")
KIND_CHECK = "kind IN (" + ", ".join(f"'{kind}'" for kind in KINDS) + ")"
EXPORT_INDEXES = ("created_at", "guild_id", "channel_id", "model_name")
# How many assistant rows the message_inputs backfill reads at a time.
PAGE = 1000

messages = sa.table(
    "messages",
    sa.column("id", sa.String),
    sa.column("parent_id", sa.String),
    sa.column("role", sa.String),
    sa.column("kind", sa.String),
    sa.column("content", sa.Text),
    sa.column("created_at", sa.DateTime),
    sa.column("request_messages", sa.JSON),
)
message_inputs = sa.table(
    "message_inputs",
    sa.column("answer_id", sa.String),
    sa.column("position", sa.Integer),
    sa.column("input_id", sa.String),
)


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("messages") as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=True))
    _backfill_kinds()
    with op.batch_alter_table("messages") as batch_op:
        batch_op.alter_column("kind", existing_type=sa.String(length=16), nullable=False)
        batch_op.create_check_constraint(op.f("ck_messages_kind"), KIND_CHECK)
        batch_op.drop_constraint("fk_messages_parent_id_messages", type_="foreignkey")
        batch_op.create_foreign_key(
            op.f("fk_messages_parent_id_messages"),
            "messages",
            ["parent_id"],
            ["id"],
            ondelete="CASCADE",
        )
        for column in EXPORT_INDEXES:
            batch_op.create_index(op.f(f"ix_messages_{column}"), [column], unique=False)

    op.create_table(
        "message_inputs",
        sa.Column("answer_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("input_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["answer_id"],
            ["messages.id"],
            name=op.f("fk_message_inputs_answer_id_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["input_id"],
            ["messages.id"],
            name=op.f("fk_message_inputs_input_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("answer_id", "position", name=op.f("pk_message_inputs")),
    )
    op.create_index(
        op.f("ix_message_inputs_input_id"), "message_inputs", ["input_id"], unique=False
    )
    if not context.is_offline_mode():
        _backfill_inputs(op.get_bind())


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_message_inputs_input_id"), table_name="message_inputs")
    op.drop_table("message_inputs")
    with op.batch_alter_table("messages") as batch_op:
        for column in reversed(EXPORT_INDEXES):
            batch_op.drop_index(op.f(f"ix_messages_{column}"))
        batch_op.drop_constraint("fk_messages_parent_id_messages", type_="foreignkey")
        batch_op.create_foreign_key(
            op.f("fk_messages_parent_id_messages"),
            "messages",
            ["parent_id"],
            ["id"],
            ondelete="SET NULL",
        )
        # A named CHECK is carried over by batch mode, so it must go before its column.
        batch_op.drop_constraint(op.f("ck_messages_kind"), type_="check")
        batch_op.drop_column("kind")


def _backfill_kinds() -> None:
    """Prompts, answers, and the failed attempts that an answer's fallback followed."""
    op.execute(sa.update(messages).where(messages.c.role == "user").values(kind="prompt"))
    later = messages.alias("later")
    # 0001 logged an exchange's failed attempts before its final answer, all with the
    # prompt as parent: a sibling written later means this one was not the answer.
    followed = (
        sa.exists()
        .where(
            later.c.parent_id == messages.c.parent_id,
            later.c.role == "assistant",
            later.c.created_at > messages.c.created_at,
        )
        .correlate(messages)
    )
    op.execute(
        sa.update(messages)
        .where(messages.c.role != "user")
        .values(kind=sa.case((followed, "attempt"), else_="answer"))
    )


def _sent_turns(request_messages: Any) -> int | None:
    """How many non-system messages an answer was sent; None when that was not stored."""
    if not isinstance(request_messages, list):
        return None
    return sum(
        1 for m in request_messages if not (isinstance(m, dict) and m.get("role") == "system")
    )


def _backfill_inputs(connection: sa.Connection) -> None:
    """Link each stored answer to the stored messages it was most likely built from."""
    # id -> (parent id, has text), for every message: a line may cross conversations
    # (a thread started from an answer continues that answer's line).
    line: dict[str, tuple[str | None, bool]] = {
        row.id: (row.parent_id, bool(row.has_text))
        for row in connection.execute(
            sa.select(
                messages.c.id,
                messages.c.parent_id,
                (sa.func.length(messages.c.content) > 0).label("has_text"),
            )
        )
    }
    last = ""
    while True:
        page = connection.execute(
            sa.select(messages.c.id, messages.c.parent_id, messages.c.request_messages)
            .where(messages.c.role != "user", messages.c.id > last)
            .order_by(messages.c.id)
            .limit(PAGE)
        ).all()
        if not page:
            return
        last = page[-1].id
        rows: list[dict[str, Any]] = []
        for answer in page:
            wanted = _sent_turns(answer.request_messages)
            inputs: list[str] = []
            cursor = answer.parent_id
            seen: set[str] = set()
            # `seen` stops a (corrupt) cycle; `wanted` stops at what was sent.
            while cursor is not None and cursor in line and cursor not in seen:
                if wanted is not None and len(inputs) >= wanted:
                    break
                seen.add(cursor)
                parent, has_text = line[cursor]
                if has_text:
                    inputs.append(cursor)
                cursor = parent
            inputs.reverse()
            rows.extend(
                {"answer_id": answer.id, "position": position, "input_id": input_id}
                for position, input_id in enumerate(inputs)
            )
        if rows:
            connection.execute(sa.insert(message_inputs), rows)
