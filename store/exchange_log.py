"""Exchanges waiting to be logged, written in as few statements as possible.

At a busy moment many exchanges finish while the log writer is still busy with the
last write; they are all written by the next write, as one insert of conversations and
one of messages, instead of two statements each. The chat service builds each
`core.exchange.Exchange`; this maps it to rows and decides how they reach the database.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.exchange import Exchange
from store.repositories import ConversationRepository
from store.writer import LogWriter, WriteOp


def conversation_row(exchange: Exchange) -> dict[str, Any]:
    """The exchange's conversation, created by the first exchange that reaches the database."""
    place = exchange.place
    return {
        "id": exchange.conversation_id,
        "guild_id": place.guild_id,
        "channel_id": place.channel_id,
        "thread_id": place.thread_id,
        "started_by": exchange.author_id,
        "origin": exchange.origin,
    }


def message_rows(exchange: Exchange) -> list[dict[str, Any]]:
    """The prompt (unless it is stored already) and each answer, in order."""
    place = exchange.place
    common = {
        "conversation_id": exchange.conversation_id,
        "guild_id": place.guild_id,
        "channel_id": place.channel_id,
        "thread_id": place.thread_id,
    }
    rows: list[dict[str, Any]] = []
    if exchange.new_prompt:
        rows.append(
            {
                **common,
                "id": exchange.prompt_id,
                "parent_id": exchange.parent_id,
                "role": "user",
                "content": exchange.text,
                "author_id": exchange.author_id,
                "author_name": exchange.author_name,
                "discord_message_id": exchange.discord_message_id,
            }
        )
    source_ids = list(exchange.source_ids)
    for answer in exchange.answers:
        rows.append(
            {
                **common,
                "id": answer.id,
                "parent_id": exchange.prompt_id,
                "role": "assistant",
                "content": answer.content,
                "model_name": answer.model_name,
                "provider": answer.provider,
                "provider_model": answer.provider_model,
                "system_prompt": exchange.system_prompt,
                "request_messages": answer.request_messages,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "latency_ms": answer.latency_ms,
                "ttft_ms": answer.ttft_ms,
                "cost_usd": answer.cost_usd,
                "status": answer.status,
                "error": answer.error,
                "fallback_from": answer.fallback_from,
                "source_ids": source_ids,
            }
        )
    return rows


class ExchangeLog:
    """Collects exchanges and hands the LogWriter one write for all that are waiting."""

    def __init__(self, writer: LogWriter) -> None:
        self.writer = writer
        self._waiting: list[Exchange] = []

    def add(self, exchange: Exchange) -> None:
        """Log one exchange: its conversation (created unless stored) and its messages, in order."""
        first = not self._waiting
        self._waiting.append(exchange)
        if first:
            # One write is queued for everything that arrives before it runs.
            self.writer.submit(self._write_waiting(), f"log exchange {exchange.prompt_id}")

    def _write_waiting(self) -> WriteOp:
        taken: list[Exchange] | None = None

        async def write(session: AsyncSession) -> None:
            nonlocal taken
            if taken is None:
                # Taken on the first attempt; a retry writes the same exchanges again.
                taken, self._waiting = self._waiting, []
            repo = ConversationRepository(session)
            await repo.ensure([conversation_row(exchange) for exchange in taken])
            await repo.add_messages([row for exchange in taken for row in message_rows(exchange)])

        return write
