"""What each person spent on priced models, per server and day: the budgets' totals.

- `spending`: one row per day (UTC), server (0 for DMs) and person (0 for the forgotten),
  with the dollars their answers cost there that day. The daily budgets
  (`SWITCHBOARD_PERSON_DAILY_BUDGET_USD`, `SWITCHBOARD_SERVER_DAILY_BUDGET_USD`) are
  checked against it before each call to a priced model.

Downgrade drops the table: the budgets start again from nothing when it comes back.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 11:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "spending",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=False),
        sa.Column("person_id", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spending")),
        sa.UniqueConstraint(
            "day", "guild_id", "person_id", name=op.f("uq_spending_day_guild_id_person_id")
        ),
    )
    op.create_index(op.f("ix_spending_person_id"), "spending", ["person_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_spending_person_id"), table_name="spending")
    op.drop_table("spending")
