"""The export's SQL: every candidate answer once, streamed, with what deciding on it needs.

A candidate is an assistant message that can be a training target or one side of a pair:
an answer, a retry ("alternative"), a comparison or battle answer, or a person's
correction. One query streams them (a server-side cursor on PostgreSQL, SQLite's own
cursor stepped batch by batch: nothing is loaded whole), each row carrying the prompt's
text and author, the net rating, and how often people picked it in a battle or a
comparison (`_picks`). What concerns the few (the answers someone corrected, the people
who opted out, what they wrote and voted, the places that log nothing) is asked once up
front instead of for each candidate. The place, model and date filters are in the query;
`filter_counts` says, in one pass, how many candidates each one removed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    exists,
    func,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from store.export.options import ExportOptions
from store.models import (
    Battle,
    BattleVote,
    ChannelSetting,
    Message,
    MessageInput,
    Person,
    Preference,
    Vote,
    table_of,
)

# Assistant messages that can be a target: what the conversation went on from, retries,
# side-by-side answers, and people's corrections. Failed attempts never are.
CANDIDATE_KINDS: tuple[str, ...] = ("answer", "alternative", "comparison", "battle", "correction")
# The place, model and date filters, in the order their removals are counted.
FILTERS: tuple[str, ...] = ("guild", "channel", "model", "since", "until")
BATCH = 500  # rows per fetch: the event loop gets a turn between batches

_messages = table_of(Message)
_answer = _messages.alias("a")
_prompt = _messages.alias("p")
_original = _messages.alias("o")  # what a correction corrects
_votes = table_of(Vote)
_people = table_of(Person)
_inputs = table_of(MessageInput)
_battles = table_of(Battle)
_battle_votes = table_of(BattleVote)
_preferences = table_of(Preference)
_settings = table_of(ChannelSetting)


@dataclass(frozen=True, slots=True)
class FilterCounts:
    """How many candidates there were, and how many each place/model/date filter removed."""

    candidates: int
    removed: dict[str, int]

    @property
    def kept(self) -> int:
        return self.candidates - sum(self.removed.values())


def _conditions(options: ExportOptions) -> list[tuple[str, ColumnElement[bool]]]:
    """(filter name, condition) for each filter the options set."""
    a = _answer
    model = func.coalesce(a.c.model_name, _original.c.model_name)
    found: list[tuple[str, ColumnElement[bool] | None]] = [
        ("guild", a.c.guild_id == options.guild_id if options.guild_id is not None else None),
        (
            "channel",
            a.c.channel_id == options.channel_id if options.channel_id is not None else None,
        ),
        ("model", model == options.model if options.model is not None else None),
        ("since", a.c.created_at >= options.since if options.since is not None else None),
        ("until", a.c.created_at < options.until if options.until is not None else None),
    ]
    return [(name, condition) for name, condition in found if condition is not None]


def _base(columns: Sequence[Any]) -> Select[Any]:
    a = _answer
    return (
        select(*columns)
        .select_from(a.outerjoin(_original, _original.c.id == a.c.alternative_to))
        .where(a.c.role == "assistant", a.c.kind.in_(CANDIDATE_KINDS))
    )


async def filter_counts(session: AsyncSession, options: ExportOptions) -> FilterCounts:
    """The candidates, and what each filter removed (each counted after the ones before it)."""
    conditions = _conditions(options)
    columns: list[Any] = [func.count()]
    so_far: list[ColumnElement[bool]] = []
    for _, condition in conditions:
        so_far.append(condition)
        columns.append(func.coalesce(func.sum(case((and_(*so_far), 1), else_=0)), 0))
    row = (await session.execute(_base(columns))).one()
    total = int(row[0])
    removed = dict.fromkeys(FILTERS, 0)
    before = total
    for (name, _), kept in zip(conditions, row[1:], strict=True):
        removed[name] = before - int(kept)
        before = int(kept)
    return FilterCounts(total, removed)


@dataclass(frozen=True, slots=True)
class OptedOut:
    """What the export must leave out for the people who opted out, asked once up front.

    Each set is as large as what those few people wrote and voted, never the log: their
    ids, the answers built on their words (through `message_inputs`), and their votes per
    answer (which do not count).
    """

    people: frozenset[int] = frozenset()
    answers: frozenset[str] = frozenset()
    votes: dict[str, tuple[int, int]] = field(default_factory=dict)  # answer: (sum, count)

    def touches(self, row: Row[Any]) -> bool:
        """Whether anyone who opted out wrote or is quoted in this candidate."""
        if not self.people:
            return False
        return (
            row.id in self.answers
            or row.alternative_to in self.answers  # a correction of an answer built on them
            or row.author_id in self.people
            or row.prompt_author_id in self.people
        )

    def rating(self, row: Row[Any]) -> tuple[int, int]:
        """(net rating, votes) of a candidate without the votes of people who opted out."""
        value, count = self.votes.get(row.id, (0, 0))
        return int(row.rating) - value, int(row.votes) - count


async def opted_out(session: AsyncSession) -> OptedOut:
    """The people who opted out, the answers built on their words, and their votes."""
    people = frozenset(
        (
            await session.scalars(select(_people.c.user_id).where(_people.c.opted_out.is_(true())))
        ).all()
    )
    if not people:
        return OptedOut()
    chosen = select(_people.c.user_id).where(_people.c.opted_out.is_(true()))
    m, i, v = _messages, _inputs, _votes
    built_on = (
        select(i.c.answer_id)
        .join(m, m.c.id == i.c.input_id)
        .where(m.c.author_id.in_(chosen))
        .distinct()
    )
    answers = frozenset(
        [
            a
            async for a in (
                await session.stream(built_on.execution_options(yield_per=BATCH))
            ).scalars()
        ]
    )
    theirs = (
        select(v.c.answer_id, func.sum(v.c.value), func.count())
        .where(v.c.voter_id.in_(chosen))
        .group_by(v.c.answer_id)
    )
    votes = {
        answer_id: (int(total), int(count))
        async for answer_id, total, count in await session.stream(
            theirs.execution_options(yield_per=BATCH)
        )
    }
    return OptedOut(people, answers, votes)


def _picks() -> tuple[ColumnElement[int], ColumnElement[int]]:
    """(picks, contest picks) of a candidate: how many people picked it as the better
    answer, and how many picked any answer of its contest (its battle or comparison).

    A battle's picks are its A-better and B-better votes, the battle valid (ties and
    "both bad" pick nothing); a comparison's are its "best" choices. Votes of people who
    have since opted out do not count. Only battle and comparison answers look (through
    the prompt's indexed id): every other candidate is 0 without a lookup.
    """
    a, b, bv, pf = _answer, _battles, _battle_votes, _preferences
    opted = select(_people.c.user_id).where(_people.c.opted_out.is_(true()))
    in_battle = (
        select(func.count())
        .select_from(bv.join(b, b.c.id == bv.c.battle_id))
        .where(b.c.prompt_id == a.c.parent_id, b.c.invalid.is_(None), bv.c.voter_id.not_in(opted))
    )
    battle_picks = in_battle.where(
        or_(
            and_(bv.c.outcome == "a", b.c.answer_a == a.c.id),
            and_(bv.c.outcome == "b", b.c.answer_b == a.c.id),
        )
    ).scalar_subquery()
    battle_all = in_battle.where(
        bv.c.outcome.in_(("a", "b")), or_(b.c.answer_a == a.c.id, b.c.answer_b == a.c.id)
    ).scalar_subquery()
    in_comparison = (
        select(func.count())
        .select_from(pf)
        .where(pf.c.prompt_id == a.c.parent_id, pf.c.voter_id.not_in(opted))
    )
    comparison_picks = in_comparison.where(pf.c.chosen_id == a.c.id).scalar_subquery()
    comparison_all = in_comparison.scalar_subquery()
    picks = case(
        (a.c.kind == "battle", battle_picks),
        (a.c.kind == "comparison", comparison_picks),
        else_=0,
    )
    contest = case(
        (a.c.kind == "battle", battle_all),
        (a.c.kind == "comparison", comparison_all),
        else_=0,
    )
    return picks, contest


@dataclass(frozen=True, slots=True)
class Unlogged:
    """The places whose logging is off now, asked once up front (a few settings rows).

    What was said there before logging was turned off is stored still, but not exported:
    turning it off says that nothing said there is for keeping. Resolved as the service
    resolves every setting: the thread's, else the channel's, else the server's, keyed
    with the server (the terminal's made-up ids repeat across servers).
    """

    switches: dict[tuple[str, int | None, int], bool] = field(default_factory=dict)

    def touches(self, row: Row[Any]) -> bool:
        """Whether the candidate was said in a place that logs nothing now."""
        if not self.switches:
            return False
        for scope, scope_id in (
            ("thread", row.thread_id),
            ("channel", row.channel_id),
            ("guild", row.guild_id),
        ):
            if scope_id is None:
                continue
            enabled = self.switches.get((scope, row.guild_id, scope_id))
            if enabled is not None:
                return not enabled
        return False


async def unlogged(session: AsyncSession) -> Unlogged:
    """Every logging switch that is set (on or off), for `Unlogged.touches` to resolve."""
    s = _settings
    rows = await session.execute(
        select(s.c.scope, s.c.guild_id, s.c.scope_id, s.c.log_enabled).where(
            s.c.log_enabled.is_not(None)
        )
    )
    switches = {
        (scope, guild_id, int(scope_id)): bool(enabled)
        for scope, guild_id, scope_id, enabled in rows.tuples()
    }
    if not any(enabled is False for enabled in switches.values()):
        return Unlogged()
    return Unlogged(switches)


def candidates_query(options: ExportOptions, *, sources: bool = False) -> Select[Any]:
    """Every candidate that passes the place, model and date filters, in export order.

    Pairs are made of answers to one prompt, so for those formats the rows come grouped by
    prompt; otherwise oldest first. With `sources`, each row also carries `input_ids`: the
    ids of the stored messages it was built from (its `message_inputs`: the history and
    the prompt), space-separated; an export that records no provenance does not pay for
    the lookup.
    """
    a, p, o, v = _answer, _prompt, _original, _votes
    rating = (
        select(func.coalesce(func.sum(v.c.value), 0))
        .where(v.c.answer_id == a.c.id)
        .scalar_subquery()
        .label("rating")
    )
    votes = (
        select(func.count())
        .select_from(v)
        .where(v.c.answer_id == a.c.id)
        .scalar_subquery()
        .label("votes")
    )
    picks, contest = _picks()
    query = (
        select(
            a.c.id,
            a.c.kind,
            a.c.conversation_id,
            a.c.parent_id,
            a.c.created_at,
            a.c.guild_id,
            a.c.channel_id,
            a.c.thread_id,
            a.c.content,
            a.c.status,
            a.c.error,
            a.c.alternative_to,
            a.c.author_id,
            func.coalesce(a.c.model_name, o.c.model_name).label("model_name"),
            func.coalesce(a.c.system_prompt, o.c.system_prompt).label("system_prompt"),
            a.c.request_messages,
            o.c.request_messages.label("original_request_messages"),
            p.c.content.label("prompt_text"),
            p.c.author_id.label("prompt_author_id"),
            rating,
            votes,
            picks.label("picks"),
            contest.label("contest_picks"),
        )
        .select_from(
            a.outerjoin(o, o.c.id == a.c.alternative_to).outerjoin(p, p.c.id == a.c.parent_id)
        )
        .where(a.c.role == "assistant", a.c.kind.in_(CANDIDATE_KINDS))
    )
    if sources:
        i = _inputs
        query = query.add_columns(
            select(func.aggregate_strings(i.c.input_id, " "))
            .where(i.c.answer_id == a.c.id)
            .scalar_subquery()
            .label("input_ids")
        )
    for _, condition in _conditions(options):
        query = query.where(condition)
    if options.paired:
        return query.order_by(a.c.parent_id, a.c.created_at, a.c.id)
    return query.order_by(a.c.created_at, a.c.id)


async def stream_candidates(
    session: AsyncSession, options: ExportOptions, *, sources: bool = False
) -> AsyncIterator[Sequence[Row[Any]]]:
    """The candidates in batches, from one streamed query (never all in memory)."""
    query = candidates_query(options, sources=sources)
    result = await session.stream(query.execution_options(yield_per=BATCH))
    async for batch in result.partitions(BATCH):
        yield batch


async def corrected_answers(session: AsyncSession, options: ExportOptions) -> set[str]:
    """The ids of the answers someone corrected (one per correction: people write few).

    Asked once rather than per candidate: SQLite's planner, once ANALYZE has seen a
    column that is mostly NULL, would scan the table for each candidate instead.
    """
    m = _messages
    query = select(m.c.alternative_to).where(
        m.c.alternative_to.is_not(None), m.c.kind == "correction"
    )
    if options.guild_id is not None:
        query = query.where(m.c.guild_id == options.guild_id)
    result = await session.stream(query.execution_options(yield_per=BATCH))
    return {answer_id async for answer_id in result.scalars()}


async def member_names(session: AsyncSession, options: ExportOptions) -> dict[int | None, set[str]]:
    """The names the log knows for each server's people (authors and voters), by server.

    DMs are server None. One row per person and name, never per message.
    """
    m, v = _messages, _votes
    authors = select(m.c.guild_id, m.c.author_name.label("name")).where(
        m.c.author_name.is_not(None)
    )
    voters = select(v.c.guild_id, v.c.voter_name.label("name")).where(v.c.voter_name.is_not(None))
    if options.guild_id is not None:
        authors = authors.where(m.c.guild_id == options.guild_id)
        voters = voters.where(v.c.guild_id == options.guild_id)
    names: dict[int | None, set[str]] = {}
    result = await session.stream(authors.union(voters).execution_options(yield_per=BATCH))
    async for guild_id, name in result:
        names.setdefault(guild_id, set()).add(name)
    return names


async def model_logged(session: AsyncSession, name: str) -> bool:
    """Whether any logged answer is by the model called `name`."""
    found = await session.scalar(select(exists().where(_messages.c.model_name == name)))
    return bool(found)


async def logged_models(session: AsyncSession) -> list[str]:
    """The names of the models that answered something, by name."""
    rows = await session.scalars(
        select(_messages.c.model_name).where(_messages.c.model_name.is_not(None)).distinct()
    )
    return sorted(rows.all())


async def database_revision(session: AsyncSession) -> str | None:
    """The schema revision the database is at (Alembic's version table), if it has one."""
    try:
        async with session.begin_nested():
            found = await session.scalar(text("SELECT version_num FROM alembic_version"))
            return None if found is None else str(found)
    except Exception:  # a database made without migrations (some tests): no revision
        return None
