"""Exchanges waiting to be logged, written in as few statements as possible.

At a busy moment many exchanges finish while the log writer is still busy with the
last write; they are all written by the next write, as one insert of conversations and
one of messages, instead of two statements each. The rows are built by the chat service;
this only decides how they reach the database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from store.repositories import ConversationRepository
from store.writer import LogWriter, WriteOp


class ExchangeLog:
    """Collects exchanges and hands the LogWriter one write for all that are waiting."""

    def __init__(self, writer: LogWriter) -> None:
        self.writer = writer
        self._waiting: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []

    def add(self, conversation: dict[str, Any], messages: list[dict[str, Any]], what: str) -> None:
        """Log one exchange: its conversation (created unless stored) and its messages, in order."""
        first = not self._waiting
        self._waiting.append((conversation, messages))
        if first:
            # One write is queued for everything that arrives before it runs.
            self.writer.submit(self._write_waiting(), what)

    def _write_waiting(self) -> WriteOp:
        taken: list[tuple[dict[str, Any], list[dict[str, Any]]]] | None = None

        async def write(session: AsyncSession) -> None:
            nonlocal taken
            if taken is None:
                # Taken on the first attempt; a retry writes the same exchanges again.
                taken, self._waiting = self._waiting, []
            repo = ConversationRepository(session)
            await repo.ensure([conversation for conversation, _ in taken])
            await repo.add_messages([row for _, rows in taken for row in rows])

        return write
