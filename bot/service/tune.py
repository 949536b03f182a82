"""Fine-tuning jobs: a snapshot of the log, a backend that trains, a candidate model, the gate.

    job, summary = await tunes.start(TuneRequest(base="smol", steps=30), actor)
    job = await tunes.run(job.id, on_update=show)      # blocks until it ends
    await tunes.promote(job.model_name, actor, default_guild=GUILD)

`start` freezes the dataset through the export (`store.export.Exporter`: redacted,
consented rows only, with its manifest and hash) into the job's folder, refuses with
the counts when too few examples qualify, and records a queued job (one per server at a
time, kept by a unique index). `run` hands it to the backend for its base (a
`TuneBackend`: the local LoRA one is `bot.service.tune_local`), polls it, writes its
progress and a heartbeat, honours a cancel asked for from any process, and on success
registers the model as a *candidate* (`ModelSpec.candidate`): admins may choose it and
it takes part in comparisons and battles, members may not pick it until `promote`.
`rollback` makes it a candidate again and gives back the server defaults its promotion
set. Every step of the gate is a `model_gate_events` row naming who did it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.service.evaluate import EvalExample
from bot.service.models import ModelCatalog
from bot.service.place_settings import PlaceSettings
from bot.service.tune_snapshots import TuneSnapshots
from chains.registry import Lineage, ModelSpec
from core.errors import NotFound, UserError
from core.messages import Author, Place
from store.export import Exporter, ExportOptions, ExportSummary, removed_text, sources_path
from store.models import TuneJob, new_id, utcnow
from store.repositories import SettingsRepository
from store.tune_jobs import ActiveJobExists, GateRepository, TuneJobRepository
from tune.dataset import Method

log = logging.getLogger(__name__)

# The phases in which a backend's loss is a training loss worth keeping.
TRAINING_PHASES = frozenset({"training", "preference training"})
MIN_EXAMPLES = 10  # tune.dataset.MIN_ROWS: fewer teach a model nothing reliable
# With at least this many examples, a tenth of the conversations is held out of training
# (the export's split: no example in both) for `tune eval`; below it, every one is trained on.
HOLD_OUT_FROM = 2 * MIN_EXAMPLES
HOLD_OUT_SPLIT = 0.9
HELD_OUT_FILE = "snapshot.validation.jsonl"
# A local job's runner writes a heartbeat this often; one silent for STALE_S has died.
HEARTBEAT_S = 5.0
STALE_S = 60.0
# Progress is written at most this often (the last step always is).
PROGRESS_WRITE_S = 2.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63}$")


# ------------------------------------------------------------------ the backend seam


@dataclass(frozen=True, slots=True)
class JobTicket:
    """What a backend is given to train: the snapshot, the budget, the name to register."""

    job_id: str
    name: str
    method: Method
    dataset: Path  # the snapshot's data file (TRL conversational JSONL for sft)
    dataset_sha256: str
    rows: int
    folder: Path  # the job's own folder, for what the backend writes
    steps: int | None
    epochs: float | None
    started_by: str
    guild_id: int | None


@dataclass(frozen=True, slots=True)
class BackendPoll:
    """How far a backend's job is. Once `done`: `spec` on success, else `error` or `cancelled`."""

    phase: str  # "preparing", "training", "exporting"; a provider's own status words
    step: int = 0
    total: int | None = None
    loss: float | None = None
    eta_s: float | None = None
    done: bool = False
    spec: ModelSpec | None = None  # the model to register (the service marks it a candidate)
    error: str | None = None
    cancelled: bool = False


class TuneBackend(Protocol):
    """One way to fine-tune: the service calls start, then poll until done, or cancel.

    `kind` names it in job records ("local", "openai"); `resumable` says whether `poll`
    works from a process other than the one that started the job (a provider's job id
    does; a local training run dies with its process). An OpenAI backend uploads the
    snapshot and creates the job in `start` (returning the provider's job id), reads the
    job and its events in `poll` (every `poll_interval_s`), and cancels it in `cancel`.
    """

    kind: str
    resumable: bool
    poll_interval_s: float
    export_formats: dict[str, str]  # method -> the export format its snapshot is written in

    def check(self, base: ModelSpec, method: str) -> None:
        """Raise a one-line UserError if it cannot fine-tune `base` with `method`."""
        ...

    async def start(self, ticket: JobTicket, base: ModelSpec) -> str:
        """Begin the job; its id with this backend (kept as `external_id`)."""
        ...

    async def poll(self, external_id: str) -> BackendPoll:
        """Where the job is now (never blocks for long)."""
        ...

    async def cancel(self, external_id: str) -> None:
        """Stop the job; return once it has stopped."""
        ...

    def resume(self, ticket: JobTicket, base: ModelSpec, external_id: str) -> None:
        """Follow a job another process started (only where `resumable`)."""
        ...


# ------------------------------------------------------------------ requests and views


@dataclass(frozen=True, slots=True)
class TuneRequest:
    """A fine-tune to start: its base, method, budget, name, and the export's filters."""

    base: str
    method: Method = "sft"
    name: str | None = None
    steps: int | None = None
    epochs: float | None = None
    min_rating: int = 1
    model: str | None = None  # only answers by this model
    guild_id: int | None = None
    channel_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_unrated: bool = False


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as the adapters show it."""

    id: str
    name: str
    base_model: str
    backend: str
    method: str
    status: str
    phase: str
    step: int
    total_steps: int | None
    losses: tuple[float, ...]
    eta_s: float | None
    snapshot_path: str
    snapshot_sha256: str
    snapshot_rows: int
    steps: int | None
    epochs: float | None
    started_by: str
    guild_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    model_name: str | None
    gate: str | None  # the model's state: "candidate", "promoted", "removed"; None before
    filters_channel: int | None = None  # the export's --channel, when one was given

    @property
    def loss(self) -> float | None:
        """The last loss reported."""
        return self.losses[-1] if self.losses else None

    @property
    def elapsed_s(self) -> float | None:
        """Seconds since it started (until it finished)."""
        if self.started_at is None:
            return None
        return ((self.finished_at or utcnow()) - self.started_at).total_seconds()

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


@dataclass(frozen=True, slots=True)
class GateChange:
    """What promote or rollback did."""

    model: str
    action: str  # "promoted", "rolled_back"
    default_guild: int | None = None  # the server whose default it became (promote --default)
    restored: tuple[tuple[int, str | None], ...] = ()  # rollback: (server, default given back)


def _view(job: TuneJob, gate: str | None) -> JobView:
    return JobView(
        id=job.id,
        name=job.name,
        base_model=job.base_model,
        backend=job.backend,
        method=job.method,
        status=job.status,
        phase=job.phase,
        step=job.step,
        total_steps=job.total_steps,
        losses=tuple(job.losses or ()),
        eta_s=job.eta_s,
        snapshot_path=job.snapshot_path,
        snapshot_sha256=job.snapshot_sha256,
        snapshot_rows=job.snapshot_rows,
        steps=job.steps,
        epochs=job.epochs,
        started_by=job.started_by,
        guild_id=job.guild_id,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        model_name=job.model_name,
        gate=gate,
        filters_channel=(job.filters or {}).get("channel_id"),
    )


def actor_text(actor: Author) -> str:
    """Who did it, as job and gate records keep it."""
    return actor.name if actor.id == 0 else f"{actor.name} ({actor.id})"


# ------------------------------------------------------------------ the service


class TuneService:
    """Starts, runs, lists and cancels fine-tunes, and moves their models through the gate."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        catalog: ModelCatalog,
        place_settings: PlaceSettings,
        exporter: Exporter,
        backends: dict[str, TuneBackend],
        jobs_dir: Path,
        snapshots: TuneSnapshots | None = None,
    ) -> None:
        self.sessions = sessions
        self.catalog = catalog
        self.place_settings = place_settings
        self.exporter = exporter
        self.backends = backends
        self.jobs_dir = Path(jobs_dir)
        # What forgetting and retention take out of the snapshots (the same one `Privacy` has).
        self.snapshots = snapshots or TuneSnapshots(sessions, self.jobs_dir)
        self._tasks: dict[str, asyncio.Task[JobView]] = {}

    def backend_for(self, base: ModelSpec) -> TuneBackend:
        """The backend that fine-tunes `base`, or a one-line refusal."""
        kind = (
            "local"
            if base.is_local
            else "openai"
            if base.provider in ("openai", "azure-openai")
            else None
        )
        backend = self.backends.get(kind) if kind else None
        if backend is None:
            raise UserError(
                f"`{base.name}` ({base.provider}) cannot be fine-tuned: choose a local llama.cpp "
                "model, or an OpenAI or Azure OpenAI one with a training_price."
            )
        return backend

    # -------------------------------------------------------------- start

    async def start(self, request: TuneRequest, actor: Author) -> tuple[JobView, ExportSummary]:
        """Freeze the snapshot and record a queued job; the export's summary with it.

        Refuses (one line each): a base no backend trains, a name in use, a server that
        already has a job, too few examples (with what each filter removed).
        """
        if request.steps is not None and request.epochs is not None:
            raise UserError("Give --steps or --epochs, not both.")
        if (request.steps is not None and request.steps < 1) or (
            request.epochs is not None and request.epochs <= 0
        ):
            raise UserError("--steps and --epochs must be positive.")
        base = await self.catalog.get(request.base)
        backend = self.backend_for(base)
        backend.check(base, request.method)
        job_id = new_id()
        name = request.name or f"{base.name}-tune-{job_id[:6]}"
        if not _NAME.match(name):
            raise UserError(
                f"`{name}` cannot be a model name: use 1-64 letters, digits and . _ : / @ + - "
                "(no spaces), starting with a letter or digit."
            )
        await self.catalog.refresh()
        self.catalog.ensure_name_free(name)
        async with self.sessions() as session:
            repo = TuneJobRepository(session)
            busy = await repo.active(request.guild_id)
            if busy is not None:
                raise UserError(_busy(busy))
            if await repo.name_used(name) is not None:
                raise UserError(
                    f"A running job will register `{name}` already; choose another --name."
                )

        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True)
        try:
            # Messages deleted while the snapshot is made are taken out of it at the end.
            async with self.snapshots.making(folder):
                summary = await self._record(job_id, name, base, backend, request, actor, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return await self.job(job_id), summary

    async def _record(
        self,
        job_id: str,
        name: str,
        base: ModelSpec,
        backend: TuneBackend,
        request: TuneRequest,
        actor: Author,
        folder: Path,
    ) -> ExportSummary:
        """Make the snapshot in `folder` and record the queued job."""
        summary, data = await self._snapshot(request, backend, folder)
        job = TuneJob(
            id=job_id,
            guild_id=request.guild_id,
            name=name,
            base_model=base.name,
            backend=backend.kind,
            method=request.method,
            snapshot_path=str(data.path),
            snapshot_sha256=data.sha256,
            snapshot_rows=data.examples,
            filters=_filters(request),
            steps=request.steps,
            epochs=request.epochs,
            status="queued",
            phase="queued",
            step=0,
            losses=[],
            cancel_requested=False,
            started_by=actor_text(actor),
            created_at=utcnow(),
        )
        async with self.sessions() as session, session.begin():
            try:
                await TuneJobRepository(session).add(job)
            except ActiveJobExists:
                busy = await TuneJobRepository(session).active(request.guild_id)
                raise UserError(_busy(busy) if busy else "Another job just started here.") from None
        return summary

    async def _snapshot(
        self, request: TuneRequest, backend: TuneBackend, folder: Path
    ) -> tuple[ExportSummary, Any]:
        options = ExportOptions(
            format=backend.export_formats[request.method],  # type: ignore[arg-type]
            min_rating=request.min_rating,
            model=request.model,
            guild_id=request.guild_id,
            channel_id=request.channel_id,
            since=request.since,
            until=request.until,
            include_unrated=request.include_unrated,
        )
        # With sources: which logged messages each line was built from, so that forgetting
        # a person or retention can take those lines out later (`tune_snapshots`).
        out = folder / "snapshot.jsonl"
        try:
            summary = await self.exporter.run(options, out, sources=True)
            if summary.examples >= HOLD_OUT_FROM:
                held = await self.exporter.run(
                    replace(options, split=HOLD_OUT_SPLIT), out, sources=True
                )
                train, validation = held.files
                if train.examples >= MIN_EXAMPLES and validation.examples:
                    _remove_data(out)
                    return held, train
                for file in held.files:  # an unlucky split: train on everything
                    _remove_data(file.path)
                summary = await self.exporter.run(options, out, sources=True)
        except UserError as exc:  # "Nothing to export: of 40 answers, 30 unrated, ..."
            raise UserError(f"Cannot fine-tune: {str(exc)[0].lower()}{str(exc)[1:]}") from None
        if summary.examples < MIN_EXAMPLES:
            left_out = removed_text(summary.removed, options)
            raise UserError(
                f"Too few examples to fine-tune: {summary.examples} of {summary.candidates} "
                f"logged answers qualified, and at least {MIN_EXAMPLES} are needed"
                + (f" (left out: {left_out})." if left_out else ".")
                + " Collect more 👍 on good answers, or widen the filters (--min-rating, "
                "--include-unrated, --since)."
            )
        return summary, summary.files[0]

    # -------------------------------------------------------------- run

    def launch(
        self, job_id: str, on_update: Callable[[JobView], None] | None = None
    ) -> asyncio.Task[JobView]:
        """Run a queued job in the background of this process (the bot's way)."""
        task = asyncio.create_task(self.run(job_id, on_update), name=f"tune-job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))
        return task

    async def run(self, job_id: str, on_update: Callable[[JobView], None] | None = None) -> JobView:
        """Run a queued job to its end here; `on_update` sees each change. The final view."""
        async with self.sessions() as session, session.begin():
            repo = TuneJobRepository(session)
            job = await repo.get(job_id)
            if job is None:
                raise NotFound(f"No fine-tuning job {job_id}.")
            if job.status != "queued":
                raise UserError(f"Job {job_id[:8]} is {job.status}; only a queued job can run.")
            now = utcnow()
            await repo.set(
                job_id, status="running", phase="starting", started_at=now, heartbeat_at=now
            )
        base = await self.catalog.get(job.base_model)
        backend = self.backend_for(base)
        ticket = self._ticket(job)

        async def begin() -> str:
            return await backend.start(ticket, base)

        return await self._carry(job, backend, begin, on_update, record=True)

    def _ticket(self, job: TuneJob) -> JobTicket:
        return JobTicket(
            job_id=job.id,
            name=job.name,
            method=job.method,  # type: ignore[arg-type]
            dataset=Path(job.snapshot_path),
            dataset_sha256=job.snapshot_sha256,
            rows=job.snapshot_rows,
            folder=self.jobs_dir / job.id,
            steps=job.steps,
            epochs=job.epochs,
            started_by=job.started_by,
            guild_id=job.guild_id,
        )

    async def _carry(
        self,
        job: TuneJob,
        backend: TuneBackend,
        begin: Callable[[], Awaitable[str]],
        on_update: Callable[[JobView], None] | None,
        *,
        record: bool = False,
    ) -> JobView:
        """Start (or pick up) the backend's job, follow it to its end, and record how it ended."""
        job_id = job.id
        external: str | None = None
        try:
            external = await begin()
            if record:
                # Shielded: a stop right now must still leave the id a later process resumes by.
                await asyncio.shield(self._write(job_id, external_id=external))
            poll = await self._follow(job_id, backend, external, on_update)
            if poll.cancelled:
                await self._finish(job_id, status="cancelled", phase="cancelled")
            elif poll.spec is None:
                await self._finish(
                    job_id, status="failed", phase="failed", error=poll.error or "failed"
                )
            else:
                await self._register(job, poll.spec)
        except BaseException as exc:
            if not isinstance(exc, Exception) and backend.resumable and external is not None:
                # The provider keeps training while this process stops: the next bot start
                # picks the polling up (`resume`), so nothing is cancelled or marked.
                raise
            if external is not None:
                await asyncio.shield(backend.cancel(external))
            if not isinstance(exc, Exception):  # Ctrl-C, or the bot shutting down
                reason = "interrupted: the process running it stopped"
            elif isinstance(exc, UserError):
                reason = str(exc)
            else:
                reason = f"{type(exc).__name__}: {exc}"
            await asyncio.shield(
                self._finish(job_id, status="failed", phase="failed", error=reason)
            )
            if isinstance(exc, Exception) and not isinstance(exc, UserError):
                log.exception("fine-tuning job %s failed", job_id)
            if not isinstance(exc, Exception):
                raise
        view = await self.job(job_id)
        if on_update is not None:
            on_update(view)
        return view

    async def resume(self) -> list[JobView]:
        """Pick up the provider jobs nobody follows any more (a bot start calls it); those resumed.

        A job is followed by the process that started it, which writes a heartbeat; one
        silent for STALE_S lost its follower, and this process polls it from now on.
        """
        cutoff = utcnow() - timedelta(seconds=STALE_S)
        resumed: list[JobView] = []
        async with self.sessions() as session:
            repo = TuneJobRepository(session)
            stale = [
                job
                for kind, backend in self.backends.items()
                if backend.resumable
                for job in await repo.stale(kind, cutoff)
                if job.external_id and job.id not in self._tasks
            ]
        for job in stale:
            backend = self.backends[job.backend]
            try:
                base = await self.catalog.get(job.base_model)
                backend.resume(self._ticket(job), base, job.external_id or "")
            except UserError as exc:
                await self._finish(job.id, status="failed", phase="failed", error=str(exc))
                continue
            await self._write(job.id, heartbeat_at=utcnow())

            async def begin(external: str = job.external_id or "") -> str:
                return external

            task = asyncio.create_task(
                self._carry(job, backend, begin, None), name=f"tune-job-{job.id}"
            )
            self._tasks[job.id] = task
            task.add_done_callback(lambda _t, key=job.id: self._tasks.pop(key, None))
            resumed.append(_view(job, None))
        return resumed

    async def _follow(
        self,
        job_id: str,
        backend: TuneBackend,
        external: str,
        on_update: Callable[[JobView], None] | None,
    ) -> BackendPoll:
        """Poll until done, writing progress and heartbeats; a cancel asked for anywhere stops it."""
        last: BackendPoll | None = None
        losses: list[float] = []
        written = heard = float("-inf")
        while True:
            poll = await backend.poll(external)
            now = time.monotonic()
            if (
                poll.loss is not None
                and (last is None or poll.step != last.step)
                and poll.phase in TRAINING_PHASES
            ):
                losses.append(round(poll.loss, 5))
            changed = last is None or (poll.phase, poll.step) != (last.phase, last.step)
            if (
                poll.done
                or (changed and now - written >= PROGRESS_WRITE_S)
                or now - heard >= HEARTBEAT_S
            ):
                cancel = await self._write(
                    job_id,
                    phase=poll.phase,
                    step=poll.step,
                    total_steps=poll.total,
                    losses=list(losses),
                    eta_s=poll.eta_s,
                    heartbeat_at=utcnow(),
                )
                written = heard = now
                if on_update is not None and changed:
                    on_update(await self.job(job_id))
                if cancel and not poll.done:
                    await backend.cancel(external)
                    return replace(poll, done=True, cancelled=True, spec=None)
            if poll.done:
                return poll
            last = poll
            await asyncio.sleep(backend.poll_interval_s)

    async def _write(self, job_id: str, **fields: Any) -> bool:
        """Update the job's columns; whether a cancel has been asked for."""
        async with self.sessions() as session, session.begin():
            repo = TuneJobRepository(session)
            await repo.set(job_id, **fields)
            job = await repo.get(job_id)
            return bool(job and job.cancel_requested)

    async def _finish(self, job_id: str, **fields: Any) -> bool:
        async with self.sessions() as session, session.begin():
            done = await TuneJobRepository(session).finish_if_active(job_id, **fields)
        if fields.get("status") != "succeeded":
            _discard(self.jobs_dir / job_id)
        return done

    async def _register(self, job: TuneJob, spec: ModelSpec) -> None:
        """Register the candidate, then mark the job succeeded; undone if it was cancelled meanwhile."""
        async with self.sessions() as session:
            current = await TuneJobRepository(session).get(job.id)
        if current is None or current.cancel_requested:
            await self._finish(job.id, status="cancelled", phase="cancelled")
            return
        lineage = spec.lineage or Lineage(base_model=job.base_model)
        spec = spec.model_copy(
            update={
                "candidate": True,
                # The job, not the person: who started it is in the job's record, which
                # forgetting that person anonymises (the registry is not rewritten).
                "lineage": lineage.model_copy(update={"created_by": f"tune job {job.id}"}),
            }
        )
        await self.catalog.register(spec, created_by=f"tune job {job.id}")
        try:
            async with self.sessions() as session, session.begin():
                done = await TuneJobRepository(session).finish_if_active(
                    job.id, status="succeeded", phase="done", model_name=spec.name
                )
                if done:
                    await GateRepository(session).record(
                        spec.name, "candidate", job.started_by, job_id=job.id, guild_id=job.guild_id
                    )
        except BaseException:
            await asyncio.shield(self.catalog.unregister(spec.name))
            raise
        if not done:  # cancelled or marked failed while it registered: take it back
            await self.catalog.unregister(spec.name)
            _discard(self.jobs_dir / job.id)

    # -------------------------------------------------------------- status, list, cancel

    async def recover(self) -> list[JobView]:
        """Mark local jobs whose process died as failed (a bot start calls it); those marked.

        A job is interrupted when its runner has written no heartbeat for STALE_S; one
        running in another live process keeps writing them, so it is left alone.
        """
        marked: list[JobView] = []
        cutoff = utcnow() - timedelta(seconds=STALE_S)
        async with self.sessions() as session, session.begin():
            repo = TuneJobRepository(session)
            for kind, backend in self.backends.items():
                if backend.resumable:
                    continue  # resumed by polling instead (an OpenAI backend)
                for job in await repo.stale(kind, cutoff):
                    if job.id in self._tasks:
                        continue
                    seen = job.heartbeat_at or job.created_at
                    reason = (
                        f"interrupted: the process running it stopped (last heard from "
                        f"{seen:%Y-%m-%d %H:%M} UTC); start it again with `switchboard tune start`"
                    )
                    await repo.finish_if_active(
                        job.id, status="failed", phase="failed", error=reason
                    )
                    marked.append(_view(job, None))
        for job in marked:
            _discard(self.jobs_dir / job.id)
        return marked

    async def job(self, ref: str) -> JobView:
        """One job, by its id (or the first characters of it) or the model name it registers."""
        async with self.sessions() as session:
            repo = TuneJobRepository(session)
            found = await repo.get(ref) or None
            jobs = [found] if found else await repo.find(ref)
        if not jobs:
            raise NotFound(f"No fine-tuning job '{ref}'.", listing="tune list")
        if len({j.id for j in jobs}) > 1 and jobs[0].name != ref:
            raise UserError(f"'{ref}' matches {len(jobs)} jobs; give more of the id.")
        return _view(jobs[0], self._gate(jobs[0].model_name))

    async def latest(self, guild_id: int | None = None) -> JobView | None:
        """The newest job (of a server), if any."""
        jobs = await self.list(guild_id, limit=1)
        return jobs[0] if jobs else None

    async def list(self, guild_id: int | None = None, *, limit: int = 50) -> list[JobView]:
        """The latest jobs, newest first, with the state of the models they made."""
        await self.recover()
        async with self.sessions() as session:
            jobs = await TuneJobRepository(session).recent(guild_id, limit)
        return [_view(job, self._gate(job.model_name)) for job in jobs]

    def _gate(self, model_name: str | None) -> str | None:
        if model_name is None:
            return None
        if model_name not in self.catalog.registry:
            return "removed"
        return "candidate" if self.catalog.registry.get(model_name).candidate else "promoted"

    async def cancel(self, ref: str, actor: Author, *, wait_s: float = 60.0) -> JobView:
        """Stop a queued or running job; waits up to `wait_s` for its runner to stop it."""
        job = await self.job(ref)
        if not job.active:
            raise UserError(f"Job {job.id[:8]} is {job.status}: there is nothing to cancel.")
        async with self.sessions() as session, session.begin():
            repo = TuneJobRepository(session)
            if job.status == "queued":
                await repo.finish_if_active(
                    job.id,
                    status="cancelled",
                    phase="cancelled",
                    error=f"cancelled by {actor_text(actor)}",
                )
            else:
                await repo.set(
                    job.id, cancel_requested=True, error=f"cancelled by {actor_text(actor)}"
                )
        if job.status == "queued":
            _discard(self.jobs_dir / job.id)
            return await self.job(job.id)
        if self.backends[job.backend].resumable:
            # A provider's job nobody follows now: follow it here, which cancels it at once.
            await self.resume()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            await self.recover()  # a runner that died never answers: it is marked failed
            view = await self.job(job.id)
            if not view.active:
                return view
            await asyncio.sleep(0.5)
        return await self.job(job.id)

    # -------------------------------------------------------------- evaluation

    async def held_out(self, ref: str) -> tuple[JobView, list[EvalExample]]:
        """A finished job and the prompts of its snapshot it was not trained on (none below
        HOLD_OUT_FROM examples, where every one was trained on).

        Each row is a held-out example's last question, with the conversation and system
        prompt before it and the liked answer as its reference.
        """
        job = await self.job(ref)
        if job.model_name is None:
            raise UserError(
                f"Job {job.id[:8]} ({job.name}) is {job.status}: only a finished fine-tune "
                "can be evaluated."
            )
        # Nothing deleted since (by a process that could not rewrite it) is asked again.
        await self.snapshots.catch_up()
        path = Path(job.snapshot_path).with_name(HELD_OUT_FILE)
        try:
            lines = await asyncio.to_thread(_read_lines, path)
        except FileNotFoundError:  # trained on every example (fewer than HOLD_OUT_FROM)
            return job, []
        examples = [
            example
            for number, line in enumerate(lines, 1)
            if line.strip() and (example := _held_out_example(json.loads(line), number))
        ]
        return job, examples

    # -------------------------------------------------------------- the gate

    async def _fine_tune(self, name: str) -> ModelSpec:
        spec = await self.catalog.get(name)
        if (
            spec.origin != "database"
            or spec.lineage is None
            or spec.lineage.source
            not in (
                "lora",
                "openai-fine-tune",
            )
        ):
            raise UserError(f"`{spec.name}` is not a fine-tune made by `switchboard tune`.")
        return spec

    async def promote(
        self, name: str, actor: Author, *, default_guild: int | None = None
    ) -> GateChange:
        """Make a candidate a normal model (and, with `default_guild`, that server's default)."""
        spec = await self._fine_tune(name)
        who = actor_text(actor)
        if spec.candidate:
            await self.catalog.register(
                spec.model_copy(update={"candidate": False}), created_by=who, replace=True
            )
        elif default_guild is None:
            raise UserError(f"`{spec.name}` is already promoted.")
        async with self.sessions() as session, session.begin():
            jobs = await TuneJobRepository(session).by_model([spec.name])
            job_id = jobs[spec.name].id if spec.name in jobs else None
            if spec.candidate:
                await GateRepository(session).record(spec.name, "promoted", who, job_id=job_id)
            previous = None
            if default_guild is not None:
                row = await SettingsRepository(session).get("guild", default_guild, default_guild)
                previous = row.model if row is not None else None
        if default_guild is not None:
            await self.place_settings.change(
                Place(default_guild, 0), "guild", "model", spec.name, actor
            )
            async with self.sessions() as session, session.begin():
                await GateRepository(session).record(
                    spec.name,
                    "default_set",
                    who,
                    job_id=job_id,
                    guild_id=default_guild,
                    previous_default=previous,
                )
        return GateChange(spec.name, "promoted", default_guild=default_guild)

    async def rollback(self, name: str, actor: Author) -> GateChange:
        """Make a promoted fine-tune a candidate again; give back the defaults its promotion set."""
        spec = await self._fine_tune(name)
        if spec.candidate:
            raise UserError(f"`{spec.name}` is a candidate already: there is no promotion to undo.")
        who = actor_text(actor)
        async with self.sessions() as session:
            history = await GateRepository(session).history(spec.name)
        # The defaults set since the last rollback, latest first: each server gets back
        # what it had before this model, if this model is still its default.
        since = max((i for i, e in enumerate(history) if e.action == "rolled_back"), default=-1)
        restored: list[tuple[int, str | None]] = []
        done: set[int] = set()
        for event in reversed(history[since + 1 :]):
            if event.action != "default_set" or event.guild_id is None or event.guild_id in done:
                continue
            done.add(event.guild_id)
            now = await self.place_settings.effective(Place(event.guild_id, 0))
            if now.model.source == "guild" and now.model.value == spec.name:
                back = event.previous_default if event.previous_default != spec.name else None
                await self.place_settings.change(
                    Place(event.guild_id, 0), "guild", "model", back, actor
                )
                restored.append((event.guild_id, back))
        await self.catalog.register(
            spec.model_copy(update={"candidate": True}), created_by=who, replace=True
        )
        async with self.sessions() as session, session.begin():
            jobs = await TuneJobRepository(session).by_model([spec.name])
            await GateRepository(session).record(
                spec.name,
                "rolled_back",
                who,
                job_id=jobs[spec.name].id if spec.name in jobs else None,
            )
        return GateChange(spec.name, "rolled_back", restored=tuple(restored))

    async def history(self, name: str) -> list[tuple[datetime, str, str, int | None]]:
        """A model's gate steps: (when, action, who, server), oldest first."""
        async with self.sessions() as session:
            events = await GateRepository(session).history(name)
        return [(e.created_at, e.action, e.actor, e.guild_id) for e in events]

    async def aclose(self) -> None:
        """Stop the jobs running in this process's background (marked failed: interrupted)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for backend in self.backends.values():
            close = getattr(backend, "aclose", None)  # a provider backend's HTTP clients
            if close is not None:
                await close()


def _busy(job: TuneJob) -> str:
    where = f"server {job.guild_id}" if job.guild_id else "this installation (no --guild)"
    progress = f", step {job.step}/{job.total_steps}" if job.total_steps else ""
    return (
        f"A fine-tune is already {job.status} for {where}: job {job.id[:8]} ({job.name}, "
        f"{job.phase}{progress}). Wait for it, or stop it with `switchboard tune cancel {job.id[:8]}`."
    )


def _filters(request: TuneRequest) -> dict[str, Any]:
    return {
        "min_rating": request.min_rating,
        "model": request.model,
        "guild_id": request.guild_id,
        "channel_id": request.channel_id,
        "since": request.since.isoformat() if request.since else None,
        "until": request.until.isoformat() if request.until else None,
        "include_unrated": request.include_unrated,
    }


def _discard(folder: Path) -> None:
    """Remove what a failed or cancelled job made, keeping its snapshot."""
    shutil.rmtree(folder / "adapter", ignore_errors=True)
    (folder / "adapter.gguf").unlink(missing_ok=True)


def _remove_data(path: Path) -> None:
    """A data file of the snapshot no longer used, with its sources."""
    path.unlink(missing_ok=True)
    sources_path(path).unlink(missing_ok=True)


def _read_lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as file:
        return file.readlines()


def _held_out_example(row: dict[str, Any], number: int) -> EvalExample | None:
    """An evaluation row from one example of the snapshot, in any of its formats."""
    if "messages" in row:  # sft, openai-chat: the conversation, then the liked answer
        messages, answer = row["messages"][:-1], row["messages"][-1]
    elif "input" in row:  # openai-dpo
        messages, answer = row["input"]["messages"], row["preferred_output"][-1]
    elif "prompt" in row and isinstance(row["prompt"], list):  # dpo (conversational)
        messages, answer = row["prompt"], row["chosen"][-1]
    else:
        return None
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    if not turns or turns[-1]["role"] != "user":
        return None
    history = tuple((m["role"], str(m["content"])) for m in turns[:-1])
    return EvalExample(
        id=f"held-out-{number}",
        prompt=str(turns[-1]["content"]),
        reference=str(answer["content"]),
        system=str(system),
        history=history,
    )
