"""Privacy in Discord through simcord, on the real bot and service (real SQLite, fake model
server): /privacy, /logging, /retention, deleted messages and the daily purge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import discord
import pytest
from sqlalchemy import func, select, update

from bot.app import App
from bot.discord.bot import SwitchboardBot
from bot.discord.privacy import FORGET_CANCELLED, FORGET_TIMED_OUT, FORGET_TIMEOUT_S
from bot.service import ChatService
from core.messages import Place
from store.models import AnonymousCount, Message, SettingChange
from tests.fixtures.discord import MANAGER_ROLE, World
from tests.scan import find_text


@pytest.fixture
def simcord_bot(chat_service: ChatService) -> SwitchboardBot:
    """The real bot, with its daily purge every hour of simcord's clock for these tests."""
    return SwitchboardBot(
        chat_service, manager_role=MANAGER_ROLE, shard_count=1, purge_every=timedelta(hours=1)
    )


def bot_messages(world: World) -> list[discord.Message]:
    return [m for m in world.channel.history() if m.author.id == world.bot.user.id]


async def stored_texts(app: App) -> list[str]:
    await app.writer.drain()
    async with app.sessions() as session:
        return list((await session.scalars(select(Message.content))).all())


async def test_an_opted_out_member_is_answered_and_nothing_is_stored(
    world: World, chat_app: App
) -> None:
    shown = await world.alice.slash(world.channel, "privacy opt-out")
    assert shown.ephemeral and "opted out" in shown.response.content

    await world.alice.send(world.channel, f"{world.bot.user.mention} my private question")
    [answer] = bot_messages(world)
    assert answer.content == "Echo: my private question"
    assert await stored_texts(chat_app) == []
    async with chat_app.sessions() as session:
        assert await session.scalar(select(func.sum(AnonymousCount.exchanges))) == 1

    status = await world.alice.slash(world.channel, "privacy status")
    assert status.ephemeral and "**opted out**" in status.response.content
    back = await world.alice.slash(world.channel, "privacy opt-in")
    assert "**opted in**" in back.response.content
    await world.alice.send(world.channel, f"{world.bot.user.mention} store this one")
    assert "store this one" in await stored_texts(chat_app)


async def test_forget_asks_first_and_then_deletes_everything_of_theirs(
    world: World, chat_app: App
) -> None:
    me = world.bot.user.mention
    await world.alice.send(world.channel, f"{me} alice remembers apples")
    await world.bob.send(world.channel, f"{me} bob asks about bananas")
    [_, bobs_answer] = bot_messages(world)
    await world.bob.send(world.channel, "and cherries?", reply_to=bobs_answer)
    await world.mod.slash(world.channel, "model set", name="solo")
    assert "alice remembers apples" in await stored_texts(chat_app)

    asked = await world.alice.slash(world.channel, "privacy forget")
    assert asked.ephemeral and "cannot be undone" in asked.response.content
    cancelled = await world.alice.click(asked.response, label="Cancel")
    assert cancelled.response.content == FORGET_CANCELLED
    assert "alice remembers apples" in await stored_texts(chat_app)

    asked = await world.alice.slash(world.channel, "privacy forget")
    confirmed = await world.alice.click(asked.response, label="Delete everything")
    await world.env.settle()
    text = confirmed.response.content
    assert text.startswith("Deleted 1 message you wrote, 1 answer"), text
    assert await find_text(chat_app.sessions, "alice remembers") == []
    assert await find_text(chat_app.sessions, "apples") == []
    # Bob's exchanges are untouched.
    texts = await stored_texts(chat_app)
    assert {"bob asks about bananas", "and cherries?", "Echo: and cherries?"} <= set(texts)
    # The mod's settings change keeps its name.
    async with chat_app.sessions() as session:
        assert (await session.scalars(select(SettingChange.actor_name))).all() == ["mod"]


async def test_the_forget_question_gives_up_after_a_while(world: World, chat_app: App) -> None:
    await world.alice.send(world.channel, f"{world.bot.user.mention} keep me")
    asked = await world.alice.slash(world.channel, "privacy forget")
    await world.env.advance_time(FORGET_TIMEOUT_S + 1)
    shown = world.env.backend.get_message(asked.response.channel_id, asked.response.id)
    assert shown.content == FORGET_TIMED_OUT and not shown.components
    assert "keep me" in await stored_texts(chat_app)


async def test_a_deleted_message_deletes_its_prompt_and_answer(world: World, chat_app: App) -> None:
    me = world.bot.user.mention
    kept = await world.alice.send(world.channel, f"{me} this one stays")
    gone = await world.alice.send(world.channel, f"{me} this one goes")
    assert len(await stored_texts(chat_app)) == 4
    await world.alice.delete(gone)
    await world.env.settle()
    assert sorted(await stored_texts(chat_app)) == ["Echo: this one stays", "this one stays"]

    # A moderator's bulk delete too.
    world.env.backend.bulk_delete_messages(world.channel.id, [kept.id])
    await world.env.settle()
    assert await stored_texts(chat_app) == []


async def test_a_channel_that_logs_nothing(world: World, chat_app: App) -> None:
    world.open_to_everyone("logging")
    refused = await world.alice.slash(world.channel, "logging off")
    assert refused.ephemeral and "Manage Channels" in refused.response.content

    done = await world.mod.slash(world.channel, "logging off")
    assert not done.ephemeral and "**off**" in done.response.content
    shown = await world.alice.slash(world.channel, "settings")
    [logging_field] = [f for f in shown.response.embeds[0].fields if f.name == "Logging"]
    assert logging_field.value.startswith("off")

    await world.alice.send(world.channel, f"{world.bot.user.mention} unlogged words")
    assert bot_messages(world)[-1].content == "Echo: unlogged words"
    assert await stored_texts(chat_app) == []

    await world.mod.slash(world.channel, "logging inherit")
    await world.alice.send(world.channel, f"{world.bot.user.mention} logged words")
    assert "logged words" in await stored_texts(chat_app)


async def test_retention_needs_manage_server_and_shows_in_settings(
    world: World, chat_service: ChatService
) -> None:
    world.open_to_everyone("retention")
    refused = await world.mod.slash(world.channel, "retention set", days=30)
    assert refused.ephemeral and "Manage Server" in refused.response.content

    done = await world.admin.slash(world.channel, "retention set", days=30)
    assert done.response.content == "Retention for this server: **30 days** (server default)."
    shown = await world.alice.slash(world.channel, "settings")
    [field] = [f for f in shown.response.embeds[0].fields if f.name == "Retention"]
    assert field.value == "**30 days** (server default)"
    settings = await chat_service.effective_settings(Place(world.guild.id, world.channel.id))
    assert settings.retention.value == 30

    reset = await world.admin.slash(world.channel, "retention reset")
    assert "kept forever** (bot default)" in reset.response.content


async def test_the_bot_applies_the_retention_on_its_own(world: World, chat_app: App) -> None:
    await world.admin.slash(world.channel, "retention set", days=7)
    await world.alice.send(world.channel, f"{world.bot.user.mention} an old question")
    await world.alice.send(world.channel, f"{world.bot.user.mention} a new question")
    await chat_app.writer.drain()
    async with chat_app.sessions() as session, session.begin():
        old = datetime.now(UTC) - timedelta(days=8)
        await session.execute(
            update(Message).where(Message.content.like("%old question")).values(created_at=old)
        )
    assert len(await stored_texts(chat_app)) == 4  # not until the next purge
    await world.env.advance_time(timedelta(hours=1).total_seconds() + 1)
    await world.env.settle()
    assert sorted(await stored_texts(chat_app)) == ["Echo: a new question", "a new question"]


async def test_an_answer_that_is_not_stored_has_no_feedback_buttons(world: World) -> None:
    await world.alice.send(world.channel, f"{world.bot.user.mention} stored, so rated")
    await world.alice.slash(world.channel, "privacy opt-out")
    await world.alice.send(world.channel, f"{world.bot.user.mention} not stored")
    rated, unrated = bot_messages(world)
    assert rated.components and not unrated.components
