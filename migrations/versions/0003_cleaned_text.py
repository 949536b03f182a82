"""Record on each message whether its text had to be cleaned before it could be stored.

`messages.cleaned` (nullable boolean): true when a NUL byte or a lone surrogate was
replaced (see `core.text.clean`), so that `content` is exactly what the model was sent.
Existing rows are left NULL (not known). Downgrade drops the column.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("messages") as batch_op:
        batch_op.add_column(sa.Column("cleaned", sa.Boolean(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_column("cleaned")
