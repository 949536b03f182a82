"""What the exchange log does about privacy: anonymous counts added up, deleted messages
never brought back by exchanges still waiting, Discord deletions in order (real databases)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from sqlalchemy import select

from store.db import create_engine, create_session_factory
from store.exchange_log import ExchangeLog
from store.models import Message, new_id
from store.repositories import (
    AnonymousCountRepository,
    AnonymousCountRow,
    ConversationRepository,
)
from store.writer import LogWriter
from tests.fixtures.store import sqlite_url
from tests.test_store_exchange_log import Sessions, exchange, logged_answer

DAY = date(2026, 12, 1)


async def contents(sessions: Sessions) -> list[str]:
    async with sessions() as session:
        return sorted((await session.scalars(select(Message.content))).all())


async def test_anonymous_counts_are_added_up_before_they_are_written(
    any_session_factory: Sessions,
) -> None:
    writer = LogWriter(any_session_factory)
    log = ExchangeLog(writer)
    for tokens in (10, 20, 30):
        log.count_anonymous(AnonymousCountRow(DAY, 5, "main", 1, tokens, 1, 0.5))
    log.count_anonymous(AnonymousCountRow(DAY, 5, "solo", 1, 1, 1, 0.0))
    async with writer:
        await writer.drain(timeout=60)
    assert writer.written == 1  # one write for everything that was waiting
    async with any_session_factory() as session:
        totals = await AnonymousCountRepository(session).totals()
    assert totals == [
        AnonymousCountRow(DAY, 5, "main", 3, 60, 3, 1.5),
        AnonymousCountRow(DAY, 5, "solo", 1, 1, 1, 0.0),
    ]


async def test_counts_and_deletions_kept_over_a_shutdown_are_written_at_the_next_start(
    session_factory: Sessions, tmp_path: Path
) -> None:
    # A database file that is not there: every write fails and is kept, then spilled.
    away = create_engine(sqlite_url(tmp_path / "away" / "switchboard.db"))
    writer = LogWriter(
        create_session_factory(away), spill_dir=tmp_path / "unwritten", retries=0, backoff=0
    )
    log = ExchangeLog(writer)
    async with writer:
        log.add(exchange(text="deleted in Discord", discord_message_id=500))
        log.count_anonymous(AnonymousCountRow(DAY, 0, "main", 1, 2, 3, 0.25))
        log.delete_discord_prompt(500)
        await writer.drain(timeout=60)
    await away.dispose()
    assert writer.spilled is not None and writer.dropped == 0

    # The next start replays them in order: the exchange, then its deletion.
    replayed = ExchangeLog(LogWriter(session_factory))
    assert replayed.replay_folder(tmp_path / "unwritten") == 3
    async with replayed.writer:
        await replayed.writer.drain(timeout=60)
    assert await contents(session_factory) == []
    async with session_factory() as session:
        [row] = await AnonymousCountRepository(session).totals()
    assert (row.exchanges, row.cost_usd) == (1, 0.25)


async def test_waiting_exchanges_never_bring_deleted_words_back(
    any_session_factory: Sessions,
) -> None:
    writer = LogWriter(any_session_factory)
    log = ExchangeLog(writer)
    first = exchange(text="forgotten words", discord_message_id=500)
    expired = exchange(text="an expired turn", discord_message_id=501)
    log.add(first)
    log.add(expired)
    async with writer:
        await writer.drain(timeout=60)
        # Built on them, still waiting when they are deleted:
        on_forgotten_prompt = new_id()
        on_forgotten = exchange(
            prompt_id=on_forgotten_prompt,
            conversation_id=first.conversation_id,
            parent_id=first.answers[0].id,
            text="built on forgotten words",
            answers=(logged_answer(input_ids=(first.prompt_id, on_forgotten_prompt)),),
        )
        on_expired_prompt = new_id()
        on_expired = exchange(
            prompt_id=on_expired_prompt,
            conversation_id=expired.conversation_id,
            parent_id=expired.answers[0].id,
            text="built on an expired turn",
            answers=(logged_answer(input_ids=(expired.prompt_id, on_expired_prompt)),),
        )
        log.forget_ids([first.prompt_id, first.answers[0].id])
        log.forget_ids([expired.prompt_id, expired.answers[0].id], words=False)
        async with any_session_factory() as session, session.begin():
            await ConversationRepository(session).delete_messages(
                [first.prompt_id, expired.prompt_id]
            )
        log.add(on_forgotten)
        log.add(on_expired)
        log.link_discord_messages(first.answers[0].id, first.conversation_id, [900])
        await writer.drain(timeout=60)
    assert writer.kept == 0, writer.problem  # nothing refers to a row that is gone
    assert await contents(any_session_factory) == ["4", "built on an expired turn"]
    assert log.is_gone(first.prompt_id) and not log.is_gone(expired.prompt_id)
    assert log.is_deleted(expired.prompt_id)
    async with any_session_factory() as session:
        row = await session.get(Message, on_expired_prompt)
        assert row is not None and row.parent_id is None
