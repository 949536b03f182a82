"""Alembic environment and revisions: the only way the schema changes.

`from migrations import upgrade_database` runs them from code; the package sits above
`store` (its revisions import `store.models`), and `store` never imports it.
"""

from migrations.runner import (
    DowngradePlan,
    Dropped,
    alembic_config,
    database_revision,
    downgrade_database,
    known_revisions,
    migrations_dir,
    plan_downgrade,
    upgrade_database,
)

__all__ = [
    "DowngradePlan",
    "Dropped",
    "alembic_config",
    "database_revision",
    "downgrade_database",
    "known_revisions",
    "migrations_dir",
    "plan_downgrade",
    "upgrade_database",
]
