"""LogWriter: ordered, batched, retried background writes on a real SQLite file."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from store.models import Conversation, Message, new_id
from store.repositories import ConversationRepository
from store.writer import LogWriter, WriteOp

Sessions = async_sessionmaker[AsyncSession]


def add_conversation(conversation_id: str) -> WriteOp:
    """An op that logs one conversation with a prompt and its answer."""

    async def op(session: AsyncSession) -> None:
        repo = ConversationRepository(session)
        await repo.create(id=conversation_id, guild_id=1, channel_id=2, thread_id=None,
                          started_by=3, origin="discord")  # fmt: skip
        prompt = new_id()
        await repo.add_messages([
            {"id": prompt, "conversation_id": conversation_id, "role": "user", "content": "hi"},
            {"conversation_id": conversation_id, "parent_id": prompt, "role": "assistant",
             "content": "hello"},
        ])  # fmt: skip

    return op


def orphan_message() -> WriteOp:
    """An op the database refuses every time: its conversation does not exist."""

    async def op(session: AsyncSession) -> None:
        await ConversationRepository(session).add_messages(
            [{"conversation_id": new_id(), "role": "user", "content": "lost"}]
        )

    return op


async def conversation_ids(sessions: Sessions) -> list[str]:
    """The ids of the stored conversations."""
    async with sessions() as session:
        return list((await session.scalars(select(Conversation.id))).all())


def count_commits(sessions: Sessions) -> list[int]:
    """A counter of the COMMITs the engine behind `sessions` performs."""
    commits: list[int] = []
    event.listen(sessions.kw["bind"].sync_engine, "commit", lambda conn: commits.append(1))
    return commits


async def test_drain_waits_for_everything_submitted(session_factory: Sessions) -> None:
    writer = LogWriter(session_factory, backoff=0)
    await writer.start()
    ids = [new_id() for _ in range(30)]
    for cid in ids:
        writer.submit(add_conversation(cid), f"exchange {cid}")
    await writer.drain(timeout=60)

    assert sorted(await conversation_ids(session_factory)) == sorted(ids)
    assert (writer.written, writer.failed, writer.pending) == (30, 0, 0)
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 60
    await writer.aclose()


async def test_between_writes_no_write_is_half_done(session_factory: Sessions) -> None:
    writer = LogWriter(session_factory, backoff=0)
    await writer.start()
    inside = asyncio.Event()
    release = asyncio.Event()

    async def slow(session: AsyncSession) -> None:
        await add_conversation("slow")(session)
        inside.set()
        await release.wait()  # its ops ran; its commit waits

    writer.submit(slow, "a slow write")
    await inside.wait()
    # A write is half done: a reader waits for it, and is told when it waited too long.
    async with writer.between_writes(timeout=0.05) as held:
        assert not held
    reader = asyncio.create_task(_read_between_writes(writer, session_factory))
    await asyncio.sleep(0.05)
    assert not reader.done()
    release.set()
    assert await reader == ["slow"]  # committed before the reader got in
    # Held by a reader, the writer waits: what is submitted meanwhile is not written yet.
    async with writer.between_writes(timeout=5) as held:
        assert held
        writer.submit(add_conversation("later"), "a later write")
        await asyncio.sleep(0.05)
        assert await conversation_ids(session_factory) == ["slow"]
    await writer.drain(timeout=10)
    assert sorted(await conversation_ids(session_factory)) == ["later", "slow"]
    await writer.aclose()


async def _read_between_writes(writer: LogWriter, sessions: Sessions) -> list[str]:
    async with writer.between_writes(timeout=10) as held:
        assert held
        return await conversation_ids(sessions)


async def test_a_failing_op_is_retried_until_it_succeeds(session_factory: Sessions) -> None:
    attempts: list[int] = []
    cid = new_id()
    inner = add_conversation(cid)

    async def flaky(session: AsyncSession) -> None:
        await inner(session)  # its writes must be rolled back when the attempt fails
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("database went away")

    async with LogWriter(session_factory, retries=3, backoff=0) as writer:
        writer.submit(flaky, "flaky exchange")
        await writer.drain(timeout=60)
        assert (writer.written, writer.failed) == (1, 0)

    assert len(attempts) == 3
    assert await conversation_ids(session_factory) == [cid]


async def test_an_op_that_keeps_failing_is_reported_and_the_rest_written(
    session_factory: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    before, after = new_id(), new_id()
    writer = LogWriter(session_factory, retries=2, backoff=0)
    # Queued before the task starts, so the three go in one batch that the bad one sinks.
    writer.submit(add_conversation(before), "exchange before")
    writer.submit(orphan_message(), "exchange with a missing conversation")
    writer.submit(add_conversation(after), "exchange after")
    with caplog.at_level(logging.ERROR, logger="store.writer"):
        await writer.start()
        await writer.drain(timeout=60)
    await writer.aclose()

    assert sorted(await conversation_ids(session_factory)) == sorted([before, after])
    assert (writer.written, writer.failed) == (2, 1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # Reported when it failed, kept, tried once more at close, and reported as lost.
    assert len(errors) == 2 and writer.dropped == 1 and writer.kept == 0
    assert "exchange with a missing conversation" in errors[0].getMessage()
    assert "3 attempts" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert "lost at shutdown" in errors[1].getMessage()
    assert "exchange with a missing conversation" in errors[1].getMessage()


async def test_queued_ops_are_batched_into_few_transactions(session_factory: Sessions) -> None:
    commits = count_commits(session_factory)
    writer = LogWriter(session_factory, max_batch=100)
    ids = [new_id() for _ in range(200)]
    for cid in ids:
        writer.submit(add_conversation(cid), f"exchange {cid}")
    await writer.start()
    await writer.drain(timeout=120)
    await writer.aclose()

    assert len(await conversation_ids(session_factory)) == 200
    assert writer.written == 200
    assert len(commits) == writer.transactions == 2


async def test_ops_run_in_submission_order(session_factory: Sessions) -> None:
    seen: list[int] = []

    def record(i: int) -> WriteOp:
        async def op(session: AsyncSession) -> None:
            seen.append(i)

        return op

    async with LogWriter(session_factory, backoff=0) as writer:
        for i in range(20):
            writer.submit(record(i), f"op {i}")
            if i % 7 == 0:
                await asyncio.sleep(0)  # let some run while others are still being submitted
        await writer.drain(timeout=60)
    assert seen == list(range(20))


async def test_aclose_writes_what_is_queued_and_later_submits_are_reported(
    session_factory: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    writer = LogWriter(session_factory)
    ids = [new_id() for _ in range(5)]
    for cid in ids:
        writer.submit(add_conversation(cid), "exchange")
    await writer.aclose()  # never started: it still writes what was queued
    assert sorted(await conversation_ids(session_factory)) == sorted(ids)

    with caplog.at_level(logging.ERROR, logger="store.writer"):
        writer.submit(add_conversation(new_id()), "too late")  # must not raise
    assert writer.failed == 1
    assert "too late" in caplog.text


async def test_drain_times_out_while_an_op_is_stuck(session_factory: Sessions) -> None:
    release = asyncio.Event()

    async def stuck(session: AsyncSession) -> None:
        await release.wait()

    async with LogWriter(session_factory) as writer:
        writer.submit(stuck, "stuck op")
        with pytest.raises(TimeoutError):
            await writer.drain(timeout=0.05)
        assert writer.pending == 1
        release.set()
        await writer.drain(timeout=60)
        assert (writer.pending, writer.written) == (0, 1)


async def test_drain_without_start_says_so(session_factory: Sessions) -> None:
    writer = LogWriter(session_factory)
    await writer.drain()  # nothing submitted: nothing to wait for
    writer.submit(add_conversation(new_id()), "exchange")
    with pytest.raises(RuntimeError, match="start"):
        await writer.drain()
    await writer.aclose()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LogWriter(async_sessionmaker(), retries=-1)
    with pytest.raises(ValueError):
        LogWriter(async_sessionmaker(), max_batch=0)


async def test_exchange_log_writes_all_waiting_exchanges_in_one_write(
    session_factory: Sessions,
) -> None:
    from core.exchange import Exchange, LoggedAnswer
    from core.messages import Place
    from store.exchange_log import ExchangeLog

    writer = LogWriter(session_factory)
    log = ExchangeLog(writer)
    conversation_id = new_id()

    def exchange(text: str, answers: int = 1) -> Exchange:
        prompt = new_id()
        return Exchange(
            conversation_id=conversation_id, place=Place(guild_id=1, channel_id=2), origin="discord",
            prompt_id=prompt, parent_id=None, author_id=3, author_name="carol", text=text,
            system_prompt="Be brief.",
            answers=tuple(
                LoggedAnswer(id=new_id(), kind="answer", model_name="m", provider="p", provider_model="pm",
                             content=f"a-{text}", request_messages=[{"role": "user", "content": text}],
                             input_ids=(prompt,), status="ok")
                for _ in range(answers)
            ),
        )  # fmt: skip

    for i in range(50):
        log.add(exchange(f"q{i}"), f"exchange {i}")
    assert writer.submitted == 1, "exchanges waiting together are one write"
    await writer.start()
    await writer.drain(timeout=60)
    log.add(exchange("later", answers=0), "later")
    await writer.drain(timeout=60)
    await writer.aclose()
    assert writer.submitted == 2 and writer.failed == 0
    async with session_factory() as session:
        assert await session.scalar(select(func.count()).select_from(Message)) == 101
        assert await conversation_ids(session_factory) == [conversation_id]
