"""The service's parts on their own: the answer unit, the log record, the model catalog, the limit.

Real SQLite with real migrations, real langchain-openai against the fake model server.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from bot.app import App, open_app
from bot.service.limits import PersonLimit
from chains.answer import Prompt, with_fallbacks
from chains.registry import Lineage, ModelSpec
from core.errors import ConfigError, NotFound
from core.messages import Author, ChatRequest, FallbackUsed, Place, ReplyDelta
from core.settings import Settings
from store.models import Message
from store.repositories import ConversationRepository
from tests.fakes.openai_server import FakeOpenAI

GUILD, CHANNEL, THREAD = 10, 20, 30
ALICE, MOD = Author(1, "alice"), Author(3, "mod")


def in_thread(text: str, discord_id: int) -> ChatRequest:
    return ChatRequest(Place(GUILD, CHANNEL, THREAD), ALICE, text, discord_message_id=discord_id)


# ------------------------------------------------------------------ the answer unit


async def test_the_answer_unit_runs_one_model_on_a_prompt_without_any_conversation(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    answerer = chat_app.service.answerer
    spec = chat_app.registry.get("solo")
    prompt = Prompt("Be brief.", [("user", "hi"), ("assistant", "hello")], "What is 2+2?")
    attempt = await answerer.run(answerer.prepare(spec, prompt))
    assert attempt.ok and attempt.reply == "Echo: What is 2+2?"
    assert attempt.history_used == 2
    assert attempt.usage is not None and attempt.usage.completion_tokens > 0
    assert (
        attempt.ttft_ms is not None
        and attempt.latency_ms is not None
        and attempt.ttft_ms <= attempt.latency_ms
    )
    assert [m["content"] for m in fake_openai.chat_requests[-1].messages] == [
        "Be brief.",
        "hi",
        "hello",
        "What is 2+2?",
    ]


async def test_the_answer_unit_reports_a_failure_instead_of_raising(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    answerer = chat_app.service.answerer
    fake_openai.fail_next(429)
    attempt = await answerer.run(
        answerer.prepare(chat_app.registry.get("solo"), Prompt(None, [], "hi"))
    )
    assert (
        not attempt.ok
        and "solo" in (attempt.error or "")
        and "rate limit" in (attempt.error or "").lower()
    )
    assert attempt.reply == "" and answerer.billed(attempt) is None


async def test_the_answer_unit_trims_history_and_says_how_much_it_sent(chat_app: App) -> None:
    answerer = chat_app.service.answerer
    tiny = chat_app.registry.get("tiny")  # a 300-token window
    history = [
        (role, f"{role} turn {i} " + "word " * 30)
        for i in range(6)
        for role in ("user", "assistant")
    ]
    attempt = answerer.prepare(tiny, Prompt("", history, "the question"))
    assert 0 < attempt.history_used < len(history) and attempt.history_used % 2 == 0
    assert attempt.sent[-1].content == "the question"
    assert attempt.sent[0].content == history[len(history) - attempt.history_used][1], (
        "the newest turns are kept"
    )

    too_long = answerer.prepare(tiny, Prompt("", [], "word " * 400))
    assert too_long.sent == [] and "too long" in (too_long.error or "")


async def test_the_fallback_policy_tries_the_next_model_only_when_it_may(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    answerer = chat_app.service.answerer
    chain = chat_app.registry.fallback_chain("main")
    fake_openai.fail_next(503)
    attempts: list = []
    events = [
        e
        async for e in with_fallbacks(
            answerer, chain, Prompt(None, [], "hi"), attempts, answerer.clock()
        )
    ]
    assert [type(e) for e in events[:1]] == [FallbackUsed] and isinstance(events[-1], ReplyDelta)
    assert [a.spec.name for a in attempts] == ["main", "backup"] and attempts[-1].ok

    fake_openai.fail_next(
        400,
        message="Your request was rejected by the safety system",
        code="content_policy_violation",
    )
    attempts = []
    events = [
        e
        async for e in with_fallbacks(
            answerer, chain, Prompt(None, [], "hi"), attempts, answerer.clock()
        )
    ]
    assert events == [] and [a.spec.name for a in attempts] == ["main"], (
        "a refusal is not sidestepped"
    )


# ------------------------------------------------------------------ the log record


async def test_each_answer_records_its_kind_and_the_stored_messages_that_went_into_it(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = chat_app.service
    first = await svc.answer(in_thread("one", 1))
    fake_openai.fail_next(503)  # main fails, backup answers
    second = await svc.answer(in_thread("two", 2))
    await chat_app.writer.drain()
    async with chat_app.sessions() as session:
        rows = (await session.scalars(select(Message).order_by(Message.created_at))).all()
        repo = ConversationRepository(session)
        by_id = {row.id: row for row in rows}
        assert [(r.role, r.kind) for r in rows] == [
            ("user", "prompt"),
            ("assistant", "answer"),
            ("user", "prompt"),
            ("assistant", "attempt"),
            ("assistant", "answer"),
        ]
        prompt_one, answer_one = by_id[first.message_id].parent_id, first.message_id
        prompt_two = by_id[second.message_id].parent_id
        assert await repo.inputs_of(first.message_id) == [prompt_one]
        assert await repo.inputs_of(second.message_id) == [prompt_one, answer_one, prompt_two]
        failed = next(r for r in rows if r.kind == "attempt")
        assert await repo.inputs_of(failed.id) == [prompt_one, answer_one, prompt_two]
        # Forgetting "one" is a query: every answer that used it.
        assert await repo.answers_using([prompt_one]) == [
            first.message_id,
            failed.id,
            second.message_id,
        ]


async def test_inputs_hold_only_the_history_that_was_sent(
    chat_app: App, fake_openai: FakeOpenAI
) -> None:
    svc, place = chat_app.service, Place(GUILD, CHANNEL, THREAD)
    await svc.set_model(place, "thread", "tiny", MOD)
    for i in range(8):
        last = await svc.answer(in_thread(f"turn {i} " + "word " * 20, i))
    await chat_app.writer.drain()
    async with chat_app.sessions() as session:
        inputs = await ConversationRepository(session).inputs_of(last.message_id)
        rows = {
            r.id: r
            for r in (await session.scalars(select(Message).where(Message.id.in_(inputs)))).all()
        }
    sent = [m["content"].strip() for m in fake_openai.chat_requests[-1].messages[1:]]
    # (The question is sent stripped of surrounding spaces, history as it was stored.)
    assert [rows[i].content.strip() for i in inputs] == sent, (
        "the links name exactly the messages sent, in order"
    )
    assert len(inputs) < 16


# ------------------------------------------------------------------ the model catalog


async def test_a_model_registered_by_another_process_is_selectable_within_seconds(
    service_settings: Settings, fake_openai: FakeOpenAI
) -> None:
    async with (
        open_app(service_settings, knowledge=False) as bot,
        open_app(service_settings, knowledge=False, migrate=False) as cli,
    ):
        tuned = (await cli.service.get_model("solo")).model_copy(
            update={
                "name": "solo-tuned",
                "description": "solo, fine-tuned",
                "lineage": Lineage(base_model="solo", source="lora", dataset_hash="sha256:abc"),
            }
        )
        await cli.service.register_model(tuned, created_by="cli")

        # Asking for it by name finds it at once; the list catches up within the refresh.
        change = await bot.service.set_model(Place(GUILD, CHANNEL), "channel", "solo-tuned", MOD)
        assert change.new == "solo-tuned"
        spec = await bot.service.get_model("solo-tuned")
        assert spec.origin == "database"
        assert spec.lineage == Lineage(
            base_model="solo", source="lora", dataset_hash="sha256:abc", created_by="cli"
        )

        await cli.service.catalog.unregister("solo-tuned")
        later = time.monotonic() + bot.service.catalog.refresh_s
        bot.service.catalog.clock = lambda: later  # as if the refresh interval had passed
        bot.service.list_models()
        await asyncio.sleep(0.2)  # the background refresh
        assert "solo-tuned" not in [s.name for s in bot.service.list_models()]
        with pytest.raises(NotFound):
            await bot.service.get_model("solo-tuned")


async def test_a_registered_model_cannot_take_a_configured_name_or_unknown_fallback(
    chat_app: App,
) -> None:
    svc = chat_app.service
    with pytest.raises(ConfigError, match="already a model in"):
        await svc.register_model(ModelSpec(name="main", provider="openai"), created_by="test")
    with pytest.raises(ConfigError, match="fallback 'nowhere'"):
        await svc.register_model(
            ModelSpec(name="new", provider="openai", fallback="nowhere"), created_by="test"
        )
    assert "new" not in [s.name for s in svc.list_models()]


async def test_a_stored_model_that_no_longer_validates_is_skipped_not_fatal(
    chat_app: App, service_settings: Settings
) -> None:
    from store.repositories import ModelRepository

    async with chat_app.sessions() as session, session.begin():
        await ModelRepository(session).add(
            "broken", {"provider": "no-such-provider"}, created_by="test"
        )
        await ModelRepository(session).add(
            "fine", {"provider": "openai", "model": "gpt-x"}, created_by="test"
        )
    async with open_app(service_settings, knowledge=False, migrate=False) as app:
        names = [s.name for s in app.service.list_models()]
    assert "fine" in names and "broken" not in names


# ------------------------------------------------------------------ the per-person limit


def test_the_person_limit_is_a_window_per_person_with_one_notice() -> None:
    limit = PersonLimit(2)

    def message(author: int, at: float) -> ChatRequest:
        return ChatRequest(Place(1, 1), Author(author, "x"), "hi", discord_message_id=1, sent_at=at)

    assert limit.admit(message(1, 0.0)).allowed and limit.admit(message(1, 1.0)).allowed
    refused = limit.admit(message(1, 10.0))
    assert not refused.allowed and refused.notify and refused.retry_after == pytest.approx(50.0)
    assert refused.per_minute == 2
    again = limit.admit(message(1, 20.0))
    assert not again.allowed and not again.notify, "told once per window"
    assert limit.admit(message(2, 20.0)).allowed, "another person has a window of their own"
    assert limit.admit(message(1, 60.0)).allowed, "a new window opens after a minute"


def test_the_terminal_and_a_zero_limit_are_never_limited() -> None:
    terminal = ChatRequest(Place(0, 0), Author(1, "terminal"), "hi")
    limit = PersonLimit(1)
    assert all(limit.admit(terminal).allowed for _ in range(5))
    unlimited = PersonLimit(0)
    discord_message = ChatRequest(
        Place(1, 1), Author(1, "x"), "hi", discord_message_id=1, sent_at=0.0
    )
    assert all(unlimited.admit(discord_message).allowed for _ in range(50))
