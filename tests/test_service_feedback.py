"""Feedback through the service: votes, corrections, retries and stats, on real databases.

Real SQLite (and PostgreSQL where the SQL differs), real migrations, the real service on
the fake model server.
"""

from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import select

from bot.app import App
from bot.present import share_text, vote_line
from bot.terminal import TerminalChat, run_json
from core.errors import NotFound, UserError
from core.messages import Author, ChatRequest, Place, ReplyFinished, ReplyStarted
from store.models import Message, Vote
from store.repositories import ConversationRepository
from tests.fakes.openai_server import FakeOpenAI

PLACE = Place(10, 20)
ALICE, BOB, CAROL = Author(1, "alice"), Author(2, "bob"), Author(3, "carol")


def ask(text: str, discord_id: int, reply_to: int | None = None) -> ChatRequest:
    return ChatRequest(
        PLACE, ALICE, text, discord_message_id=discord_id, reply_to_discord_id=reply_to
    )


async def votes_on(app: App, answer_id: str) -> list[tuple[int, int, str | None]]:
    async with app.sessions() as session:
        rows = (await session.scalars(select(Vote).where(Vote.answer_id == answer_id))).all()
    return sorted((v.voter_id, v.value, v.reason) for v in rows)


async def test_one_vote_per_person_per_answer_that_changes_and_goes(chat_app: App) -> None:
    svc = chat_app.service
    result = await svc.answer(ask("What is 2+2?", 1))
    # Voted at once, while the log writer may not have written the answer yet.
    first = await svc.vote(result.message_id, BOB, 1, source="button")
    assert (first.value, first.previous) == (1, None) and vote_line(first) == "Thanks for the 👍."
    again = await svc.vote(result.message_id, BOB, 1, source="reaction")
    assert "already" in vote_line(again)
    changed = await svc.vote(
        result.message_id, BOB, -1, source="button", reason="wrong", comment="it is 4"
    )
    assert changed.previous == 1 and vote_line(changed) == "Changed your vote to 👎."
    await svc.vote(result.message_id, CAROL, 1, source="terminal")
    assert await votes_on(chat_app, result.message_id) == [(2, -1, "wrong"), (3, 1, None)]

    removed = await svc.unvote(result.message_id, BOB)
    assert removed.previous == -1 and vote_line(removed) == "Your vote is removed."
    assert await votes_on(chat_app, result.message_id) == [(3, 1, None)]


async def test_votes_on_unknown_answers_or_prompts_are_refused_politely(chat_app: App) -> None:
    svc = chat_app.service
    with pytest.raises(NotFound, match="don't have that answer"):
        await svc.vote("0" * 32, BOB, 1, source="button")
    result = await svc.answer(ask("hello", 1))
    await chat_app.writer.drain()
    async with chat_app.sessions() as session:
        answer = await session.get(Message, result.message_id)
    assert answer is not None and answer.parent_id is not None
    with pytest.raises(NotFound):
        await svc.vote(answer.parent_id, BOB, 1, source="button")  # a prompt, not an answer
    with pytest.raises(UserError, match="Unknown reason"):
        await svc.vote(result.message_id, BOB, -1, source="button", reason="boring")


async def test_a_vote_by_reaction_finds_the_answer_its_message_carries(chat_app: App) -> None:
    svc = chat_app.service
    result = await svc.answer(ask("hello", 1))
    await svc.link_discord_messages(result.message_id, result.conversation_id, [7001, 7002])
    outcome = await svc.vote_on_discord_message(7002, BOB, -1)
    assert outcome is not None and outcome.answer_id == result.message_id
    assert await votes_on(chat_app, result.message_id) == [(2, -1, None)]
    assert await svc.vote_on_discord_message(7002, BOB, None) is not None  # the reaction removed
    assert await votes_on(chat_app, result.message_id) == []
    assert await svc.vote_on_discord_message(123456, BOB, 1) is None, "not one of our answers"


async def test_taking_back_one_thumb_keeps_a_vote_that_is_the_other(chat_app: App) -> None:
    svc = chat_app.service
    result = await svc.answer(ask("hello", 1))
    await svc.link_discord_messages(result.message_id, result.conversation_id, [7001])
    await svc.vote_on_discord_message(7001, BOB, 1)
    await svc.vote_on_discord_message(7001, BOB, -1)  # reacted 👎 too: the vote is now 👎
    kept = await svc.vote_on_discord_message(7001, BOB, None, taking_back=1)  # the 👍 goes
    assert kept is not None and (kept.value, kept.previous) == (-1, -1)
    assert await votes_on(chat_app, result.message_id) == [(2, -1, None)]
    gone = await svc.vote_on_discord_message(7001, BOB, None, taking_back=-1)
    assert gone is not None and (gone.value, gone.previous) == (0, -1)
    assert await votes_on(chat_app, result.message_id) == []


async def test_an_answers_origin_names_its_model_and_the_message_that_asked(
    chat_app: App,
) -> None:
    svc = chat_app.service
    result = await svc.answer(ask("hello", 4242))
    origin = await svc.answer_origin(result.message_id)
    assert (origin.answer_id, origin.model, origin.prompt_discord_id) == (
        result.message_id,
        "main",
        4242,
    )
    with pytest.raises(NotFound, match="don't have that answer"):
        await svc.answer_origin("0" * 32)


async def test_a_correction_is_a_sibling_that_used_the_same_inputs(chat_app: App) -> None:
    svc = chat_app.service
    first = await svc.answer(ask("My name is Ada.", 1))
    await svc.link_discord_messages(first.message_id, first.conversation_id, [8001])
    second = await svc.answer(ask("What is my name?", 2, reply_to=8001))
    assert await svc.answer_text(second.message_id) == "Echo: What is my name?"
    correction = await svc.correct(second.message_id, BOB, "  Your name is Ada.  ")
    async with chat_app.sessions() as session:
        repo = ConversationRepository(session)
        row = await session.get(Message, correction.id)
        original = await session.get(Message, second.message_id)
        assert row is not None and original is not None
        assert (row.kind, row.role, row.content, row.author_id) == (
            "correction",
            "assistant",
            "Your name is Ada.",
            BOB.id,
        )
        assert row.parent_id == original.parent_id and row.alternative_to == original.id
        assert row.request_messages == original.request_messages
        assert await repo.inputs_of(correction.id) == await repo.inputs_of(original.id)
    with pytest.raises(UserError, match="empty"):
        await svc.correct(second.message_id, BOB, "   ")


async def test_a_retry_is_an_alternative_with_the_same_history_and_the_conversation_follows_it(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = chat_app.service
    first = await svc.answer(ask("My name is Ada.", 1))
    await svc.link_discord_messages(first.message_id, first.conversation_id, [8001])
    second = await svc.answer(ask("What is my name?", 2, reply_to=8001))
    sent_first_time = fake_openai.chat_requests[-1].messages

    events = [e async for e in svc.retry(second.message_id, ALICE, model="solo")]
    started, finished = events[0], events[-1]
    assert isinstance(started, ReplyStarted) and started.model == "solo"
    assert isinstance(finished, ReplyFinished) and finished.result.model == "solo"
    assert fake_openai.chat_requests[-1].model == "fake-solo"
    assert fake_openai.chat_requests[-1].messages == sent_first_time, (
        "the same history, as it was sent"
    )
    alternative = finished.result.message_id
    await chat_app.writer.drain()
    async with chat_app.sessions() as session:
        rows = {m.id: m for m in (await session.scalars(select(Message))).all()}
    assert (
        rows[alternative].kind == "alternative"
        and rows[alternative].alternative_to == second.message_id
    )
    assert rows[alternative].parent_id == rows[second.message_id].parent_id
    assert sum(1 for m in rows.values() if m.role == "user") == 2, (
        "the question is not stored again"
    )

    # The conversation continues from the alternative, not from the original.
    await svc.link_discord_messages(alternative, finished.result.conversation_id, [8003])
    await svc.answer(ask("Thanks", 3, reply_to=8003))
    sent = [m["content"] for m in fake_openai.chat_requests[-1].messages[1:]]
    assert sent[-2:] == ["Echo: What is my name?", "Thanks"]
    assert len(sent) == 5


async def test_stats_per_model_with_an_interval_reasons_and_corrections(chat_app: App) -> None:
    svc = chat_app.service
    answers = [await svc.answer(ask(f"question {n}", n)) for n in range(1, 5)]
    for n, result in enumerate(answers):
        await svc.vote(
            result.message_id,
            BOB,
            1 if n < 3 else -1,
            source="button",
            reason=None if n < 3 else "too_long",
        )
        await svc.vote(result.message_id, CAROL, 1, source="button")
    await svc.correct(answers[3].message_id, CAROL, "Shorter.")
    stats = await svc.feedback_stats(PLACE.guild_id)
    [main] = stats.models
    assert (main.model, main.answers, main.up, main.down, main.corrections) == ("main", 4, 7, 1, 1)
    assert main.top_reasons() == [("too_long", 1)]
    low, high = main.interval or (0, 0)
    assert 0.4 < low < 7 / 8 < high <= 1.0
    assert share_text(main).startswith("88% 👍 (95% CI")
    assert (await svc.feedback_stats(PLACE.guild_id, channel_id=999)).models == ()


async def test_the_terminal_votes_corrects_and_retries_the_last_answer(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    chat = TerminalChat(chat_app.service, Place(0, 0), Author(42, "terminal"))
    lines = [
        "/good",
        "What is 2+2?",
        "/good",
        "/bad too_long and rambling",
        "/better It is 4.",
        "/retry solo",
        "/bad",
    ]
    stdout = io.StringIO()
    await run_json(chat, io.BytesIO("\n".join(lines).encode() + b"\n"), stdout)  # type: ignore[arg-type]
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert len(out) == len(lines)
    assert out[0]["ok"] is False and "no answer yet" in out[0]["message"]
    answer_id = out[1]["message_id"]
    assert (
        out[2]["message"] == "Thanks for the 👍."
        and out[3]["message"] == "Changed your vote to 👎."
    )
    assert out[4]["ok"] and "better answer" in out[4]["message"]
    assert out[5]["model"] == "solo" and out[5]["reply"] == "Echo: What is 2+2?", (
        "/retry prints a reply"
    )
    assert out[6]["message"] == "Thanks for the 👎.", "votes now apply to the newest answer"
    assert await votes_on(chat_app, answer_id) == [(42, -1, "too_long")]
    assert await votes_on(chat_app, out[5]["message_id"]) == [(42, -1, None)]
