"""Privacy: who is stored, forgetting a person, deleted messages, and retention.

What `ChatService` asks of it on every message is `opted_out(user_id)`: cached for
`OPT_OUT_TTL_S` (another process may record a choice) and read for every person missing
in one loop turn with one query, so a burst of new people costs one round trip. An
exchange is stored unless its author opted out, its place logs nothing (`logging` off in
`PlaceSettings`), or what it was built from may not be stored; one that is not stored is
only counted (`anonymous_counts`: day, server, model, tokens, cost) and remembered in
memory, so the conversation goes on.

Forgetting a person (`forget`), a Discord message deleted (`message_deleted`) and retention
(`purge`) delete through `store.repositories.PrivacyRepository`; the turn cache forgets the
same messages, and the log is told the ids deleted (`ExchangeLog.forget_ids`), so that an
answer being written while they went is not stored on top of them. The fine-tuning
snapshots (`Snapshots`: `bot.service.tune_snapshots`, wired in `bot.app`) are told them
too, and rewritten without the lines built on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.service.conversations import ConversationIndex
from bot.service.place_settings import PlaceSettings
from core.cache import LRU
from core.errors import StorageUnavailable, UserError
from core.messages import Author, Place
from store.db import failure_reason, is_outage
from store.exchange_log import ExchangeLog
from store.repositories import (
    AnonymousCountRow,
    PeopleRepository,
    PrivacyRepository,
    Removal,
    SpendingRepository,
)
from store.writer import LogWriter

log = logging.getLogger(__name__)

# A choice recorded by another process (a second shard, the terminal) applies within this.
OPT_OUT_TTL_S = 30.0
CACHED_PEOPLE = 50_000
# Discord messages deleted lately: an answer being written while its prompt went is not stored.
REMEMBERED_DELETIONS = 50_000
# How long a forget waits for the log to write what is queued before it.
DRAIN_TIMEOUT_S = 30.0
# How long a status waits for the log to write what was just said.
STATUS_WAIT_S = 1.0  # Discord wants an answer within 3 s
# Expired prompts deleted per transaction by a purge.
PURGE_BATCH = 1000


class Uploads(Protocol):
    """What forgetting needs of the knowledge base."""

    async def forget_uploader(self, uploader_id: int | None, name: str | None = None) -> int: ...


class SnapshotsTaken(Protocol):
    """What a pass over the fine-tuning snapshots took out of them."""

    @property
    def lines(self) -> int: ...
    @property
    def problem(self) -> str | None: ...


class SnapshotPass(Protocol):
    """One deletion's pass over the snapshots: told the ids deleted, then finished."""

    def note(self, message_ids: Collection[str]) -> None: ...
    async def finish(self) -> SnapshotsTaken: ...


class Snapshots(Protocol):
    """What deleting needs of the fine-tuning snapshots (`tune_snapshots.TuneSnapshots`).

    `cause` is "forget", "retention" or "deleted" (a Discord message); `finish` never
    raises: what could not be rewritten is its `problem`.
    """

    async def pruning(self, cause: str) -> SnapshotPass: ...


@dataclass(frozen=True, slots=True)
class PrivacyStatus:
    """What is stored about a person, and what they chose."""

    opted_out: bool
    messages: int  # messages they wrote that are stored
    votes: int
    changed_at: datetime | None  # when they last chose (None: never)


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What forgetting a person deleted."""

    messages: int  # what they wrote (prompts)
    corrections: int  # better answers they wrote
    answers: int  # answers to them, or built on their words (every kind)
    votes: int
    conversations: int  # left empty, so removed
    setting_changes: int  # no longer carrying their name
    documents: int  # no longer carrying their name as uploader
    # Set when the documents could not be changed (the database part is done).
    documents_problem: str | None = None
    snapshot_lines: int = 0  # lines taken out of fine-tuning snapshots
    # Set when a snapshot could not be rewritten (the database part is done).
    snapshots_problem: str | None = None

    @property
    def nothing(self) -> bool:
        """Whether nothing at all was stored about them."""
        return not (
            self.messages
            or self.corrections
            or self.answers
            or self.votes
            or self.conversations
            or self.setting_changes
            or self.documents
            or self.snapshot_lines
        )


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What applying retention deleted (or, in a dry run, would delete)."""

    dry_run: bool
    prompts: int
    answers: int  # every other kind of message that went with them
    conversations: int  # left empty, so removed
    default_days: int | None  # the bot's retention (None: keep)
    servers: dict[int, int]  # servers with their own (days; 0: keep)
    snapshot_lines: int = 0  # lines taken out of fine-tuning snapshots (never in a dry run)
    snapshots_problem: str | None = None  # a snapshot that could not be rewritten

    @property
    def messages(self) -> int:
        return self.prompts + self.answers


def _counts(removal: Removal) -> tuple[int, int, int]:
    """(prompts, corrections, other messages) in a removal."""
    prompts = removal.kinds.get("prompt", 0)
    corrections = removal.kinds.get("correction", 0)
    return prompts, corrections, removal.messages - prompts - corrections


class Privacy:
    """Opt-out (cached), forgetting, deleted Discord messages, retention; anonymous counts."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        writer: LogWriter,
        exchange_log: ExchangeLog,
        conversations: ConversationIndex,
        place_settings: PlaceSettings,
        *,
        uploads: Uploads | None = None,
        snapshots: Snapshots | None = None,
        ttl: float = OPT_OUT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], date] = lambda: datetime.now(UTC).date(),
    ) -> None:
        self.sessions = sessions
        self.writer = writer
        self.exchange_log = exchange_log
        self.conversations = conversations
        self.place_settings = place_settings
        self.uploads = uploads
        self.snapshots = snapshots
        self.ttl = ttl
        self.clock = clock
        self.today = today
        # user id -> (fresh until, opted out); kept past its time to answer during an outage.
        self._people: LRU[int, tuple[float, bool]] = LRU(CACHED_PEOPLE)
        self._reads: dict[int, asyncio.Future[bool]] = {}
        self._batch: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._prunes: set[asyncio.Future[None]] = set()  # snapshots rewritten for deleted messages
        self._generation = 0  # bumped by every choice, so reads begun before it are not cached
        self._deleted: LRU[int, bool] = LRU(REMEMBERED_DELETIONS)  # Discord messages deleted
        # user id -> the `mark` just after they were forgotten.
        self._forgotten: LRU[int, int] = LRU(CACHED_PEOPLE)
        self._mark = 0

    # ------------------------------------------------------------ the hot path

    async def opted_out(self, user_id: int) -> bool:
        """Whether this person opted out (cached; a burst of unknown people is one query).

        While the database cannot be read, the last answer read stands; a person never
        read is taken as opted out, so nobody's choice is broken by an outage.
        """
        cached = self._people.get(user_id)
        if cached is not None and cached[0] > self.clock():
            return cached[1]
        pending = self._reads.get(user_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.create_future()
            self._reads[user_id] = pending
            if not self._batch:
                loop.call_soon(self._start_read)
            self._batch.append(user_id)
        return await asyncio.shield(pending)

    def _start_read(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.ensure_future(self._read(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, batch: list[int]) -> None:
        generation = self._generation
        futures = {user_id: self._reads.pop(user_id) for user_id in batch}
        try:
            async with self.sessions() as session:
                out = await PeopleRepository(session).opted_out(batch)
        except Exception as exc:
            if not is_outage(exc):
                for future in futures.values():
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()  # every waiter re-raises it; none waiting is no news
                return
            log.warning(
                "opt-outs could not be read (%s); the last ones read apply, and people not "
                "read yet are not stored",
                failure_reason(exc),
            )
            for user_id, future in futures.items():
                stale = self._people.get(user_id)
                if not future.done():
                    future.set_result(stale[1] if stale is not None else True)
            return
        fresh_until = self.clock() + self.ttl
        for user_id, future in futures.items():
            if generation == self._generation:
                self._people.put(user_id, (fresh_until, user_id in out))
            if not future.done():
                future.set_result(user_id in out)

    async def logging_on(self, place: Place) -> bool:
        """Whether `place` stores what is said there (its effective logging switch)."""
        return bool((await self.place_settings.effective(place)).logging.value)

    @property
    def mark(self) -> int:
        """Taken when an exchange begins, to tell `may_store` when that was."""
        return self._mark

    def may_store(
        self, *, authors: Iterable[int], mark: int, discord_message_id: int | None
    ) -> bool:
        """Whether an exchange begun at `mark` may still be stored now: none of the people
        whose words it holds (`authors`) was forgotten since, and its Discord message was
        not deleted while it was being answered."""
        if discord_message_id is not None and discord_message_id in self._deleted:
            return False
        for author_id in authors:
            forgotten = self._forgotten.get(author_id)
            if forgotten is not None and forgotten > mark:
                return False
        return True

    def is_gone(self, message_id: str) -> bool:
        """Whether this message was deleted lately with its words (a person forgotten, a
        Discord message deleted): nothing built on it may be stored."""
        return self.exchange_log.is_gone(message_id)

    def is_deleted(self, message_id: str) -> bool:
        """Whether this message was deleted lately for whatever reason (retention too)."""
        return self.exchange_log.is_deleted(message_id)

    def count(
        self,
        guild_id: int | None,
        model_name: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
    ) -> None:
        """Count an exchange that was answered but not stored (in the background)."""
        self.exchange_log.count_anonymous(
            AnonymousCountRow(
                day=self.today(),
                guild_id=guild_id or 0,
                model_name=model_name,
                exchanges=1,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cost_usd=cost_usd,
            )
        )

    # ------------------------------------------------------------ choices

    async def status(self, author: Author) -> PrivacyStatus:
        """What is stored about `author` now, and whether they opted out."""
        with contextlib.suppress(TimeoutError):  # their last exchange may be on its way
            await self.writer.drain(timeout=STATUS_WAIT_S)
        async with self._database("read what is stored about you") as session:
            person = await PeopleRepository(session).get(author.id)
            messages, votes = await PrivacyRepository(session).stored_about(author.id)
        opted_out = person is not None and person.opted_out
        self._people.put(author.id, (self.clock() + self.ttl, opted_out))
        return PrivacyStatus(
            opted_out=opted_out,
            messages=messages,
            votes=votes,
            changed_at=person.changed_at if person is not None else None,
        )

    async def set_opted_out(self, author: Author, opted_out: bool) -> PrivacyStatus:
        """Record the person's choice; it applies to their next message at once."""
        async with self._database("save your choice") as session, session.begin():
            await PeopleRepository(session).set_opted_out(author.id, opted_out)
        self._generation += 1
        self._people.put(author.id, (self.clock() + self.ttl, opted_out))
        return await self.status(author)

    # ------------------------------------------------------------ deleting

    async def forget(self, author: Author, *, by_name: bool = False) -> ForgetReport:
        """Delete everything stored about `author`; says what went.

        Their messages and what derives from them, the answers that used their words,
        their votes and corrections; their name and id in the settings history; their
        name on the documents they added (`by_name`: also documents added under their
        name without an id, as the terminal adds them). Whether they opted out stays.
        """
        if self.writer.problem is not None:
            raise StorageUnavailable(
                f"Nothing was deleted: the database cannot be written right now ({self.writer.problem}). "
                "Try again once it is back."
            )
        # From now on nothing begun before is stored with their words in it, and memory
        # no longer offers their turns as history.
        self._mark += 1
        self._forgotten.put(author.id, self._mark)
        self.conversations.forget(set(), author.id)
        try:
            # What was logged before this is in the database, so it is deleted too.
            await self.writer.drain(timeout=DRAIN_TIMEOUT_S)
        except TimeoutError:
            raise StorageUnavailable(
                "Nothing was deleted: the log is still being written. Try again in a minute."
            ) from None
        snapshots = await self._snapshot_pass("forget")
        async with self._database("delete what is stored about you") as session:
            async with session.begin():
                done = await PrivacyRepository(session).forget_person(author.id)
        self._forget_in_memory(done.removed, author.id)
        taken = await self._snapshots_done(snapshots, done.removed.message_ids)
        documents, problem = 0, None
        if self.uploads is not None:
            try:
                documents = await self.uploads.forget_uploader(
                    author.id, author.name if by_name else None
                )
            except Exception as exc:
                log.warning("could not take %s off their documents: %s", author.id, exc)
                problem = str(getattr(exc, "message", None) or exc)
        prompts, corrections, answers = _counts(done.removed)
        return ForgetReport(
            messages=prompts,
            corrections=corrections,
            answers=answers,
            votes=done.votes,
            conversations=done.removed.conversations,
            setting_changes=done.setting_changes,
            documents=documents,
            documents_problem=problem,
            snapshot_lines=taken.lines if taken else 0,
            snapshots_problem=taken.problem if taken else None,
        )

    def message_deleted(self, discord_message_id: int) -> None:
        """A person deleted their Discord message: its prompt and what derives from it go.

        Done by the log writer after what is queued before it (so a message deleted just
        after it was sent goes too), and kept and retried while the database is away; an
        answer still being written for it is not stored.
        """
        self._deleted.put(discord_message_id, True)
        self.exchange_log.delete_discord_prompt(discord_message_id, self._message_gone)

    def _message_gone(self, removal: Removal) -> None:
        self._forget_in_memory(removal)
        if self.snapshots is not None and removal.message_ids:
            # After the deletion, in the background: the log writer does not wait on files.
            task = asyncio.ensure_future(self._prune_deleted(set(removal.message_ids)))
            self._prunes.add(task)
            task.add_done_callback(self._prunes.discard)

    async def settle(self) -> None:
        """Wait for the snapshot rewrites that deleted Discord messages began (at close)."""
        while self._prunes:
            await asyncio.gather(*self._prunes, return_exceptions=True)

    async def _prune_deleted(self, message_ids: set[str]) -> None:
        taken = await self._snapshots_done(await self._snapshot_pass("deleted"), message_ids)
        if taken is not None and taken.problem:
            log.error("a deleted message's snapshot lines were not removed: %s", taken.problem)

    async def purge(self, *, dry_run: bool = False, now: datetime | None = None) -> PurgeReport:
        """Delete the exchanges older than their server's retention (else the bot's).

        In batches of `PURGE_BATCH` prompts, each in its own transaction; a dry run counts
        what would go and changes nothing.
        """
        now = now or datetime.now(UTC)
        default = self.place_settings.retention_days
        async with self._database("read the retention settings") as session:
            overrides = await PrivacyRepository(session).retention_overrides()
        cutoffs = {
            guild_id: (now - timedelta(days=days) if days else None)
            for guild_id, days in overrides.items()
        }
        default_cutoff = now - timedelta(days=default) if default else None
        snapshots = None if dry_run else await self._snapshot_pass("retention")
        total = Removal()
        after = None
        while True:
            async with self._database("apply the retention") as session, session.begin():
                repo = PrivacyRepository(session)
                batch = await repo.expired_prompts(
                    cutoffs, default_cutoff, after=after, limit=PURGE_BATCH
                )
                if not batch:
                    if dry_run:
                        total.conversations = len(await repo.would_empty(total.touched))
                    break
                removal = await repo.expire([prompt_id for _, prompt_id in batch], dry_run=dry_run)
            after = batch[-1]  # keyset pagination: a dry run deletes nothing, so page on
            if not dry_run:  # expired, not forgotten: answers built on them may stay
                self._forget_in_memory(removal, words=False)
                if snapshots is not None:  # keeps only the ids some snapshot line names
                    snapshots.note(removal.message_ids)
            removal.message_ids = set()  # counted; no need to hold every id of a big purge
            total.add(removal)
        if not dry_run:  # the budgets' totals of the days that are over
            async with self._database("delete past days' spending") as session, session.begin():
                await SpendingRepository(session).delete_before(now.astimezone(UTC).date())
        taken = await self._snapshots_done(snapshots, ())
        prompts = total.kinds.get("prompt", 0)
        return PurgeReport(
            dry_run=dry_run,
            prompts=prompts,
            answers=total.messages - prompts,
            conversations=total.conversations,
            default_days=default,
            servers=overrides,
            snapshot_lines=taken.lines if taken else 0,
            snapshots_problem=taken.problem if taken else None,
        )

    async def _snapshot_pass(self, cause: str) -> SnapshotPass | None:
        """A pass over the fine-tuning snapshots, begun before the deletion; None without
        snapshots, or when they cannot be read (the deletion goes on: said in the log)."""
        if self.snapshots is None:
            return None
        try:
            return await self.snapshots.pruning(cause)
        except Exception:
            log.exception("the fine-tuning snapshots could not be read")
            return None

    @staticmethod
    async def _snapshots_done(
        snapshots: SnapshotPass | None, message_ids: Collection[str]
    ) -> SnapshotsTaken | None:
        """The snapshots rewritten without the lines built on what was deleted."""
        if snapshots is None:
            return None
        snapshots.note(message_ids)
        return await snapshots.finish()

    def _forget_in_memory(
        self, removal: Removal, author_id: int | None = None, *, words: bool = True
    ) -> None:
        self.exchange_log.forget_ids(removal.message_ids, words=words)
        self.conversations.forget(removal.message_ids, author_id)

    @asynccontextmanager
    async def _database(self, doing: str) -> AsyncIterator[AsyncSession]:
        """A session whose outage is one line a person can act on (StorageUnavailable)."""
        try:
            async with self.sessions() as session:
                yield session
        except Exception as exc:
            if isinstance(exc, UserError) or not is_outage(exc):
                raise
            raise StorageUnavailable(
                f"Could not {doing}: the database cannot be reached right now "
                f"({failure_reason(exc)}). Nothing was changed; try again in a moment."
            ) from exc
