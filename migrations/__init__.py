"""Alembic environment and revisions: the only way the schema changes.

`from migrations import upgrade_database` runs them from code; the package sits above
`store` (its revisions import `store.models`), and `store` never imports it.
"""

from migrations.runner import (
    alembic_config,
    database_revision,
    downgrade_database,
    migrations_dir,
    upgrade_database,
)

__all__ = [
    "alembic_config",
    "database_revision",
    "downgrade_database",
    "migrations_dir",
    "upgrade_database",
]
