"""Which conversation a message continues, and the history it brings.

A conversation is a Discord thread, a DM channel, a reply chain in a channel (replying to
one of the bot's answers continues its line; a fresh mention starts anew), or a terminal
session. `ConversationIndex` answers "which conversation, continuing from which message?"
and "what came before it?" from memory where it can, and from the database otherwise.

What it keeps in memory (each a bounded LRU, so a long-running bot stays small):
- turns: recent messages (id -> Turn), so history is a walk up parent links in memory;
- leaves: each conversation's newest message, which the next prompt continues from;
- carriers: the Discord messages that carry answers (id -> where), and known misses,
  because every reply between two people asks;
- running: the conversation held in a thread or DM channel, or a known miss;
- stored: conversations known to be in the database (no need to wait for the log writer).

The caches assume one process answers a given thread or channel (Discord shards split
by server, so they never share one); another process's writes are found in the database
once this one's cache misses.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.cache import LRU, MISS, Miss
from core.messages import ChatRequest
from store.db import failure_reason, is_outage
from store.models import Message
from store.repositories import ConversationRepository
from store.writer import LogWriter

log = logging.getLogger(__name__)

# Recent turns kept in memory so a busy conversation never waits on the log writer.
TURN_CACHE_SIZE = 50_000
# How long a lookup waits for the log writer when the conversation may still be on its way.
DRAIN_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class Turn:
    """One message, as much as history needs (stored, or remembered here only)."""

    id: str
    conversation_id: str
    role: str
    content: str
    parent_id: str | None
    author_id: int | None = None  # who wrote a prompt; None for answers
    # False: the exchange was answered but not stored (see bot.service.privacy).
    stored: bool = True
    # Its text may never be stored, not even as another answer's history: an opted-out
    # person's exchange, or one in a place that logs nothing.
    private: bool = False


@dataclass(frozen=True, slots=True)
class Located:
    """Where a message sits: its conversation, and the message the next prompt follows."""

    conversation_id: str
    leaf_id: str | None  # None: the conversation is new


class ConversationIndex:
    """Resolves conversations and their history; remembers recent turns in memory."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        writer: LogWriter,
        size: int = TURN_CACHE_SIZE,
    ) -> None:
        self.sessions = sessions
        self.writer = writer
        self._turns: LRU[str, Turn] = LRU(size)
        self._leaves: LRU[str, str] = LRU(size)  # conversation id -> newest message id
        self._carriers: LRU[int, Located | Miss] = LRU(size)  # Discord message id -> answer
        self._running: LRU[int, str | Miss] = LRU(size)  # thread or DM channel id -> conversation
        self._stored: LRU[str, bool] = LRU(size)  # conversation ids known to be in the database

    async def resolve(self, request: ChatRequest) -> Located:
        """The conversation `request` belongs to and the message it continues from."""
        place = request.place
        if request.conversation_id:
            return Located(request.conversation_id, await self._leaf_of(request.conversation_id))
        if request.reply_to_discord_id is not None:
            found = await self.find_carrier(request.reply_to_discord_id)
            if found is not None:
                self._stored.put(found.conversation_id, True)
                return found
        # A thread is one conversation; so is a DM channel (people rarely use replies there).
        running_key = (
            place.thread_id
            if place.thread_id is not None
            else (place.channel_id if place.is_dm else None)
        )
        if running_key is None:
            return Located(uuid.uuid4().hex, None)
        cached = self._running.get(running_key)
        if isinstance(cached, str):
            return Located(cached, await self._leaf_of(cached))
        conversation = None
        if cached is None:
            try:
                async with self.sessions() as session:
                    repo = ConversationRepository(session)
                    if place.thread_id is not None:
                        conversation = await repo.latest_for_thread(place.thread_id)
                    else:
                        conversation = await repo.latest_for_dm(place.channel_id)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning(
                    "conversation lookup failed (%s); starting a new one", failure_reason(exc)
                )
                return Located(uuid.uuid4().hex, None)
        if conversation is None:
            conversation_id = uuid.uuid4().hex
            self._running.put(running_key, conversation_id)
            # A thread started from one of our answers has that message's id: the
            # thread picks up the answer's line of conversation.
            started_from = await self.find_carrier(place.thread_id) if place.thread_id else None
            return Located(conversation_id, started_from.leaf_id if started_from else None)
        self._running.put(running_key, conversation.id)
        self._stored.put(conversation.id, True)
        return Located(conversation.id, await self._leaf_of(conversation.id))

    async def history(self, leaf_id: str | None, limit: int) -> list[Turn]:
        """The turns from the conversation's start to `leaf_id`, oldest first.

        Turns older than the in-memory window are read from the database, at most `limit`.
        Failed attempts carry no text worth replaying and are left out.
        """
        if leaf_id is None:
            return []
        turns: list[Turn] = []
        cursor: str | None = leaf_id
        while cursor is not None:
            turn = self._turns.get(cursor)
            if turn is None:
                break
            turns.append(turn)
            cursor = turn.parent_id
        if cursor is not None:
            try:
                async with self.sessions() as session:
                    rows = await ConversationRepository(session).lineage(cursor, limit)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.warning(
                    "history could not be read (%s); answering with what is in memory",
                    failure_reason(exc),
                )
                rows = []
            for row in reversed(rows):
                turns.append(
                    Turn(
                        row.id,
                        row.conversation_id,
                        row.role,
                        row.content,
                        row.parent_id,
                        row.author_id,
                    )
                )
        turns.reverse()
        return [t for t in turns if t.content]

    def remember(self, conversation_id: str, prompt: Turn, answer: Turn | None) -> None:
        """Record a finished exchange: the next prompt continues from its answer (or prompt)."""
        self._stored.put(conversation_id, True)
        self._turns.put(prompt.id, prompt)
        leaf = prompt
        if answer is not None:
            self._turns.put(answer.id, answer)
            leaf = answer
        self._leaves.put(conversation_id, leaf.id)

    def stored_ancestor(self, message_id: str | None) -> str | None:
        """`message_id`, or its nearest ancestor that is stored (None: none is).

        A turn this process no longer remembers came from the database, or was stored.
        """
        cursor = message_id
        while cursor is not None:
            turn = self._turns.get(cursor)
            if turn is None or turn.stored:
                return cursor
            cursor = turn.parent_id
        return None

    def is_stored(self, message_id: str) -> bool:
        """Whether a message is (or is on its way to being) stored, as far as memory knows."""
        turn = self._turns.get(message_id)
        return turn is None or turn.stored

    def forget(self, message_ids: set[str], author_id: int | None = None) -> int:
        """Drop these messages (and, given an author, every prompt of theirs and the answers
        to it) from memory, with whatever points at them; returns how many turns went.

        Conversations whose newest message went are read from the database next time.
        """
        doomed = set(message_ids)
        if author_id is not None:
            prompts = {key for key, turn in self._turns.items() if turn.author_id == author_id}
            doomed |= prompts
            doomed |= {key for key, turn in self._turns.items() if turn.parent_id in prompts}
        dropped = 0
        for key in doomed:
            if self._turns.pop(key) is not None:
                dropped += 1
        for conversation_id, leaf in self._leaves.items():
            if leaf in doomed:
                self._leaves.pop(conversation_id)
                self._stored.pop(conversation_id)
        for discord_id, located in self._carriers.items():
            if isinstance(located, Located) and located.leaf_id in doomed:
                self._carriers.pop(discord_id)
        return dropped

    def link_carriers(
        self, answer_id: str, conversation_id: str, discord_message_ids: Sequence[int]
    ) -> None:
        """Remember that these Discord messages carry `answer_id` (replacing known misses)."""
        located = Located(conversation_id, answer_id)
        for discord_id in discord_message_ids:
            self._carriers.put(discord_id, located)

    async def find_carrier(self, discord_message_id: int) -> Located | None:
        """The answer a Discord message of ours carries, with its conversation; None if none."""
        found = self._carriers.get(discord_message_id)
        if found is not None:
            return None if found is MISS else found
        try:
            async with self.sessions() as session:
                row = await ConversationRepository(session).find_by_discord_message(
                    discord_message_id
                )
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("answer lookup failed (%s)", failure_reason(exc))
            return None  # not remembered: the next lookup asks again
        located = Located(row[0], row[1]) if row is not None else None
        # Remember misses too: every reply between two people asks. link_carriers replaces them.
        self._carriers.put(discord_message_id, located if located is not None else MISS)
        return located

    async def stored_message(self, message_id: str) -> Message | None:
        """A stored message by id (None when it is not in the database)."""
        async with self.sessions() as session:
            return await ConversationRepository(session).get_message(message_id)

    async def has_conversation(self, thread_id: int) -> bool:
        """Whether the bot converses in this thread (or the thread grew out of one of its answers)."""
        cached = self._running.get(thread_id)
        if cached is not None:
            return cached is not MISS
        try:
            async with self.sessions() as session:
                conversation = await ConversationRepository(session).latest_for_thread(thread_id)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("thread lookup failed (%s)", failure_reason(exc))
            return False  # not remembered: the next message asks again
        if conversation is not None:
            self._running.put(thread_id, conversation.id)
            self._stored.put(conversation.id, True)
            return True
        if await self.find_carrier(thread_id) is not None:
            return True
        self._running.put(thread_id, MISS)
        return False

    async def _leaf_of(self, conversation_id: str) -> str | None:
        """The newest message of a conversation; None if it has none (it is new)."""
        leaf = self._leaves.get(conversation_id)
        if leaf is not None:
            return leaf
        if self._stored.get(conversation_id) is None:
            await self.writer.drain(
                timeout=DRAIN_WAIT_S
            )  # it may still be on its way to the database
        async with self.sessions() as session:
            messages = await ConversationRepository(session).messages(conversation_id)
        if not messages:
            return None
        self._stored.put(conversation_id, True)
        return messages[-1].id
