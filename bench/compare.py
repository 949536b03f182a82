"""compare: four models side by side, each with 1 s of latency, through the real service.

`ChatService.compare` asks every model at once, so comparing four 1 s models should take
about as long as one of them: the ratio is the comparison's wall time over the model's
1 s latency (best of 3 rounds, against the fake server in its own process). Floors
measured first, in the same run and against the same server, say where the rest goes:

- one model alone through the service (`ChatService.answer`): the service's own cost
  for one answer, which a comparison cannot beat;
- four answers one after another: what a comparison would cost without concurrency.

Afterwards every comparison must be logged once: one prompt and four "comparison"
answers each.

Last line: `compare: ratio X (goal <= 1.1)`, X = comparison wall / 1 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from bench._support import bench_settings, fake_model_server
from bot.app import freeze_long_lived_heap, open_app
from bot.service.compare import Comparison
from core.messages import Author, ChatRequest, Place
from store.models import Message

LATENCY_S = 1.0
MODELS = ("fake-1", "fake-2", "fake-3", "fake-4")
GOAL = 1.1
ROUNDS = 3  # this machine's neighbours add noise to any single round: the best one counts
PLACE = Place(guild_id=1, channel_id=1)
WHO = Author(1, "bench")


async def best(call: Callable[[int], Awaitable[object]]) -> tuple[float, list[float]]:
    """The best wall time of ROUNDS calls, and every round's."""
    walls = []
    for round_ in range(ROUNDS):
        t0 = time.perf_counter()
        await call(round_)
        walls.append(time.perf_counter() - t0)
    return min(walls), walls


async def run() -> float:
    console = Console()
    freeze_long_lived_heap()
    with (
        fake_model_server(latency=LATENCY_S) as base_url,
        bench_settings(base_url, models=MODELS, max_retries=0) as settings,
    ):
        async with open_app(settings, knowledge=False) as sb:
            freeze_long_lived_heap()
            svc = sb.service
            # Every model's client built and its connection open before anything is timed.
            warm = await svc.compare(PLACE, WHO, "warm up", list(MODELS))
            if not all(answer.ok for answer in warm.answers):
                raise RuntimeError(f"warm-up failed: {[a.error for a in warm.answers]}")

            async def alone(round_: int) -> None:
                result = await svc.answer(ChatRequest(PLACE, WHO, f"alone {round_}"))
                if result.error:
                    raise RuntimeError(result.error)

            # A channel per model, for answers one after another.
            channels = [Place(guild_id=2, channel_id=n) for n in range(len(MODELS))]
            for channel, model in zip(channels, MODELS, strict=True):
                await svc.set_model(channel, "channel", model, WHO)

            async def in_turn(round_: int) -> None:
                for channel in channels:
                    result = await svc.answer(ChatRequest(channel, WHO, f"in turn {round_}"))
                    if result.error:
                        raise RuntimeError(result.error)

            comparisons: list[Comparison] = []

            async def compare(round_: int) -> None:
                comparison = await svc.compare(PLACE, WHO, f"question {round_}", list(MODELS))
                failed = [a.error for a in comparison.answers if a.error]
                if failed:
                    raise RuntimeError(f"{len(failed)} answers failed, first: {failed[0]}")
                comparisons.append(comparison)

            one, _ = await best(alone)
            four_in_turn, _ = await best(in_turn)
            service_compare, walls = await best(compare)
            await sb.writer.drain()
            async with sb.sessions() as session:
                logged = await session.scalar(
                    select(func.count())
                    .select_from(Message)
                    .where(Message.parent_id.in_([c.prompt_id for c in comparisons]))
                    .where(Message.kind == "comparison")
                )

    table = Table(
        title=f"compare: {len(MODELS)} models side by side, model latency {LATENCY_S * 1000:.0f} ms"
    )
    for column in ("path", "wall ms", "wall / latency"):
        table.add_column(column)
    for name, wall in (
        ("one model alone (ChatService.answer)", one),
        (f"{len(MODELS)} answers one after another", four_in_turn),
        (f"compare, {len(MODELS)} models at once", service_compare),
    ):
        table.add_row(name, f"{wall * 1000:.0f}", f"{wall / LATENCY_S:.2f}")
    table.caption = (
        f"best of {ROUNDS} rounds each; compare rounds: "
        + ", ".join(f"{w * 1000:.0f}" for w in walls)
        + " ms"
    )
    console.print(table)
    console.print(
        f"compare over one model alone: {(service_compare - one) * 1000:+.0f} ms "
        f"({service_compare / one:.2f}x)"
    )
    expected = len(MODELS) * ROUNDS
    console.print(f"logged: {logged} comparison answers (expected {expected})")
    if logged != expected:
        raise RuntimeError("not every comparison was logged exactly once")
    return service_compare / LATENCY_S


def main() -> int:
    ratio = asyncio.run(run())
    print(f"compare: ratio {ratio:.2f} (goal <= {GOAL})")
    return 0
