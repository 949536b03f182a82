"""Chatting with the real bot and the real chat service in simcord: who gets answered, and how."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord
import pytest
import simcord

from bot.app import App
from bot.discord.bot import SwitchboardBot
from bot.discord.render import WRITING_MARKER, split_text
from bot.service import ChatService
from bot.service.limits import PersonLimit
from tests.fakes.openai_server import FakeOpenAI, FakeRequest
from tests.fixtures.discord import World


def bot_messages(
    world: World, channel: simcord.ChannelHandle | None = None
) -> list[discord.Message]:
    """The bot's messages in the channel (or the given one), oldest first."""
    me = world.bot.user
    assert me is not None
    return [m for m in (channel or world.channel).history() if m.author.id == me.id]


async def test_mention_gets_a_streamed_reply(world: World, fake_openai: FakeOpenAI) -> None:
    edits: list[str] = []

    async def record(payload: discord.RawMessageUpdateEvent) -> None:
        edits.append(payload.data.get("content", ""))

    world.bot.add_listener(record, "on_raw_message_edit")
    fake_openai.reply = lambda request: "The capital of France is Paris."

    question = await world.alice.send(
        world.channel, f"{world.bot.user.mention} what is the capital of France?"
    )

    [answer] = bot_messages(world)
    assert answer.content == "The capital of France is Paris."
    assert answer.reference is not None and answer.reference.message_id == question.id
    # It was posted while the model was still writing, then edited into the final text.
    assert edits and edits[-1] == "The capital of France is Paris."
    assert WRITING_MARKER not in answer.content
    [request] = fake_openai.chat_requests
    assert request.last_user_text == "what is the capital of France?"  # the mention is stripped


async def test_reply_continues_the_conversation_and_a_fresh_mention_starts_anew(
    world: World, fake_openai: FakeOpenAI
) -> None:
    me = world.bot.user.mention
    await world.alice.send(world.channel, f"{me} my name is Alice")
    [first_answer] = bot_messages(world)

    await world.alice.send(world.channel, "what is my name?", reply_to=first_answer)
    second = fake_openai.chat_requests[-1]
    texts = [m["content"] for m in second.messages if m["role"] != "system"]
    assert texts == ["my name is Alice", "Echo: my name is Alice", "what is my name?"]

    # Replying to the second answer keeps the whole chain.
    second_answer = bot_messages(world)[-1]
    await world.alice.send(world.channel, "and again?", reply_to=second_answer)
    third = [m["content"] for m in fake_openai.chat_requests[-1].messages if m["role"] != "system"]
    assert third[:3] == texts and third[-1] == "and again?" and len(third) == 5

    await world.alice.send(world.channel, f"{me} who am I?")
    fresh = [m["content"] for m in fake_openai.chat_requests[-1].messages if m["role"] != "system"]
    assert fresh == ["who am I?"]


async def test_plain_messages_and_other_bots_are_ignored(
    world: World, fake_openai: FakeOpenAI
) -> None:
    other_bot = world.guild.add_member(world.env.create_user("otherbot", bot=True))
    await other_bot.send(world.channel, f"{world.bot.user.mention} hello from a bot")
    await world.alice.send(world.channel, "just talking to people here")

    assert bot_messages(world) == []
    assert fake_openai.chat_requests == []


async def test_direct_messages_are_answered_and_continue(
    world: World, fake_openai: FakeOpenAI
) -> None:
    await world.alice.send_dm("hello in private")
    await world.alice.send_dm("still there?")

    answers = [
        m.content for m in world.alice.user.dm_channel.history() if m.author.id == world.bot.user.id
    ]
    assert answers == ["Echo: hello in private", "Echo: still there?"]
    # A DM channel is one running conversation.
    texts = [m["content"] for m in fake_openai.chat_requests[-1].messages if m["role"] != "system"]
    assert texts == ["hello in private", "Echo: hello in private", "still there?"]


async def test_thread_is_answered_without_mentions_once_the_bot_takes_part(
    world: World, fake_openai: FakeOpenAI
) -> None:
    thread = world.thread("planning")
    await world.alice.send(thread, "nobody asked the bot yet")
    assert bot_messages(world, thread) == []

    await world.alice.send(thread, f"{world.bot.user.mention} help us plan")
    await world.bob.send(thread, "and what about Tuesday?")

    await world.bob.send(
        thread, f"{world.alice.mention} what do you think?"
    )  # for Alice, not the bot

    assert [m.content for m in bot_messages(world, thread)] == [
        "Echo: help us plan",
        "Echo: and what about Tuesday?",
    ]
    assert len(fake_openai.chat_requests) == 2
    texts = [m["content"] for m in fake_openai.chat_requests[-1].messages if m["role"] != "system"]
    assert texts == ["help us plan", "Echo: help us plan", "and what about Tuesday?"]


async def test_long_answer_arrives_split_and_intact(world: World, fake_openai: FakeOpenAI) -> None:
    prose = " ".join(f"sentence{i} of the answer." for i in range(150))  # about 3,900 characters
    code = "```python\n" + "".join(f"print('line {i}')\n" for i in range(80)) + "```\n"
    text = prose + "\n\n" + code + "\nThat is all."
    assert len(text) > 5000
    fake_openai.reply = lambda request: text

    await world.alice.send(world.channel, f"{world.bot.user.mention} write a lot")

    parts = bot_messages(world)
    assert len(parts) == 3
    assert all(len(p.content) <= 2000 and p.content.count("```") % 2 == 0 for p in parts)
    # Each part after the first replies to the one before it.
    for earlier, later in zip(parts, parts[1:], strict=False):
        assert later.reference is not None and later.reference.message_id == earlier.id
    # Take the fence repairs back out and the answer is whole.
    chunks = split_text(text, 2000 - len(WRITING_MARKER))
    assert [p.content for p in parts] == [c.content for c in chunks]
    assert parts[1].content.endswith("\n```") and parts[2].content.startswith(
        "```python\n"
    )  # the block spans them
    rebuilt = "".join(
        p.content.removeprefix(c.reopen).removesuffix(c.close)
        for p, c in zip(parts, chunks, strict=True)
    )
    assert rebuilt == text
    # A reply to the last part continues the conversation.
    await world.alice.send(world.channel, "thanks", reply_to=parts[-1])
    assert fake_openai.chat_requests[-1].messages[-2]["content"] == text


async def test_fallback_model_is_named_under_the_answer(
    world: World, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_next(429)  # the main model is rate limited; its fallback answers

    await world.alice.send(world.channel, f"{world.bot.user.mention} hi")

    [answer] = bot_messages(world)
    body, footer = answer.content.split("\n-# ", 1)
    assert body == "Echo: hi"
    assert footer.startswith("answered by backup (main was unavailable: ")


async def test_failing_model_shows_a_clear_message(world: World, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(500, times=2)  # the main model and its fallback both fail

    await world.alice.send(world.channel, f"{world.bot.user.mention} hi")

    [answer] = bot_messages(world)
    assert answer.content.startswith("⚠️ ")
    assert "main" in answer.content or "backup" in answer.content
    assert "Traceback" not in answer.content and "Error code" not in answer.content


async def test_a_final_edit_discord_fails_once_is_tried_again(
    world: World, fake_openai: FakeOpenAI
) -> None:
    world.env.inject_error("PATCH", "/channels/*/messages/*", status=500)  # an outage, not our bug

    await world.alice.send(world.channel, f"{world.bot.user.mention} hi")

    [answer] = bot_messages(world)
    assert answer.content == "Echo: hi"
    patches = [r for r in world.env.http_requests if r.method == "PATCH"]
    assert len(patches) == 2


async def test_unexpected_failure_is_logged_and_apologised_for(
    world: World, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    # Discord rejects the final edit's body once (our bug): nothing a person can fix, so an
    # apology with an id.
    world.env.inject_error(
        "PATCH", "/channels/*/messages/*", status=400, code=50035, message="Invalid Form Body"
    )

    with caplog.at_level(logging.ERROR, logger="bot.discord.chat"):
        await world.alice.send(world.channel, f"{world.bot.user.mention} hi")

    [answer] = bot_messages(world)
    assert answer.content.startswith(
        "Echo: hi\nSorry, something went wrong on our side (error id `"
    )
    [record] = [r for r in caplog.records if r.name == "bot.discord.chat"]
    assert record.exc_info is not None  # the traceback went to the log
    error_id = answer.content.split("`")[1]
    assert error_id in record.getMessage()


async def test_model_output_pings_nobody(world: World, fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = lambda request: f"@everyone look, {world.bob.mention}!"

    await world.alice.send(world.channel, f"{world.bot.user.mention} shout")

    [answer] = bot_messages(world)
    assert answer.content == f"@everyone look, {world.bob.mention}!"
    assert not answer.mention_everyone
    # Who was notified is not on discord.Message; simcord's backend records it.
    stored = world.env.backend.get_message(world.channel.id, answer.id)
    assert world.bob.id not in stored.ping_user_ids


async def test_a_bare_mention_gets_told_what_is_wrong(
    world: World, fake_openai: FakeOpenAI
) -> None:
    await world.alice.send(world.channel, world.bot.user.mention)

    [answer] = bot_messages(world)
    assert answer.content == "⚠️ There is nothing to answer: the message is empty."
    assert fake_openai.chat_requests == []


def thread_from(world: World, message: discord.Message, name: str) -> simcord.ChannelHandle:
    """ "Create Thread" on a message: the thread takes the message's id."""
    created = world.env.backend.create_thread(
        world.channel.id, name, world.alice.id, message_id=message.id
    )
    return simcord.ChannelHandle(world.env, world.guild, created)


def conversation(request: FakeRequest) -> list[str]:
    """The texts a request to the model carried, without the system prompt."""
    return [m["content"] for m in request.messages if m["role"] != "system"]


async def test_thread_started_from_an_answer_continues_that_exchange(
    world: World, fake_openai: FakeOpenAI
) -> None:
    await world.alice.send(world.channel, f"{world.bot.user.mention} tell me about tea")
    await world.alice.send(
        world.channel, f"{world.bot.user.mention} and about coffee?"
    )  # another line
    tea, _coffee = bot_messages(world)
    thread = thread_from(world, tea, "tea")

    await world.bob.send(
        thread, "what about green tea?"
    )  # no mention: the thread grew out of an answer

    assert thread.id == tea.id
    assert [m.content for m in bot_messages(world, thread)] == ["Echo: what about green tea?"]
    assert conversation(fake_openai.chat_requests[-1]) == [
        "tell me about tea",
        "Echo: tell me about tea",
        "what about green tea?",
    ]
    # The thread goes on from there.
    await world.alice.send(thread, "and oolong?")
    assert conversation(fake_openai.chat_requests[-1]) == [
        "tell me about tea",
        "Echo: tell me about tea",
        "what about green tea?",
        "Echo: what about green tea?",
        "and oolong?",
    ]
    # Someone named in the thread is being spoken to, not the bot.
    await world.alice.send(thread, f"{world.bob.mention} do you like it?")
    assert len(fake_openai.chat_requests) == 4


async def test_thread_from_a_plain_message_needs_a_mention(
    world: World, fake_openai: FakeOpenAI
) -> None:
    question = await world.alice.send(world.channel, "does anyone know about tea?")
    thread = thread_from(world, question, "tea")

    await world.bob.send(thread, "I do")
    assert bot_messages(world, thread) == [] and fake_openai.chat_requests == []

    await world.bob.send(thread, f"{world.bot.user.mention} do you?")
    await world.alice.send(thread, "thanks")
    assert [m.content for m in bot_messages(world, thread)] == ["Echo: do you?", "Echo: thanks"]


async def test_after_a_restart_the_bot_still_takes_part_in_its_threads(
    world: World, fake_openai: FakeOpenAI, restart: Callable[[], Awaitable[App]]
) -> None:
    thread = world.thread("long running")
    await world.alice.send(thread, f"{world.bot.user.mention} remember me")
    quiet = world.thread("no bot here")
    await world.alice.send(quiet, "just people")

    await restart()  # a new bot and a new service over the same database
    await world.alice.send(thread, "still there?")
    await world.alice.send(quiet, "still just people")

    assert [m.content for m in bot_messages(world, thread)] == [
        "Echo: remember me",
        "Echo: still there?",
    ]
    assert bot_messages(world, quiet) == []
    # The database said so, and the conversation goes on where it was.
    assert conversation(fake_openai.chat_requests[-1]) == [
        "remember me",
        "Echo: remember me",
        "still there?",
    ]
    assert [
        r for r in world.env.http_requests if r.method == "GET" and r.path.endswith("/messages")
    ] == []


async def test_after_a_restart_a_thread_from_an_answer_continues_it(
    world: World, fake_openai: FakeOpenAI, restart: Callable[[], Awaitable[App]]
) -> None:
    await world.alice.send(world.channel, f"{world.bot.user.mention} tell me about tea")
    [tea] = bot_messages(world)

    await restart()
    thread = thread_from(world, tea, "tea")
    await world.bob.send(thread, "what about green tea?")

    assert [m.content for m in bot_messages(world, thread)] == ["Echo: what about green tea?"]
    assert conversation(fake_openai.chat_requests[-1]) == [
        "tell me about tea",
        "Echo: tell me about tea",
        "what about green tea?",
    ]


async def test_a_person_over_the_message_limit_is_told_once_then_skipped_until_the_minute_is_over(
    world: World, chat_service: ChatService, fake_openai: FakeOpenAI
) -> None:
    chat_service.limits = PersonLimit(2)
    await world.env.restart_bot(SwitchboardBot(chat_service, shard_count=1))
    mention = world.bot.user.mention
    for n in range(1, 5):
        await world.alice.send(world.channel, f"{mention} question {n}")
    await world.bob.send(world.channel, f"{mention} my own question")  # the limit is per person

    contents = [m.content for m in bot_messages(world)]
    assert contents[:2] == ["Echo: question 1", "Echo: question 2"]
    assert contents[2].startswith(
        "⏳ You are sending me messages faster than I answer them (2 a minute)."
    )
    assert contents[3:] == ["Echo: my own question"]  # question 4 got no second notice
    assert [r.last_user_text for r in fake_openai.chat_requests] == [
        "question 1",
        "question 2",
        "my own question",
    ]

    await world.env.advance_time(61)
    await world.alice.send(world.channel, f"{mention} question 5")
    assert bot_messages(world)[-1].content == "Echo: question 5"


async def test_the_bots_owner_is_told_once_when_the_log_cannot_be_written_and_once_when_it_can(
    world: World, chat_app: App, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import shutil
    from types import SimpleNamespace

    from store.db import sqlite_file
    from tests.test_service_outage import backup, delete, quick_retries

    # simcord makes the bot its own application's owner: let the admin own it instead.
    owner = await world.bot.fetch_user(world.admin.id)

    async def application_info() -> SimpleNamespace:
        return SimpleNamespace(owner=owner, team=None)

    monkeypatch.setattr(world.bot, "application_info", application_info)
    quick_retries(chat_app)
    db = sqlite_file(chat_app.settings.sqlalchemy_url)
    assert db is not None
    mention = world.bot.user.mention
    await world.alice.send(world.channel, f"{mention} before")
    await chat_app.writer.drain()
    backup(db, tmp_path / "backup.db")

    delete(db)  # the database goes away
    for n in range(3):
        await world.alice.send(world.channel, f"{mention} during {n}")
        await chat_app.writer.drain()
        await world.env.advance_time(1)
    assert [m.content for m in bot_messages(world)][1:] == [f"Echo: during {n}" for n in range(3)]
    told = [m.content for m in world.admin.user.dm_channel.history()]
    assert len(told) == 1 and "Not saved yet: the database cannot be written" in told[0]

    shutil.copy(tmp_path / "backup.db", db)  # and comes back
    await world.alice.send(world.channel, f"{mention} after")
    await chat_app.writer.drain()
    await world.env.advance_time(1)
    told = [m.content for m in world.admin.user.dm_channel.history()]
    assert len(told) == 2 and "being written again" in told[1]
    assert world.alice.user.dm_channel.history() == [], "members are not told"
