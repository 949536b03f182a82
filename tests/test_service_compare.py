"""Comparing models through the service: side by side, blind battles, votes and preferences.

Real SQLite (and PostgreSQL where the SQL differs), real migrations, the real service and
answer unit on the fake model server; a model that fails is a real unreachable endpoint.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from bot.app import App, open_app
from bot.present import change_line, preference_line, verdict_line
from bot.service.compare import SIDE_FAILED, STOPPED, ModelAnswer, gives_itself_away
from bot.terminal import TerminalChat, run_json
from chains.registry import ModelSpec
from core.errors import NotFound, UserError
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from store.models import Battle, BattleVote, Message, Preference
from store.repositories import ArenaRepository, ConversationRepository
from tests.fakes.openai_server import FakeOpenAI, FakeRequest, echo_reply

PLACE = Place(10, 20)
ALICE, BOB, CAROL, MOD = Author(1, "alice"), Author(2, "bob"), Author(3, "carol"), Author(4, "mod")
CONFIG_EXTRA = 'comparison_models = ["solo"]\narena_pool = ["main", "solo", "backup"]\n'


def with_config_extra(settings: Settings, extra: str = CONFIG_EXTRA) -> Settings:
    """The test registry with top-level keys added before its tables."""
    config = settings.config
    text = config.read_text()
    config.write_text(text.replace('default_model = "main"\n', f'default_model = "main"\n{extra}'))
    return settings


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def arena_database(request: pytest.FixtureRequest) -> str | None:
    """None for the SQLite file in the data folder, else a fresh migrated PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("migrated_postgres_url")


@pytest.fixture
async def arena_app(service_settings: Settings, arena_database: str | None) -> AsyncIterator[App]:
    """The service with comparison_models and arena_pool configured, on SQLite and PostgreSQL."""
    settings = with_config_extra(service_settings).model_copy(
        update={"database_url": arena_database}
    )
    async with open_app(settings, knowledge=False) as app:
        app.service.comparisons.rng = random.Random(7)
        yield app


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def register_dead_model(app: App, name: str = "dead") -> None:
    """A model whose endpoint refuses connections."""
    spec = ModelSpec(
        name=name,
        provider="openai-compatible",
        model="fake-dead",
        base_url=f"http://127.0.0.1:{closed_port()}/v1",
    )
    await app.service.register_model(spec, created_by="tests")


async def rows(app: App, model: type, **where: object) -> list:
    await app.writer.drain()
    async with app.sessions() as session:
        query = select(model).filter_by(**where)
        return list((await session.scalars(query)).all())


# -------------------------------------------------------------------------- side by side


async def test_four_models_answer_at_once_with_identical_context_and_one_exchange_is_logged(
    arena_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = arena_app.service
    await svc.set_system_prompt(PLACE, "channel", "You are terse.", MOD)
    # An earlier conversation in the channel: a comparison brings none of its history.
    await svc.answer(ChatRequest(PLACE, ALICE, "My name is Ada.", discord_message_id=1))
    fake_openai.latency = 0.5  # long enough that four sequential requests never overlap
    fake_openai.max_active = 0
    fake_openai.reset()
    told: list[ModelAnswer] = []

    comparison = await svc.compare(
        PLACE,
        ALICE,
        "What is 2+2?",
        ["main", "solo", "backup", "tiny"],
        discord_message_id=2,
        on_answer=told.append,
    )
    assert fake_openai.max_active == 4, "all four requests were in flight together"
    assert [a.model for a in comparison.answers] == ["main", "solo", "backup", "tiny"]
    assert sorted(a.model for a in told) == ["backup", "main", "solo", "tiny"]
    for answer in comparison.answers:
        assert answer.ok and answer.reply == "Echo: What is 2+2?"
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        assert answer.latency_ms is not None and answer.ttft_ms is not None
        assert 0 < answer.ttft_ms <= answer.latency_ms
    main = comparison.answers[0]
    assert main.cost_usd == pytest.approx(
        (main.usage.prompt_tokens * 1.0 + main.usage.completion_tokens * 2.0) / 1e6
    )
    assert comparison.answers[1].cost_usd == 0.0, "solo has no price"

    sent = [request.messages for request in fake_openai.chat_requests]
    assert len(sent) == 4 and all(messages == sent[0] for messages in sent)
    assert sent[0] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert sorted(r.model for r in fake_openai.chat_requests) == [
        "fake-backup",
        "fake-model",
        "fake-solo",
        "fake-tiny",
    ]

    [prompt] = await rows(arena_app, Message, id=comparison.prompt_id)
    assert (prompt.kind, prompt.parent_id, prompt.discord_message_id) == ("prompt", None, 2)
    assert prompt.conversation_id == comparison.conversation_id
    answers = await rows(arena_app, Message, parent_id=comparison.prompt_id)
    assert sorted(m.model_name for m in answers) == ["backup", "main", "solo", "tiny"]
    async with arena_app.sessions() as session:
        repo = ConversationRepository(session)
        for row in answers:
            assert row.kind == "comparison" and row.status == "ok"
            assert row.request_messages == sent[0] and row.system_prompt == "You are terse."
            assert row.latency_ms is not None and row.ttft_ms is not None
            assert await repo.inputs_of(row.id) == [comparison.prompt_id]
        messages = await repo.messages(comparison.conversation_id)
    assert len(messages) == 5, "one prompt and four answers, in a conversation of their own"


async def test_a_failing_model_is_reported_in_its_own_result_and_the_others_answer(
    arena_app: App, fake_openai: FakeOpenAI
) -> None:
    await register_dead_model(arena_app)
    comparison = await arena_app.service.compare(PLACE, ALICE, "hello", ["main", "dead"])
    main, dead = comparison.answers
    assert main.ok and main.reply == "Echo: hello"
    assert not dead.ok and dead.reply == "" and "dead" in (dead.error or "")
    assert dead.usage is None and dead.cost_usd is None
    [row] = await rows(arena_app, Message, model_name="dead")
    assert (row.kind, row.status, row.error) == ("comparison", "error", dead.error)
    assert [r.model for r in fake_openai.chat_requests] == ["fake-model"], "no fallback asked"


async def test_which_models_compare_and_how_many(arena_app: App) -> None:
    svc = arena_app.service
    default = await svc.compare(PLACE, ALICE, "hi")
    assert [a.model for a in default.answers] == ["main", "solo"], (
        "the place's model, then the config's comparison_models"
    )
    await svc.set_model(PLACE, "channel", "backup", MOD)
    moved = await svc.compare(PLACE, ALICE, "hi")
    assert [a.model for a in moved.answers] == ["backup", "solo"]
    with pytest.raises(NotFound, match="No model named 'mian'. Did you mean 'main'"):
        await svc.compare(PLACE, ALICE, "hi", ["mian", "solo"])
    with pytest.raises(UserError, match="at least two"):
        await svc.compare(PLACE, ALICE, "hi", ["main", "main"])
    with pytest.raises(UserError, match="4 models at most"):
        await svc.compare(PLACE, ALICE, "hi", ["main", "solo", "backup", "tiny", "tiny-then-big"])
    with pytest.raises(UserError, match="empty"):
        await svc.compare(PLACE, ALICE, "  \x00 ", ["main", "solo"])


async def test_without_comparison_models_the_default_is_one_model_and_refused(
    chat_app: App,
) -> None:
    with pytest.raises(UserError, match="Only main would answer.*comparison_models"):
        await chat_app.service.compare(PLACE, ALICE, "hi")


async def test_one_preference_per_person_that_changes(arena_app: App) -> None:
    svc = arena_app.service
    await register_dead_model(arena_app)
    comparison = await svc.compare(PLACE, ALICE, "hi", ["main", "solo", "dead"])
    main, solo, dead = comparison.answers
    # Chosen at once, while the log writer may not have written the comparison yet.
    first = await svc.prefer(comparison.prompt_id, solo.answer_id, BOB)
    assert (first.model, first.previous_id) == ("solo", None)
    assert preference_line(first) == "Noted: **solo** gave the best answer."
    again = await svc.prefer(comparison.prompt_id, solo.answer_id, BOB)
    assert "already your pick" in preference_line(again)
    changed = await svc.prefer(comparison.prompt_id, main.answer_id, BOB)
    assert (changed.previous_model, changed.model) == ("solo", "main")
    assert preference_line(changed) == "Changed your pick from **solo** to **main**."
    await svc.prefer(comparison.prompt_id, solo.answer_id, CAROL)
    picks = await rows(arena_app, Preference, prompt_id=comparison.prompt_id)
    assert sorted((p.voter_id, p.chosen_id) for p in picks) == [
        (BOB.id, main.answer_id),
        (CAROL.id, solo.answer_id),
    ]

    with pytest.raises(UserError, match="dead did not answer"):
        await svc.prefer(comparison.prompt_id, dead.answer_id, BOB)
    other = await svc.compare(PLACE, ALICE, "another", ["main", "solo"])
    with pytest.raises(UserError, match="not one of this comparison's answers"):
        await svc.prefer(comparison.prompt_id, other.answers[0].answer_id, BOB)
    with pytest.raises(NotFound, match="don't have that comparison"):
        await svc.prefer("0" * 32, main.answer_id, BOB)
    answer = await svc.answer(ChatRequest(PLACE, ALICE, "plain chat"))
    await arena_app.writer.drain()
    with pytest.raises(NotFound, match="don't have that comparison"):
        await svc.prefer(answer.message_id, answer.message_id, BOB)  # not a comparison


async def test_a_choice_read_while_the_log_writer_commits_the_comparison_still_finds_it(
    arena_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person may press "best" just as the comparison is being written: the read misses
    the rows the writer commits meanwhile, and once it is over nothing is pending any more."""
    svc, writer = arena_app.service, arena_app.writer
    released = asyncio.Event()

    async def held(session: object) -> None:
        await released.wait()

    writer.submit(held, "a write that holds the writer")  # the comparison queues behind it
    comparison = await svc.compare(PLACE, ALICE, "hi", ["main", "solo"])
    read = ArenaRepository.comparison_answers
    reads: list[str] = []

    async def read_during_the_commit(self: ArenaRepository, prompt_id: str) -> list[Message]:
        reads.append(prompt_id)
        if len(reads) == 1:  # began before the commit: sees nothing, ends after it
            released.set()
            await writer.drain()
            return []
        return await read(self, prompt_id)

    monkeypatch.setattr(ArenaRepository, "comparison_answers", read_during_the_commit)
    pick = await svc.prefer(comparison.prompt_id, comparison.answers[1].answer_id, BOB)
    assert pick.model == "solo" and pick.stored and len(reads) == 2


async def test_a_stopped_comparison_is_logged_with_what_was_written(
    arena_app: App, fake_openai: FakeOpenAI
) -> None:
    fake_openai.latency = 30
    task = asyncio.create_task(arena_app.service.compare(PLACE, ALICE, "slow", ["main", "solo"]))
    for _ in range(500):  # until both requests are in flight
        if len(fake_openai.chat_requests) == 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stopped = await rows(arena_app, Message, kind="comparison")
    assert sorted((m.model_name, m.status, m.error) for m in stopped) == [
        ("main", "error", STOPPED),
        ("solo", "error", STOPPED),
    ]


# ------------------------------------------------------------------------------ battles


def leaky_reply(request: FakeRequest) -> str:
    """solo gives its name away; every other model echoes."""
    if request.model == "fake-solo":
        return "Solo here. " + echo_reply(request)
    return echo_reply(request)


async def test_battles_draw_two_distinct_models_from_the_pool_at_random(
    arena_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = arena_app.service
    await svc.set_system_prompt(PLACE, "channel", "Be brief.", MOD)
    battles = [await svc.battle(PLACE, ALICE, f"question {n}") for n in range(12)]
    stored = await rows(arena_app, Battle)
    by_id = {b.id: b for b in stored}
    assert sorted(by_id) == sorted(b.id for b in battles)
    pairs = [(by_id[b.id].model_a, by_id[b.id].model_b) for b in battles]
    assert all(a != b and {a, b} <= {"main", "solo", "backup"} for a, b in pairs)
    assert {m for pair in pairs for m in pair} == {"main", "solo", "backup"}
    assert len(set(pairs)) > 3, "each model appears as A and as B"

    first, row = battles[0], by_id[battles[0].id]
    assert first.a.reply == first.b.reply == "Echo: question 0"
    assert (row.prompt_id, row.answer_a, row.answer_b) == (
        first.prompt_id,
        first.a.answer_id,
        first.b.answer_id,
    )
    assert row.pool == ["main", "solo", "backup"] and row.invalid is None
    assert (row.guild_id, row.channel_id, row.thread_id, row.asked_by) == (10, 20, None, ALICE.id)
    answers = {m.id: m for m in await rows(arena_app, Message, parent_id=first.prompt_id)}
    assert {m.kind for m in answers.values()} == {"battle"}
    assert answers[row.answer_a].model_name == row.model_a
    assert answers[row.answer_b].model_name == row.model_b
    assert (
        answers[row.answer_a].request_messages
        == answers[row.answer_b].request_messages
        == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "question 0"},
        ]
    )


async def test_the_arena_pool_is_set_per_place_and_inherited(arena_app: App) -> None:
    svc = arena_app.service
    thread = Place(10, 20, 30)
    change = await svc.set_arena_pool(PLACE, "guild", ["solo", "backup", "solo"], MOD)
    assert change_line(change) == "Arena pool for this server: **solo**, **backup**."
    assert (await svc.effective_settings(thread)).arena_pool.value == ["solo", "backup"]
    await svc.set_arena_pool(PLACE, "channel", ["main", "tiny"], MOD)
    pooled = [await svc.battle(thread, ALICE, f"q{n}") for n in range(4)]
    drawn = {(b.model_a, b.model_b) for b in await rows(arena_app, Battle)}
    assert len(pooled) == 4 and all({a, b} == {"main", "tiny"} for a, b in drawn)
    reset = await svc.set_arena_pool(PLACE, "channel", None, MOD)
    assert change_line(reset) == (
        "Arena pool for this channel reset; battles now draw from **solo**, **backup** "
        "(server default)."
    )
    await svc.set_arena_pool(PLACE, "guild", None, MOD)
    assert (await svc.effective_settings(PLACE)).arena_pool.value == ["main", "solo", "backup"]

    with pytest.raises(NotFound, match="No model named 'nope'"):
        await svc.set_arena_pool(PLACE, "channel", ["main", "nope"], MOD)
    with pytest.raises(UserError, match="at least two different models"):
        await svc.set_arena_pool(PLACE, "channel", ["main", "main"], MOD)


async def test_without_an_arena_pool_battles_draw_from_every_model(chat_app: App) -> None:
    svc = chat_app.service
    assert (await svc.effective_settings(PLACE)).arena_pool.value is None
    svc.comparisons.rng = random.Random(1)
    for n in range(10):
        await svc.battle(PLACE, ALICE, f"q{n}")
    drawn = {m for b in await rows(chat_app, Battle) for m in (b.model_a, b.model_b)}
    assert len(drawn) >= 3 and drawn <= {"main", "backup", "solo", "tiny", "tiny-then-big"}


async def test_a_pool_whose_models_are_gone_is_refused_in_one_line(arena_app: App) -> None:
    svc = arena_app.service
    await register_dead_model(arena_app, "gone")
    await svc.set_arena_pool(PLACE, "channel", ["main", "gone"], MOD)
    await svc.remove_model("gone")
    with pytest.raises(
        UserError, match=r"arena pool set for this channel \(main, gone\) has fewer"
    ):
        await svc.battle(PLACE, ALICE, "hi")


async def test_an_answer_that_names_its_model_invalidates_the_battle(
    arena_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = arena_app.service
    fake_openai.reply = leaky_reply
    await svc.set_arena_pool(PLACE, "channel", ["main", "solo"], MOD)
    battle = await svc.battle(PLACE, ALICE, "Who are you?")
    sides = {battle.a.reply, battle.b.reply}
    assert sides == {"Echo: Who are you?", "Solo here. Echo: Who are you?"}
    [row] = await rows(arena_app, Battle, id=battle.id)
    label = "A" if row.model_a == "solo" else "B"
    assert row.invalid == f"Answer {label} gave its model away: it says 'Solo'."

    verdict = await svc.battle_vote(battle.id, BOB, "a", "clearer")
    assert {verdict.model_a, verdict.model_b} == {"main", "solo"}
    assert not verdict.counted and verdict.invalid == row.invalid and verdict.stored
    assert "This battle does not count: Answer" in verdict_line(verdict)
    [vote] = await rows(arena_app, BattleVote, battle_id=battle.id)
    assert (vote.voter_id, vote.outcome, vote.reason) == (BOB.id, "a", "clearer"), (
        "the vote is kept; the battle's `invalid` keeps it out of the ratings"
    )


def test_what_gives_a_model_away() -> None:
    gpt = ModelSpec(name="gpt-4o-mini", provider="openai", model="gpt-4o-mini")
    azure = ModelSpec(
        name="azure-prod",
        provider="azure-openai",
        model="gpt-4o",
        base_url="https://x.openai.azure.com",
        api_version="2024-10-21",
    )
    smol = ModelSpec(
        name="smollm2",
        provider="llama.cpp",
        model="smollm2-135m-instruct",
        bundled="smollm2-135m-instruct",
    )
    qwen = ModelSpec(
        name="qwen-7b",
        provider="openai-compatible",
        model="Qwen/Qwen2.5-7B-Instruct",
        base_url="http://localhost:8000/v1",
    )
    assert gives_itself_away("I am ChatGPT, how can I help?", gpt) == "ChatGPT"
    assert gives_itself_away("As GPT-4 I cannot browse.", gpt) == "GPT"
    assert gives_itself_away("I'm gpt4o.", gpt) == "gpt"
    assert gives_itself_away("Trained by openai.", azure) == "openai"
    assert gives_itself_away("This is azure-prod speaking.", azure) == "azure-prod"
    assert gives_itself_away("I am SmolLM2, a small model.", smol) == "SmolLM2"
    assert gives_itself_away("Made by Hugging Face.", smol) == "Hugging Face"
    assert gives_itself_away("I'm Qwen, from Alibaba Cloud.", qwen) in {"Qwen", "Alibaba"}
    assert gives_itself_away("Use a GPTQ-quantised model for that.", gpt) is None, (
        "a family runs into its version, not into another word"
    )
    assert gives_itself_away("Egypt's pyramids are old.", gpt) is None, "whole words only"
    for innocent in (
        "ChatGPT-style answers are common.",  # another model's maker, not smollm's
        "It runs locally on a small, fast model.",
    ):
        assert gives_itself_away(innocent, smol) is None, innocent
    assert gives_itself_away("I am Claude, by Anthropic.", gpt) is None, "another model is fine"


async def test_a_battle_whose_model_fails_does_not_count_and_hides_the_error(
    arena_app: App,
) -> None:
    svc = arena_app.service
    await register_dead_model(arena_app)
    await svc.set_arena_pool(PLACE, "channel", ["main", "dead"], MOD)
    battle = await svc.battle(PLACE, ALICE, "hello")
    failed = battle.a if battle.a.reply == "" else battle.b
    assert failed.error == SIDE_FAILED and "dead" not in failed.error
    verdict = await svc.battle_vote(battle.id, BOB, "tie")
    assert not verdict.counted and verdict.invalid and "(dead) failed" in verdict.invalid


async def test_one_vote_per_person_per_battle_and_the_models_are_revealed(arena_app: App) -> None:
    svc = arena_app.service
    battle = await svc.battle(PLACE, ALICE, "hello")
    # Voted at once, while the log writer may not have written the battle yet.
    verdict = await svc.battle_vote(battle.id, BOB, "b", "  more precise \x00 ")
    [row] = await rows(arena_app, Battle, id=battle.id)
    assert (verdict.model_a, verdict.model_b) == (row.model_a, row.model_b)
    assert verdict.counted and not verdict.already_voted and verdict.votes_left_today == 49
    assert verdict_line(verdict) == (
        f"Thanks for your vote (B was better). A was **{row.model_a}**, B was **{row.model_b}**."
    )
    again = await svc.battle_vote(battle.id, BOB, "a")
    assert again.already_voted and again.outcome == "b", "the first vote stands"
    assert verdict_line(again).startswith("You already voted on this battle (B was better)")
    await svc.battle_vote(battle.id, CAROL, "bad")
    votes = await rows(arena_app, BattleVote, battle_id=battle.id)
    assert sorted((v.voter_id, v.outcome, v.reason) for v in votes) == [
        (BOB.id, "b", "more precise"),
        (CAROL.id, "bad", None),
    ]
    with pytest.raises(UserError, match="Vote a .*not 'maybe'"):
        await svc.battle_vote(battle.id, BOB, "maybe")
    with pytest.raises(NotFound, match="don't have that battle"):
        await svc.battle_vote("0" * 32, BOB, "a")


async def test_a_daily_cap_on_votes_per_person(arena_app: App) -> None:
    svc = arena_app.service
    svc.comparisons.votes_per_day = 2
    battles = [await svc.battle(PLACE, ALICE, f"q{n}") for n in range(3)]
    assert (await svc.battle_vote(battles[0].id, BOB, "a")).votes_left_today == 1
    assert (await svc.battle_vote(battles[1].id, BOB, "tie")).votes_left_today == 0
    with pytest.raises(UserError, match="You have cast 2 arena votes today.*00:00 UTC"):
        await svc.battle_vote(battles[2].id, BOB, "b")
    assert (await svc.battle_vote(battles[0].id, BOB, "b")).already_voted, (
        "a repeated vote is still answered with the reveal"
    )
    assert (await svc.battle_vote(battles[2].id, CAROL, "b")).counted, "the cap is per person"
    assert len(await rows(arena_app, BattleVote, voter_id=BOB.id)) == 2


async def test_what_may_not_be_stored_is_answered_and_voted_on_but_never_stored(
    chat_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = chat_app.service

    async def nothing_stored(request: ChatRequest, settings: object) -> bool:
        return False

    monkeypatch.setattr(svc, "_may_store", nothing_stored)
    comparison = await svc.compare(PLACE, ALICE, "private?", ["main", "solo"])
    assert not comparison.stored and all(a.ok for a in comparison.answers)
    pick = await svc.prefer(comparison.prompt_id, comparison.answers[1].answer_id, BOB)
    assert (pick.model, pick.stored) == ("solo", False)
    battle = await svc.battle(PLACE, ALICE, "private battle")
    verdict = await svc.battle_vote(battle.id, BOB, "a")
    assert not verdict.stored and not verdict.counted
    assert {verdict.model_a, verdict.model_b} <= {"main", "backup", "solo", "tiny", "tiny-then-big"}
    assert "Nothing of this battle is stored" in verdict_line(verdict)
    for model in (Message, Battle, BattleVote, Preference):
        assert await rows(chat_app, model) == [], model.__name__


async def test_the_terminal_runs_a_battle_and_reveals_the_models_after_the_vote(
    arena_app: App,
) -> None:
    chat = TerminalChat(arena_app.service, Place(0, 0), Author(42, "terminal"))
    lines = [
        "/vote a",
        "/arena",
        "/arena What is DNS?",
        "/vote maybe",
        "/vote b the second was shorter",
        "/vote a",
        "/settings",
    ]
    stdout = io.StringIO()
    await run_json(chat, io.BytesIO("\n".join(lines).encode() + b"\n"), stdout)  # type: ignore[arg-type]
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert len(out) == len(lines)
    assert out[0]["ok"] is False and "no battle" in out[0]["message"]
    assert out[1]["ok"] is False and "after /arena" in out[1]["message"]
    battle = out[2]
    assert battle["command"] == "arena" and battle["ok"]
    assert battle["a"] == battle["b"] == {"reply": "Echo: What is DNS?", "error": None}
    assert "model_a" not in battle and "main" not in battle["message"]
    assert out[3]["ok"] is False and "not 'maybe'" in out[3]["message"]
    voted = out[4]
    assert voted["ok"] and voted["outcome"] == "b" and voted["counted"] is True
    assert {voted["model_a"], voted["model_b"]} <= {"main", "solo", "backup"}
    assert f"A was **{voted['model_a']}**, B was **{voted['model_b']}**" in voted["message"]
    assert out[5]["already_voted"] is True and out[5]["outcome"] == "b"
    assert "arena pool: **main**, **solo**, **backup** (from global)" in out[6]["message"]
    [vote] = await rows(arena_app, BattleVote, battle_id=battle["battle_id"])
    assert (vote.voter_id, vote.outcome, vote.reason) == (42, "b", "the second was shorter")
