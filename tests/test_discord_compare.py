"""Comparing models in Discord through simcord: /compare, /arena, /arena-pool and /leaderboard.

The real bot and the real chat service over a migrated SQLite file; the models are the
fake OpenAI server (and, for a failing model, a real endpoint that refuses connections).
What people do is checked where it lands: the preferences, battles and votes tables.
"""

from __future__ import annotations

import io
import random
from collections.abc import Awaitable, Callable
from typing import Any

import discord
import pytest
import simcord
from PIL import Image
from sqlalchemy import select

from bot.app import App
from bot.discord.compare import CONTENT_LIMIT, DESCRIPTION_LIMIT, EMBEDS_LIMIT
from bot.discord.leaderboard import leaderboard_embed
from bot.service.leaderboard import Leaderboard, LeaderboardEntry
from bot.service.limits import PersonLimit
from bot.service.ratings import fit_ratings
from core.settings import Settings
from store.models import Battle, BattleVote, Preference
from tests.fakes.openai_server import FakeOpenAI, FakeRequest
from tests.fixtures.battles import add_answers, add_battle
from tests.fixtures.discord import World
from tests.test_service_compare import leaky_reply, register_dead_model, with_config_extra

MODELS = {"main", "solo", "backup", "tiny", "tiny-then-big"}


@pytest.fixture
def service_settings(service_settings: Settings) -> Settings:
    """The test registry with comparison_models = ["solo"] and arena_pool = main, solo, backup."""
    return with_config_extra(service_settings)


@pytest.fixture(autouse=True)
def seeded(chat_app: App) -> None:
    chat_app.service.comparisons.rng = random.Random(7)


def components_of(message: simcord.ResponseMessage | discord.Message) -> list[dict[str, Any]]:
    """Every component of a message, flattened out of its action rows."""
    rows = message.components
    if isinstance(message, discord.Message):
        return [child.to_dict() for row in rows for child in row.children]  # type: ignore[union-attr]
    return [child for row in rows for child in row.get("components", [])]


def best_buttons(message: simcord.ResponseMessage) -> dict[str, str]:
    """The "best" buttons of a comparison: model -> custom id."""
    return {
        c["label"]: c["custom_id"]
        for c in components_of(message)
        if c["custom_id"].startswith("sb:best:")
    }


def arena_buttons(message: simcord.ResponseMessage) -> dict[str, str]:
    """The buttons of a battle: action -> custom id."""
    return {
        c["custom_id"].split(":")[2]: c["custom_id"]
        for c in components_of(message)
        if c["custom_id"].startswith("sb:arena:")
    }


def by_title(message: simcord.ResponseMessage) -> dict[str, discord.Embed]:
    return {str(embed.title): embed for embed in message.embeds}


def fields(embed: discord.Embed) -> dict[str, str]:
    return {str(f.name): str(f.value) for f in embed.fields}


def embed_size(embed: discord.Embed) -> int:
    """What Discord counts of an embed against the 6,000 of a message."""
    return len(embed)


def public_text(message: simcord.ResponseMessage) -> str:
    """All that everyone can read of a message: content, embeds and button labels."""
    parts = [message.content]
    for embed in message.embeds:
        parts += [str(embed.title), str(embed.description), str(embed.footer.text)]
        parts += [f"{f.name} {f.value}" for f in embed.fields]
    parts += [str(c.get("label")) for c in components_of(message)]
    return "\n".join(parts)


def callbacks(world: World) -> list[int]:
    """The type of each interaction callback the bot sent, in order."""
    return [
        r.json["type"]
        for r in world.env.http_requests
        if r.method == "POST" and r.path.endswith("/callback")
    ]


async def rows(app: App, model: type, **where: object) -> list[Any]:
    await app.writer.drain()
    async with app.sessions() as session:
        return list((await session.scalars(select(model).filter_by(**where))).all())


# -------------------------------------------------------------------------- /compare


async def test_compare_shows_each_model_and_the_best_button_keeps_one_pick_per_person(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda request: f"{request.model} says: {request.last_user_text}"
    done = await world.alice.slash(
        world.channel, "compare", prompt="What is 2+2?", models="main, solo, backup"
    )
    message = done.response
    assert callbacks(world) == [5], "deferred at once (Discord's type 5: thinking…)"
    assert not message.ephemeral, "shown to the channel"
    assert message.content.endswith(">>> What is 2+2?")
    shown = by_title(message)
    assert set(shown) == {"main", "solo", "backup"}
    assert shown["solo"].description == "fake-solo says: What is 2+2?"
    main = fields(shown["main"])
    assert set(main) == {"Latency", "First token", "Tokens", "Cost"}
    assert main["Latency"].endswith(("ms", "s")) and " in · " in main["Tokens"]
    assert main["Cost"].startswith("$") and fields(shown["solo"])["Cost"] == "free"
    assert [f.inline for f in shown["main"].fields] == [True] * 4
    buttons = best_buttons(message)
    assert set(buttons) == {"main", "solo", "backup"}
    assert [c["label"] for c in components_of(message)] == [e.title for e in message.embeds], (
        "the buttons follow the answers' order"
    )

    picked = await world.bob.click(message, custom_id=buttons["solo"])
    assert picked.response.ephemeral
    assert picked.response.content == "Noted: **solo** gave the best answer."
    again = await world.bob.click(message, custom_id=buttons["solo"])
    assert again.response.content == "**solo** was already your pick; it stays."
    changed = await world.bob.click(message, custom_id=buttons["main"])
    assert changed.response.content == "Changed your pick from **solo** to **main**."
    await world.alice.click(message, custom_id=buttons["backup"])

    answers = {
        name: custom_id.rsplit(":", 1)[1] for name, custom_id in best_buttons(message).items()
    }
    picks = await rows(chat_app, Preference)
    assert sorted((p.voter_id, p.chosen_id) for p in picks) == sorted(
        [(world.bob.id, answers["main"]), (world.alice.id, answers["backup"])]
    )
    assert {p.prompt_id for p in picks} == {buttons["main"].split(":")[2]}


async def test_without_models_compare_asks_the_channels_model_and_the_comparison_set(
    world: World, chat_app: App
) -> None:
    done = await world.alice.slash(world.channel, "compare", prompt="hi")
    assert set(by_title(done.response)) == {"main", "solo"}
    await world.mod.slash(world.channel, "model set", name="backup")
    moved = await world.alice.slash(world.channel, "compare", prompt="hi")
    assert set(by_title(moved.response)) == {"backup", "solo"}


async def test_each_answer_is_edited_in_as_its_model_finishes_and_a_failure_says_why(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    await register_dead_model(chat_app)  # refuses connections: it fails before main answers
    fake_openai.latency = 0.3
    done = await world.alice.slash(world.channel, "compare", prompt="hello", models="main, dead")

    edits = [
        r.json
        for r in world.env.http_requests
        if r.method == "PATCH" and r.path.endswith("/messages/@original")
    ]
    first, last = edits[0], edits[-1]
    assert [e["title"] for e in first["embeds"]] == ["dead"], "dead is shown before main is done"
    assert "Waiting for the others" in first["content"] and not first.get("components")
    assert [e["title"] for e in last["embeds"]] == ["dead", "main"], "in the order they finished"

    shown = by_title(done.response)
    assert shown["dead"].colour == discord.Colour.red()
    assert shown["dead"].description.startswith("⚠️ ") and "dead" in shown["dead"].description
    assert fields(shown["dead"])["Tokens"] == "—"
    assert shown["main"].description == "Echo: hello"
    assert set(best_buttons(done.response)) == {"main"}, "nothing to pick in a failure"


async def test_bad_input_is_one_line_that_keeps_the_question(world: World) -> None:
    typo = await world.alice.slash(
        world.channel, "compare", prompt="A long question I typed", models="mian, solo"
    )
    content = typo.response.content
    assert content.startswith("⚠️ No model named 'mian'. Did you mean 'main'")
    assert content.endswith(">>> A long question I typed") and not typo.response.embeds
    too_many = await world.alice.slash(
        world.channel, "compare", prompt="q", models="main, solo, backup, tiny, tiny-then-big"
    )
    assert too_many.response.content.startswith("⚠️ A comparison asks 4 models at most")


async def test_comparing_and_battling_count_against_the_persons_message_limit(
    world: World, chat_app: App
) -> None:
    chat_app.service.limits = PersonLimit(1)
    await world.alice.slash(world.channel, "compare", prompt="one")
    refused = await world.alice.slash(world.channel, "arena", prompt="two")
    assert refused.response.ephemeral and callbacks(world)[-1] == 4, "answered, not deferred"
    assert refused.response.content.startswith("⏳ You are asking me faster than I answer")
    assert refused.response.content.endswith(">>> two")
    allowed = await world.bob.slash(world.channel, "arena", prompt="his own minute")
    assert arena_buttons(allowed.response)


# ------------------------------------------------------------------ Discord's limits


def within_limits(message: simcord.ResponseMessage) -> None:
    assert len(message.content) <= CONTENT_LIMIT
    assert len(message.embeds) <= 10
    assert sum(embed_size(e) for e in message.embeds) <= EMBEDS_LIMIT
    for embed in message.embeds:
        assert len(embed.description or "") <= DESCRIPTION_LIMIT


async def test_long_answers_are_shortened_to_fit_and_say_so(
    world: World, fake_openai: FakeOpenAI
) -> None:
    def long(request: FakeRequest) -> str:
        if request.model == "fake-solo":
            return "Short and sweet."
        if request.model == "fake-backup":  # a code block that cannot fit whole
            return "```python\n" + "x = 1\n" * 1500 + "```"
        return " ".join(f"word{i:04d}" for i in range(1200))  # 10,799 characters

    fake_openai.reply = long
    done = await world.alice.slash(
        world.channel, "compare", prompt="write a lot", models="main, solo, backup"
    )
    message = done.response
    within_limits(message)
    shown = by_title(message)
    assert shown["solo"].description == "Short and sweet." and not shown["solo"].footer.text
    for name in ("main", "backup"):
        embed = shown[name]
        assert embed.footer.text.startswith("Shortened to fit Discord: ")
        assert len(embed.description) > 2000, "the room the short answer left is shared"
    assert shown["main"].footer.text.endswith(" of 10,799 characters shown.")
    assert shown["main"].description.endswith(" …")
    assert shown["backup"].description.count("```") == 2, "the code block is closed"

    four = await world.alice.slash(
        world.channel, "compare", prompt="x" * 5000, models="main, backup, tiny, tiny-then-big"
    )
    within_limits(four.response)
    assert "The question is shortened here." in four.response.content

    fake_openai.reply = lambda request: "y" * 9000
    battle = await world.alice.slash(world.channel, "arena", prompt="long battle")
    within_limits(battle.response)
    assert all(e.footer.text.startswith("Shortened") for e in battle.response.embeds)


# ---------------------------------------------------------------------------- /arena


async def test_a_battle_is_anonymous_and_the_vote_reveals_the_models_to_the_voter_only(
    world: World, chat_app: App
) -> None:
    done = await world.alice.slash(world.channel, "arena", prompt="What is DNS?")
    message = done.response
    assert not message.ephemeral and message.content.endswith(">>> What is DNS?")
    assert [e.title for e in message.embeds] == ["Answer A", "Answer B"]
    assert [e.description for e in message.embeds] == ["Echo: What is DNS?"] * 2
    assert list(arena_buttons(message)) == ["a", "b", "tie", "bad", "why"]
    [battle] = await rows(chat_app, Battle)
    words = public_text(message).casefold()
    assert battle.model_a not in words and battle.model_b not in words, "no model is named"

    voted = await world.bob.click(message, custom_id=arena_buttons(message)["b"])
    reveal = voted.response
    assert reveal.ephemeral, "only the voter sees the names"
    assert reveal.content == (
        f"Thanks for your vote (B was better). A was **{battle.model_a}**, "
        f"B was **{battle.model_b}**."
    )
    again = await world.bob.click(message, custom_id=arena_buttons(message)["a"])
    assert again.response.ephemeral
    assert again.response.content.startswith("You already voted on this battle (B was better)")
    await world.alice.click(message, custom_id=arena_buttons(message)["tie"])
    after = world.channel.history()[-1]
    assert public_text(done.response) == public_text(message), "the battle message is unchanged"
    assert after.id == message.id, "nothing else was posted in the channel"
    votes = await rows(chat_app, BattleVote, battle_id=battle.id)
    assert sorted((v.voter_id, v.outcome) for v in votes) == sorted(
        [(world.bob.id, "b"), (world.alice.id, "tie")]
    )


async def test_a_vote_with_a_reason_goes_through_the_modal(world: World, chat_app: App) -> None:
    done = await world.alice.slash(world.channel, "arena", prompt="Explain TCP")
    shown = await world.bob.click(done.response, custom_id=arena_buttons(done.response)["why"])
    assert shown.modal is not None
    select_options = shown.modal["components"][0]["component"]["options"]
    assert [o["value"] for o in select_options] == ["a", "b", "tie", "bad"]
    voted = await world.bob.submit_modal(
        shown, {"outcome": ["bad"], "reason": "Both skipped the handshake."}
    )
    assert voted.response.ephemeral
    assert voted.response.content.startswith("Thanks for your vote (both were bad). A was **")
    [vote] = await rows(chat_app, BattleVote)
    assert (vote.voter_id, vote.outcome, vote.reason) == (
        world.bob.id,
        "bad",
        "Both skipped the handshake.",
    )


async def test_an_answer_that_names_its_model_makes_the_battle_not_count_after_the_vote(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = leaky_reply
    world.open_to_everyone("arena-pool")
    await world.mod.slash(world.channel, "arena-pool set", models="main, solo")
    done = await world.alice.slash(world.channel, "arena", prompt="Who are you?")
    [battle] = await rows(chat_app, Battle)
    label = "A" if battle.model_a == "solo" else "B"
    voted = await world.bob.click(done.response, custom_id=arena_buttons(done.response)["a"])
    assert voted.response.ephemeral
    assert voted.response.content.endswith(
        f"This battle does not count: Answer {label} gave its model away: it says 'Solo'."
    )
    [vote] = await rows(chat_app, BattleVote)
    assert vote.voter_id == world.bob.id, "the vote is kept, and left out of the ratings"


async def test_the_daily_cap_on_votes_is_told_to_the_voter(world: World, chat_app: App) -> None:
    chat_app.service.comparisons.votes_per_day = 1
    first = await world.alice.slash(world.channel, "arena", prompt="one")
    second = await world.alice.slash(world.channel, "arena", prompt="two")
    ok = await world.bob.click(first.response, custom_id=arena_buttons(first.response)["a"])
    assert "(0 votes left today.)" in ok.response.content
    capped = await world.bob.click(second.response, custom_id=arena_buttons(second.response)["b"])
    assert capped.response.ephemeral
    assert capped.response.content.startswith("⚠️ You have cast 1 arena votes today")
    assert "00:00 UTC" in capped.response.content
    assert len(await rows(chat_app, BattleVote)) == 1


async def test_a_battle_whose_model_fails_hides_the_error_until_the_vote(
    world: World, chat_app: App
) -> None:
    await register_dead_model(chat_app)
    world.open_to_everyone("arena-pool")
    await world.mod.slash(world.channel, "arena-pool set", models="main, dead")
    done = await world.alice.slash(world.channel, "arena", prompt="hello")
    assert "dead" not in public_text(done.response)
    failed = [e for e in done.response.embeds if e.colour == discord.Colour.red()]
    assert len(failed) == 1 and "could not answer" in str(failed[0].description)
    voted = await world.bob.click(done.response, custom_id=arena_buttons(done.response)["tie"])
    assert "This battle does not count: Answer" in voted.response.content
    assert "(dead) failed" in voted.response.content


# ----------------------------------------------------------------------- /arena-pool


async def test_the_pool_command_is_for_moderators(world: World, chat_app: App) -> None:
    command = world.env.backend.find_command("arena-pool", world.guild.id)
    assert command is not None
    assert (
        int(command["default_member_permissions"])
        == discord.Permissions(manage_channels=True).value
    ), "shown to moderators by default"
    assert not any(
        c.startswith("arena-pool") for c in world.alice.available_commands(world.channel)
    )
    assert "arena" in world.alice.available_commands(world.channel)

    world.open_to_everyone("arena-pool")
    refused = await world.alice.slash(world.channel, "arena-pool set", models="main, solo")
    assert refused.response.ephemeral
    assert refused.response.content == (
        "⚠️ Changing this channel's settings needs the **Manage Channels** permission "
        "or the **Switchboard Manager** role."
    )
    set_here = await world.mod.slash(world.channel, "arena-pool set", models="solo, backup")
    assert set_here.response.content == "Arena pool for this channel: **solo**, **backup**."
    not_server = await world.mod.slash(
        world.channel, "arena-pool set", models="main, solo", server=True
    )
    assert "**Manage Server** permission" in not_server.response.content
    by_admin = await world.admin.slash(
        world.channel, "arena-pool set", models="main, tiny", server=True
    )
    assert by_admin.response.content == "Arena pool for this server: **main**, **tiny**."
    one = await world.manager.slash(world.channel, "arena-pool set", models="solo")
    assert one.response.content == "⚠️ An arena pool needs at least two different models."

    for n in range(4):
        await world.alice.slash(world.channel, "arena", prompt=f"q{n}")
    drawn = {frozenset((b.model_a, b.model_b)) for b in await rows(chat_app, Battle)}
    assert drawn == {frozenset({"solo", "backup"})}

    settings = await world.alice.slash(world.channel, "settings")
    [pool] = [f for f in settings.response.embeds[0].fields if f.name == "Arena pool"]
    assert pool.value == "**solo**, **backup** (set for this channel)"
    reset = await world.mod.slash(world.channel, "arena-pool reset")
    assert reset.response.content == (
        "Arena pool for this channel reset; battles now draw from **main**, **tiny** "
        "(server default)."
    )


# -------------------------------------------------------------------- after a restart


async def test_compare_and_arena_buttons_work_after_a_restart(
    world: World, chat_app: App, restart: Callable[[], Awaitable[App]]
) -> None:
    compared = await world.alice.slash(
        world.channel, "compare", prompt="remember", models="main, solo"
    )
    battled = await world.alice.slash(world.channel, "arena", prompt="remember this battle")

    app = await restart()  # a new bot and service: nothing in memory knows either
    picked = await world.bob.click(
        compared.response, custom_id=best_buttons(compared.response)["solo"]
    )
    assert picked.response.content == "Noted: **solo** gave the best answer."
    voted = await world.bob.click(battled.response, custom_id=arena_buttons(battled.response)["a"])
    [battle] = await rows(app, Battle)
    assert f"A was **{battle.model_a}**, B was **{battle.model_b}**" in voted.response.content
    shown = await world.bob.click(
        battled.response, custom_id=arena_buttons(battled.response)["why"]
    )
    assert shown.modal is not None
    assert len(await rows(app, Preference)) == 1 and len(await rows(app, BattleVote)) == 1


# ---------------------------------------------------------------------- /leaderboard


async def test_the_leaderboard_shows_each_model_with_its_chart(world: World, chat_app: App) -> None:
    boards = chat_app.service.leaderboards
    boards.min_battles, boards.resamples = 6, 200  # a small board, fitted quickly
    guild, here = world.guild.id, world.channel.id
    elsewhere = world.guild.create_text_channel("elsewhere").id
    async with chat_app.sessions() as session, session.begin():
        for outcome in ["a"] * 18 + ["b"] + ["tie"]:  # main beats solo, mostly
            await add_battle(session, "main", "solo", [outcome], guild_id=guild, channel_id=here)
        await add_battle(session, "backup", "solo", ["a"], guild_id=guild, channel_id=elsewhere)
        await add_answers(
            session,
            "main",
            [200.0, 400.0, 1500.0],
            guild_id=guild,
            channel_id=here,
            cost_usd=0.002,
            votes=[1, 1, 1, -1],
        )

    done = await world.alice.slash(world.channel, "leaderboard")
    shown = done.response
    assert not shown.ephemeral, "shown to the channel"
    [embed] = shown.embeds
    assert embed.title == "Leaderboard: this channel"
    assert embed.description == "20 battles counted in this channel."
    assert "Bradley–Terry" in str(embed.footer.text)
    board = {str(f.name): str(f.value) for f in embed.fields}
    assert list(board) == ["#1 · main", "#2 · solo"]
    main = board["#1 · main"]
    assert main.startswith("Rating **") and "(95% interval " in main
    assert "20 battles (W–L–T 18–1–1)" in main
    assert "👍 75% of 4 votes · median latency 400 ms · $2.00 per 1,000 answers" in main
    assert "👍 no votes · median latency — · — per 1,000 answers" in board["#2 · solo"]
    [chart] = shown.attachments
    assert chart.filename == "leaderboard.png"
    assert embed.image.url == "attachment://leaderboard.png"
    image = Image.open(io.BytesIO(await chart.read()))
    assert image.format == "PNG" and image.width > 300 and image.height > 100

    server = await world.alice.slash(world.channel, "leaderboard", scope="server")
    [embed] = server.response.embeds
    assert embed.title == "Leaderboard: this server"
    assert {str(f.name).split(" · ")[1] for f in embed.fields} == {"main", "solo", "backup"}
    assert any(str(f.name).startswith("unranked (1 battle) · ") for f in embed.fields)

    in_dm = await world.alice.user.slash("leaderboard", scope="server")
    assert in_dm.response.content.startswith("⚠️ There is no server here")
    empty = await world.alice.user.slash("leaderboard")
    assert empty.response.content.startswith("No battles and no answers in this channel yet")
    assert not empty.response.attachments


async def test_a_leaderboard_of_more_models_than_an_embed_holds_says_so(
    world: World, chat_app: App
) -> None:
    chat_app.service.leaderboards.resamples = 50
    async with chat_app.sessions() as session, session.begin():
        for n in range(30):
            await add_answers(
                session,
                f"model-{n:02d}",
                [100.0],
                guild_id=world.guild.id,
                channel_id=world.channel.id,
                votes=[1],
            )
    done = await world.alice.slash(world.channel, "leaderboard", scope="global")
    [embed] = done.response.embeds
    assert len(embed.fields) == 25 and len(embed) <= EMBEDS_LIMIT
    assert embed.description.endswith(
        f"models are shown ({30 - len(embed.fields)} more): "
        "`switchboard leaderboard` lists them all."
    )
    assert done.response.attachments, "the chart of the 👍 shares, without battles"


def test_a_leaderboard_embed_of_long_names_keeps_to_discords_6000_characters() -> None:
    entries = tuple(
        LeaderboardEntry(f"{n:02d}-" + "m" * 200, None, 3, 1, 4, 120.0, 0.5, None)
        for n in range(25)
    )
    board = Leaderboard("global", None, None, entries, fit_ratings([], resamples=10))
    embed = leaderboard_embed(board, chart=False)
    assert 10 < len(embed.fields) < 25 and len(embed) <= EMBEDS_LIMIT
    assert f"({25 - len(embed.fields)} more)" in str(embed.description)
    assert not embed.image.url
