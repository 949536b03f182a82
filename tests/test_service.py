"""The chat service end to end: real SQLite with real migrations, real langchain-openai, fake model server."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from bot.app import App
from bot.present import change_line
from bot.service import STOPPED, ChatService
from core.errors import NotFound, UserError
from core.messages import (
    Author,
    ChatRequest,
    FallbackUsed,
    Place,
    ReplyDelta,
    ReplyFinished,
    ReplyStarted,
)
from store.models import Message, SettingChange
from tests.fakes.openai_server import FakeOpenAI

GUILD, CHANNEL, THREAD = 10, 20, 30
ALICE, BOB, MOD = Author(1, "alice"), Author(2, "bob"), Author(3, "mod")


def mention(
    text: str,
    author: Author = ALICE,
    discord_id: int = 500,
    reply_to: int | None = None,
    place: Place | None = None,
) -> ChatRequest:
    return ChatRequest(
        place or Place(GUILD, CHANNEL),
        author,
        text,
        discord_message_id=discord_id,
        reply_to_discord_id=reply_to,
    )


async def stored(app: App, message_id: str) -> Message:
    await app.writer.drain()
    async with app.sessions() as session:
        row = await session.get(Message, message_id)
    assert row is not None
    return row


async def test_answer_streams_and_logs_everything(chat_app: App, fake_openai: FakeOpenAI) -> None:
    events = [e async for e in chat_app.service.stream(mention("What is a switchboard?"))]
    assert isinstance(events[0], ReplyStarted) and events[0].model == "main"
    deltas = [e.text for e in events if isinstance(e, ReplyDelta)]
    assert len(deltas) > 1, "the reply should arrive in pieces"
    result = events[-1].result
    assert isinstance(events[-1], ReplyFinished)
    assert result.reply == "".join(deltas) == "Echo: What is a switchboard?"
    assert result.model == "main" and result.error is None and result.fallback_from is None

    row = await stored(chat_app, result.message_id)
    assert row.role == "assistant" and row.status == "ok"
    assert (
        row.model_name == "main"
        and row.provider == "openai-compatible"
        and row.provider_model == "fake-model"
    )
    assert row.prompt_tokens > 0 and row.completion_tokens > 0
    assert row.cost_usd == pytest.approx(
        (row.prompt_tokens * 1.0 + row.completion_tokens * 2.0) / 1e6
    )
    assert row.latency_ms > 0 and row.ttft_ms is not None and row.ttft_ms <= row.latency_ms
    assert (row.guild_id, row.channel_id, row.thread_id) == (GUILD, CHANNEL, None)
    # The exact messages sent are what the server received.
    assert row.request_messages == fake_openai.chat_requests[-1].messages
    assert row.request_messages[0]["role"] == "system" and row.system_prompt
    prompt = await stored(chat_app, row.parent_id)
    assert (
        prompt.role == "user" and prompt.author_id == ALICE.id and prompt.discord_message_id == 500
    )


async def test_reply_chain_continues_and_fresh_mention_starts_anew(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = chat_app.service
    first = await svc.answer(mention("My name is Ada.", discord_id=501))
    await svc.link_discord_messages(first.message_id, first.conversation_id, [9001, 9002])
    assert await svc.is_conversation_message(9002)

    second = await svc.answer(mention("What is my name?", discord_id=502, reply_to=9002))
    assert second.conversation_id == first.conversation_id
    sent = [m["content"] for m in fake_openai.chat_requests[-1].messages]
    assert sent[1:] == ["My name is Ada.", "Echo: My name is Ada.", "What is my name?"]

    fresh = await svc.answer(mention("Hello again", discord_id=503))
    assert fresh.conversation_id != first.conversation_id
    assert [m["role"] for m in fake_openai.chat_requests[-1].messages] == ["system", "user"]


async def test_history_survives_a_restart(service_settings, fake_openai: FakeOpenAI) -> None:
    from bot.app import open_app

    async with open_app(service_settings, knowledge=False) as app:
        first = await app.service.answer(mention("Remember 42.", discord_id=601))
        await app.service.link_discord_messages(first.message_id, first.conversation_id, [9100])
    async with open_app(service_settings, knowledge=False) as app:
        again = await app.service.answer(mention("What did I ask?", discord_id=602, reply_to=9100))
    assert again.conversation_id == first.conversation_id
    assert "Remember 42." in [m["content"] for m in fake_openai.chat_requests[-1].messages]


async def test_branching_reply_to_an_older_answer(chat_app: App, fake_openai: FakeOpenAI) -> None:
    svc = chat_app.service
    a = await svc.answer(mention("one", discord_id=1))
    await svc.link_discord_messages(a.message_id, a.conversation_id, [11])
    b = await svc.answer(mention("two", discord_id=2, reply_to=11))
    await svc.link_discord_messages(b.message_id, b.conversation_id, [12])
    # Replying to the FIRST answer again branches: "two" is not in that line.
    await svc.answer(mention("three", discord_id=3, reply_to=11))
    sent = [m["content"] for m in fake_openai.chat_requests[-1].messages[1:]]
    assert sent == ["one", "Echo: one", "three"]


async def test_users_chains_and_channels_never_mix(chat_app: App, fake_openai: FakeOpenAI) -> None:
    svc = chat_app.service
    a = await svc.answer(mention("alice secret", ALICE, discord_id=1))
    await svc.link_discord_messages(a.message_id, a.conversation_id, [21])
    await svc.answer(mention("bob here", BOB, discord_id=2))
    assert "alice secret" not in str(fake_openai.chat_requests[-1].messages)
    other_channel = Place(GUILD, CHANNEL + 1)
    await svc.answer(mention("elsewhere", BOB, discord_id=3, place=other_channel))
    assert "alice secret" not in str(fake_openai.chat_requests[-1].messages)


async def test_thread_is_one_conversation_and_inherits_channel_settings(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = chat_app.service
    channel, thread = Place(GUILD, CHANNEL), Place(GUILD, CHANNEL, THREAD)
    await svc.set_model(channel, "channel", "solo", MOD)
    first = await svc.answer(mention("in the thread", place=thread, discord_id=1))
    second = await svc.answer(mention("still here", BOB, place=thread, discord_id=2))
    assert first.model == second.model == "solo"
    assert second.conversation_id == first.conversation_id
    assert fake_openai.chat_requests[-1].model == "fake-solo"
    assert "in the thread" in str(fake_openai.chat_requests[-1].messages)

    await svc.set_model(thread, "thread", "backup", MOD)
    eff = await svc.effective_settings(thread)
    assert (eff.model.value, eff.model.source) == ("backup", "thread")
    assert (await svc.effective_settings(channel)).model.value == "solo"


async def test_settings_resolution_sources_and_change_log(chat_app: App) -> None:
    svc = chat_app.service
    place = Place(GUILD, CHANNEL, THREAD)
    eff = await svc.effective_settings(place)
    assert (eff.model.value, eff.model.source) == ("main", "global")
    assert eff.system_prompt.source == "global" and eff.knowledge.value is False

    await svc.set_model(place, "guild", "backup", MOD)
    assert (await svc.effective_settings(place)).model.source == "guild"
    message = change_line(await svc.set_model(place, "channel", "solo", MOD))
    assert "solo" in message and "was" not in message
    await svc.set_system_prompt(place, "thread", "Answer like a pirate.", MOD)
    eff = await svc.effective_settings(place)
    assert (eff.model.value, eff.model.source) == ("solo", "channel")
    assert (eff.system_prompt.value, eff.system_prompt.source) == (
        "Answer like a pirate.",
        "thread",
    )

    await svc.reset_model(place, "channel", MOD)
    assert (await svc.effective_settings(place)).model.value == "backup"

    async with chat_app.sessions() as session:
        changes = (
            await session.scalars(select(SettingChange).order_by(SettingChange.changed_at))
        ).all()
    assert [(c.scope, c.field, c.old_value, c.new_value) for c in changes] == [
        ("guild", "model", None, "backup"),
        ("channel", "model", None, "solo"),
        ("thread", "system_prompt", None, "Answer like a pirate."),
        ("channel", "model", "solo", None),
    ]
    assert all(c.actor_id == MOD.id and c.actor_name == "mod" for c in changes)


async def test_system_prompt_is_sent(chat_app: App, fake_openai: FakeOpenAI) -> None:
    await chat_app.service.set_system_prompt(Place(GUILD, CHANNEL), "channel", "Be terse.", MOD)
    await chat_app.service.answer(mention("hi"))
    assert fake_openai.chat_requests[-1].messages[0] == {"role": "system", "content": "Be terse."}


async def test_unknown_model_is_refused_with_suggestion(chat_service: ChatService) -> None:
    with pytest.raises(NotFound, match="backup"):
        await chat_service.set_model(Place(GUILD, CHANNEL), "channel", "backpu", MOD)


async def test_fallback_answers_when_the_model_fails(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_next(503)
    events = [e async for e in chat_app.service.stream(mention("hello"))]
    fallbacks = [e for e in events if isinstance(e, FallbackUsed)]
    assert (
        len(fallbacks) == 1
        and fallbacks[0].failed_model == "main"
        and fallbacks[0].model == "backup"
    )
    result = events[-1].result
    assert result.model == "backup" and result.fallback_from == "main" and result.error is None
    assert result.reply == "Echo: hello"
    assert [r.model for r in fake_openai.chat_requests] == ["fake-model", "fake-backup"]

    row = await stored(chat_app, result.message_id)
    assert row.status == "fallback" and row.fallback_from == "main"
    async with chat_app.sessions() as session:
        attempts = (
            await session.scalars(select(Message).where(Message.parent_id == row.parent_id))
        ).all()
    failed = [a for a in attempts if a.status == "error"]
    assert len(failed) == 1 and failed[0].model_name == "main" and "503" in failed[0].error


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(429, "rate limit"), (401, "API key"), (500, "error")],
)
async def test_failure_without_fallback_is_a_clear_message(
    chat_app: App, fake_openai: FakeOpenAI, status: int, phrase: str
) -> None:
    await chat_app.service.set_model(Place(GUILD, CHANNEL), "channel", "solo", MOD)
    fake_openai.fail_next(status)
    result = await chat_app.service.answer(mention("hello"))
    assert result.model is None and result.reply == ""
    assert "solo" in result.error and phrase.lower() in result.error.lower()
    assert "Traceback" not in result.error
    row = await stored(chat_app, result.message_id)
    assert row.status == "error" and row.error == result.error


async def test_unreachable_model_is_named(chat_app: App, fake_openai: FakeOpenAI) -> None:
    await fake_openai.stop()  # nothing listens on that port any more
    await chat_app.service.set_model(Place(GUILD, CHANNEL), "channel", "solo", MOD)
    result = await chat_app.service.answer(mention("hello"))
    assert "solo" in result.error and "unreachable" in result.error.lower()


async def test_history_is_trimmed_to_the_context_window(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc, place = chat_app.service, Place(GUILD, CHANNEL, THREAD)
    await svc.set_model(place, "thread", "tiny", MOD)
    for i in range(12):
        await svc.answer(mention(f"turn {i} " + "word " * 20, place=place, discord_id=i))
    sent = fake_openai.chat_requests[-1].messages
    contents = " ".join(m["content"] for m in sent)
    assert "turn 11" in contents and "turn 0 " not in contents, "oldest turns go first"
    assert sent[0]["role"] == "system"
    assert chat_app.service.answerer.tokens.count_messages(sent) <= 300 - 50


async def test_a_message_too_long_for_any_window_is_explained(chat_app: App) -> None:
    svc, place = chat_app.service, Place(GUILD, CHANNEL)
    await svc.set_model(place, "channel", "tiny", MOD)
    result = await svc.answer(mention("word " * 400))
    assert result.error and "too long" in result.error and "tiny" in result.error


async def test_dm_conversation_continues(chat_app: App, fake_openai: FakeOpenAI) -> None:
    dm = Place(None, 777)
    await chat_app.service.answer(mention("first in DM", place=dm, discord_id=1))
    second = await chat_app.service.answer(mention("second in DM", place=dm, discord_id=2))
    assert "first in DM" in str(fake_openai.chat_requests[-1].messages)
    assert second.error is None


async def test_empty_message_is_refused(chat_service: ChatService) -> None:
    with pytest.raises(UserError, match="empty"):
        await chat_service.answer(mention("   "))


async def test_many_concurrent_exchanges_are_each_logged_once(chat_app: App) -> None:
    import asyncio

    results = await asyncio.gather(
        *(
            chat_app.service.answer(
                mention(f"q{i}", Author(100 + i, f"u{i}"), discord_id=i, place=Place(GUILD, i % 5))
            )
            for i in range(40)
        )
    )
    assert all(r.error is None for r in results)
    await chat_app.writer.drain()
    async with chat_app.sessions() as session:
        rows = (await session.scalars(select(Message))).all()
    assert len(rows) == 80 and len({r.id for r in rows}) == 80
    assert chat_app.writer.failed == 0


async def test_a_failing_log_write_never_breaks_the_reply(
    chat_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import text

    chat_app.writer.backoff = 0.01
    async with chat_app.engine.begin() as conn:
        # Break the log table under the running service: every write to it now fails.
        await conn.execute(text("ALTER TABLE messages RENAME TO messages_away"))
    result = await chat_app.service.answer(mention("still answered?"))
    assert result.reply == "Echo: still answered?" and result.error is None
    await chat_app.writer.drain()
    assert chat_app.writer.failed == 1
    assert any(
        "log write failed" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records
    )
    async with chat_app.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE messages_away RENAME TO messages"))
    # The next exchange is written normally again.
    later = await chat_app.service.answer(mention("and now?", discord_id=9))
    assert (await stored(chat_app, later.message_id)).content == "Echo: and now?"


async def test_thread_started_from_an_answer_continues_its_line(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = chat_app.service
    answer = await svc.answer(mention("Topic: tides.", discord_id=40))
    await svc.link_discord_messages(answer.message_id, answer.conversation_id, [4242])
    assert not await svc.has_conversation(777)
    assert await svc.has_conversation(4242), "a thread created from an answer has the answer's id"
    # Discord gives a thread created from a message that message's id.
    await svc.answer(mention("Tell me more", place=Place(GUILD, CHANNEL, 4242), discord_id=41))
    sent = [m["content"] for m in fake_openai.chat_requests[-1].messages[1:]]
    assert sent == ["Topic: tides.", "Echo: Topic: tides.", "Tell me more"]
    assert await svc.has_conversation(4242)


async def test_dm_conversation_survives_a_restart(
    service_settings, fake_openai: FakeOpenAI
) -> None:
    from bot.app import open_app

    dm = Place(None, 888)
    async with open_app(service_settings, knowledge=False) as app:
        first = await app.service.answer(mention("DM before restart", place=dm, discord_id=1))
    async with open_app(service_settings, knowledge=False) as app:
        second = await app.service.answer(mention("DM after restart", place=dm, discord_id=2))
    assert second.conversation_id == first.conversation_id
    assert "DM before restart" in str(fake_openai.chat_requests[-1].messages)


async def test_log_writes_that_failed_are_written_once_the_database_is_back(chat_app: App) -> None:
    from sqlalchemy import text

    chat_app.writer.backoff = 0.01
    chat_app.writer.retry_interval = 0  # try kept writes again before every later write
    svc, thread = chat_app.service, Place(GUILD, CHANNEL, THREAD)
    async with chat_app.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE messages RENAME TO messages_away"))
    lost = await svc.answer(mention("first, not stored", place=thread))
    await chat_app.writer.drain()
    async with chat_app.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE messages_away RENAME TO messages"))
    kept = await svc.answer(mention("second, stored", place=thread, discord_id=2))
    assert kept.conversation_id == lost.conversation_id
    row = await stored(chat_app, kept.message_id)
    assert row.conversation_id == lost.conversation_id
    # The lost exchange was kept and written first, so the line of history is whole.
    assert (await stored(chat_app, lost.message_id)).content == "Echo: first, not stored"
    prompt = await stored(chat_app, row.parent_id)
    assert prompt.parent_id == lost.message_id
    assert (
        chat_app.writer.failed == 1 and chat_app.writer.recovered == 1 and chat_app.writer.kept == 0
    )


async def test_a_thread_without_the_bot_is_remembered_until_it_joins(chat_app: App) -> None:
    from sqlalchemy import event

    svc, thread = chat_app.service, Place(GUILD, CHANNEL, 5150)
    statements: list[str] = []
    event.listen(
        chat_app.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, sql, *rest: statements.append(sql),
    )
    assert not await svc.has_conversation(5150)
    looked_up = len(statements)
    assert looked_up > 0
    assert not await svc.has_conversation(5150)
    assert len(statements) == looked_up, "a known miss is answered from memory"
    first = await svc.answer(mention("now I ask", place=thread))
    assert await svc.has_conversation(5150)
    second = await svc.answer(mention("and continue", place=thread, discord_id=2))
    assert second.conversation_id == first.conversation_id


async def test_warm_up_readies_the_model_in_force_and_never_raises(chat_app: App) -> None:
    svc, place = chat_app.service, Place(GUILD, CHANNEL)
    await svc.set_model(place, "channel", "solo", MOD)
    await svc.warm_up(place)
    assert "solo" in svc.answerer.models._cache and "main" not in svc.answerer.models._cache
    keyless = (await svc.get_model("solo")).model_copy(
        update={
            "name": "keyless",
            "provider": "openai",
            "base_url": None,
            "api_key_env": "NO_SUCH_KEY",
        }
    )
    await svc.register_model(keyless, created_by="test")
    await svc.set_model(place, "channel", "keyless", MOD)
    await svc.warm_up(place)  # a missing key is only logged here; the first request reports it
    result = await svc.answer(mention("hi"))
    assert "NO_SUCH_KEY" in result.error


async def test_concurrent_messages_in_one_place_share_one_settings_read(chat_app: App) -> None:
    import asyncio

    from sqlalchemy import event

    statements: list[str] = []
    event.listen(
        chat_app.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, sql, *rest: statements.append(sql),
    )
    place = Place(GUILD, 4040)
    results = await asyncio.gather(*(chat_app.service.effective_settings(place) for _ in range(20)))
    assert len({id(r) for r in results}) == 1
    assert sum("channel_settings" in sql for sql in statements) == 1
    # A change made meanwhile is seen by the next read.
    await chat_app.service.set_model(place, "channel", "solo", MOD)
    assert (await chat_app.service.effective_settings(place)).model.value == "solo"


async def test_places_that_miss_together_are_read_in_one_query(chat_app: App) -> None:
    import asyncio

    from sqlalchemy import event

    svc = chat_app.service
    await svc.set_model(Place(GUILD, 1), "guild", "backup", MOD)
    await svc.set_model(Place(GUILD, 2), "channel", "solo", MOD)
    await svc.set_system_prompt(Place(GUILD, 2, 3), "thread", "Be brief.", MOD)
    await svc.set_model(Place(None, 77), "channel", "tiny", MOD)  # a DM
    statements: list[str] = []
    event.listen(
        chat_app.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, sql, *rest: statements.append(sql),
    )
    places = [
        Place(GUILD, 1),
        Place(GUILD, 2),
        Place(GUILD, 2, 3),
        Place(None, 77),
        Place(99, 5),
        Place(GUILD, 2),
    ]
    got = await asyncio.gather(*(svc.effective_settings(p) for p in places))
    assert sum("channel_settings" in sql for sql in statements) == 1
    assert [(s.model.value, s.model.source) for s in got] == [
        ("backup", "guild"),
        ("solo", "channel"),
        ("solo", "channel"),
        ("tiny", "channel"),
        ("main", "global"),
        ("solo", "channel"),
    ]
    assert got[2].system_prompt.value == "Be brief." and got[2].system_prompt.source == "thread"
    assert got[1].system_prompt.source == "global"


async def test_a_message_too_long_for_one_window_falls_back_to_a_larger_one(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc, place = chat_app.service, Place(GUILD, CHANNEL)
    await svc.set_model(place, "channel", "tiny-then-big", MOD)
    events = [e async for e in svc.stream(mention("word " * 400))]
    [fallback] = [e for e in events if isinstance(e, FallbackUsed)]
    assert fallback.failed_model == "tiny-then-big" and "too long" in fallback.reason
    result = events[-1].result
    assert (
        result.error is None
        and result.model == "backup"
        and result.fallback_from == "tiny-then-big"
    )
    assert [r.model for r in fake_openai.chat_requests] == ["fake-backup"], (
        "nothing was sent to the small model"
    )


async def test_an_answer_whose_reader_goes_away_is_still_logged(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    # Discord refusing the reply closes the stream after the model has started writing.
    fake_openai.token_delay = 0.05
    stream = chat_app.service.stream(mention("tell me a story"))
    started = await anext(stream)
    first = await anext(stream)
    assert isinstance(started, ReplyStarted) and isinstance(first, ReplyDelta)
    await stream.aclose()

    row = await stored(chat_app, started.message_id)
    assert row.status == "error" and row.error == STOPPED
    assert row.content == first.text and row.model_name == "main"
    # The provider billed what it wrote: estimated, as it never got to send its usage.
    assert row.prompt_tokens > 0 and row.completion_tokens > 0 and row.cost_usd > 0
    assert row.request_messages == fake_openai.chat_requests[-1].messages
    prompt = await stored(chat_app, row.parent_id)
    assert prompt.content == "tell me a story"


async def test_an_answer_cancelled_mid_stream_is_logged_once(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    # Shutting down cancels answers still being written once the grace period is over.
    fake_openai.token_delay = 0.05
    seen: dict[str, str] = {}
    writing = asyncio.Event()

    async def read() -> None:
        async for event in chat_app.service.stream(mention("tell me a story")):
            if isinstance(event, ReplyStarted):
                seen["id"] = event.message_id
            elif isinstance(event, ReplyDelta):
                writing.set()

    task = asyncio.create_task(read())
    await writing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    row = await stored(chat_app, seen["id"])
    assert row.status == "error" and row.error == STOPPED and row.content.startswith("Echo:")
    async with chat_app.sessions() as session:
        answers = (
            await session.scalars(select(Message).where(Message.parent_id == row.parent_id))
        ).all()
    assert [a.id for a in answers] == [row.id]
