"""Exchanges waiting to be logged, mapped to rows and written in as few statements as possible.

An `Exchange` (core.exchange) becomes: its conversation row (an insert that skips a
stored one), the prompt row (unless the prompt is already stored), one row per answer
or failed attempt, and the answers' `message_inputs` links. A blind battle's `battles`
row (`LoggedBattle`) is written by the op submitted after its exchange's. At a busy moment many
exchanges finish while the log writer is still busy with the last write; they are all
written by the next write, as one insert each of conversations, messages and inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Collection, Iterable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession

from core.cache import LRU
from core.exchange import Exchange, LoggedAnswer, LoggedBattle
from core.messages import Place
from core.text import clean_deep
from store.db import failure_reason, is_outage, sqlstate
from store.models import utcnow
from store.repositories import (
    MESSAGE_COLUMNS,
    AnonymousCountRepository,
    AnonymousCountRow,
    ArenaRepository,
    ConversationRepository,
    PrivacyRepository,
    Removal,
    SpendingRepository,
    SpendingRow,
)
from store.writer import LogWriter

_TICK = timedelta(microseconds=1)
GONE_REMEMBERED = 50_000
# A message row with every column unset: rows built on it all have the same keys.
_BLANK: dict[str, Any] = dict.fromkeys(MESSAGE_COLUMNS)


_Rows = tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]


def exchange_rows(exchange: Exchange, at: datetime) -> _Rows:
    """(conversation row, message rows, input rows) of one exchange; its messages from `at` on.

    Each message is 1 µs after the one before, so the rows keep their order.
    """
    place = exchange.place
    where = {
        "conversation_id": exchange.conversation_id,
        "guild_id": place.guild_id,
        "channel_id": place.channel_id,
        "thread_id": place.thread_id,
    }
    conversation = {
        "id": exchange.conversation_id,
        "guild_id": place.guild_id,
        "channel_id": place.channel_id,
        "thread_id": place.thread_id,
        "started_by": exchange.author_id,
        "origin": exchange.origin,
        "created_at": at,
    }
    messages: list[dict[str, Any]] = []
    if exchange.new_prompt:
        messages.append(
            {
                **_BLANK,
                **where,
                "id": exchange.prompt_id,
                "parent_id": exchange.parent_id,
                "role": "user",
                "kind": "prompt",
                "content": exchange.text,
                "cleaned": exchange.prompt_cleaned,
                "author_id": exchange.author_id,
                "author_name": exchange.author_name,
                "discord_message_id": exchange.discord_message_id,
                "created_at": at,
            }
        )
        at += _TICK
    inputs: list[dict[str, Any]] = []
    for answer in exchange.answers:
        messages.append(
            {
                **_BLANK,
                **where,
                "id": answer.id,
                "parent_id": exchange.prompt_id,
                "role": "assistant",
                "kind": answer.kind,
                "content": answer.content,
                "cleaned": answer.cleaned,
                "created_at": at,
                "model_name": answer.model_name,
                "provider": answer.provider,
                "provider_model": answer.provider_model,
                "system_prompt": exchange.system_prompt,
                "request_messages": answer.request_messages,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                "latency_ms": answer.latency_ms,
                "ttft_ms": answer.ttft_ms,
                "cost_usd": answer.cost_usd,
                "status": answer.status,
                "error": answer.error,
                "fallback_from": answer.fallback_from,
                "source_ids": list(exchange.source_ids),
                "alternative_to": answer.alternative_to,
            }
        )
        at += _TICK
        inputs.extend(
            {"answer_id": answer.id, "position": position, "input_id": input_id}
            for position, input_id in enumerate(answer.input_ids)
        )
    return conversation, messages, inputs


def is_bad_data(exc: BaseException) -> bool:
    """Whether a write failed because of what it writes (it would fail again as it is).

    Only data errors count: a value the database refuses (SQLSTATE class 22), a broken
    constraint other than a foreign key (23), a value the driver cannot encode. Anything
    else (the database away, read-only or restarting; a row it refers to not written
    yet; an error not understood) is worth trying again later, so the writer keeps it.
    """
    if isinstance(exc, UnicodeError):  # some drivers raise it as it is, unwrapped
        return True
    code = sqlstate(exc)
    if code is not None:
        return code.startswith("22") or (code.startswith("23") and code != "23503")
    if is_outage(exc):
        return False
    if isinstance(exc, IntegrityError):  # SQLite: CHECK, NOT NULL, UNIQUE; not FOREIGN KEY
        return "foreign key" not in str(exc).lower()
    if isinstance(exc, DBAPIError):
        return isinstance(exc, DataError)
    return isinstance(exc, StatementError)  # a value SQLAlchemy could not bind


class ExchangeLog:
    """Collects exchanges and hands the LogWriter one write for all that are waiting.

    One exchange that cannot be stored as it is never takes the others with it: when the
    write of all waiting exchanges fails for a reason in the data, each is written alone
    (in a SAVEPOINT), and one that still fails is written with every text cleaned
    (`core.text.clean_deep`, marked `cleaned`). An exchange that cannot be stored even
    then is reported and left out; later exchanges that follow it are stored as the
    start of a new line rather than lost with it. A write that fails because the
    database is away is raised, so the writer keeps it and tries again, in order.
    """

    def __init__(self, writer: LogWriter, logger: logging.Logger | None = None) -> None:
        self.writer = writer
        self.log = logger or logging.getLogger(__name__)
        self._waiting: list[tuple[Exchange, datetime]] = []
        # The time the next message may have: times only go forward, so the log keeps
        # the order exchanges finished in, even when the clock does not move between two.
        self._next_at = utcnow()
        self._lost: set[str] = set()  # ids of messages that could not be stored at all
        # Messages deleted on purpose lately, and whether their words may live on in an
        # answer built on them: not after a person is forgotten or a Discord message is
        # deleted (an exchange still waiting that was built on one is never written), but
        # after retention, yes (it is only no longer referred to).
        self._gone: LRU[str, bool] = LRU(GONE_REMEMBERED)
        # Exchanges answered but not stored, counted until the next write takes them.
        self._counts: dict[tuple[date, int, str], AnonymousCountRow] = {}
        # What answers cost, per day, server and person, until the next write takes it.
        self._spent: dict[tuple[date, int, int], float] = {}
        self.isolated = 0  # exchanges written alone after a batch failed on its data
        self.cleaned = 0  # exchanges stored only once every text in them was cleaned
        self.lost = 0  # exchanges that could not be stored at all

    def add(
        self, exchange: Exchange, what: str | None = None, *, at: datetime | None = None
    ) -> None:
        """Log one exchange; `what` names it in the log writer's error messages.

        `at` is when it finished (default: now); a replayed exchange keeps its own.
        """
        if at is None:
            # Stamped now, when it finished, not when it is written: a retried or delayed
            # write keeps the times, and with them the order.
            at = max(utcnow(), self._next_at)
            self._next_at = at + _TICK * (int(exchange.new_prompt) + len(exchange.answers) or 1)
        first = not self._waiting
        self._waiting.append((exchange, at))
        if first:
            # One write is queued for everything that arrives before it runs.
            write = _Write(self)
            self.writer.submit(
                write, what or f"log exchange {exchange.prompt_id}", spill=write.spill
            )

    def link_discord_messages(
        self, message_id: str, conversation_id: str, discord_message_ids: list[int]
    ) -> None:
        """Record (in the background) that these Discord messages carry answer `message_id`."""
        ids = list(discord_message_ids)

        async def write(session: AsyncSession) -> None:
            if message_id in self._lost or message_id in self._gone:
                return  # its exchange could not be stored, or was deleted: nothing to link to
            await ConversationRepository(session).link_discord_messages(
                message_id, conversation_id, ids
            )

        def spill() -> list[dict[str, Any]]:
            return [
                {
                    "kind": "discord_links",
                    "message_id": message_id,
                    "conversation_id": conversation_id,
                    "discord_message_ids": ids,
                }
            ]

        self.writer.submit(write, f"link discord messages of {message_id}", spill=spill)

    def count_anonymous(self, row: AnonymousCountRow) -> None:
        """Count (in the background) exchanges that were answered but not stored.

        Counts arriving before the write runs are added up in memory: one upsert per day,
        server and model, whatever the number of exchanges.
        """
        key = (row.day, row.guild_id, row.model_name)
        first = not self._counts
        had = self._counts.get(key)
        self._counts[key] = (
            row
            if had is None
            else dataclasses.replace(
                had,
                exchanges=had.exchanges + row.exchanges,
                prompt_tokens=had.prompt_tokens + row.prompt_tokens,
                completion_tokens=had.completion_tokens + row.completion_tokens,
                cost_usd=had.cost_usd + row.cost_usd,
            )
        )
        if first:
            write = _CountWrite(self)
            self.writer.submit(write, "count exchanges not stored", spill=write.spill)

    def count_spending(self, row: SpendingRow) -> None:
        """Add (in the background) what an answer cost to its asker's total for the day.

        Amounts arriving before the write runs are added up in memory, and
        `unwritten_spending` tells the budgets about them meanwhile.
        """
        key = (row.day, row.guild_id, row.person_id)
        first = not self._spent
        self._spent[key] = self._spent.get(key, 0.0) + row.cost_usd
        if first:
            write = _SpendWrite(self)
            self.writer.submit(write, "add up what answers cost", spill=write.spill)

    def unwritten_spending(
        self, day: date, person_ids: Collection[int], guild_ids: Collection[int]
    ) -> tuple[dict[int, float], dict[int, float]]:
        """What of `day`'s spending by these people (anywhere) and in these servers is not
        written yet.

        Exact only between writes (`LogWriter.between_writes`): a write in progress has
        taken its amounts from here, and not committed them yet.
        """
        people = dict.fromkeys(person_ids, 0.0)
        servers = dict.fromkeys(guild_ids, 0.0)
        for (when, guild, who), cost in self._spent.items():
            if when == day:
                if who in people:
                    people[who] += cost
                if guild in servers:
                    servers[guild] += cost
        return people, servers

    def delete_discord_prompt(
        self, discord_message_id: int, removed: Callable[[Removal], None] | None = None
    ) -> None:
        """Delete (in the background, after every write queued before it) the prompt a
        person's Discord message became, with what derives from it; `removed` hears what
        went. Queued behind the log, a message deleted just after it was sent goes too."""

        async def write(session: AsyncSession) -> None:
            removal = await PrivacyRepository(session).delete_discord_message(discord_message_id)
            self.forget_ids(removal.message_ids)
            if removed is not None and removal.message_ids:
                removed(removal)  # may run again if the write is retried: it only forgets

        def spill() -> list[dict[str, Any]]:
            return [{"kind": "discord_deletion", "discord_message_id": discord_message_id}]

        self.writer.submit(write, f"delete Discord message {discord_message_id}", spill=spill)

    def add_battle(self, battle: LoggedBattle, *, at: datetime | None = None) -> None:
        """Log a blind battle (in the background), after the exchange that holds its answers.

        Submitted after that exchange, so the writer stores it second; were the exchange
        kept for later (the database away), this fails on its foreign keys and is kept
        behind it.
        """
        at = at or utcnow()

        async def write(session: AsyncSession) -> None:
            ids = (battle.prompt_id, battle.answer_a, battle.answer_b)
            if set(ids) & self._lost or any(id in self._gone for id in ids):
                return  # its exchange could not be stored, or was deleted: nothing to refer to
            await ArenaRepository(session).add_battle(battle_row(battle, at))

        def spill() -> list[dict[str, Any]]:
            return [{"kind": "battle", "at": at.isoformat(), "battle": battle_to_json(battle)}]

        self.writer.submit(write, f"log battle {battle.id}", spill=spill)

    def replay_folder(self, folder: Path) -> int:
        """Queue again every file a writer spilled into `folder` at shutdown; how many records.

        Each file is removed once its records are queued: if they cannot be written now
        either, the writer spills them again at the next shutdown.
        """
        count = 0
        for path in sorted(folder.glob("unwritten-*.jsonl")) if folder.is_dir() else []:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
                records = [json.loads(line) for line in lines if line.strip()]
            except (OSError, ValueError) as exc:
                self.log.error(
                    "log: cannot read the unwritten records in %s (%s); left as it is", path, exc
                )
                continue
            count += self.replay(records)
            path.unlink(missing_ok=True)
            self.log.warning(
                "log: %d records kept at the last shutdown (%s) are being written",
                len(records),
                path.name,
            )
        return count

    def replay(self, records: list[dict[str, Any]]) -> int:
        """Queue again what a writer spilled at shutdown (`LogWriter.spill_dir`); how many records."""
        count = 0
        for record in records:
            if record.get("kind") == "exchange":
                self.add(
                    exchange_from_json(record["exchange"]), at=datetime.fromisoformat(record["at"])
                )
            elif record.get("kind") == "anonymous_counts":
                for row in record["rows"]:
                    self.count_anonymous(
                        AnonymousCountRow(**{**row, "day": date.fromisoformat(row["day"])})
                    )
            elif record.get("kind") == "spending":
                for row in record["rows"]:
                    self.count_spending(
                        SpendingRow(**{**row, "day": date.fromisoformat(row["day"])})
                    )
            elif record.get("kind") == "discord_deletion":
                self.delete_discord_prompt(int(record["discord_message_id"]))
            elif record.get("kind") == "battle":
                self.add_battle(
                    battle_from_json(record["battle"]), at=datetime.fromisoformat(record["at"])
                )
            elif record.get("kind") == "discord_links":
                self.link_discord_messages(
                    record["message_id"], record["conversation_id"], record["discord_message_ids"]
                )
            else:
                self.log.warning("log: skipping an unknown spilled record %r", record.get("kind"))
                continue
            count += 1
        return count

    def forget_ids(self, message_ids: Iterable[str], *, words: bool = True) -> None:
        """These messages were deleted on purpose: waiting exchanges and links no longer
        refer to them; with `words`, an exchange built on one is not written at all (its
        request holds the deleted words), which is what forgetting asks."""
        for message_id in message_ids:
            self._gone.put(message_id, words or bool(self._gone.get(message_id)))

    def is_gone(self, message_id: str) -> bool:
        """Whether this message was deleted lately with its words (see `forget_ids`)."""
        return bool(self._gone.get(message_id))

    def is_deleted(self, message_id: str) -> bool:
        """Whether this message was deleted lately, for whatever reason."""
        return message_id in self._gone

    def is_lost(self, message_id: str) -> bool:
        """Whether this message belonged to an exchange that could not be stored at all."""
        return message_id in self._lost

    async def _write(self, session: AsyncSession, taken: list[tuple[Exchange, datetime]]) -> None:
        rows = [exchange_rows(exchange, at) for exchange, at in taken]
        try:
            async with session.begin_nested():
                await self._insert(session, rows)
        except Exception as exc:
            if not is_bad_data(exc):
                raise
            self.log.warning(
                "log: %d exchanges failed together (%s); writing each alone",
                len(rows),
                failure_reason(exc),
            )
            for one in rows:
                await self._insert_alone(session, one)

    async def _insert(self, session: AsyncSession, rows: list[_Rows]) -> None:
        if len(self._gone):
            rows = self._without_gone(rows)
        conversations: dict[str, dict[str, Any]] = {}
        messages: list[dict[str, Any]] = []
        inputs: list[dict[str, Any]] = []
        for conversation, message_rows, links in rows:
            # Sent with every exchange (an insert that skips stored rows), so the log
            # never depends on knowing whether an earlier write got through.
            conversations.setdefault(conversation["id"], conversation)
            messages += message_rows
            inputs += links
        if self._lost:
            messages, inputs = self._without_lost(messages, inputs)
        repo = ConversationRepository(session)
        await repo.ensure(conversations.values())
        await repo.insert_rows(messages, inputs)

    async def _insert_alone(self, session: AsyncSession, rows: _Rows) -> None:
        """Write one exchange in its own SAVEPOINT; cleaned if need be; else leave it out."""
        self.isolated += 1
        try:
            async with session.begin_nested():
                await self._insert(session, [rows])
            return
        except Exception as exc:
            if not is_bad_data(exc):
                raise
            first = exc
        conversation, messages, links = rows
        cleaned = ([{**row, "cleaned": True} for row in clean_deep(messages)], clean_deep(links))
        try:
            async with session.begin_nested():
                await self._insert(session, [(clean_deep(conversation), *cleaned)])
        except Exception as exc:
            if not is_bad_data(exc):
                raise
            self.lost += 1
            self._lost.update(row["id"] for row in messages)
            self.log.error(
                "log: an exchange of conversation %s could not be stored (%s; cleaned: %s); "
                "the exchanges after it start a new line",
                conversation["id"],
                failure_reason(first),
                failure_reason(exc),
            )
        else:
            self.cleaned += 1
            self.log.warning(
                "log: an exchange of conversation %s was stored with its text cleaned (%s)",
                conversation["id"],
                failure_reason(first),
            )

    def _without_gone(self, rows: list[_Rows]) -> list[_Rows]:
        """Exchanges that are, or were built on the words of, messages deleted meanwhile are
        not written (their requests hold the deleted words); one that merely follows one,
        or cites one that expired, starts a line and cites the rest."""
        gone = self._gone
        kept: list[_Rows] = []
        for conversation, messages, links in rows:
            if any(row["id"] in gone for row in messages) or any(
                gone.get(link["input_id"]) for link in links
            ):
                continue
            messages = [
                {**row, "parent_id": None} if row["parent_id"] in gone else row for row in messages
            ]
            links = [link for link in links if link["input_id"] not in gone]
            kept.append((conversation, messages, links))
        return kept

    def _without_lost(
        self, messages: list[dict[str, Any]], inputs: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Rows that refer to a message that could not be stored: follow nothing, cite nothing."""
        lost = self._lost
        messages = [
            {**row, "parent_id": None} if row["parent_id"] in lost else row for row in messages
        ]
        inputs = [link for link in inputs if link["input_id"] not in lost]
        return messages, inputs


class _Write:
    """One write of the exchanges waiting when it first runs (a retry writes the same ones)."""

    def __init__(self, log: ExchangeLog) -> None:
        self._log = log
        self._taken: list[tuple[Exchange, datetime]] | None = None

    async def __call__(self, session: AsyncSession) -> None:
        if self._taken is None:
            self._taken, self._log._waiting = self._log._waiting, []
        await self._log._write(session, self._taken)

    def spill(self) -> list[dict[str, Any]]:
        """The exchanges of this write as JSON-ready records (for a writer shutting down)."""
        taken = self._log._waiting if self._taken is None else self._taken
        return [
            {"kind": "exchange", "at": at.isoformat(), "exchange": exchange_to_json(exchange)}
            for exchange, at in taken
        ]


class _CountWrite:
    """One write of the anonymous counts waiting when it first runs (a retry writes the same)."""

    def __init__(self, log: ExchangeLog) -> None:
        self._log = log
        self._taken: list[AnonymousCountRow] | None = None

    async def __call__(self, session: AsyncSession) -> None:
        if self._taken is None:
            self._taken, self._log._counts = list(self._log._counts.values()), {}
        await AnonymousCountRepository(session).add(self._taken)

    def spill(self) -> list[dict[str, Any]]:
        """The counts of this write as one JSON-ready record (for a writer shutting down)."""
        taken = list(self._log._counts.values()) if self._taken is None else self._taken
        rows = [{**dataclasses.asdict(row), "day": row.day.isoformat()} for row in taken]
        return [{"kind": "anonymous_counts", "rows": rows}] if rows else []


class _SpendWrite:
    """One write of the spending waiting when it first runs (a retry writes the same)."""

    def __init__(self, log: ExchangeLog) -> None:
        self._log = log
        self._taken: list[SpendingRow] | None = None

    async def __call__(self, session: AsyncSession) -> None:
        if self._taken is None:
            waiting, self._log._spent = self._log._spent, {}
            self._taken = [SpendingRow(*key, cost) for key, cost in waiting.items()]
        await SpendingRepository(session).add(self._taken)

    def spill(self) -> list[dict[str, Any]]:
        """The amounts of this write as one JSON-ready record (for a writer shutting down)."""
        taken = (
            [SpendingRow(*key, cost) for key, cost in self._log._spent.items()]
            if self._taken is None
            else self._taken
        )
        rows = [{**dataclasses.asdict(row), "day": row.day.isoformat()} for row in taken]
        return [{"kind": "spending", "rows": rows}] if rows else []


def exchange_to_json(exchange: Exchange) -> dict[str, Any]:
    """An exchange as JSON-ready data."""
    data: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(exchange)))
    return data


def exchange_from_json(data: dict[str, Any]) -> Exchange:
    """The exchange `exchange_to_json` made."""
    answers = tuple(
        LoggedAnswer(**{**answer, "input_ids": tuple(answer["input_ids"])})
        for answer in data["answers"]
    )
    return Exchange(
        **{
            **data,
            "place": Place(**data["place"]),
            "answers": answers,
            "source_ids": tuple(data["source_ids"]),
        }
    )


def battle_row(battle: LoggedBattle, at: datetime) -> dict[str, Any]:
    """The `battles` row of a logged battle."""
    return {
        "id": battle.id,
        "prompt_id": battle.prompt_id,
        "answer_a": battle.answer_a,
        "answer_b": battle.answer_b,
        "model_a": battle.model_a,
        "model_b": battle.model_b,
        "pool": list(battle.pool),
        "guild_id": battle.place.guild_id,
        "channel_id": battle.place.channel_id,
        "thread_id": battle.place.thread_id,
        "asked_by": battle.asked_by,
        "invalid": battle.invalid,
        "created_at": at,
    }


def battle_to_json(battle: LoggedBattle) -> dict[str, Any]:
    """A battle as JSON-ready data."""
    data: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(battle)))
    return data


def battle_from_json(data: dict[str, Any]) -> LoggedBattle:
    """The battle `battle_to_json` made."""
    return LoggedBattle(**{**data, "place": Place(**data["place"]), "pool": tuple(data["pool"])})
