"""Daily budgets for priced models, per person and per server: checked before each call.

The real service over a migrated SQLite file (and PostgreSQL for the totals' SQL), the
real answer unit on the fake model server. `main` is priced (steeply, so that one
answer costs cents), `solo` and `backup` are free.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select

from bot.app import App, open_app
from bot.present import spending_line
from bot.service.limits import FRESH_S, OverBudget
from core.messages import Author, ChatRequest, ChatResult, Place
from core.settings import Settings
from store.exchange_log import ExchangeLog
from store.models import Spending
from store.repositories import SpendingRepository, SpendingRow
from tests.fakes.openai_server import FakeOpenAI

GUILD, CHANNEL = 10, 20
PLACE = Place(GUILD, CHANNEL)
ALICE, BOB, MOD = Author(1, "alice"), Author(2, "bob"), Author(3, "mod")
REPO = Path(__file__).resolve().parent.parent
QUESTION = "What does a switchboard operator do all day?"


def priced(settings: Settings, **budgets: float) -> Settings:
    """The test registry with `main` at $200 / $400 per million tokens, and `budgets`."""
    config = settings.config
    text = config.read_text().replace(
        "input_price = 1.0\noutput_price = 2.0", "input_price = 200.0\noutput_price = 400.0"
    )
    config.write_text('comparison_models = ["solo"]\narena_pool = ["main", "solo"]\n' + text)
    return settings.model_copy(update=budgets)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def budget_database(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqlite" else request.getfixturevalue("migrated_postgres_url")


@pytest.fixture
def budget_settings(service_settings: Settings, budget_database: str | None) -> Settings:
    return priced(service_settings, person_daily_budget_usd=0.04, database_url=budget_database)


@pytest.fixture
async def app(budget_settings: Settings) -> AsyncIterator[App]:
    async with open_app(budget_settings, knowledge=False) as app:
        yield app


def asked(text: str = QUESTION, author: Author = ALICE, place: Place = PLACE) -> ChatRequest:
    """A message from Discord (the terminal's carry no Discord id, and are exempt)."""
    return ChatRequest(place, author, text, discord_message_id=1000 + author.id)


async def answered(app: App, request: ChatRequest) -> ChatResult:
    result = await app.service.answer(request)
    assert result.error is None, result.error
    return result


async def refusal(app: App, request: ChatRequest) -> str:
    with pytest.raises(OverBudget) as refused:
        await app.service.answer(request)
    return str(refused.value)


async def test_a_person_over_budget_is_refused_paid_models_and_free_ones_still_answer(
    app: App, budget_settings: Settings
) -> None:
    first = await answered(app, asked())
    assert first.model == "main" and first.cost_usd is not None and 0.02 < first.cost_usd < 0.04
    second = await answered(app, asked())  # spent less than the $0.04: asked, and billed
    spent = first.cost_usd + (second.cost_usd or 0)
    assert spent >= 0.04
    message = await refusal(app, asked())
    assert message.startswith(
        f"You have spent ${spent:,.2f} of your $0.04 daily budget for paid models; it renews "
        "at 00:00 UTC (in "
    )
    assert message.endswith("Models without a price, like the local ones, still answer.")
    # The refused message asked nothing: two answers were billed, and two are counted.
    await app.writer.drain()
    async with app.sessions() as session:
        rows = (await session.scalars(select(Spending))).all()
    assert [(r.guild_id, r.person_id) for r in rows] == [(GUILD, ALICE.id)]
    assert rows[0].cost_usd == pytest.approx(spent) and rows[0].day == datetime.now(UTC).date()

    # Another answer to an earlier question (🔁) is refused too, before the model is asked.
    await app.writer.drain()
    with pytest.raises(OverBudget):
        async for _ in app.service.retry(first.message_id or "", ALICE):
            pass
    # A person's budget counts everywhere: a DM is refused too; someone else is not.
    assert (await refusal(app, asked(place=Place(None, 99)))).startswith("You have spent")
    assert (await answered(app, asked(author=BOB))).model == "main"
    # The terminal is the operator's: never refused.
    terminal = await app.service.answer(ChatRequest(PLACE, ALICE, QUESTION))
    assert terminal.model == "main" and terminal.error is None

    # A free model still answers her, and costs nothing.
    await app.service.set_model(PLACE, "channel", "solo", MOD)
    free = await answered(app, asked())
    assert free.model == "solo" and not free.cost_usd
    # Comparing with a priced model is refused; with free ones only, it is not.
    with pytest.raises(OverBudget):
        await app.service.compare(PLACE, ALICE, QUESTION, ["main", "solo"], discord_message_id=7)
    both_free = await app.service.compare(
        PLACE, ALICE, QUESTION, ["solo", "backup"], discord_message_id=8
    )
    assert [a.model for a in both_free.answers] == ["solo", "backup"]

    # The totals are in the database: a restarted bot still refuses her.
    await app.service.set_model(PLACE, "channel", "main", MOD)
    async with open_app(budget_settings, knowledge=False) as later:
        assert (await refusal(later, asked())).startswith(f"You have spent ${spent:,.2f}")


async def test_a_server_budget_caps_everyone_there_and_not_elsewhere(
    service_settings: Settings, fake_openai: FakeOpenAI
) -> None:
    settings = priced(service_settings, server_daily_budget_usd=0.04)
    async with open_app(settings, knowledge=False) as app:
        await answered(app, asked(author=ALICE))
        await answered(app, asked(author=BOB))
        spent = await app.service.spending(MOD, PLACE)
        assert spent is not None and spent.server >= 0.04 and spent.person == 0
        message = await refusal(app, asked(author=MOD))
        assert message.startswith(
            f"This server has spent ${spent.server:,.2f} of its $0.04 daily budget for paid "
            "models; it renews at 00:00 UTC (in "
        )
        # Another server, and a DM, have their own totals (and DMs no server budget).
        assert (await answered(app, asked(author=MOD, place=Place(11, 21)))).model == "main"
        assert (await answered(app, asked(author=MOD, place=Place(None, 99)))).model == "main"
        # A fallback that is priced is not asked over the budget; a free first model answers.
        await app.service.set_model(PLACE, "channel", "backup", MOD)
        assert (await answered(app, asked(author=MOD))).model == "backup"
        # A blind battle whose pool has one free model is refused, before anyone is asked;
        # with two free ones, it is drawn from those.
        asks = len(fake_openai.requests)
        with pytest.raises(OverBudget):
            await app.service.battle(PLACE, MOD, QUESTION, discord_message_id=9)
        assert len(fake_openai.requests) == asks
        await app.service.set_arena_pool(PLACE, "channel", ["main", "solo", "backup"], MOD)
        for n in range(4):
            battle = await app.service.battle(PLACE, MOD, QUESTION, discord_message_id=10 + n)
            verdict = await app.service.battle_vote(battle.id, MOD, "tie")
            assert {verdict.model_a, verdict.model_b} == {"solo", "backup"}


async def test_another_process_spending_shows_once_the_totals_are_read_again(
    app: App, budget_settings: Settings
) -> None:
    # A second process of the bot on the same database (a second shard, say).
    async with open_app(budget_settings, knowledge=False, migrate=False) as other:
        assert other.service.budget is not None
        clock = [0.0]
        other.service.budget.clock = lambda: clock[0]
        assert await other.service.spending(ALICE, PLACE) is not None  # it reads her total: 0
        for _ in range(2):
            await answered(app, asked())  # she spends the budget through this process
        await app.writer.drain()
        assert (await answered(other, asked())).model == "main"  # its total is not stale yet
        await other.writer.drain()
        clock[0] += FRESH_S + 1
        assert (await refusal(other, asked())).startswith("You have spent $0.0")
        # Read again: what both processes' answers cost.
        spent = await other.service.spending(ALICE, PLACE)
        assert spent is not None and spent.person == pytest.approx(3 * 0.0226, rel=0.1)


async def test_many_people_at_once_are_read_in_one_query(app: App) -> None:
    statements: list[str] = []
    engine = app.engine.sync_engine
    listen = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listen)
    try:
        people = [Author(100 + n, f"p{n}") for n in range(30)]
        await asyncio.gather(*(app.service.spending(person, PLACE) for person in people))
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    reads = [s for s in statements if "FROM spending" in s]
    assert len(reads) == 2, reads  # one load: the people, and the server


async def test_usage_says_where_a_person_stands(app: App) -> None:
    assert spending_line(None, True) == (
        "No daily budget is set for paid models: they answer without a cap."
    )
    first = await answered(app, asked())
    spent = await app.service.spending(ALICE, PLACE)
    assert spent is not None and spent.person == pytest.approx(first.cost_usd)
    line = spending_line(spent, True)
    assert line.startswith(
        f"Today (UTC), on paid models, you spent ${first.cost_usd:,.2f} of your $0.04 daily "
        "budget. Budgets renew at 00:00 UTC (in "
    )
    assert spent.renews_at == datetime.combine(
        datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC
    )


async def test_forgetting_a_person_keeps_the_servers_total_without_them(
    service_settings: Settings,
) -> None:
    settings = priced(service_settings, person_daily_budget_usd=0.04, server_daily_budget_usd=1)
    async with open_app(settings, knowledge=False) as app:
        for _ in range(2):
            await answered(app, asked())
        await refusal(app, asked())
        before = await app.service.spending(BOB, PLACE)
        await app.service.forget(ALICE)
        async with app.sessions() as session:
            rows = (await session.scalars(select(Spending))).all()
        assert [r.person_id for r in rows] == [0]  # her id is gone; the dollars stay
        after = await app.service.spending(BOB, PLACE)
        assert before is not None and after is not None
        assert after.server == pytest.approx(before.server)
        # Forgotten, she starts again from nothing (everything about her went).
        assert (await answered(app, asked())).model == "main"


async def test_the_purge_deletes_the_days_that_are_over(app: App) -> None:
    today = datetime.now(UTC).date()
    async with app.sessions() as session, session.begin():
        await SpendingRepository(session).add(
            [
                SpendingRow(today - timedelta(days=2), GUILD, ALICE.id, 1.0),
                SpendingRow(today - timedelta(days=1), GUILD, ALICE.id, 1.0),
                SpendingRow(today, GUILD, ALICE.id, 0.01),
                SpendingRow(today, GUILD, ALICE.id, 0.01),  # adds up
            ]
        )
    await app.service.purge(dry_run=True)
    async with app.sessions() as session:
        assert len((await session.scalars(select(Spending))).all()) == 3
    await app.service.purge()
    async with app.sessions() as session:
        rows = (await session.scalars(select(Spending))).all()
    assert [(r.day, r.cost_usd) for r in rows] == [(today, pytest.approx(0.02))]
    assert (await answered(app, asked())).model == "main"  # $0.02 of $0.04


def usage_command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`switchboard usage` in its own process, on the same data and budgets as `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_CONFIG=str(settings.config),
        SWITCHBOARD_DATA_DIR=str(settings.data_dir),
        SWITCHBOARD_PERSON_DAILY_BUDGET_USD=str(settings.person_daily_budget_usd),
        SWITCHBOARD_SERVER_DAILY_BUDGET_USD=str(settings.server_daily_budget_usd),
        COLUMNS="120",
    )
    if settings.database_url:
        env["SWITCHBOARD_DATABASE_URL"] = settings.database_url
    return subprocess.run(
        [sys.executable, "-m", "bot", "usage", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_switchboard_usage_shows_the_operator_who_spent_what(
    app: App, budget_settings: Settings
) -> None:
    alice = [await answered(app, asked()) for _ in range(2)]
    bob = await answered(app, asked(author=BOB, place=Place(None, 99)))  # a DM
    await app.writer.drain()
    proc = await asyncio.to_thread(usage_command, budget_settings)
    assert proc.returncode == 0, proc.stderr
    total = sum(r.cost_usd or 0 for r in [*alice, bob])
    day = datetime.now(UTC).date().isoformat()
    assert proc.stdout.startswith(
        f"Spent on paid models on {day} (UTC): ${total:,.2f} in 2 places. "
        "Daily budgets: $0.04 a person."
    )
    assert "by server" in proc.stdout and "DMs" in proc.stdout and "by person" in proc.stdout
    proc = await asyncio.to_thread(usage_command, budget_settings, "--json", "--top", "1")
    data = json.loads(proc.stdout)
    assert data["total_usd"] == pytest.approx(total) and data["person_budget_usd"] == 0.04
    assert [s["guild_id"] for s in data["servers"]] == [GUILD, 0]
    assert data["people"] == [{"person_id": ALICE.id, "usd": pytest.approx(total - bob.cost_usd)}]
    # Without budgets nothing is counted, and it says so.
    off = budget_settings.model_copy(update={"person_daily_budget_usd": 0.0})
    proc = await asyncio.to_thread(usage_command, off)
    assert proc.returncode == 0 and proc.stdout.startswith("No daily budget is set (")


def test_spending_waiting_for_the_writer_counts_and_survives_a_spill() -> None:
    class Writer:
        def __init__(self) -> None:
            self.spills: list[object] = []

        def submit(self, op: object, what: str, spill: object = None) -> None:
            self.spills.append(spill)

    writer = Writer()
    log = ExchangeLog(writer)  # type: ignore[arg-type]
    day = date(2026, 12, 2)
    log.count_spending(SpendingRow(day, GUILD, ALICE.id, 0.25))
    log.count_spending(SpendingRow(day, GUILD, BOB.id, 0.5))
    log.count_spending(SpendingRow(day, 0, ALICE.id, 0.125))  # a DM
    assert len(writer.spills) == 1  # one write for everything waiting
    everyone = ({ALICE.id: 0.375, BOB.id: 0.5}, {GUILD: 0.75, 0: 0.125})
    assert log.unwritten_spending(day, [ALICE.id, BOB.id], [GUILD, 0]) == everyone
    (spill,) = writer.spills
    records = spill()  # type: ignore[operator]
    again = ExchangeLog(Writer())  # type: ignore[arg-type]
    assert again.replay(records) == 1
    assert again.unwritten_spending(day, [ALICE.id, BOB.id], [GUILD, 0]) == everyone
    later = again.unwritten_spending(day + timedelta(days=1), [ALICE.id], [GUILD])
    assert later == ({ALICE.id: 0.0}, {GUILD: 0.0})
