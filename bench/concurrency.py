"""concurrency: 200 conversations in 50 channels at once, against a model with 500 ms latency.

All 200 messages go through the service at the same moment; the wall time until the
last reply is complete is divided by the model's own 500 ms. A bare run of 200
concurrent ChatOpenAI calls to the same server is measured first, as the floor.
While the service runs, a probe measures event-loop lag (how late a 5 ms sleep wakes).
Afterwards every exchange must be logged exactly once.

Last line: `concurrency: ratio X (goal <= 1.2)`, X = service wall time / 500 ms.
"""

from __future__ import annotations

import asyncio
import time

from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from bench._support import bench_settings, fake_model_server, percentile
from bot.app import open_app
from bot.messages import Author, ChatRequest, Place
from store.models import Conversation, Message

LATENCY_S = 0.5
CONVERSATIONS = 200
CHANNELS = 50
GOAL = 1.2


async def loop_lag(stop: asyncio.Event, samples: list[float]) -> None:
    """How late the loop wakes a task that asked to sleep 5 ms."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        samples.append(max(0.0, (time.perf_counter() - t0 - 0.005) * 1000))


async def run() -> float:
    console = Console()
    with fake_model_server(latency=LATENCY_S) as base_url, bench_settings(base_url) as settings:
        async with open_app(settings, knowledge=False) as sb:
            bare = ChatOpenAI(base_url=base_url, api_key="sk-bench", model="fake-model", stream_usage=True)

            async def bare_call(i: int) -> None:
                async for _ in bare.astream([HumanMessage(f"hello {i}")]):
                    pass

            await bare_call(-1)  # open connections' code paths once
            await sb.service.answer(ChatRequest(Place(1, 1), Author(1, "warmup"), "warm up"))

            t0 = time.perf_counter()
            await asyncio.gather(*(bare_call(i) for i in range(CONVERSATIONS)))
            bare_wall = time.perf_counter() - t0

            requests = [
                ChatRequest(Place(guild_id=1, channel_id=1000 + i % CHANNELS), Author(10_000 + i, f"user{i}"), f"question {i}")
                for i in range(CONVERSATIONS)
            ]
            lag: list[float] = []
            stop = asyncio.Event()
            probe = asyncio.create_task(loop_lag(stop, lag))
            t0 = time.perf_counter()
            results = await asyncio.gather(*(sb.service.answer(r) for r in requests))
            wall = time.perf_counter() - t0
            stop.set()
            await probe

            failed = [r.error for r in results if r.error]
            if failed:
                raise RuntimeError(f"{len(failed)} replies failed, first: {failed[0]}")
            await sb.writer.drain()
            async with sb.sessions() as session:
                answers = await session.scalar(
                    select(func.count()).select_from(Message).where(Message.id.in_([r.message_id for r in results]))
                )
                user_rows = await session.scalar(
                    select(func.count()).select_from(Message).where(
                        Message.role == "user", Message.content.like("question %")
                    )
                )
                convs = await session.scalar(
                    select(func.count()).select_from(Conversation).where(
                        Conversation.id.in_([r.conversation_id for r in results])
                    )
                )

    table = Table(title=f"concurrency: {CONVERSATIONS} conversations in {CHANNELS} channels, model latency {LATENCY_S * 1000:.0f} ms")
    for col in ("path", "wall ms", "wall / latency"):
        table.add_column(col)
    table.add_row("bare ChatOpenAI x200", f"{bare_wall * 1000:.0f}", f"{bare_wall / LATENCY_S:.2f}")
    table.add_row("Switchboard service x200", f"{wall * 1000:.0f}", f"{wall / LATENCY_S:.2f}")
    console.print(table)
    console.print(f"service / bare: {wall / bare_wall:.2f} (what Switchboard adds on top of the LangChain client)")
    console.print(
        f"event-loop lag: p50 {percentile(lag, 50):.1f} ms, p99 {percentile(lag, 99):.1f} ms, max {max(lag):.1f} ms"
    )
    console.print(f"logged: {answers} answers, {user_rows} prompts, {convs} conversations (expected {CONVERSATIONS} each)")
    if not answers == user_rows == convs == CONVERSATIONS:
        raise RuntimeError("not every exchange was logged exactly once")
    return wall / LATENCY_S


def main() -> int:
    ratio = asyncio.run(run())
    print(f"concurrency: ratio {ratio:.2f} (goal <= {GOAL})")
    return 0
