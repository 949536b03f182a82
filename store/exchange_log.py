"""Exchanges waiting to be logged, mapped to rows and written in as few statements as possible.

An `Exchange` (core.exchange) becomes: its conversation row (an insert that skips a
stored one), the prompt row (unless the prompt is already stored), one row per answer
or failed attempt, and the answers' `message_inputs` links. At a busy moment many
exchanges finish while the log writer is still busy with the last write; they are all
written by the next write, as one insert each of conversations, messages and inputs.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.exchange import Exchange
from store.models import utcnow
from store.repositories import MESSAGE_COLUMNS, ConversationRepository
from store.writer import LogWriter, WriteOp

_TICK = timedelta(microseconds=1)
# A message row with every column unset: rows built on it all have the same keys.
_BLANK: dict[str, Any] = dict.fromkeys(MESSAGE_COLUMNS)


def exchange_rows(
    exchange: Exchange, at: datetime
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(conversation row, message rows, input rows) of one exchange; its messages from `at` on.

    Each message is 1 µs after the one before, so the rows keep their order.
    """
    place = exchange.place
    where = {
        "conversation_id": exchange.conversation_id,
        "guild_id": place.guild_id,
        "channel_id": place.channel_id,
        "thread_id": place.thread_id,
    }
    conversation = {
        "id": exchange.conversation_id,
        "guild_id": place.guild_id,
        "channel_id": place.channel_id,
        "thread_id": place.thread_id,
        "started_by": exchange.author_id,
        "origin": exchange.origin,
        "created_at": at,
    }
    messages: list[dict[str, Any]] = []
    if exchange.new_prompt:
        messages.append(
            {
                **_BLANK,
                **where,
                "id": exchange.prompt_id,
                "parent_id": exchange.parent_id,
                "role": "user",
                "kind": "prompt",
                "content": exchange.text,
                "author_id": exchange.author_id,
                "author_name": exchange.author_name,
                "discord_message_id": exchange.discord_message_id,
                "created_at": at,
            }
        )
        at += _TICK
    inputs: list[dict[str, Any]] = []
    for answer in exchange.answers:
        messages.append(
            {
                **_BLANK,
                **where,
                "id": answer.id,
                "parent_id": exchange.prompt_id,
                "role": "assistant",
                "kind": answer.kind,
                "content": answer.content,
                "created_at": at,
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
                "source_ids": list(exchange.source_ids),
            }
        )
        at += _TICK
        inputs.extend(
            {"answer_id": answer.id, "position": position, "input_id": input_id}
            for position, input_id in enumerate(answer.input_ids)
        )
    return conversation, messages, inputs


class ExchangeLog:
    """Collects exchanges and hands the LogWriter one write for all that are waiting."""

    def __init__(self, writer: LogWriter) -> None:
        self.writer = writer
        self._waiting: list[tuple[Exchange, datetime]] = []
        # The time the next message may have: times only go forward, so the log keeps
        # the order exchanges finished in, even when the clock does not move between two.
        self._next_at = utcnow()

    def add(self, exchange: Exchange, what: str | None = None) -> None:
        """Log one exchange; `what` names it in the log writer's error messages."""
        # Stamped now, when it finished, not when it is written: a retried or delayed
        # write keeps the times, and with them the order.
        at = max(utcnow(), self._next_at)
        self._next_at = at + _TICK * (int(exchange.new_prompt) + len(exchange.answers) or 1)
        first = not self._waiting
        self._waiting.append((exchange, at))
        if first:
            # One write is queued for everything that arrives before it runs.
            self.writer.submit(self._write_waiting(), what or f"log exchange {exchange.prompt_id}")

    def _write_waiting(self) -> WriteOp:
        taken: list[tuple[Exchange, datetime]] | None = None

        async def write(session: AsyncSession) -> None:
            nonlocal taken
            if taken is None:
                # Taken on the first attempt; a retry writes the same exchanges again.
                taken, self._waiting = self._waiting, []
            conversations: dict[str, dict[str, Any]] = {}
            messages: list[dict[str, Any]] = []
            inputs: list[dict[str, Any]] = []
            for exchange, at in taken:
                conversation, rows, links = exchange_rows(exchange, at)
                # Sent with every exchange (an insert that skips stored rows), so the log
                # never depends on knowing whether an earlier write got through.
                conversations.setdefault(conversation["id"], conversation)
                messages += rows
                inputs += links
            repo = ConversationRepository(session)
            await repo.ensure(conversations.values())
            await repo.insert_rows(messages, inputs)

        return write
