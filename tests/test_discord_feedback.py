"""Feedback in Discord through simcord: buttons, modals, reactions, retries and /feedback stats.

The real bot and the real chat service over a migrated SQLite file; the model is the
fake OpenAI server. What people do is checked where it lands: the votes and messages
tables.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable

import discord
import simcord
from PIL import Image
from sqlalchemy import select

from bot.app import App
from bot.discord.feedback import AnswerButton, thumb_value
from bot.present import REASON_WORDS
from bot.service.limits import PersonLimit
from core.exchange import VOTE_REASONS
from store.models import Message, Vote
from store.repositories import ConversationRepository
from tests.fakes.openai_server import FakeOpenAI, FakeRequest
from tests.fixtures.discord import World

ACTIONS = ("up", "down", "fix", "retry")


def bot_messages(
    world: World, channel: simcord.ChannelHandle | None = None
) -> list[discord.Message]:
    """The bot's messages in the channel (or the given one), oldest first."""
    return [m for m in (channel or world.channel).history() if m.author.id == world.bot.user.id]


def buttons(message: discord.Message) -> dict[str, str]:
    """The feedback buttons on a message: action -> custom id."""
    found = {}
    for row in message.components:
        for item in getattr(row, "children", []):
            action, _, _answer = (item.custom_id or "").partition(":")[2].partition(":")
            found[action] = item.custom_id
    return found


def components_of(response: simcord.ResponseMessage) -> list[dict]:
    return [child for row in response.components for child in row.get("components", [])]


async def answer_rows(app: App) -> list[Message]:
    """Every stored assistant message, oldest first."""
    await app.writer.drain()
    async with app.sessions() as session:
        rows = await session.scalars(
            select(Message).where(Message.role == "assistant").order_by(Message.created_at)
        )
        return list(rows.all())


async def votes(app: App) -> list[tuple[int, int, str | None, str | None, str]]:
    """(voter, value, reason, comment, source) of every stored vote, by voter."""
    async with app.sessions() as session:
        rows = (await session.scalars(select(Vote))).all()
    return sorted((v.voter_id, v.value, v.reason, v.comment, v.source) for v in rows)


async def ask(world: World, text: str) -> discord.Message:
    """Alice asks the bot; the answer's last part."""
    await world.alice.send(world.channel, f"{world.bot.user.mention} {text}")
    return bot_messages(world)[-1]


def conversation(request: FakeRequest) -> list[str]:
    return [m["content"] for m in request.messages if m["role"] != "system"]


# ----------------------------------------------------------------- the buttons


async def test_an_answer_carries_the_four_buttons_on_its_last_part_only(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda request: " ".join(f"word{i:04d}" for i in range(300))  # 2 parts
    await world.alice.send(world.channel, f"{world.bot.user.mention} write a lot")

    first, last = bot_messages(world)
    [answer] = await answer_rows(chat_app)
    assert buttons(first) == {}
    assert buttons(last) == {action: f"sb:{action}:{answer.id}" for action in ACTIONS}
    # The buttons came with the final text, in the same request: no edit of their own.
    writes = [r for r in world.env.http_requests if r.path.endswith(str(last.id))]
    assert writes[-1].json["content"] == last.content and writes[-1].json["components"]
    assert not any(r.json.get("components") for r in writes[:-1])

    fake_openai.fail_next(500, times=2)  # the main model and its fallback both fail
    await world.alice.send(world.channel, f"{world.bot.user.mention} and now?")
    assert buttons(bot_messages(world)[-1]) == {}, "a failure has nothing to rate"


async def test_thumbs_buttons_record_one_vote_per_person_and_the_why_modal_adds_to_it(
    world: World, chat_app: App
) -> None:
    answer = await ask(world, "what is 2+2?")
    ids = buttons(answer)

    up = await world.alice.click(answer, custom_id=ids["up"])
    assert up.response is not None and up.response.ephemeral
    assert up.response.content == "Thanks for the 👍."
    again = await world.alice.click(answer, custom_id=ids["up"])
    assert "already" in again.response.content
    down = await world.bob.click(answer, custom_id=ids["down"])
    assert down.response.ephemeral and down.response.content.startswith("Thanks for the 👎.")
    assert await votes(chat_app) == [
        (world.alice.id, 1, None, None, "button"),
        (world.bob.id, -1, None, None, "button"),
    ]

    [why] = components_of(down.response)
    shown = await world.bob.click(down.response, custom_id=why["custom_id"])
    assert shown.modal is not None
    options = shown.modal["components"][0]["component"]["options"]
    assert [o["value"] for o in options] == list(VOTE_REASONS)
    assert [o["label"] for o in options] == [REASON_WORDS[r] for r in VOTE_REASONS]
    done = await world.bob.submit_modal(
        shown, {"reason": ["too_long"], "comment": "Two sentences would do."}
    )
    assert done.response.ephemeral and "Too long" in done.response.content
    assert await votes(chat_app) == [
        (world.alice.id, 1, None, None, "button"),
        (world.bob.id, -1, "too_long", "Two sentences would do.", "button"),
    ]

    # Alice changes her mind; an empty modal changes nothing.
    changed = await world.alice.click(answer, custom_id=ids["down"])
    assert changed.response.content.startswith("Changed your vote to 👎.")
    [why] = components_of(changed.response)
    shown = await world.alice.click(changed.response, custom_id=why["custom_id"])
    empty = await world.alice.submit_modal(shown, {})
    assert empty.response.content == "Nothing added; your 👎 stands."
    assert (await votes(chat_app))[0] == (world.alice.id, -1, None, None, "button")


async def test_the_pencil_opens_the_answer_and_stores_the_better_one(
    world: World, chat_app: App
) -> None:
    answer = await ask(world, "capital of Australia?")
    ids = buttons(answer)

    shown = await world.bob.click(answer, custom_id=ids["fix"])
    assert shown.modal is not None
    text_input = shown.modal["components"][0]["component"]
    assert text_input["value"] == "Echo: capital of Australia?"
    unchanged = await world.bob.submit_modal(shown, {"text": "Echo: capital of Australia?"})
    assert "nothing is saved" in unchanged.response.content

    shown = await world.bob.click(answer, custom_id=ids["fix"])
    saved = await world.bob.submit_modal(shown, {"text": "Canberra is the capital of Australia."})
    assert saved.response.ephemeral and "saved" in saved.response.content
    original, correction = await answer_rows(chat_app)
    assert (correction.kind, correction.content, correction.author_id) == (
        "correction",
        "Canberra is the capital of Australia.",
        world.bob.id,
    )
    assert correction.alternative_to == original.id and correction.parent_id == original.parent_id


async def test_a_long_answer_is_cut_to_what_the_correction_box_holds(
    world: World, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda request: "x" * 1500 + "\n" + "y" * 1500 + "\n" + "z" * 1500
    answer = await ask(world, "long please")
    shown = await world.alice.click(answer, custom_id=buttons(answer)["fix"])
    label = shown.modal["components"][0]
    assert len(label["component"]["value"]) == 4000 and "cut" in label["description"]


async def test_another_answer_comes_from_the_chosen_model_and_the_conversation_follows_it(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda request: f"{request.model} answers: {request.last_user_text}"
    question = await world.alice.send(world.channel, f"{world.bot.user.mention} pick a colour")
    [answer] = bot_messages(world)

    offered = await world.bob.click(answer, custom_id=buttons(answer)["retry"])
    assert offered.response.ephemeral
    [menu] = components_of(offered.response)
    names = [o["value"] for o in menu["options"]]
    assert names[0] == "main" and sorted(names) == sorted(
        s.name for s in chat_app.service.list_models()
    )
    chosen = await world.bob.select(offered.response, ["solo"])

    original, alternative = bot_messages(world)
    assert alternative.content == "fake-solo answers: pick a colour"
    assert alternative.reference is not None and alternative.reference.message_id == question.id
    assert alternative.jump_url in chosen.response.content and "solo" in chosen.response.content
    [first_row, second_row] = await answer_rows(chat_app)
    assert buttons(alternative) == {a: f"sb:{a}:{second_row.id}" for a in ACTIONS}
    assert (second_row.kind, second_row.alternative_to, second_row.model_name) == (
        "alternative",
        first_row.id,
        "solo",
    )
    assert second_row.parent_id == first_row.parent_id  # siblings under the one prompt

    # Replying to the alternative continues from it, not from the first answer.
    await world.alice.send(world.channel, "why that one?", reply_to=alternative)
    assert conversation(fake_openai.chat_requests[-1]) == [
        "pick a colour",
        "fake-solo answers: pick a colour",
        "why that one?",
    ]


async def test_in_a_thread_the_conversation_continues_from_the_alternative_shown_last(
    world: World, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda request: f"{request.model}: {request.last_user_text}"
    thread = world.thread("colours")
    await world.alice.send(thread, f"{world.bot.user.mention} pick a colour")
    [answer] = bot_messages(world, thread)
    offered = await world.alice.click(answer, custom_id=buttons(answer)["retry"])
    await world.alice.select(offered.response, ["backup"])

    await world.alice.send(thread, "and now a number")
    assert conversation(fake_openai.chat_requests[-1]) == [
        "pick a colour",
        "fake-backup: pick a colour",
        "and now a number",
    ]


async def test_another_answer_counts_against_the_persons_message_limit(
    world: World, chat_app: App
) -> None:
    chat_app.service.limits = PersonLimit(1)
    answer = await ask(world, "one question")  # Alice's one message this minute

    offered = await world.alice.click(answer, custom_id=buttons(answer)["retry"])
    refused = await world.alice.select(offered.response, ["solo"])
    assert refused.response.content.startswith(
        "⏳ You are asking me faster than I answer (1 a minute)"
    )
    assert len(bot_messages(world)) == 1
    offered = await world.bob.click(answer, custom_id=buttons(answer)["retry"])
    await world.bob.select(offered.response, ["solo"])  # Bob has his own minute
    assert len(bot_messages(world)) == 2


async def test_buttons_under_an_answer_from_before_a_restart_still_work(
    world: World, fake_openai: FakeOpenAI, restart: Callable[[], Awaitable[App]]
) -> None:
    answer = await ask(world, "remember this")
    ids = buttons(answer)

    app = await restart()  # a new bot and service: nothing in memory knows the answer
    up = await world.bob.click(answer, custom_id=ids["up"])
    assert up.response.content == "Thanks for the 👍."
    assert await votes(app) == [(world.bob.id, 1, None, None, "button")]
    shown = await world.bob.click(answer, custom_id=ids["fix"])
    assert shown.modal["components"][0]["component"]["value"] == "Echo: remember this"
    offered = await world.bob.click(answer, custom_id=ids["retry"])
    await world.bob.select(offered.response, ["main"])
    assert [m.content for m in bot_messages(world)] == ["Echo: remember this"] * 2
    assert [r.kind for r in await answer_rows(app)] == ["answer", "alternative"]


async def test_a_button_on_an_answer_the_log_does_not_know_gets_a_polite_note(
    world: World, chat_app: App
) -> None:
    answer = await ask(world, "forget me")
    [row] = await answer_rows(chat_app)
    async with chat_app.sessions() as session, session.begin():
        await ConversationRepository(session).delete_messages([row.parent_id])  # prompt and answer

    for action in ("up", "down", "fix", "retry"):
        pressed = await world.bob.click(answer, custom_id=buttons(answer)[action])
        note = pressed.response
        assert note is not None and note.ephemeral, action
        assert "don't have that answer in my log" in note.content, action
    assert await votes(chat_app) == []
    assert len(bot_messages(world)) == 1


# ----------------------------------------------------------------- reactions


async def test_thumbs_reactions_count_as_votes_and_taking_them_away_takes_them_back(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.reply = lambda request: " ".join(f"word{i:04d}" for i in range(300))  # 2 parts
    await world.alice.send(world.channel, f"{world.bot.user.mention} write a lot")
    first, last = bot_messages(world)

    await world.bob.react(first, "👍")  # any part of the answer
    assert await votes(chat_app) == [(world.bob.id, 1, None, None, "reaction")]
    await world.bob.react(last, "👎🏽")  # a change of mind, in any skin tone
    assert await votes(chat_app) == [(world.bob.id, -1, None, None, "reaction")]
    await world.bob.unreact(first, "👍")  # the 👍 goes, the 👎 stands
    assert await votes(chat_app) == [(world.bob.id, -1, None, None, "reaction")]
    await world.bob.unreact(last, "👎🏽")
    assert await votes(chat_app) == []

    await world.alice.react(last, "🎉")  # not a vote
    question = world.channel.history()[0]
    await world.bob.react(question, "👍")  # a person's message: not ours to count
    other_bot = world.guild.add_member(world.env.create_user("otherbot", bot=True))
    await other_bot.react(last, "👍")
    assert await votes(chat_app) == []


async def test_a_thumbs_up_in_a_direct_message_counts(world: World, chat_app: App) -> None:
    await world.alice.send_dm("hello in private")
    dm = world.alice.user.dm_channel
    [answer] = [m for m in dm.history() if m.author.id == world.bot.user.id]
    await world.alice.user.set_reaction(answer, "👍", reacted=True)
    assert await votes(chat_app) == [(world.alice.id, 1, None, None, "reaction")]


def test_thumbs_are_read_in_every_skin_tone_and_nothing_else_is() -> None:
    assert [thumb_value(e) for e in ("👍", "👍🏻", "👍🏿", "👎", "👎🏼")] == [1, 1, 1, -1, -1]
    assert [thumb_value(e) for e in ("❤️", "🎉", "👌")] == [None, None, None]
    assert AnswerButton("up", "a" * 32).custom_id == "sb:up:" + "a" * 32


# ----------------------------------------------------------------- /feedback stats


async def test_feedback_stats_show_an_embed_per_model_and_a_chart(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    world.open_to_everyone("feedback")
    empty = await world.alice.slash(world.channel, "feedback stats")
    assert empty.response.ephemeral and empty.response.content.startswith("No answers")

    first = await ask(world, "one")
    second = await ask(world, "two")
    await world.alice.click(first, custom_id=buttons(first)["up"])
    await world.bob.click(first, custom_id=buttons(first)["up"])
    down = await world.bob.click(second, custom_id=buttons(second)["down"])
    [why] = components_of(down.response)
    shown = await world.bob.click(down.response, custom_id=why["custom_id"])
    await world.bob.submit_modal(shown, {"reason": ["wrong"]})
    offered = await world.alice.click(second, custom_id=buttons(second)["retry"])
    await world.alice.select(offered.response, ["solo"])
    alternative = bot_messages(world)[-1]
    await world.mod.click(alternative, custom_id=buttons(alternative)["up"])
    shown = await world.alice.click(second, custom_id=buttons(second)["fix"])
    await world.alice.submit_modal(shown, {"text": "Two is the answer."})

    stats = await world.alice.slash(world.channel, "feedback stats")
    shown_stats = stats.response
    assert shown_stats.ephemeral
    assert shown_stats.content == "Feedback in this channel: 3 answers, 4 votes."
    main, solo = shown_stats.embeds
    assert main.title == "main" and solo.title == "solo"
    fields = {f.name: f.value for f in main.fields}
    assert fields["Answers"] == "2" and fields["Votes"] == "👍 2 · 👎 1"
    assert fields["Share 👍"].startswith("67% 👍 (95% CI")
    assert fields["Top 👎 reasons"] == "Wrong ×1"
    assert fields["Better answers suggested"] == "1"
    [chart] = shown_stats.attachments
    assert chart.filename == "feedback.png"
    image = Image.open(io.BytesIO(await chart.read()))
    assert image.format == "PNG" and image.width > 100 and image.height > 50

    only_solo = await world.alice.slash(world.channel, "feedback stats", model="solo", days=7)
    assert [e.title for e in only_solo.response.embeds] == ["solo"]


async def test_server_wide_stats_need_manage_channels(world: World) -> None:
    world.open_to_everyone("feedback")
    refused = await world.alice.slash(world.channel, "feedback stats", scope="server")
    assert refused.response.ephemeral and "Manage Channels" in refused.response.content
    allowed = await world.mod.slash(world.channel, "feedback stats", scope="server")
    assert allowed.response.content.startswith("No answers in this server")
    by_role = await world.manager.slash(world.channel, "feedback stats", scope="server")
    assert by_role.response.content.startswith("No answers in this server")
