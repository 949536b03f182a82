"""Streaming edits on simcord's virtual clock: a slow model, edits at most once per second."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

import discord
import pytest
from sqlalchemy import select

from bot.app import App
from bot.discord.bot import SwitchboardBot
from bot.discord.chat import discord_hiccup
from bot.discord.render import WRITING_MARKER
from bot.service import STOPPED
from store.models import Message
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.discord import MANAGER_ROLE, PacedService, World


@pytest.fixture
def simcord_bot(paced_service: PacedService) -> SwitchboardBot:
    return SwitchboardBot(paced_service, manager_role=MANAGER_ROLE, shard_count=1)  # type: ignore[arg-type]


async def test_edits_stay_within_once_per_second_per_message(
    world: World, paced_service: PacedService, fake_openai: FakeOpenAI
) -> None:
    paced_service.env = world.env
    words = [f"word{i:03d}" for i in range(700)]  # about 5,600 characters: three messages
    fake_openai.reply = lambda request: " ".join(words)
    writes: dict[int, list[datetime]] = {}
    contents: list[str] = []

    async def record_edit(payload: discord.RawMessageUpdateEvent) -> None:
        writes.setdefault(payload.message_id, []).append(
            datetime.fromisoformat(payload.data["edited_timestamp"])
        )
        contents.append(payload.data["content"])

    world.bot.add_listener(record_edit, "on_raw_message_edit")
    await world.alice.send(world.channel, f"{world.bot.user.mention} count for me")
    me = world.bot.user.id
    assert [m for m in world.channel.history() if m.author.id == me] == []  # no words yet...
    requests = [(r.method, r.path) for r in world.env.http_requests]
    assert ("POST", f"/channels/{world.channel.id}/typing") in requests  # ...but typing

    for _ in range(len(words)):  # a word every 50 ms: 35 seconds of writing
        paced_service.release()
        await world.env.advance_time(0.05)
    await world.env.advance_time(2)  # the final edits wait out the throttle

    parts = [m for m in world.channel.history() if m.author.id == me]
    assert len(parts) == 3
    assert " ".join(p.content for p in parts).split() == words  # whole, in order, marker gone
    assert all(WRITING_MARKER not in p.content for p in parts)
    assert any(WRITING_MARKER in c for c in contents)  # it was visibly still writing before
    for part in parts:
        times = [part.created_at, *writes.get(part.id, [])]
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
        assert all(gap >= 1.0 for gap in gaps), gaps
    # It really streamed: the first part was edited many times while words arrived.
    assert len(writes[parts[0].id]) >= 5


async def test_a_reply_discord_refuses_midway_is_still_logged(
    world: World, paced_service: PacedService, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    paced_service.env = world.env
    fake_openai.reply = lambda request: "one two three four five"
    # The bot loses its right to post here just as the first words are ready.
    world.env.inject_error("POST", f"/channels/{world.channel.id}/messages", status=403, code=50013)

    await world.alice.send(world.channel, f"{world.bot.user.mention} count for me")
    paced_service.release()
    await world.env.advance_time(2)

    assert [m for m in world.channel.history() if m.author.id == world.bot.user.id] == []
    await paced_service.writer.drain()
    async with chat_app.sessions() as session:
        [answer] = (await session.scalars(select(Message).where(Message.role == "assistant"))).all()
    assert answer.status == "error" and answer.error == STOPPED
    assert "one two three four five".startswith(answer.content) and answer.content


async def test_an_outage_midway_skips_edits_and_the_answer_still_arrives_whole(
    world: World, paced_service: PacedService, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    paced_service.env = world.env
    words = [f"word{i:02d}" for i in range(16)]
    fake_openai.reply = lambda request: " ".join(words)
    edits = f"/channels/{world.channel.id}/messages/*"

    def patches() -> int:
        return sum(1 for r in world.env.http_requests if r.method == "PATCH")

    await world.alice.send(world.channel, f"{world.bot.user.mention} count for me")
    for _ in range(4):
        paced_service.release()
        await world.env.advance_time(0.25)
    before = patches()
    # Discord answers 500 to every edit for two seconds (discord.py has given up retrying).
    world.env.inject_error("PATCH", edits, status=500, times=None)
    for _ in range(8):
        paced_service.release()
        await world.env.advance_time(0.25)
    during = patches() - before
    world.env.backend.faults.clear()
    for _ in range(4):
        paced_service.release()
        await world.env.advance_time(0.25)
    await world.env.advance_time(2)

    assert 1 <= during <= 3  # tried about once a second, not once per word
    [part] = [m for m in world.channel.history() if m.author.id == world.bot.user.id]
    assert part.content.split() == words  # no marker, no apology
    await paced_service.writer.drain()
    async with chat_app.sessions() as session:
        [answer] = (await session.scalars(select(Message).where(Message.role == "assistant"))).all()
    assert answer.status == "ok" and answer.content == " ".join(words)


async def test_an_answer_deleted_while_being_written_is_stopped_quietly(
    world: World, paced_service: PacedService, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    paced_service.env = world.env
    words = [f"word{i:02d}" for i in range(12)]
    fake_openai.reply = lambda request: " ".join(words)
    cleaners = world.guild.create_role(
        "Cleaners", permissions=discord.Permissions(manage_messages=True)
    )
    cleaner = world.guild.add_member(world.env.create_user("cleaner"), roles=[cleaners])

    await world.alice.send(world.channel, f"{world.bot.user.mention} count for me")
    for _ in range(4):
        paced_service.release()
        await world.env.advance_time(0.5)
    [part] = [m for m in world.channel.history() if m.author.id == world.bot.user.id]
    await cleaner.delete(part)
    writes_before = len(world.env.http_requests)
    for _ in range(8):
        paced_service.release()
        await world.env.advance_time(0.5)
    await world.env.advance_time(2)

    assert [
        m for m in world.channel.history() if m.author.id == world.bot.user.id
    ] == []  # no apology either
    after = [(r.method, r.path) for r in world.env.http_requests[writes_before:]]
    assert after == [
        ("PATCH", f"/channels/{world.channel.id}/messages/{part.id}")
    ]  # one try, then it stopped
    await paced_service.writer.drain()
    async with chat_app.sessions() as session:
        [answer] = (await session.scalars(select(Message).where(Message.role == "assistant"))).all()
    assert answer.status == "error" and answer.error == STOPPED
    assert " ".join(words).startswith(answer.content) and answer.content != " ".join(words)


@pytest.mark.parametrize(
    ("failure", "passing"),
    [
        (
            discord.HTTPException(
                SimpleNamespace(status=503, reason="Service Unavailable"), "down"
            ),
            True,
        ),
        (
            discord.HTTPException(
                SimpleNamespace(status=429, reason="Too Many Requests"), "slow down"
            ),
            True,
        ),
        (ConnectionResetError("reset by peer"), True),
        (
            discord.NotFound(
                SimpleNamespace(status=404, reason="Not Found"),
                {"code": 10008, "message": "Unknown Message"},
            ),
            False,
        ),
        (
            discord.Forbidden(
                SimpleNamespace(status=403, reason="Forbidden"),
                {"code": 50013, "message": "Missing Permissions"},
            ),
            False,
        ),
        (
            discord.HTTPException(SimpleNamespace(status=400, reason="Bad Request"), "too long"),
            False,
        ),
    ],
)
def test_which_discord_failures_an_answer_writes_through(failure: Exception, passing: bool) -> None:
    assert discord_hiccup(failure) is passing
