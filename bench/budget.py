"""budget: what checking the daily budgets adds to 200 messages from Discord at once.

Two Switchboards in one process, on the same fake model server (500 ms latency), with a
priced model: one with no budget, one with budgets per person and per server so high
that nothing is refused, so every message pays the full check (the totals read between
two log writes) and every answer adds to them. Both answer the same burst of 200
Discord messages from 200 people in one server, round after round, alternating (this
machine's neighbours make single rounds noisy); the best round of each counts. The
floors, measured in the same run on the budgeted app: one check alone of a person whose
total the process keeps, and of one it must read (what waits for the log writer, and
the `spending` table). The timed bursts come from the same 200 people as the warm-up,
so their totals are kept, as an active server's are.

Afterwards the budgeted app's totals must equal what its answers cost.

Last line: `budget: ratio X (goal <= 1.1)`, X = budgeted wall / unbudgeted wall.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from itertools import count

from rich.console import Console
from sqlalchemy import func, select

from bench._support import bench_settings, fake_model_server
from bot.app import App, freeze_long_lived_heap, open_app
from core.messages import Author, ChatRequest, Place
from store.models import Spending

LATENCY_S = 0.5
PEOPLE = 200
GUILD = 1
ROUNDS = 4
GOAL = 1.1
HIGH = 1_000_000.0  # a budget nothing reaches


async def burst(app: App, ids: count[int], round_: int) -> tuple[float, float]:
    """PEOPLE messages from Discord at once; (wall seconds, what the answers cost)."""
    requests = [
        ChatRequest(
            Place(GUILD, 100 + i % 20),
            Author(10_000 + i, f"user{i}"),
            f"question {round_}-{i}",
            discord_message_id=next(ids),
        )
        for i in range(PEOPLE)
    ]
    started = time.perf_counter()
    results = await asyncio.gather(*(app.service.answer(r) for r in requests))
    wall = time.perf_counter() - started
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} replies failed, first: {failed[0]}")
    return wall, sum(r.cost_usd or 0.0 for r in results)


async def run() -> float:
    console = Console()
    freeze_long_lived_heap()
    ids = count(1)
    with (
        fake_model_server(latency=LATENCY_S) as base_url,
        bench_settings(base_url) as plain_settings,
        bench_settings(
            base_url, person_daily_budget_usd=HIGH, server_daily_budget_usd=HIGH
        ) as budget_settings,
    ):
        async with (
            open_app(plain_settings, knowledge=False) as plain,
            open_app(budget_settings, knowledge=False) as budgeted,
        ):
            freeze_long_lived_heap()
            # Warm up: connections, settings, first writes.
            first_plain = (await burst(plain, ids, -1))[0]
            first_budgeted, billed = await burst(budgeted, ids, -1)
            walls: dict[str, list[float]] = {"no budget": [], "budgets": []}
            for round_ in range(ROUNDS):
                walls["no budget"].append((await burst(plain, ids, round_))[0])
                wall, cost = await burst(budgeted, ids, round_)
                walls["budgets"].append(wall)
                billed += cost

            budget = budgeted.service.budget
            assert budget is not None
            # The floors: a check of a person whose total is kept, and of one who must be
            # read from the database (a first message, or totals older than FRESH_S).
            kept, read = [], []
            for n in range(50):
                started = time.perf_counter()
                await budget.spent(Author(10_000, "user0"), Place(GUILD, 100))
                kept.append(time.perf_counter() - started)
                started = time.perf_counter()
                await budget.spent(Author(50_000 + n, "new"), Place(GUILD, 100))
                read.append(time.perf_counter() - started)

            await budgeted.writer.drain()
            async with budgeted.sessions() as session:
                total = await session.scalar(select(func.sum(Spending.cost_usd))) or 0.0
                rows = await session.scalar(select(func.count()).select_from(Spending))

    for name, rounds in walls.items():
        console.print(
            f"{name:>9}: best {min(rounds) * 1000:.0f} ms for {PEOPLE} messages "
            f"(rounds: {', '.join(f'{w * 1000:.0f}' for w in rounds)} ms)"
        )
    console.print(
        f"first burst (warm-up; nobody's total read yet): no budget {first_plain * 1000:.0f} ms, "
        f"budgets {first_budgeted * 1000:.0f} ms"
    )
    for name, times in (("total kept", kept), ("read from the database", read)):
        console.print(
            f"floor: one check alone, {name}: median {statistics.median(times) * 1000:.2f} ms "
            f"(max {max(times) * 1000:.2f} ms)"
        )
    console.print(f"totals: ${total:.6f} in {rows} rows; the answers cost ${billed:.6f}")
    if abs(total - billed) > 1e-9 * max(1.0, billed):
        raise RuntimeError("the spending totals do not match what the answers cost")
    return min(walls["budgets"]) / min(walls["no budget"])


def main() -> int:
    ratio = asyncio.run(run())
    print(f"budget: ratio {ratio:.2f} (goal <= {GOAL})")
    return 0
