"""The fine-tuning jobs' snapshot files, kept in step with forgetting and retention.

A job's snapshot (`data/tune/jobs/<job>/snapshot*.jsonl`, made by `TuneService.start`
through the export with `sources`) holds the redacted text of people's messages. When
`Privacy` forgets a person or applies the retention, it asks for a `pruning`, tells it
every message id it deleted (`note`, once or batch by batch), and `finish`es it: every
snapshot with a line built on one of them is rewritten without those lines
(`store.export.prune`, in a worker thread), and the report says how many lines went.

    pruning = await snapshots.pruning("forget")
    pruning.note(removal.message_ids)
    report = await pruning.finish()  # never raises: a failure is `report.problem`

The ids are matched against the snapshots' sidecars read once at `pruning` (ids only), so
a purge of a million rows keeps only the ids that hit a snapshot. A snapshot made before
sidecars existed cannot be pruned line by line: its data files are deleted (its manifest
stays and says why) by the first forget or purge that deletes anything.

What the job row records of its snapshot (`snapshot_sha256`, `snapshot_rows`) stays the
record of what the job was trained on once it started; a job still queued will train on
what is left, so its row follows the rewrite, and one whose snapshot was deleted whole
fails with the reason. A snapshot being made in this process while messages are deleted
is pruned of them once it is written (`making`); one made by another process at that
moment is not (its export read the log before the deletion).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from store.export import manifest_path
from store.export.prune import PruneError, PruneResult, export_sources, prune
from store.repositories import PrivacyRepository
from store.tune_jobs import TuneJobRepository

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.jsonl"
MANIFEST_FILE = manifest_path(Path(SNAPSHOT_FILE)).name


@dataclass(frozen=True, slots=True)
class SnapshotsPruned:
    """What a forget or a purge took out of the fine-tuning snapshots."""

    lines: int = 0  # example lines removed (in snapshots deleted whole, too)
    jobs: int = 0  # jobs whose snapshot changed
    deleted: int = 0  # snapshots deleted whole (made without sources)
    problem: str | None = None  # what could not be rewritten (tried again next time)


class SnapshotPruning:
    """One forget's or purge's pass over the snapshots (see the module)."""

    def __init__(
        self, owner: TuneSnapshots, index: dict[Path, set[str] | None], cause: str
    ) -> None:
        self._owner = owner
        self._index = index
        self._cause = cause
        self._hits: dict[Path, set[str]] = {}

    def note(self, message_ids: Collection[str]) -> None:
        """These messages were deleted."""
        if not message_ids:
            return
        for manifest, sources in self._index.items():
            if sources is None:  # provenance unknown: any deletion may concern it
                self._hits.setdefault(manifest, set()).update(itertools.islice(message_ids, 1))
            else:
                hit = sources.intersection(message_ids)
                if hit:
                    self._hits.setdefault(manifest, set()).update(hit)
        for watch in self._owner._watches:
            watch.setdefault(self._cause, set()).update(message_ids)

    async def finish(self) -> SnapshotsPruned:
        """Rewrite the snapshots that hold a line built on what was deleted."""
        return await self._owner._apply(self._hits, self._cause)


class TuneSnapshots:
    """Finds and prunes the snapshots under `jobs_dir` (built by `bot.app.open_app`)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        jobs_dir: Path,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.sessions = sessions
        self.jobs_dir = Path(jobs_dir)
        self.now = now
        self._watches: list[dict[str, set[str]]] = []  # snapshots being made: cause -> ids
        # Prunes that failed: tried again by the next forget or purge in this process.
        self._failed: dict[Path, tuple[set[str], str]] = {}

    async def pruning(self, cause: str) -> SnapshotPruning:
        """Begin a pass: the snapshots' sources, read once (ids only)."""
        return SnapshotPruning(self, await asyncio.to_thread(self._index), cause)

    def _index(self) -> dict[Path, set[str] | None]:
        index: dict[Path, set[str] | None] = {}
        if not self.jobs_dir.is_dir():
            return index
        for manifest in sorted(self.jobs_dir.glob(f"*/{MANIFEST_FILE}")):
            try:
                index[manifest] = export_sources(manifest)
            except (OSError, ValueError, KeyError, TypeError, PruneError) as exc:
                # Unreadable sources cannot clear a snapshot: it is treated as untraceable.
                log.warning("the sources of %s cannot be read (%s)", manifest.parent.name, exc)
                index[manifest] = None
        return index

    async def catch_up(self) -> SnapshotsPruned:
        """Prune every snapshot of the lines whose messages are no longer stored.

        What a forget or a purge could not rewrite (the process stopped before the retry)
        and what another process deleted while a snapshot was being made are caught here:
        at bot start and before `tune eval` reads a held-out file. Snapshots without
        sources are left to the next deletion (their provenance is unknown).
        """
        index = await asyncio.to_thread(self._index)
        named = set().union(*(ids for ids in index.values() if ids))
        if not named:
            return SnapshotsPruned()
        async with self.sessions() as session:
            missing = await PrivacyRepository(session).missing_messages(named)
        if not missing:
            return SnapshotsPruned()
        hits = {m: ids & missing for m, ids in index.items() if ids and ids & missing}
        report = await self._apply(hits, "catch-up")
        if report.lines:
            log.info("%d snapshot lines of deleted messages removed", report.lines)
        return report

    @asynccontextmanager
    async def making(self, folder: Path) -> AsyncIterator[None]:
        """Around making the snapshot in `folder`: messages deleted meanwhile (which its
        export may have read before they went) are taken out of it once it is written."""
        watch: dict[str, set[str]] = {}
        self._watches.append(watch)
        try:
            yield
        finally:
            self._watches.remove(watch)
        for cause, ids in watch.items():
            report = await self._apply({folder / MANIFEST_FILE: ids}, cause)
            if report.problem:
                log.error("a new snapshot could not be pruned: %s", report.problem)

    async def _apply(self, hits: dict[Path, set[str]], cause: str) -> SnapshotsPruned:
        work = {manifest: (ids, cause) for manifest, ids in hits.items()}
        for manifest, (ids, why) in self._failed.items():  # retried first, in their cause
            if manifest in work:
                work[manifest][0].update(ids)
            else:
                work[manifest] = (set(ids), why)
        self._failed = {}
        lines = jobs = deleted = 0
        problems: list[str] = []
        now = self.now()
        for manifest, (ids, why) in work.items():
            try:
                result = await asyncio.to_thread(prune, manifest, ids, why, now=now)
            except PruneError as exc:
                log.error("snapshot of job %s not rewritten: %s", manifest.parent.name, exc)
                self._failed[manifest] = (ids, why)
                problems.append(str(exc))
                continue
            if not result.lines:
                continue
            lines += result.lines
            jobs += 1
            deleted += result.deleted
            problem = await self._record(manifest.parent.name, result)
            if problem:
                problems.append(problem)
        return SnapshotsPruned(
            lines=lines,
            jobs=jobs,
            deleted=deleted,
            problem="; ".join(problems) if problems else None,
        )

    async def _record(self, job_id: str, result: PruneResult) -> str | None:
        """A queued job trains on what is left (or fails when nothing is); one that began
        keeps its record of what it was trained on."""
        try:
            async with self.sessions() as session, session.begin():
                repo = TuneJobRepository(session)
                job = await repo.get(job_id)
                if job is None or job.status != "queued":
                    return None
                trained = Path(job.snapshot_path).name
                for file in result.files:
                    if file.name != trained:
                        continue
                    if file.deleted:
                        await repo.fail_if_queued(
                            job_id,
                            "its snapshot was made without a record of its sources and was "
                            "deleted when messages were deleted; start it again with "
                            "`switchboard tune start`",
                        )
                    else:
                        await repo.resnapshot(job_id, file.sha256, file.examples)
        except Exception as exc:
            log.error("job %s's record of its snapshot not updated: %s", job_id, exc)
            return f"the record of job {job_id[:8]} could not be updated ({exc})"
        return None
