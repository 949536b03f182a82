"""Key channel and thread settings by their server as well as their id.

Discord's ids are unique everywhere, but the terminal chat's are made up: with the key
(scope, scope_id), `switchboard chat --guild 1 --channel 5` and `--guild 2 --channel 5`
shared one row, so turning the knowledge base on in one turned it on in the other.

- `channel_settings`: the unique key (scope, scope_id) becomes (scope, guild_id,
  scope_id). A DM channel has no server (guild_id NULL), and NULLs never collide in a
  unique constraint, so a unique index on (scope, scope_id) WHERE guild_id IS NULL keeps
  one row per DM channel. Existing rows already satisfy both.

Downgrade restores the old key. Rows that only the new key tells apart (the same scope
and id in two servers) cannot all stay: the most recently updated one is kept.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = "uq_channel_settings_scope_scope_id"
NEW_KEY = "uq_channel_settings_scope_guild_id_scope_id"
NO_GUILD_KEY = "uq_channel_settings_scope_scope_id_no_guild"


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("channel_settings") as batch_op:
        batch_op.drop_constraint(OLD_KEY, type_="unique")
        batch_op.create_unique_constraint(NEW_KEY, ["scope", "guild_id", "scope_id"])
    op.create_index(
        NO_GUILD_KEY,
        "channel_settings",
        ["scope", "scope_id"],
        unique=True,
        sqlite_where=sa.text("guild_id IS NULL"),
        postgresql_where=sa.text("guild_id IS NULL"),
    )


def downgrade() -> None:
    """Downgrade schema."""
    # Keep one row per (scope, scope_id): the newest (then the greatest id, to break ties).
    op.execute(
        "DELETE FROM channel_settings WHERE id IN ("
        " SELECT older.id FROM channel_settings AS older"
        " JOIN channel_settings AS newer"
        " ON older.scope = newer.scope AND older.scope_id = newer.scope_id"
        " AND (older.updated_at < newer.updated_at"
        " OR (older.updated_at = newer.updated_at AND older.id < newer.id)))"
    )
    op.drop_index(NO_GUILD_KEY, table_name="channel_settings")
    with op.batch_alter_table("channel_settings") as batch_op:
        batch_op.drop_constraint(NEW_KEY, type_="unique")
        batch_op.create_unique_constraint(OLD_KEY, ["scope", "scope_id"])
