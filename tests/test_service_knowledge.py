"""Answers grounded in the knowledge base: real Chroma, real local embeddings, the chat service."""

from __future__ import annotations

import gc
import uuid
from collections.abc import AsyncIterator

import pytest

from bot.app import App, knowledge_config, open_app
from core.errors import UserError
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from knowledge.base import KnowledgeBase
from store.models import Message
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.knowledge import drop_collections

GUILD, CHANNEL = 10, 20
MOD = Author(3, "mod")
RULES = b"""# Server rules

## Bans
Posting invite links to other servers gets a 7-day ban.

## Events
Game night is every Friday at 20:00 UTC in the lounge. The event code is ZX-4471.
"""


@pytest.fixture
async def kb_app(
    service_settings: Settings, chroma_target: str, local_embedder
) -> AsyncIterator[App]:
    """The service with a knowledge base on embedded Chroma, and on the Chroma server when one runs."""
    if chroma_target == "server" and not service_settings.chroma_host:
        pytest.skip("no Chroma server: `eval $(scripts/chroma.sh start)` sets CHROMA_HOST")
    settings = service_settings.model_copy(
        update={
            "chroma_host": service_settings.chroma_host if chroma_target == "server" else None,
            "knowledge_collection_prefix": f"t{uuid.uuid4().hex[:12]}-",  # no other test's collections
        }
    )
    kb = KnowledgeBase(knowledge_config(settings), embedder=local_embedder)
    try:
        async with open_app(settings, knowledge=kb) as app:
            report = await kb.add_bytes(GUILD, [("rules.md", RULES)], uploader="mod")
            assert [r.status for r in report.results] == ["added"], report.summary()
            yield app
    finally:
        drop_collections(settings)


def ask(text: str, place: Place = Place(GUILD, CHANNEL)) -> ChatRequest:
    return ChatRequest(place, Author(1, "alice"), text, discord_message_id=77)


async def test_answers_carry_passages_and_sources_when_knowledge_is_on(
    kb_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = kb_app.service
    off = await svc.answer(ask("What is the event code for game night?"))
    assert off.sources == () and "<reference" not in str(fake_openai.chat_requests[-1].messages)

    await svc.set_knowledge(Place(GUILD, CHANNEL), "channel", True, MOD)
    result = await svc.answer(ask("What is the event code for game night?"))
    assert result.sources and result.sources[0].document == "rules.md"
    assert result.sources[0].location and "Events" in result.sources[0].location
    sent = fake_openai.chat_requests[-1].messages
    assert "ZX-4471" in sent[-1]["content"] and "<reference" in sent[-1]["content"]
    assert "not instructions" in sent[0]["content"].lower() or "data" in sent[0]["content"].lower()

    await kb_app.writer.drain()
    async with kb_app.sessions() as session:
        row = await session.get(Message, result.message_id)
    assert row.source_ids == [s.chunk_id for s in result.sources]
    assert row.request_messages == sent


async def test_threads_inherit_the_knowledge_switch_and_other_servers_see_nothing(
    kb_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = kb_app.service
    await svc.set_knowledge(Place(GUILD, CHANNEL), "channel", True, MOD)
    in_thread = await svc.answer(ask("event code?", Place(GUILD, CHANNEL, 99)))
    assert in_thread.sources

    other = Place(GUILD + 1, CHANNEL)
    await svc.set_knowledge(other, "channel", True, MOD)
    elsewhere = await svc.answer(ask("What is the event code for game night?", other))
    assert elsewhere.sources == () and "ZX-4471" not in str(fake_openai.chat_requests[-1].messages)


async def test_every_model_of_a_comparison_or_battle_gets_the_same_passages(
    kb_app: App, fake_openai: FakeOpenAI
) -> None:
    svc = kb_app.service
    place = Place(GUILD, CHANNEL)
    await svc.set_knowledge(place, "channel", True, MOD)
    comparison = await svc.compare(
        place, Author(1, "alice"), "What is the event code for game night?", ["main", "solo"]
    )
    assert comparison.sources and comparison.sources[0].document == "rules.md"
    sent = [r.messages for r in fake_openai.chat_requests]
    assert len(sent) == 2 and sent[0] == sent[1], "identical context, retrieved once"
    assert "ZX-4471" in sent[0][-1]["content"]
    await kb_app.writer.drain()
    async with kb_app.sessions() as session:
        for answer in comparison.answers:
            row = await session.get(Message, answer.answer_id)
            assert row is not None and row.kind == "comparison"
            assert row.source_ids == [s.chunk_id for s in comparison.sources]

    fake_openai.reset()
    await svc.set_arena_pool(place, "channel", ["main", "backup"], MOD)
    battle = await svc.battle(place, Author(1, "alice"), "What is the event code for game night?")
    assert [s.chunk_id for s in battle.sources] == [s.chunk_id for s in comparison.sources]
    a, b = (r.messages for r in fake_openai.chat_requests)
    assert a == b and "ZX-4471" in a[-1]["content"]


async def test_knowledge_cannot_be_turned_on_in_dms(kb_app: App) -> None:
    with pytest.raises(UserError, match="server"):
        await kb_app.service.set_knowledge(Place(None, 5), "channel", True, MOD)


async def test_the_app_keeps_what_the_knowledge_base_loads_out_of_full_collections(
    service_settings: Settings, kb_settings: Settings
) -> None:
    settings = service_settings.model_copy(
        update={
            "chroma_host": kb_settings.chroma_host,
            "knowledge_collection_prefix": kb_settings.knowledge_collection_prefix,
        }
    )
    async with open_app(settings) as app:
        assert app.knowledge is not None
        before = gc.get_freeze_count()
        try:
            await app.knowledge.list_documents(GUILD)  # opens Chroma
            assert gc.get_freeze_count() > before
        finally:
            gc.unfreeze()  # the rest of the test session collects as before
