"""overhead: one message through the whole service vs. a bare ChatOpenAI streaming call.

Both talk to the same fake OpenAI server (its own process, zero model latency) and
send the same messages (system prompt, the conversation so far, the new question), so
what is left is Switchboard's own cost: settings lookup, conversation and history,
token trimming, the chain, and logging. The database already holds 10,000 logged
conversations. The two sides alternate request by request so that drift in the
machine's speed hits both alike.

The bare call is ChatOpenAI as LangChain builds it by default (httpx, the SDK's typed
chunks). The service's models use the aiohttp transport and read chunks as plain dicts
(chains.models), which is why a ratio below 1 is possible.

Last line: `overhead: ratio X (goal <= 1.5)`, X = service p50 / bare p50.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from rich.console import Console
from rich.table import Table

from bench._support import bench_settings, fake_model_server, percentile
from bot.app import open_app
from chains.chat import DEFAULT_SYSTEM_PROMPT
from core.messages import Author, ChatRequest, Place
from store.repositories import ConversationRepository

CONVERSATIONS = 10_000
ROUNDS = 400
WARMUP = 30
GOAL = 1.5


async def seed(sessions, conversations: int) -> None:
    """Log `conversations` two-turn conversations, as the bot would have."""
    batch = 1000
    for start in range(0, conversations, batch):
        async with sessions() as session, session.begin():
            repo = ConversationRepository(session)
            rows = []
            for i in range(start, min(start + batch, conversations)):
                cid = uuid.uuid4().hex
                await repo.create(
                    id=cid,
                    guild_id=1,
                    channel_id=100 + i % 50,
                    thread_id=None,
                    started_by=i,
                    origin="discord",
                )
                user_id, answer_id = uuid.uuid4().hex, uuid.uuid4().hex
                common = {
                    "conversation_id": cid,
                    "guild_id": 1,
                    "channel_id": 100 + i % 50,
                    "thread_id": None,
                }
                rows.append(
                    {
                        **common,
                        "id": user_id,
                        "parent_id": None,
                        "role": "user",
                        "content": f"question {i}",
                        "author_id": i,
                        "author_name": f"user{i}",
                    }
                )
                rows.append(
                    {
                        **common,
                        "id": answer_id,
                        "parent_id": user_id,
                        "role": "assistant",
                        "content": f"answer {i}",
                        "model_name": "fake",
                        "provider": "openai-compatible",
                        "provider_model": "fake-model",
                        "status": "ok",
                        "request_messages": [{"role": "user", "content": f"question {i}"}],
                        "prompt_tokens": 10,
                        "completion_tokens": 10,
                        "latency_ms": 5.0,
                        "cost_usd": 0.0,
                    }
                )
            await repo.add_messages(rows)


async def run() -> float:
    console = Console()
    with fake_model_server() as base_url, bench_settings(base_url) as settings:
        async with open_app(settings, knowledge=False) as sb:
            with console.status(f"logging {CONVERSATIONS:,} conversations first…"):
                await seed(sb.sessions, CONVERSATIONS)
            bare = ChatOpenAI(
                base_url=base_url, api_key="sk-bench", model="fake-model", stream_usage=True
            )
            service = sb.service
            # Each round continues one of 50 conversations (history grows), as in a busy server.
            conversations: list[str | None] = [None] * 50
            # The bare side sends what the service sends: the same growing conversations.
            transcripts: list[list[BaseMessage]] = [
                [SystemMessage(DEFAULT_SYSTEM_PROMPT)] for _ in range(50)
            ]
            bare_ms: list[float] = []
            service_ms: list[float] = []
            for i in range(WARMUP + ROUNDS):
                slot = i % 50
                question = f"hello {i}"
                t0 = time.perf_counter()
                reply = ""
                async for chunk in bare.astream([*transcripts[slot], HumanMessage(question)]):
                    reply += chunk.text
                t1 = time.perf_counter()
                transcripts[slot] += [HumanMessage(question), AIMessage(reply)]
                request = ChatRequest(
                    Place(guild_id=1, channel_id=100 + slot),
                    Author(7, "bench"),
                    question,
                    conversation_id=conversations[slot],
                )
                result = await service.answer(request)
                t2 = time.perf_counter()
                if result.error:
                    raise RuntimeError(result.error)
                conversations[slot] = result.conversation_id
                if i >= WARMUP:
                    bare_ms.append((t1 - t0) * 1000)
                    service_ms.append((t2 - t1) * 1000)
            await sb.writer.drain()
            async with sb.sessions() as session:
                logged = await ConversationRepository(session).count_messages()

    table = Table(title=f"overhead: {ROUNDS} messages, {CONVERSATIONS:,} conversations logged")
    for col in ("path", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(col)
    for name, values in (("bare ChatOpenAI.astream", bare_ms), ("Switchboard service", service_ms)):
        table.add_row(name, *(f"{percentile(values, q):.2f}" for q in (50, 90, 99)))
    console.print(table)
    expected = CONVERSATIONS * 2 + (WARMUP + ROUNDS) * 2
    console.print(f"messages logged: {logged:,} (expected {expected:,})")
    if logged != expected:
        raise RuntimeError(f"logged {logged} messages, expected {expected}")
    return percentile(service_ms, 50) / percentile(bare_ms, 50)


def main() -> int:
    ratio = asyncio.run(run())
    print(f"overhead: ratio {ratio:.2f} (goal <= {GOAL})")
    return 0
