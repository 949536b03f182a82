"""Comparisons and battles respect privacy, through the real service (real SQLite and
migrations, fake model server): opted-out people and places that log nothing are answered
and counted, never stored; forgetting a person takes their battles, verdicts and
preferences with them."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from bot.app import App
from bot.present import vote_line
from bot.service.compare import ModelAnswer
from core.errors import UserError
from core.messages import Author, ChatRequest, Place
from store.models import AnonymousCount, Battle, BattleVote, Message, Preference
from tests.scan import find_text

GUILD, CHANNEL, QUIET = 10, 20, 21
HERE, SILENT = Place(GUILD, CHANNEL), Place(GUILD, QUIET)
ALICE, BOB, CAROL, MOD = Author(1, "alice"), Author(2, "bob"), Author(3, "carol"), Author(4, "mod")
STORED = (Message, Battle, BattleVote, Preference)


async def count(app: App, model: type[Any]) -> int:
    await app.writer.drain()
    async with app.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def counted(app: App) -> int:
    """Exchanges answered but not stored, as the anonymous counters have them."""
    await app.writer.drain()
    async with app.sessions() as session:
        return int(await session.scalar(select(func.sum(AnonymousCount.exchanges))) or 0)


async def test_an_opted_out_person_compares_and_battles_and_nothing_is_stored(
    chat_app: App,
) -> None:
    svc = chat_app.service
    await svc.opt_out(ALICE)
    comparison = await svc.compare(HERE, ALICE, "alice compares privately", ["main", "solo"])
    assert (
        not comparison.stored
        and [a.reply for a in comparison.answers] == ["Echo: alice compares privately"] * 2
    )
    pick = await svc.prefer(comparison.prompt_id, comparison.answers[0].answer_id, ALICE)
    assert (pick.model, pick.stored) == ("main", False)
    battle = await svc.battle(HERE, ALICE, "alice battles privately")
    assert not battle.stored and battle.a.reply == "Echo: alice battles privately"
    verdict = await svc.battle_vote(battle.id, ALICE, "a")
    assert not verdict.stored and not verdict.counted
    for model in STORED:
        assert await count(chat_app, model) == 0, model.__name__
    assert await counted(chat_app) == 4  # each model asked: two per comparison and battle
    assert await find_text(chat_app.sessions, "privately") == []


async def test_an_opted_out_voter_sees_the_reveal_but_nothing_of_theirs_is_stored(
    chat_app: App,
) -> None:
    svc = chat_app.service
    comparison = await svc.compare(HERE, BOB, "bob compares", ["main", "solo"])
    battle = await svc.battle(HERE, BOB, "bob battles")
    assert comparison.stored and battle.stored
    await svc.opt_out(ALICE)
    pick = await svc.prefer(comparison.prompt_id, comparison.answers[1].answer_id, ALICE)
    assert (pick.model, pick.stored) == ("solo", False)
    verdict = await svc.battle_vote(battle.id, ALICE, "b", "alice thinks b")
    assert not verdict.stored and {verdict.model_a, verdict.model_b} <= set(
        chat_app.registry.names()
    )
    assert await count(chat_app, Preference) == 0 and await count(chat_app, BattleVote) == 0
    # Carol's are.
    assert (await svc.prefer(comparison.prompt_id, comparison.answers[0].answer_id, CAROL)).stored
    assert (await svc.battle_vote(battle.id, CAROL, "a")).stored
    assert await count(chat_app, Preference) == 1 and await count(chat_app, BattleVote) == 1


async def test_where_logging_is_off_comparisons_battles_and_feedback_are_not_stored(
    chat_app: App,
) -> None:
    svc = chat_app.service
    # Asked while the channel still logged: stored.
    before = await svc.compare(SILENT, BOB, "asked before", ["main", "solo"])
    battle = await svc.battle(SILENT, BOB, "battled before")
    answer = await svc.answer(ChatRequest(SILENT, BOB, "chatted before"))
    assert before.stored and battle.stored and answer.stored
    await svc.set_logging(SILENT, "channel", False, MOD)

    quiet = await svc.compare(SILENT, BOB, "asked while off", ["main", "solo"])
    quiet_battle = await svc.battle(SILENT, BOB, "battled while off")
    assert not quiet.stored and not quiet_battle.stored
    assert await counted(chat_app) == 4
    assert await find_text(chat_app.sessions, "while off") == []
    # Votes on what was said there, before too, are not stored now.
    assert not (await svc.prefer(before.prompt_id, before.answers[0].answer_id, CAROL)).stored
    assert not (await svc.battle_vote(battle.id, CAROL, "a")).stored
    vote = await svc.vote(answer.message_id or "", CAROL, 1, source="button")
    assert not vote.stored and "not kept" in vote_line(vote)
    with pytest.raises(UserError, match="logging is off"):
        await svc.correct(answer.message_id or "", CAROL, "a better answer")
    for model in (BattleVote, Preference):
        assert await count(chat_app, model) == 0, model.__name__
    assert await find_text(chat_app.sessions, "a better answer") == []

    # The next channel logs: stored there.
    elsewhere = await svc.compare(HERE, BOB, "asked elsewhere", ["main", "solo"])
    assert elsewhere.stored
    assert (await svc.prefer(elsewhere.prompt_id, elsewhere.answers[0].answer_id, CAROL)).stored


async def test_a_person_forgotten_while_their_comparison_is_answered_is_not_stored(
    chat_app: App,
) -> None:
    svc = chat_app.service
    reports = []

    async def forget_now(answer: ModelAnswer) -> None:
        if not reports:
            reports.append(await svc.forget(ALICE))

    comparison = await svc.compare(
        HERE, ALICE, "forget me mid-way", ["main", "solo"], on_answer=forget_now
    )
    assert reports and comparison.answers[0].ok and not comparison.stored
    assert await count(chat_app, Message) == 0
    assert await find_text(chat_app.sessions, "mid-way") == []


async def test_forget_takes_their_battles_verdicts_and_preferences(chat_app: App) -> None:
    svc = chat_app.service
    hers = await svc.battle(HERE, ALICE, "alice asks a battle")
    await svc.battle_vote(hers.id, BOB, "a", "bob judges alice's battle")
    bobs = await svc.battle(HERE, BOB, "bob asks a battle")
    await svc.battle_vote(bobs.id, ALICE, "b", "alice explains her verdict")
    comparison = await svc.compare(HERE, BOB, "bob compares", ["main", "solo"])
    await svc.prefer(comparison.prompt_id, comparison.answers[1].answer_id, ALICE)
    await svc.prefer(comparison.prompt_id, comparison.answers[0].answer_id, CAROL)
    own = await svc.compare(HERE, ALICE, "alice compares", ["main", "solo"])
    await svc.prefer(own.prompt_id, own.answers[0].answer_id, CAROL)
    assert await count(chat_app, Battle) == 2 and await count(chat_app, Preference) == 3

    report = await svc.forget(ALICE)
    assert report.messages == 2  # her battle's prompt and her comparison's
    assert report.votes == 2  # her verdict and her preference
    assert report.answers == 4  # the two answers of each
    for needle in ("alice asks", "alice explains", "alice compares", "alice"):
        assert await find_text(chat_app.sessions, needle) == [], needle
    await chat_app.writer.drain()
    async with chat_app.sessions() as session:
        battles = (await session.scalars(select(Battle))).all()
        votes = (await session.scalars(select(BattleVote))).all()
        preferences = (await session.scalars(select(Preference))).all()
    # Bob's battle stays, without her verdict (and Bob's verdict went with her battle);
    # Carol's preference on Bob's comparison stays, hers and the one on hers went.
    assert [b.id for b in battles] == [bobs.id] and votes == []
    assert [(p.voter_id, p.prompt_id) for p in preferences] == [(CAROL.id, comparison.prompt_id)]
    assert await find_text(chat_app.sessions, "bob compares") != []
