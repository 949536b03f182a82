"""How often one person may address the bot, and how much their answers may cost.

Each person gets `per_minute` messages in a window that opens with their first message
and lasts a minute, counted across every channel and server (it protects the model
budget from one person's flood, wherever it comes from). Over the limit, the first
refused message is told how long to wait; the rest of that window is skipped quietly.

`Budget` caps what answers from priced models cost in a day (UTC): per person and per
server, from the prices in the registry and the tokens each answer was billed for. It is
checked before each call; over a budget, priced models are not asked until midnight UTC,
and models without a price (the local ones) still answer. Answers already running
finish, so a total can pass its budget by what those cost.

The terminal chat is exempt from both: its user is the person running the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chains.registry import ModelSpec
from core.cache import LRU
from core.errors import UserError
from core.messages import Author, ChatRequest, Place
from store.exchange_log import ExchangeLog
from store.repositories import SpendingRepository, SpendingRow

log = logging.getLogger(__name__)

WINDOW_S = 60.0
# How long a budget check waits for a log write in progress (it may be retrying an outage).
WRITE_WAIT_S = 2.0
# How long totals read from the database are trusted before they are read again: what
# another process of the bot spent shows within this (its own spending shows at once).
FRESH_S = 30.0
# After the database could not be read, how soon the budgets try it again.
RETRY_S = 5.0
# People tracked at once; the least recently seen are forgotten first (their window is over).
TRACKED_PEOPLE = 10_000


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a message may be answered; if not, how long to wait and whether to say so."""

    allowed: bool
    retry_after: float = 0.0  # seconds until the window ends
    notify: bool = False  # the first refusal of a window tells the person
    per_minute: int = 0  # the limit that applies


ADMITTED = Admission(True)


@dataclass(slots=True)
class _Window:
    opened_at: float
    used: int
    told: bool = False


class PersonLimit:
    """A fixed window per person: `per_minute` messages a minute (0: no limit)."""

    def __init__(self, per_minute: int) -> None:
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0")
        self.per_minute = per_minute
        self._windows: LRU[int, _Window] = LRU(TRACKED_PEOPLE)

    def admit(self, request: ChatRequest) -> Admission:
        """Count `request` against its author's window, timed by the message's own time."""
        if self.per_minute == 0 or request.sent_at is None or request.discord_message_id is None:
            return ADMITTED  # no limit, or the terminal (its requests carry no Discord message)
        now = request.sent_at
        window = self._windows.get(request.author.id)
        if window is None or now >= window.opened_at + WINDOW_S:
            self._windows.put(request.author.id, _Window(opened_at=now, used=1))
            return ADMITTED
        if window.used < self.per_minute:
            window.used += 1
            return ADMITTED
        notify = not window.told
        window.told = True
        return Admission(
            False,
            retry_after=window.opened_at + WINDOW_S - now,
            notify=notify,
            per_minute=self.per_minute,
        )


# --------------------------------------------------------------------------- budgets


class OverBudget(UserError):
    """A priced model was not asked: the person's or the server's daily budget is spent."""


@dataclass(frozen=True, slots=True)
class Spent:
    """What a person and their server spent today on priced models, and the budgets."""

    person: float
    server: float
    person_budget: float  # 0: no budget
    server_budget: float
    renews_at: datetime  # the next midnight UTC


def priced(spec: ModelSpec) -> bool:
    """Whether answers from this model cost anything (the registry gives it a price)."""
    return spec.input_price > 0 or spec.output_price > 0


def usd(amount: float) -> str:
    """$0.0042, $0.51, $12.00: amounts under a cent keep their digits."""
    return f"${amount:.4f}" if 0 < amount < 0.01 else f"${amount:,.2f}"


def until(moment: datetime, now: datetime) -> str:
    """'in 3 h 20 min' from `now` until `moment`."""
    minutes = max(1, int((moment - now).total_seconds() // 60))
    hours, minutes = divmod(minutes, 60)
    return f"in {hours} h {minutes} min" if hours else f"in {minutes} min"


@dataclass(frozen=True, slots=True)
class SpendingReport:
    """Today's spending on priced models, for the operator: per server and per person."""

    day: date
    person_budget: float  # 0: no budget
    server_budget: float
    servers: list[tuple[int, float]]  # (server id, 0 for DMs; dollars), the largest first
    people: list[tuple[int, float]]  # (person id, 0 for the forgotten; dollars), everywhere

    @property
    def total(self) -> float:
        return sum(usd for _, usd in self.servers)


@dataclass(slots=True)
class _Total:
    usd: float
    fresh_until: float  # monotonic seconds: read again from the database after this


class Budget:
    """Daily budgets in USD for priced models: per person (all servers and DMs) and per server.

    0 means no budget. The totals live in the database (`spending`), so they hold across
    restarts and every process of the bot. Each process keeps the totals it read, adds
    what its own answers cost at once, and reads them again after `FRESH_S` (spending
    through another process shows within that); a burst of people not read yet is read
    in one query, between two writes of the log, with what still waits for the writer.
    """

    def __init__(
        self,
        *,
        person_daily_usd: float,
        server_daily_usd: float,
        sessions: async_sessionmaker[AsyncSession],
        exchange_log: ExchangeLog,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if person_daily_usd < 0 or server_daily_usd < 0:
            raise ValueError("budgets must be >= 0")
        self.person_daily_usd = person_daily_usd
        self.server_daily_usd = server_daily_usd
        self.sessions = sessions
        self.exchange_log = exchange_log
        self.now = now
        self.clock = clock
        self._day: date | None = None
        self._people: dict[int, _Total] = {}
        self._servers: dict[int, _Total] = {}
        # Keys to read at the next load, the load running, and (while it reads) what
        # answers recorded meanwhile, which its result does not hold yet.
        self._wanted: tuple[set[int], set[int]] = (set(), set())
        self._loading: asyncio.Future[None] | None = None
        self._during: tuple[dict[int, float], dict[int, float]] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.person_daily_usd or self.server_daily_usd)

    def _today(self) -> date:
        """Today (UTC); the totals kept are today's only."""
        day = self.now().astimezone(UTC).date()
        if day != self._day:
            self._day = day
            self._people.clear()
            self._servers.clear()
        return day

    async def spent(self, author: Author, place: Place) -> Spent:
        """What `author` (everywhere) and the server of `place` spent today, with the budgets."""
        guild = place.guild_id or 0
        while True:
            day, now = self._today(), self.clock()
            person, server = self._people.get(author.id), self._servers.get(guild)
            if person and server and person.fresh_until > now and server.fresh_until > now:
                break
            self._wanted[0].add(author.id)
            self._wanted[1].add(guild)
            if self._loading is None:
                self._loading = asyncio.ensure_future(self._load(day))
            # Shielded: one caller cancelled (its reader left) must not stop the others'.
            await asyncio.shield(self._loading)
        midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
        return Spent(person.usd, server.usd, self.person_daily_usd, self.server_daily_usd, midnight)

    async def _load(self, day: date) -> None:
        """Read the totals of every person and server wanted so far, in one query each."""
        try:
            # Between two writes of the log, what waits for it and what it wrote add up
            # exactly (during a write, its amounts are in neither, or in both).
            async with self.exchange_log.writer.between_writes(WRITE_WAIT_S):
                people, servers = self._wanted
                self._wanted = (set(), set())
                waiting = self.exchange_log.unwritten_spending(day, people, servers)
                self._during = ({}, {})
                try:
                    async with self.sessions() as session:
                        stored = await SpendingRepository(session).totals(day, people, servers)
                    fresh_until = self.clock() + FRESH_S
                except Exception as exc:  # the database is away: answer rather than refuse all
                    log.warning("the budgets could not read today's spending (%s)", exc)
                    stored, fresh_until = ({}, {}), self.clock() + RETRY_S
                during, self._during = self._during, None
            if day != self._day:
                return  # midnight passed meanwhile: these are yesterday's
            for kept, keys, found, wait, since in (
                (self._people, people, stored[0], waiting[0], during[0]),
                (self._servers, servers, stored[1], waiting[1], during[1]),
            ):
                for key in keys:
                    usd = found.get(key, 0.0) + wait.get(key, 0.0) + since.get(key, 0.0)
                    kept[key] = _Total(usd, fresh_until)
        finally:
            self._during = None
            self._loading = None

    async def report(self) -> SpendingReport:
        """Today's totals as the database has them (this process's own included: it waits
        for the writer first)."""
        day = self._today()
        with contextlib.suppress(TimeoutError):  # a write retrying an outage: read what is there
            await self.exchange_log.writer.drain(timeout=WRITE_WAIT_S)
        async with self.sessions() as session:
            rows = await SpendingRepository(session).of_day(day)
        servers: dict[int, float] = {}
        people: dict[int, float] = {}
        for row in rows:
            servers[row.guild_id] = servers.get(row.guild_id, 0.0) + row.cost_usd
            people[row.person_id] = people.get(row.person_id, 0.0) + row.cost_usd
        return SpendingReport(
            day,
            self.person_daily_usd,
            self.server_daily_usd,
            sorted(servers.items(), key=lambda item: -item[1]),
            sorted(people.items(), key=lambda item: -item[1]),
        )

    def forget(self, person_id: int) -> None:
        """A person was forgotten: their totals passed to nobody, so read them again."""
        self._people.pop(person_id, None)

    async def check(
        self, author: Author, place: Place, specs: Sequence[ModelSpec], *, discord: bool
    ) -> None:
        """Raise OverBudget if a priced model in `specs` may not be asked for `author` now.

        Only what comes from Discord is checked (`discord`): the terminal is exempt.
        """
        if not discord or not self.enabled or not any(priced(spec) for spec in specs):
            return
        spent = await self.spent(author, place)
        when = f"it renews at 00:00 UTC ({until(spent.renews_at, self.now())})"
        free = "Models without a price, like the local ones, still answer."
        if spent.person_budget and spent.person >= spent.person_budget:
            raise OverBudget(
                f"You have spent {usd(spent.person)} of your {usd(spent.person_budget)} "
                f"daily budget for paid models; {when}. {free}"
            )
        if place.guild_id and spent.server_budget and spent.server >= spent.server_budget:
            raise OverBudget(
                f"This server has spent {usd(spent.server)} of its "
                f"{usd(spent.server_budget)} daily budget for paid models; {when}. {free}"
            )

    def record(self, author: Author, place: Place, cost: float | None, *, discord: bool) -> None:
        """Add what an answer cost to its asker's and their server's totals for today
        (at once here, and in the background in the database)."""
        if not (discord and cost and self.enabled):
            return
        day, guild = self._today(), place.guild_id or 0
        self.exchange_log.count_spending(SpendingRow(day, guild, author.id, cost))
        for kept, key, index in ((self._people, author.id, 0), (self._servers, guild, 1)):
            total = kept.get(key)
            if total is not None:
                total.usd += cost
            if self._during is not None:  # a load is reading: its result must hold this too
                self._during[index][key] = self._during[index].get(key, 0.0) + cost
