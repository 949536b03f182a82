"""Feedback on answers: votes, corrections, and the stats that sum them up.

A vote is one person's 👍 (+1) or 👎 (-1) on one answer, from a button, a reaction or the
terminal; voting again changes it, removing a reaction removes it. A correction is a
person's better answer to the same prompt, stored as a sibling of the answer it corrects
(kind "correction"): the strongest training signal there is. Votes from people who opted
out of storage are not stored. All of it is written at once (the person is waiting for an
acknowledgement); an answer the log writer has not written yet is waited for briefly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import NotFound, StorageUnavailable, UserError
from core.exchange import VOTE_REASONS
from core.messages import Author, Place
from core.text import clean
from store.db import failure_reason, is_outage
from store.models import Message
from store.repositories import FeedbackRepository
from store.writer import LogWriter

T = TypeVar("T")

VoteSource = Literal["button", "reaction", "terminal"]
# How long a vote waits for the log writer to store the answer it is about.
ANSWER_WAIT_S = 5.0
CORRECTION_LIMIT = 4000
UNKNOWN_ANSWER = (
    "I don't have that answer in my log (it may be from before logging began, or it was "
    "deleted), so I cannot record feedback on it."
)


@dataclass(frozen=True, slots=True)
class VoteOutcome:
    """What a vote did: the value now (0: removed) and the value it replaced."""

    answer_id: str
    value: int
    previous: int | None
    stored: bool = True  # False for a person who opted out: counted nowhere


@dataclass(frozen=True, slots=True)
class AnswerOrigin:
    """What another try at an answer starts from: the model that answered, the question's message."""

    answer_id: str
    model: str | None
    prompt_discord_id: int | None  # the Discord message that asked (None from the terminal)


@dataclass(frozen=True, slots=True)
class Correction:
    """A person's better answer, stored beside the answer it corrects."""

    id: str
    answer_id: str


@dataclass(frozen=True, slots=True)
class ModelFeedback:
    """One model's feedback in a place and period."""

    model: str
    answers: int
    up: int
    down: int
    corrections: int
    reasons: dict[str, int]

    @property
    def votes(self) -> int:
        return self.up + self.down

    @property
    def share_up(self) -> float | None:
        """The share of 👍 among votes, or None without votes."""
        return self.up / self.votes if self.votes else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """A 95% Wilson interval for the share of 👍 (None without votes)."""
        if not self.votes:
            return None
        from scipy.stats import binomtest  # scipy.stats takes most of a second to import

        ci = binomtest(self.up, self.votes).proportion_ci(confidence_level=0.95, method="wilson")
        return float(ci.low), float(ci.high)

    def top_reasons(self, count: int = 3) -> list[tuple[str, int]]:
        """The most given 👎 reasons, most first."""
        return sorted(self.reasons.items(), key=lambda item: (-item[1], item[0]))[:count]


@dataclass(frozen=True, slots=True)
class FeedbackStats:
    """Feedback per model, in the order of most votes."""

    models: tuple[ModelFeedback, ...]

    @property
    def votes(self) -> int:
        return sum(m.votes for m in self.models)


class Feedback:
    """Records votes and corrections, and sums them up."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        writer: LogWriter,
        *,
        opted_out: Callable[[int], Awaitable[bool]] | None = None,
        logging_on: Callable[[Place], Awaitable[bool]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.writer = writer
        # Whether a person opted out of storage (their votes are then not stored).
        self.opted_out = opted_out
        # Whether a place stores what is said there (feedback on answers there too).
        self.logging_on = logging_on

    async def vote(
        self,
        answer_id: str,
        voter: Author,
        value: int,
        *,
        source: VoteSource,
        reason: str | None = None,
        comment: str | None = None,
    ) -> VoteOutcome:
        """Record `voter`'s 👍 (1) or 👎 (-1) on an answer, replacing an earlier vote of theirs."""
        if value not in (1, -1):
            raise ValueError("a vote is 1 or -1")
        if reason is not None and reason not in VOTE_REASONS:
            raise UserError(f"Unknown reason {reason!r}; choose one of: {', '.join(VOTE_REASONS)}.")
        if comment is not None:
            comment = clean(comment)[0].strip()[:1000] or None
        if self.opted_out is not None and await self.opted_out(voter.id):
            await self.answer(answer_id)  # still say so when the answer is unknown
            return VoteOutcome(answer_id, value, None, stored=False)
        if not await self._logged(answer_id):
            return VoteOutcome(answer_id, value, None, stored=False)

        async def work(repo: FeedbackRepository, answer: Message) -> int | None:
            return await repo.vote(
                answer,
                voter_id=voter.id,
                voter_name=clean(voter.name)[0],
                value=value,
                source=source,
                reason=reason if value < 0 else None,
                comment=comment if value < 0 else None,
            )

        previous = await self._write(answer_id, work)
        return VoteOutcome(answer_id, value, previous)

    async def unvote(
        self, answer_id: str, voter: Author, *, only: int | None = None
    ) -> VoteOutcome:
        """Take back `voter`'s vote on an answer (nothing to take back is fine).

        With `only` (1 or -1), the vote goes only while it is that value: a person who
        reacted 👍, then 👎, and takes the 👍 away still means 👎.
        """

        async def work(repo: FeedbackRepository, answer: Message) -> tuple[int, int | None]:
            if only is not None:
                current = await repo.vote_of(answer.id, voter.id)
                if current is not None and current.value != only:
                    return current.value, current.value  # kept as it is
            return 0, await repo.unvote(answer.id, voter.id)

        value, previous = await self._write(answer_id, work)
        return VoteOutcome(answer_id, value, previous)

    async def correct(self, answer_id: str, author: Author, text: str) -> Correction:
        """Store `author`'s better answer to the prompt `answer_id` answered."""
        text, cleaned = clean(text)
        text = text.strip()
        if not text:
            raise UserError("The correction is empty: write the answer you would have wanted.")
        if len(text) > CORRECTION_LIMIT:
            raise UserError(
                f"That correction is {len(text):,} characters; the limit is {CORRECTION_LIMIT:,}."
            )
        if self.opted_out is not None and await self.opted_out(author.id):
            raise UserError(
                "You opted out of storage, so a correction cannot be kept. `/privacy opt-in` to allow it."
            )
        if not await self._logged(answer_id):
            raise UserError(
                "Nothing said where that answer was given is stored (logging is off there), "
                "so a correction cannot be kept."
            )

        async def work(repo: FeedbackRepository, answer: Message) -> str:
            return await repo.add_correction(
                answer,
                author_id=author.id,
                author_name=clean(author.name)[0],
                text=text,
                cleaned=cleaned,
            )

        return Correction(await self._write(answer_id, work), answer_id)

    async def answer_text(self, answer_id: str) -> str:
        """The text of an answer (to start a correction from)."""
        return (await self.answer(answer_id)).content

    async def stats(
        self,
        *,
        guild_id: int | None,
        channel_id: int | None = None,
        model: str | None = None,
        since: datetime | None = None,
    ) -> FeedbackStats:
        """Answers, votes, share 👍 with its interval, top reasons and corrections per model."""
        async with self.sessions() as session:
            rows = await FeedbackRepository(session).stats(
                guild_id=guild_id, channel_id=channel_id, model_name=model, since=since
            )
        models = [
            ModelFeedback(r.model_name, r.answers, r.up, r.down, r.corrections, r.reasons)
            for r in rows
        ]
        models.sort(key=lambda m: (-m.votes, -m.answers, m.model))
        return FeedbackStats(tuple(models))

    async def answer(self, answer_id: str) -> Message:
        """The answer, waiting briefly for the log writer if it may still be on its way."""
        for attempt in range(2):
            # Read before the query: a write committing while it runs is still waited for.
            waiting = self.writer.pending
            async with self.sessions() as session:
                answer = await FeedbackRepository(session).votable(answer_id)
            if answer is not None:
                return answer
            if attempt == 0 and waiting:
                await self._drain()
        raise NotFound(UNKNOWN_ANSWER)

    async def _logged(self, answer_id: str) -> bool:
        """Whether the place the answer was given in stores what is said there now (NotFound
        for an answer the log does not know)."""
        if self.logging_on is None:
            return True
        answer = await self.answer(answer_id)
        return await self.logging_on(
            Place(answer.guild_id, answer.channel_id or 0, answer.thread_id)
        )

    async def _write(
        self, answer_id: str, work: Callable[[FeedbackRepository, Message], Awaitable[T]]
    ) -> T:
        """Run `work` on the answer in one transaction; a database that is away is one line."""
        try:
            for attempt in range(2):
                waiting = self.writer.pending  # before the query (see `answer`)
                try:
                    async with self.sessions() as session, session.begin():
                        repo = FeedbackRepository(session)
                        answer = await repo.votable(answer_id)
                        if answer is None:
                            if attempt == 0 and waiting:
                                await self._drain()
                                continue
                            raise NotFound(UNKNOWN_ANSWER)
                        return await work(repo, answer)
                except IntegrityError:
                    # A concurrent first vote of the same person on the same answer: the
                    # second try finds it and updates it.
                    if attempt:
                        raise
            raise NotFound(UNKNOWN_ANSWER)
        except UserError:
            raise
        except Exception as exc:
            if is_outage(exc):
                raise StorageUnavailable(
                    f"Your feedback could not be saved: the database cannot be written right now "
                    f"({failure_reason(exc)}). Try again in a moment."
                ) from exc
            raise

    async def _drain(self) -> None:
        try:
            await self.writer.drain(timeout=ANSWER_WAIT_S)
        except TimeoutError:
            pass
