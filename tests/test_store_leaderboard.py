"""The leaderboard's queries on real migrated databases: SQLite always, PostgreSQL when configured."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from store.repositories import ConversationRepository, CountedVerdict, LeaderboardRepository
from tests.fixtures.battles import add_battle, add_conversation

Sessions = async_sessionmaker[AsyncSession]
GUILD, OTHER_GUILD, CHANNEL, OTHER_CHANNEL = 1000, 1001, 2000, 2001


async def battle(
    session: AsyncSession,
    model_a: str,
    model_b: str,
    outcomes: list[str],
    *,
    guild_id: int | None = GUILD,
    channel_id: int = CHANNEL,
    invalid: str | None = None,
) -> str:
    return await add_battle(
        session,
        model_a,
        model_b,
        outcomes,
        guild_id=guild_id,
        channel_id=channel_id,
        invalid=invalid,
    )


async def test_verdicts_count_valid_battles_and_leave_out_both_bad(
    any_session_factory: Sessions,
) -> None:
    async with any_session_factory() as session, session.begin():
        first = await battle(session, "alpha", "beta", ["a", "tie", "bad"])
        second = await battle(session, "beta", "gamma", ["b"])
        await battle(session, "alpha", "gamma", ["a", "a"], invalid="answer A named its model")
        await battle(session, "alpha", "gamma", ["bad"])
        await battle(session, "alpha", "beta", [])  # nobody voted yet

    async with any_session_factory() as session:
        verdicts = await LeaderboardRepository(session).battle_verdicts()
    assert verdicts == [
        CountedVerdict(first, "alpha", "beta", "a"),
        CountedVerdict(first, "alpha", "beta", "tie"),
        CountedVerdict(second, "beta", "gamma", "b"),
    ]


async def test_verdicts_per_channel_server_and_everywhere(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session, session.begin():
        here = await battle(session, "alpha", "beta", ["a"])
        next_door = await battle(session, "alpha", "beta", ["b"], channel_id=OTHER_CHANNEL)
        # The same channel id in another server (the terminal's ids are made up) is elsewhere.
        elsewhere = await battle(session, "alpha", "beta", ["tie"], guild_id=OTHER_GUILD)
        dm = await battle(session, "alpha", "beta", ["a"], guild_id=None, channel_id=5)

    async def ids(**where: Any) -> set[str]:
        async with any_session_factory() as session:
            found = await LeaderboardRepository(session).battle_verdicts(**where)
        return {v.battle_id for v in found}

    assert await ids(guild_id=GUILD, channel_id=CHANNEL) == {here}
    assert await ids(guild_id=GUILD) == {here, next_door}
    assert await ids(guild_id=OTHER_GUILD, channel_id=CHANNEL) == {elsewhere}
    assert await ids(channel_id=5) == {dm}
    assert await ids() == {here, next_door, elsewhere, dm}


async def test_model_usage_median_latency_and_mean_cost(any_session_factory: Sessions) -> None:
    async with any_session_factory() as session, session.begin():
        repo = ConversationRepository(session)
        conversation_id = await add_conversation(session, GUILD, CHANNEL)
        other_id = await add_conversation(session, OTHER_GUILD, CHANNEL)
        place = {"conversation_id": conversation_id, "guild_id": GUILD, "channel_id": CHANNEL}

        def answer(model: str, latency: float | None, cost: float | None, **extra: Any) -> dict:
            return {
                **place,
                "role": "assistant",
                "content": "an answer",
                "model_name": model,
                "latency_ms": latency,
                "cost_usd": cost,
                "status": "ok",
                **extra,
            }

        await repo.add_messages(
            [
                {**place, "role": "user", "content": "a question"},
                answer("alpha", 100.0, 0.002),
                answer("alpha", 300.0, 0.004, kind="alternative"),
                answer("alpha", 200.0, None, kind="comparison"),
                answer("alpha", 9000.0, 0.5, status="error"),  # a failure says nothing of speed
                answer("alpha", 9000.0, 0.5, kind="attempt", status="error"),
                answer("beta", 50.0, 0.0),
                answer("beta", 70.0, 0.0, status="fallback"),
                answer("gamma", None, None),
                {**answer("alpha", 1.0, 9.0), "conversation_id": other_id, "guild_id": OTHER_GUILD},
            ]
        )

    async with any_session_factory() as session:
        usage = {
            u.model_name: u
            for u in await LeaderboardRepository(session).model_usage(guild_id=GUILD)
        }
        everywhere = await LeaderboardRepository(session).model_usage()
    assert set(usage) == {"alpha", "beta", "gamma"}
    assert usage["alpha"].answers == 3
    assert usage["alpha"].median_latency_ms == 200.0  # odd count: the middle one
    assert usage["alpha"].mean_cost_usd is not None
    assert abs(usage["alpha"].mean_cost_usd - 0.003) < 1e-12  # the unknown cost left out
    assert usage["beta"].median_latency_ms == 60.0  # even count: the mean of the middle two
    assert usage["beta"].mean_cost_usd == 0.0  # free, not unknown
    assert usage["gamma"].answers == 1
    assert usage["gamma"].median_latency_ms is None
    assert usage["gamma"].mean_cost_usd is None
    alpha_everywhere = next(u for u in everywhere if u.model_name == "alpha")
    assert alpha_everywhere.answers == 4
    assert alpha_everywhere.median_latency_ms == 150.0
