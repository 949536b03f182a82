"""/privacy and /logging in the terminal chat, in-process on the real service."""

from __future__ import annotations

from sqlalchemy import select

from bot.app import App
from bot.terminal import HELP, TerminalChat
from core.messages import ReplyFinished
from store.models import Message
from tests.test_terminal import chat_in


async def say(chat: TerminalChat, text: str) -> bool:
    """Send a line; whether its exchange was stored."""
    async for event in chat.send(text):
        if isinstance(event, ReplyFinished):
            return event.result.stored
    raise AssertionError("no reply")


async def texts(app: App) -> list[str]:
    await app.writer.drain()
    async with app.sessions() as session:
        return sorted((await session.scalars(select(Message.content))).all())


async def test_privacy_commands_in_the_terminal(chat_app: App) -> None:
    chat = chat_in(chat_app)
    assert "/privacy forget" in HELP and "/logging on|off|inherit" in HELP
    out = await chat.command("/privacy opt-out")
    assert out.ok and "**opted out**" in out.message
    assert not await say(chat, "kept to myself")
    assert await texts(chat_app) == []

    assert (await chat.command("/privacy opt-in")).ok
    chat = chat_in(chat_app, channel=6)  # a fresh conversation: no private history in it
    assert await say(chat, "stored now")
    status = await chat.command("/privacy status")
    assert "1 message you wrote" in status.message

    forgot = await chat.command("/privacy forget")
    assert forgot.ok and forgot.message.startswith("Deleted 1 message you wrote, 1 answer")
    assert chat.conversation_id is None and await texts(chat_app) == []
    assert (await chat.command("/privacy")).ok is False  # incomplete: says so


async def test_logging_off_in_the_terminal(chat_app: App) -> None:
    chat = chat_in(chat_app)
    done = await chat.command("/logging off")
    assert done.ok and "**off**" in done.message
    settings = (await chat.command("/settings")).message
    assert "logging: off (from channel)" in settings
    assert "retention: kept forever (from global)" in settings
    assert not await say(chat, "not logged here")
    await chat.command("/logging inherit")
    assert "logging: on (from global)" in (await chat.command("/settings")).message
    assert await texts(chat_app) == []
