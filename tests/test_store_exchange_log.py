"""ExchangeLog: how an Exchange becomes rows, on real migrated databases."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.exchange import Exchange, LoggedAnswer
from core.messages import Place
from store.exchange_log import ExchangeLog
from store.models import Conversation, Message, new_id
from store.repositories import ConversationRepository
from store.writer import LogWriter

Sessions = async_sessionmaker[AsyncSession]
PLACE = Place(guild_id=1000, channel_id=2000, thread_id=3000)
ALICE = 11


def logged_answer(kind: str = "answer", **fields: Any) -> LoggedAnswer:
    """An answer with every metric set."""
    values: dict[str, Any] = {
        "id": new_id(), "kind": kind, "model_name": "smollm2", "provider": "local",
        "provider_model": "smollm2-135m", "content": "4",
        "request_messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 2+2?"}],
        "input_ids": (), "status": "ok", "prompt_tokens": 12, "completion_tokens": 1,
        "latency_ms": 80.5, "ttft_ms": 20.0, "cost_usd": 0.0001,
    }  # fmt: skip
    return LoggedAnswer(**{**values, **fields})


def exchange(**fields: Any) -> Exchange:
    """A Discord exchange in a thread, with one answer that used the prompt."""
    prompt = fields.pop("prompt_id", new_id())
    values: dict[str, Any] = {
        "conversation_id": new_id(), "place": PLACE, "origin": "discord", "prompt_id": prompt,
        "parent_id": None, "author_id": ALICE, "author_name": "alice", "text": "What is 2+2?",
        "system_prompt": "Be brief.", "answers": (logged_answer(input_ids=(prompt,)),),
        "source_ids": ("doc-1:0", "doc-1:3"), "discord_message_id": 500,
    }  # fmt: skip
    return Exchange(**{**values, **fields})


async def log(sessions: Sessions, *exchanges: Exchange) -> LogWriter:
    """Log the exchanges through a LogWriter, as the service does, and wait for the write."""
    writer = LogWriter(sessions)
    exchange_log = ExchangeLog(writer)
    for item in exchanges:
        exchange_log.add(item)
    async with writer:
        await writer.drain(timeout=60)
    return writer


async def test_an_exchange_with_a_fallback_becomes_rows(any_session_factory: Sessions) -> None:
    prompt = new_id()
    failed = logged_answer("attempt", model_name="gpt-4o", provider="openai", provider_model="gpt-4o",
                           content="", status="error", error="429 Too Many Requests",
                           prompt_tokens=None, completion_tokens=None, latency_ms=None, ttft_ms=None,
                           cost_usd=None, input_ids=(prompt,))  # fmt: skip
    answer = logged_answer(status="fallback", fallback_from="gpt-4o", input_ids=(prompt,))
    first = exchange(prompt_id=prompt, answers=(failed, answer))
    writer = await log(any_session_factory, first)
    assert (writer.written, writer.failed, writer.transactions) == (1, 0, 1)

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        conversation = await repo.get(first.conversation_id)
        assert conversation is not None
        assert (conversation.guild_id, conversation.channel_id, conversation.thread_id,
                conversation.started_by, conversation.origin) == (1000, 2000, 3000, ALICE, "discord")  # fmt: skip
        rows = await repo.messages(first.conversation_id)
        assert [(m.id, m.role, m.kind) for m in rows] == [
            (prompt, "user", "prompt"), (failed.id, "assistant", "attempt"),
            (answer.id, "assistant", "answer"),
        ]  # fmt: skip
        assert rows[0].created_at < rows[1].created_at < rows[2].created_at
        user, attempt, final = rows
        assert (user.parent_id, user.content, user.author_id, user.author_name,
                user.discord_message_id) == (None, "What is 2+2?", ALICE, "alice", 500)  # fmt: skip
        assert (user.system_prompt, user.request_messages, user.model_name) == (None, None, None)
        for row in rows:
            assert (row.guild_id, row.channel_id, row.thread_id) == (1000, 2000, 3000)
        assert attempt.parent_id == final.parent_id == prompt
        assert (attempt.status, attempt.error, attempt.content, attempt.model_name) == (
            "error", "429 Too Many Requests", "", "gpt-4o",
        )  # fmt: skip
        assert (final.model_name, final.provider, final.provider_model) == (
            "smollm2",
            "local",
            "smollm2-135m",
        )
        assert final.request_messages == list(answer.request_messages)
        assert final.system_prompt == "Be brief."
        assert final.source_ids == ["doc-1:0", "doc-1:3"]
        assert (final.prompt_tokens, final.completion_tokens, final.status, final.fallback_from) == (
            12, 1, "fallback", "gpt-4o",
        )  # fmt: skip
        assert (final.latency_ms, final.ttft_ms, final.cost_usd) == (80.5, 20.0, 0.0001)
        assert (final.author_id, final.discord_message_id) == (None, None)
        assert await repo.inputs_of(final.id) == [prompt]
        assert await repo.answers_using([prompt]) == [failed.id, answer.id]


async def test_a_later_exchange_links_its_history_and_can_reuse_a_stored_prompt(
    any_session_factory: Sessions,
) -> None:
    first = exchange()
    (first_answer,) = first.answers
    reply_id = new_id()
    # Bob replies to the answer: his answer was built from the whole line.
    reply = exchange(
        conversation_id=first.conversation_id, prompt_id=reply_id, parent_id=first_answer.id,
        author_id=22, author_name="bob", text="And times 3?", discord_message_id=None,
        answers=(logged_answer(content="12", input_ids=(first.prompt_id, first_answer.id, reply_id)),),
        source_ids=(),
    )  # fmt: skip
    # Another answer to Bob's stored prompt, asked for on purpose: no second prompt row.
    alternative = replace(
        reply, new_prompt=False, answers=(logged_answer("alternative", content="Twelve.",
                                                        input_ids=(first.prompt_id, first_answer.id, reply_id)),)
    )  # fmt: skip
    await log(any_session_factory, first, reply)
    await log(any_session_factory, alternative)

    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        rows = await repo.messages(first.conversation_id)
        assert [(m.content, m.kind) for m in rows] == [
            ("What is 2+2?", "prompt"), ("4", "answer"), ("And times 3?", "prompt"),
            ("12", "answer"), ("Twelve.", "alternative"),
        ]  # fmt: skip
        assert rows[2].parent_id == first_answer.id and rows[2].author_id == 22
        assert rows[3].parent_id == rows[4].parent_id == reply_id
        assert rows[3].source_ids == []
        assert await repo.inputs_of(rows[4].id) == [first.prompt_id, first_answer.id, reply_id]
        assert await repo.answers_using([first.prompt_id]) == [
            first_answer.id,
            rows[3].id,
            rows[4].id,
        ]
        assert len((await session.scalars(select(Conversation.id))).all()) == 1


async def test_waiting_exchanges_are_one_write_of_three_inserts(
    any_session_factory: Sessions,
) -> None:
    writer = LogWriter(any_session_factory)
    exchange_log = ExchangeLog(writer)
    conversation_id = new_id()
    for _ in range(30):
        exchange_log.add(exchange(conversation_id=conversation_id))
    inserts: list[str] = []
    engine = any_session_factory.kw["bind"]

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append(statement.split("(")[0])

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        async with writer:
            await writer.drain(timeout=60)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert (writer.submitted, writer.transactions) == (1, 1)
    assert len(inserts) == 3, inserts  # conversations, messages, message_inputs
    async with any_session_factory() as session:
        rows = await ConversationRepository(session).messages(conversation_id)
    assert len(rows) == 60
    assert [m.kind for m in rows] == ["prompt", "answer"] * 30
    times = [m.created_at for m in rows]
    assert times == sorted(times) and len(set(times)) == 60


async def test_a_retried_write_writes_the_same_rows(any_session_factory: Sessions) -> None:
    """The write is rolled back once (as after a lost connection) and run again."""
    writer = LogWriter(any_session_factory)
    exchange_log = ExchangeLog(writer)
    item = exchange()
    exchange_log.add(item)
    write = writer._queue.get_nowait().op  # type: ignore[union-attr]

    async with any_session_factory() as session:
        await write(session)
        first = [
            (m.id, m.created_at)
            for m in await ConversationRepository(session).messages(item.conversation_id)
        ]
        await session.rollback()
    later = exchange()
    exchange_log.add(later)  # arrives after the first attempt: the next write's
    async with any_session_factory() as session, session.begin():
        await write(session)

    async with any_session_factory() as session:
        rows = await ConversationRepository(session).messages(item.conversation_id)
        assert [(m.id, m.created_at) for m in rows] == first
        assert len((await session.scalars(select(Message))).all()) == 2
    assert writer.pending == 2
    await writer.aclose()  # writes the later exchange
    async with any_session_factory() as session:
        assert len(await ConversationRepository(session).messages(later.conversation_id)) == 2
        assert len((await session.scalars(select(Message))).all()) == 4


async def logged(sessions: Sessions, *exchanges: Exchange) -> tuple[LogWriter, ExchangeLog]:
    writer = LogWriter(sessions)
    exchange_log = ExchangeLog(writer)
    for item in exchanges:
        exchange_log.add(item)
    async with writer:
        await writer.drain(timeout=60)
    return writer, exchange_log


async def test_text_no_database_stores_fails_alone_and_is_stored_cleaned(
    any_session_factory: Sessions,
) -> None:
    # NUL bytes (PostgreSQL refuses them) and a lone surrogate (no UTF-8 encoder takes it),
    # as if something had reached the log without passing the service's cleaning.
    before, after = exchange(text="before"), exchange(text="after")
    odd_prompt = new_id()
    odd = exchange(
        prompt_id=odd_prompt,
        text="nul\x00 and \udcff here",
        answers=(logged_answer(content="echo \x00", input_ids=(odd_prompt,)),),
    )
    writer, exchange_log = await logged(any_session_factory, before, odd, after)
    assert writer.failed == 0 and exchange_log.isolated == 3 and exchange_log.cleaned == 1
    async with any_session_factory() as session:
        repo = ConversationRepository(session)
        for good in (before, after):
            [prompt, answer] = await repo.messages(good.conversation_id)
            assert prompt.content == good.text and not prompt.cleaned and not answer.cleaned
        [prompt, answer] = await repo.messages(odd.conversation_id)
    assert prompt.content == "nul and \ufffd here" and prompt.cleaned
    assert answer.content == "echo " and answer.cleaned
    assert await inputs_of(any_session_factory, answer.id) == [odd_prompt]


async def test_an_exchange_that_cannot_be_stored_never_takes_the_rest_of_its_conversation(
    any_session_factory: Sessions,
) -> None:
    conversation = new_id()
    first = exchange(conversation_id=conversation, text="first")
    # Not storable even cleaned (it breaks the kind CHECK constraint): it is left out...
    bad_prompt = new_id()
    bad_answer = logged_answer(
        kind="bogus", input_ids=(first.prompt_id, first.answers[0].id, bad_prompt)
    )
    bad = exchange(
        conversation_id=conversation, prompt_id=bad_prompt, parent_id=first.answers[0].id,
        text="second", answers=(bad_answer,),
    )  # fmt: skip
    # ...and the exchange that continues from it starts a new line instead of being lost too.
    third_prompt = new_id()
    third_answer = logged_answer(
        input_ids=(first.prompt_id, bad_prompt, bad_answer.id, third_prompt)
    )
    third = exchange(
        conversation_id=conversation, prompt_id=third_prompt, parent_id=bad_answer.id,
        text="third", answers=(third_answer,),
    )  # fmt: skip
    writer, exchange_log = await logged(any_session_factory, first, bad, third)
    assert writer.failed == 0 and exchange_log.lost == 1
    assert exchange_log.is_lost(bad_answer.id) and not exchange_log.is_lost(third_answer.id)
    async with any_session_factory() as session:
        rows = await ConversationRepository(session).messages(conversation)
    assert [row.content for row in rows] == ["first", "4", "third", "4"]
    assert rows[2].parent_id is None
    assert await inputs_of(any_session_factory, third_answer.id) == [first.prompt_id, third_prompt]

    # Later writes that refer to it still go in.
    later_prompt = new_id()
    later = exchange(
        conversation_id=conversation, prompt_id=later_prompt, parent_id=third_answer.id, text="fourth",
        answers=(logged_answer(input_ids=(third_prompt, third_answer.id, later_prompt)),),
    )  # fmt: skip
    writer = LogWriter(any_session_factory)
    exchange_log.writer = writer
    exchange_log.add(later)
    async with writer:
        await writer.drain(timeout=60)
    async with any_session_factory() as session:
        rows = await ConversationRepository(session).messages(conversation)
    assert [row.content for row in rows][-2:] == ["fourth", "4"] and rows[
        -2
    ].parent_id == third_answer.id


async def inputs_of(sessions: Sessions, answer_id: str) -> list[str]:
    async with sessions() as session:
        return await ConversationRepository(session).inputs_of(answer_id)
