"""Fine-tuning jobs and the gate records of the models they make: all their SQL.

`TuneJobRepository` adds, finds, updates and lists `tune_jobs`; a second queued or
running job in one server fails on the partial unique index (`ActiveJobExists`).
`GateRepository` records each step of a model's way from candidate to promoted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from store.models import TUNE_ACTIVE, ModelGateEvent, TuneJob, utcnow

# A job id may be given by its first characters, as git abbreviates commits.
MIN_ID_PREFIX = 6


class ActiveJobExists(Exception):
    """A server already has a queued or running job."""


def guild_key(guild_id: int | None) -> int:
    """The server a job counts against for "one at a time" (0: outside any server)."""
    return guild_id or 0


class TuneJobRepository:
    """Rows of `tune_jobs`."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, job: TuneJob) -> TuneJob:
        """Insert a job; ActiveJobExists when its server already has an active one."""
        job.guild_key = guild_key(job.guild_id)
        try:
            async with self.session.begin_nested():
                self.session.add(job)
                await self.session.flush()
        except IntegrityError as exc:
            raise ActiveJobExists(str(exc.orig)) from None
        return job

    async def get(self, job_id: str) -> TuneJob | None:
        """A job by its id."""
        return await self.session.get(TuneJob, job_id)

    async def find(self, ref: str) -> list[TuneJob]:
        """Jobs whose id starts with `ref` (at least MIN_ID_PREFIX characters), or named `ref`."""
        ref = ref.strip().lower()
        clauses = [TuneJob.name == ref]
        if len(ref) >= MIN_ID_PREFIX:
            clauses.append(TuneJob.id.startswith(ref, autoescape=True))
        rows = await self.session.scalars(
            select(TuneJob).where(or_(*clauses)).order_by(TuneJob.created_at.desc())
        )
        return list(rows.all())

    async def active(self, guild_id: int | None) -> TuneJob | None:
        """The server's queued or running job, if any."""
        return await self.session.scalar(
            select(TuneJob).where(
                TuneJob.guild_key == guild_key(guild_id), TuneJob.status.in_(TUNE_ACTIVE)
            )
        )

    async def running(self, backend: str | None = None) -> list[TuneJob]:
        """Every queued or running job (of one backend)."""
        query = select(TuneJob).where(TuneJob.status.in_(TUNE_ACTIVE))
        if backend is not None:
            query = query.where(TuneJob.backend == backend)
        return list((await self.session.scalars(query.order_by(TuneJob.created_at))).all())

    async def recent(self, guild_id: int | None = None, limit: int = 50) -> list[TuneJob]:
        """The latest jobs, newest first (of one server, when given)."""
        query = select(TuneJob).order_by(TuneJob.created_at.desc()).limit(limit)
        if guild_id is not None:
            query = query.where(TuneJob.guild_id == guild_id)
        return list((await self.session.scalars(query)).all())

    async def name_used(self, name: str) -> TuneJob | None:
        """An active job that will register `name`."""
        return await self.session.scalar(
            select(TuneJob).where(TuneJob.name == name, TuneJob.status.in_(TUNE_ACTIVE))
        )

    async def set(self, job_id: str, **fields: Any) -> None:
        """Change some of a job's columns."""
        await self.session.execute(update(TuneJob).where(TuneJob.id == job_id).values(**fields))

    async def resnapshot(self, job_id: str, sha256: str, rows: int) -> bool:
        """A queued job's snapshot after lines were taken out of it (it has not trained
        yet, so it will train on what is left); whether the job was still queued. A job
        that started keeps what it recorded: that is what it was trained on."""
        result = await self.session.execute(
            update(TuneJob)
            .where(TuneJob.id == job_id, TuneJob.status == "queued")
            .values(snapshot_sha256=sha256, snapshot_rows=rows)
        )
        return bool(getattr(result, "rowcount", 0))

    async def fail_if_queued(self, job_id: str, error: str) -> bool:
        """Fail a job that has not started (its snapshot is gone); whether it was queued."""
        result = await self.session.execute(
            update(TuneJob)
            .where(TuneJob.id == job_id, TuneJob.status == "queued")
            .values(status="failed", phase="failed", error=error, finished_at=utcnow())
        )
        return bool(getattr(result, "rowcount", 0))

    async def finish_if_active(self, job_id: str, **fields: Any) -> bool:
        """Finish a job unless something else finished it first; whether this did."""
        result = await self.session.execute(
            update(TuneJob)
            .where(TuneJob.id == job_id, TuneJob.status.in_(TUNE_ACTIVE))
            .values(finished_at=utcnow(), **fields)
        )
        return bool(getattr(result, "rowcount", 0))

    async def stale(self, backend: str, seen_before: datetime) -> list[TuneJob]:
        """Active jobs of `backend` whose runner has not been heard from since `seen_before`."""
        last_seen = func.coalesce(TuneJob.heartbeat_at, TuneJob.created_at)
        rows = await self.session.scalars(
            select(TuneJob).where(
                TuneJob.backend == backend,
                TuneJob.status.in_(TUNE_ACTIVE),
                last_seen < seen_before,
            )
        )
        return list(rows.all())

    async def by_model(self, names: Sequence[str]) -> dict[str, TuneJob]:
        """The job that made each of these models (the latest, when several tried)."""
        if not names:
            return {}
        rows = await self.session.scalars(
            select(TuneJob).where(TuneJob.model_name.in_(list(names))).order_by(TuneJob.created_at)
        )
        return {job.model_name: job for job in rows.all() if job.model_name}


class GateRepository:
    """Rows of `model_gate_events`."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def record(
        self,
        model_name: str,
        action: str,
        actor: str,
        *,
        job_id: str | None = None,
        guild_id: int | None = None,
        previous_default: str | None = None,
    ) -> ModelGateEvent:
        """Record one step."""
        event = ModelGateEvent(
            model_name=model_name,
            action=action,
            actor=actor,
            job_id=job_id,
            guild_id=guild_id,
            previous_default=previous_default,
            created_at=utcnow(),
        )
        self.session.add(event)
        await self.session.flush()
        return event

    async def history(self, model_name: str) -> list[ModelGateEvent]:
        """A model's steps, oldest first."""
        rows = await self.session.scalars(
            select(ModelGateEvent)
            .where(ModelGateEvent.model_name == model_name)
            .order_by(ModelGateEvent.created_at, ModelGateEvent.id)
        )
        return list(rows.all())
