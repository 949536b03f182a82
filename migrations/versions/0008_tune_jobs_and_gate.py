"""Fine-tuning jobs and the gate their models pass.

- `tune_jobs`: one per fine-tune: the server, the base model, the backend (local LoRA or
  a provider's job) and method, the frozen dataset snapshot (path, SHA-256, rows, the
  export's filters), the steps asked for, status and phase, progress and losses, who
  started it and when, the error, the model it registered. At most one queued or running
  job per server (a partial unique index on `guild_key`, which is 0 outside servers).
- `model_gate_events`: each step of a fine-tuned model's way to people (registered as a
  candidate, promoted, made a server's default, rolled back), with who did it.

Downgrade drops both tables (the registered models stay in `registered_models`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 00:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = "status IN ('queued', 'running')"


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "tune_jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("guild_key", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("snapshot_path", sa.Text(), nullable=False),
        sa.Column("snapshot_sha256", sa.String(length=64), nullable=False),
        sa.Column("snapshot_rows", sa.Integer(), nullable=False),
        sa.Column("filters", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("epochs", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=True),
        sa.Column("losses", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("eta_s", sa.Float(), nullable=True),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("started_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("model_name", sa.String(length=200), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_tune_jobs_status"),
        ),
        sa.CheckConstraint("method IN ('sft', 'dpo')", name=op.f("ck_tune_jobs_method")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tune_jobs")),
    )
    op.create_index(op.f("ix_tune_jobs_guild_id"), "tune_jobs", ["guild_id"])
    op.create_index(op.f("ix_tune_jobs_status"), "tune_jobs", ["status"])
    op.create_index(op.f("ix_tune_jobs_created_at"), "tune_jobs", ["created_at"])
    op.create_index(
        "uq_tune_jobs_active_guild",
        "tune_jobs",
        ["guild_key"],
        unique=True,
        sqlite_where=sa.text(_ACTIVE),
        postgresql_where=sa.text(_ACTIVE),
    )
    op.create_table(
        "model_gate_events",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("previous_default", sa.String(length=200), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "action IN ('candidate', 'promoted', 'rolled_back', 'default_set')",
            name=op.f("ck_model_gate_events_action"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["tune_jobs.id"],
            name=op.f("fk_model_gate_events_job_id_tune_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_gate_events")),
    )
    op.create_index(op.f("ix_model_gate_events_model_name"), "model_gate_events", ["model_name"])
    op.create_index(op.f("ix_model_gate_events_job_id"), "model_gate_events", ["job_id"])
    op.create_index(op.f("ix_model_gate_events_created_at"), "model_gate_events", ["created_at"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("model_gate_events")
    op.drop_table("tune_jobs")
