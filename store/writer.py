"""A background writer for logs: a reply never waits on, or fails because of, its logging.

While the database cannot be written (gone, read-only, restarting), the writer keeps what
it could not write and tries again; `problem` says why, and watchers hear when it starts
and ends, so the adapters can tell people once. What is still unwritten at shutdown is
spilled to a file by the ops that know how (`submit(..., spill=)`), to be written at the
next start, instead of being lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from store.db import failure_reason

WriteOp = Callable[[AsyncSession], Awaitable[None]]
# What an op that could not be written hands over at shutdown: JSON-ready records.
Spill = Callable[[], list[dict[str, Any]]]
# Told the problem when writes start failing, and None when they get through again.
Watcher = Callable[[str | None], None]


@dataclass(slots=True)
class _Job:
    op: WriteOp
    what: str
    spill: Spill | None = None


_STOP = object()


class LogWriter:
    """Runs submitted write ops in order on a background task, batching and retrying them.

    Ops get a fresh session and must not commit; a failed op's work is rolled back
    before it is retried, so an op must be safe to run again. An op that still fails
    after its retries is reported and kept aside; the kept ops are tried again, in
    order, before later writes (at most every `retry_interval` seconds) and at close,
    so a database outage delays the log instead of losing it.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        retries: int = 3,
        backoff: float = 0.2,
        max_batch: int = 100,
        retry_interval: float = 10.0,
        max_kept: int = 10_000,
        spill_dir: Path | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if retries < 0 or backoff < 0 or max_batch < 1:
            raise ValueError("retries and backoff must be >= 0, max_batch >= 1")
        self._session_factory = session_factory
        self.retries = retries
        self.backoff = backoff
        self.max_batch = max_batch
        self.log = logger or logging.getLogger(__name__)
        self.submitted = 0
        self.written = 0
        self.failed = 0
        self.transactions = 0  # committed transactions, to see the batching at work
        self.recovered = 0  # failed ops written later
        self.dropped = 0  # failed ops given up on for good (too many kept, or closed)
        self.retry_interval = retry_interval
        self._kept: deque[_Job] = deque()
        self._max_kept = max_kept
        self._last_retry = 0.0
        self._processed = 0
        self._queue: asyncio.Queue[_Job | object] = asyncio.Queue()
        self._progress = asyncio.Condition()
        # Held while a batch is written, from its first op to its commit (between_writes).
        self._busy = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.spill_dir = spill_dir
        self.spilled: Path | None = None  # where unwritten ops went at shutdown, if any
        self.problem: str | None = None  # why writes are failing now; None while they work
        self._watchers: list[Watcher] = []

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher(problem)` when writes start failing, and `watcher(None)` once they
        work again; returns what stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None

    def _set_problem(self, problem: str | None) -> None:
        if (problem is None) == (self.problem is None):
            self.problem = problem
            return
        self.problem = problem
        if problem is None:
            self.log.warning(
                "the log is being written again (%d kept writes recovered)", self.recovered
            )
        else:
            self.log.warning(
                "the log cannot be written (%s); replies go on, and what is not written is kept "
                "and tried again every %.0f s",
                problem,
                self.retry_interval,
            )
        for watcher in list(self._watchers):
            try:
                watcher(problem)
            except Exception:  # a watcher must never stop the writer
                self.log.exception("log writer: a problem watcher failed")

    @contextlib.asynccontextmanager
    async def between_writes(self, timeout: float) -> AsyncIterator[bool]:  # noqa: ASYNC109
        """Hold off the writer: inside, no write is half done (its ops ran and it has not
        committed yet). Yields False if a write still ran after `timeout` seconds (then
        nothing is held off: a write retrying through an outage may take long)."""
        try:
            await asyncio.wait_for(self._busy.acquire(), timeout)
        except TimeoutError:
            yield False
            return
        try:
            yield True
        finally:
            self._busy.release()

    @property
    def pending(self) -> int:
        """Ops submitted but not yet written or given up on."""
        return self.submitted - self._processed

    def submit(self, op: WriteOp, what: str, *, spill: Spill | None = None) -> None:
        """Queue a write; never blocks and never raises.

        `spill` gives the op's content as JSON-ready records, should it still be unwritten
        at shutdown (see `spill_dir`).
        """
        if self._closed:
            self.failed += 1
            self.log.error("log write dropped, the writer is closed: %s", what)
            return
        self.submitted += 1
        self._queue.put_nowait(_Job(op, what, spill))

    async def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._closed:
            raise RuntimeError("this LogWriter is closed")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="switchboard-log-writer")

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the agreed API)
        """Wait until everything submitted so far is written (or reported as failed)."""
        target = self.submitted
        if self._processed >= target:
            return
        if self._task is None or self._task.done():
            raise RuntimeError("the LogWriter is not running; call start() first")

        async def caught_up() -> None:
            async with self._progress:
                await self._progress.wait_for(lambda: self._processed >= target)

        await asyncio.wait_for(caught_up(), timeout)

    async def aclose(self) -> None:
        """Write everything still queued, then stop the background task."""
        if self._closed:
            return
        self._closed = True
        if self._task is None or self._task.done():
            if self._queue.qsize():
                # Never started: write what was queued rather than drop it.
                self._task = asyncio.create_task(self._run())
            else:
                return
        self._queue.put_nowait(_STOP)
        await self._task
        if self._kept:
            await self._retry_kept()
        self._spill_or_drop(list(self._kept))
        self._kept.clear()

    def _spill_or_drop(self, jobs: list[_Job]) -> None:
        """At shutdown: what could not be written goes to a file if its op can say what it was."""
        records: list[dict[str, Any]] = []
        for job in jobs:
            if job.spill is not None and self.spill_dir is not None:
                try:
                    records += job.spill()
                    continue
                except Exception:
                    self.log.exception("log writer: could not spill %s", job.what)
            self.dropped += 1
            self.log.error("log write lost at shutdown after repeated failures: %s", job.what)
        if not records or self.spill_dir is None:
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.spill_dir / f"unwritten-{stamp}.jsonl"
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as out:
                for record in records:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as exc:
            self.dropped += len(records)
            self.log.error(
                "log writes lost at shutdown: they could not be kept in %s either (%s)", path, exc
            )
            return
        self.spilled = path
        self.log.warning(
            "%d log records could not be written before shutdown; kept in %s and written at the next start",
            len(records),
            path,
        )

    async def _run(self) -> None:
        """Take ops off the queue; whatever queued up meanwhile goes in one transaction."""
        while True:
            if self._kept and self._queue.empty():
                # Nothing new to write: try the kept writes again when it is time.
                wait = max(0.0, self._last_retry + self.retry_interval - time.monotonic())
                try:
                    job = await asyncio.wait_for(self._queue.get(), wait)
                except TimeoutError:
                    with contextlib.suppress(Exception):
                        async with self._busy:
                            await self._retry_kept()
                    continue
            else:
                job = await self._queue.get()
            if job is _STOP:
                return
            batch: list[_Job] = [job]  # type: ignore[list-item]
            stop = False
            while len(batch) < self.max_batch and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)  # type: ignore[arg-type]
            try:
                async with self._busy:
                    if self._kept and time.monotonic() - self._last_retry >= self.retry_interval:
                        await self._retry_kept()
                    await self._write_batch(batch)
            except Exception:  # the loop must survive anything an op does
                self.log.exception("log writer: unexpected error")
            async with self._progress:
                self._processed += len(batch)
                self._progress.notify_all()
            if stop:
                return

    async def _write_batch(self, batch: list[_Job]) -> None:
        """One transaction for the batch; if it fails, each op alone so one cannot sink the rest."""
        if len(batch) > 1:
            try:
                await self._transaction(batch)
            except Exception as exc:
                self.log.warning(
                    "log writer: a batch of %d failed (%s); writing its ops one by one",
                    len(batch),
                    exc,
                )
            else:
                self.written += len(batch)
                return
        for job in batch:
            await self._write_one(job)

    async def _write_one(self, job: _Job) -> None:
        """Run one op in its own transaction, retrying with backoff, and report a final failure."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                await self._transaction([job])
            except Exception as exc:
                if attempt == attempts:
                    self.failed += 1
                    self.log.error(
                        "log write failed after %d attempts (kept to try again later): %s",
                        attempts,
                        job.what,
                        exc_info=exc,
                    )
                    self._keep(job)
                    self._set_problem(failure_reason(exc))
                    return
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            else:
                self.written += 1
                return

    def _keep(self, job: _Job) -> None:
        if len(self._kept) >= self._max_kept:
            lost = self._kept.popleft()
            self.dropped += 1
            self.log.error("log write given up (too many failed writes kept): %s", lost.what)
        self._kept.append(job)
        self._last_retry = time.monotonic()

    async def _retry_kept(self) -> None:
        """Try the kept ops again, oldest first; stop at the first that still fails."""
        self._last_retry = time.monotonic()
        while self._kept:
            job = self._kept[0]
            try:
                await self._transaction([job])
            except Exception as exc:
                self.log.warning("log write still failing (%s): %s", exc, job.what)
                return
            self._kept.popleft()
            self.recovered += 1
            self.log.info("log write recovered: %s", job.what)
        self._set_problem(None)

    @property
    def kept(self) -> int:
        """Failed ops waiting to be tried again."""
        return len(self._kept)

    async def _transaction(self, jobs: list[_Job]) -> None:
        """Run the ops in one session and commit."""
        async with self._session_factory() as session, session.begin():
            for job in jobs:
                await job.op(session)
        self.transactions += 1

    async def __aenter__(self) -> LogWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
