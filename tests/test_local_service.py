"""The zero-key default end to end: no config file, no keys, the bundled SmolLM2 through the whole service."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from bot.app import open_app
from core.messages import Author, ChatRequest, Place, ReplyDelta, ReplyFinished
from core.settings import Settings
from store.models import Message
from tests.fixtures.local import local_server_children, process_running

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_config_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where the default ./switchboard.toml does not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWITCHBOARD_CONFIG", raising=False)


def zero_key_settings(tmp_path: Path) -> Settings:
    # No config file (the default one is absent, and none is named) and an environment
    # without any key: the built-in registry applies.
    return Settings(data_dir=tmp_path / "data", environ={})


async def test_bundled_model_answers_through_the_service_and_stops_on_exit(tmp_path: Path) -> None:
    async with open_app(zero_key_settings(tmp_path), knowledge=False) as app:
        assert app.registry.default_model == "smollm2"
        request = ChatRequest(Place(1, 2), Author(3, "newcomer"), "What is the capital of France?")
        events = [event async for event in app.service.stream(request)]
        deltas = [e.text for e in events if isinstance(e, ReplyDelta)]
        result = events[-1].result
        assert isinstance(events[-1], ReplyFinished)
        assert result.error is None and result.model == "smollm2"
        assert len(deltas) > 1 and result.reply.strip() and result.reply == "".join(deltas)
        servers = local_server_children()
        assert len(servers) == 1

        await app.writer.drain()
        async with app.sessions() as session:
            row = await session.get(Message, result.message_id)
        assert row.status == "ok" and row.provider == "llama.cpp"
        assert row.prompt_tokens > 0 and row.completion_tokens > 0 and row.cost_usd == 0.0
    for _ in range(100):
        if not process_running(servers[0]):
            break
        await asyncio.sleep(0.05)
    assert not process_running(servers[0]), "the llama.cpp server outlived the app"


async def test_a_local_server_that_dies_mid_reply_is_explained_and_restarted(
    tmp_path: Path,
) -> None:
    async with open_app(zero_key_settings(tmp_path), knowledge=False) as app:
        await app.service.warm_up()
        [pid] = local_server_children()
        request = ChatRequest(
            Place(1, 2), Author(3, "newcomer"), "Tell me a long story about a dragon."
        )
        received = 0
        result = None
        async for event in app.service.stream(request):
            if isinstance(event, ReplyDelta):
                received += 1
                if received == 3:
                    os.kill(pid, signal.SIGKILL)
            elif isinstance(event, ReplyFinished):
                result = event.result
        assert result is not None and result.error
        assert "stopped while answering" in result.error and "smollm2" in result.error
        again = await app.service.answer(ChatRequest(Place(1, 2), Author(3, "newcomer"), "Hello?"))
        assert again.error is None and again.reply.strip()
        assert local_server_children() and pid not in local_server_children()
