"""The leaderboard: models rated from blind battles, beside their 👍 share, speed and cost.

`Leaderboards.board(scope, guild_id, channel_id)` reads the battle verdicts of a channel,
a server or everywhere, fits the ratings (`bot.service.ratings`, in a worker thread: the
bootstrap takes a moment) and puts beside each model what the feedback and the log say
of it there: the share of 👍 among its votes, its median latency, what 1,000 of its
answers cost, and its price per million tokens from the registry. The same verdicts give
the same board (the bootstrap is seeded), so a fit is remembered until a vote changes it.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Literal, cast

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.service.feedback import ModelFeedback
from bot.service.models import ModelCatalog
from bot.service.ratings import (
    MIN_BATTLES,
    RESAMPLES,
    Comparison,
    CountedOutcome,
    Rating,
    RatingFit,
    fit_ratings,
)
from core.cache import LRU
from core.errors import StorageUnavailable
from store.db import failure_reason, is_outage
from store.repositories import FeedbackRepository, LeaderboardRepository, ModelUsage

LeaderboardScope = Literal["channel", "server", "global"]
LEADERBOARD_SCOPES: tuple[LeaderboardScope, ...] = ("channel", "server", "global")
# Price per 1M tokens as comparison sites blend it: three input tokens to one output token.
INPUT_SHARE = 0.75
FITS_KEPT = 32
METHOD = (
    "Bradley–Terry maximum likelihood with Davidson's tie parameter; 95% intervals from "
    "{resamples:,} bootstrap resamples of battles; rank = 1 + the models surely better."
)


@dataclass(frozen=True, slots=True)
class Price:
    """A model's list price in USD per 1M tokens (the registry's), and the two blended."""

    input: float
    output: float

    @property
    def blended(self) -> float:
        return INPUT_SHARE * self.input + (1 - INPUT_SHARE) * self.output

    @property
    def free(self) -> bool:
        return not self.input and not self.output


@dataclass(frozen=True, slots=True)
class LeaderboardEntry:
    """One model on the board: its rating (None: no counted battle), feedback, speed and cost."""

    model: str
    rating: Rating | None
    up: int
    down: int
    answers: int
    median_latency_ms: float | None
    cost_per_1k_answers: float | None  # USD; None: no answer with a known cost
    price: Price | None  # None: the model is no longer in the registry

    @property
    def rank(self) -> int | None:
        return self.rating.rank if self.rating is not None else None

    @property
    def battles(self) -> int:
        return self.rating.battles if self.rating is not None else 0

    @property
    def votes(self) -> int:
        return self.up + self.down

    @property
    def share_up(self) -> float | None:
        """The share of 👍 among its votes (None without votes)."""
        return self.up / self.votes if self.votes else None

    @property
    def feedback(self) -> ModelFeedback:
        """Its votes as the feedback stats count them (for their Wilson interval)."""
        return ModelFeedback(self.model, self.answers, self.up, self.down, 0, {})


@dataclass(frozen=True, slots=True)
class Leaderboard:
    """The models of a place, rated ones first (best first), then the others by name."""

    scope: LeaderboardScope
    guild_id: int | None
    channel_id: int | None
    entries: tuple[LeaderboardEntry, ...]
    fit: RatingFit

    @property
    def min_battles(self) -> int:
        return self.fit.min_battles

    @property
    def battles(self) -> int:
        return self.fit.battles

    @property
    def method(self) -> str:
        return METHOD.format(resamples=self.fit.resamples)

    def get(self, model: str) -> LeaderboardEntry | None:
        return next((e for e in self.entries if e.model == model), None)


def _place(
    scope: LeaderboardScope, guild_id: int | None, channel_id: int | None
) -> tuple[int | None, int | None]:
    """The (server, channel) filters of a scope; None means any."""
    if scope == "global":
        return None, None
    if scope == "server":
        if guild_id is None:
            raise ValueError("a server leaderboard needs the server's id")
        return guild_id, None
    if scope == "channel":
        if channel_id is None:
            raise ValueError("a channel leaderboard needs the channel's id")
        return guild_id, channel_id  # guild None: a DM channel, whose id is its own
    raise ValueError(f"unknown leaderboard scope {scope!r}")


class Leaderboards:
    """Builds leaderboards from the log; remembers recent fits by the verdicts they fit."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        catalog: ModelCatalog,
        *,
        min_battles: int = MIN_BATTLES,
        resamples: int = RESAMPLES,
    ) -> None:
        self.sessions = sessions
        self.catalog = catalog
        self.min_battles = min_battles
        self.resamples = resamples
        self._fits: LRU[str, RatingFit] = LRU(FITS_KEPT)

    async def board(
        self,
        scope: LeaderboardScope,
        guild_id: int | None = None,
        channel_id: int | None = None,
    ) -> Leaderboard:
        """The leaderboard of a channel (thread: its channel), a server, or everywhere."""
        where_guild, where_channel = _place(scope, guild_id, channel_id)
        try:
            async with self.sessions() as session:
                repo = LeaderboardRepository(session)
                verdicts = await repo.battle_verdicts(
                    guild_id=where_guild, channel_id=where_channel
                )
                usage = await repo.model_usage(guild_id=where_guild, channel_id=where_channel)
                votes = await FeedbackRepository(session).stats(
                    guild_id=where_guild, channel_id=where_channel
                )
        except Exception as exc:
            if is_outage(exc):
                raise StorageUnavailable(
                    f"The leaderboard cannot be read right now: the database is not answering "
                    f"({failure_reason(exc)}). Try again in a moment."
                ) from exc
            raise
        comparisons = [
            Comparison(v.battle_id, v.model_a, v.model_b, _counted(v.outcome)) for v in verdicts
        ]
        fit = await self._fit(comparisons)
        return Leaderboard(
            scope=scope,
            guild_id=guild_id,
            channel_id=channel_id if scope == "channel" else None,
            entries=self._entries(fit, usage, {v.model_name: (v.up, v.down) for v in votes}),
            fit=fit,
        )

    async def _fit(self, comparisons: list[Comparison]) -> RatingFit:
        """The fit of these verdicts: remembered, else computed in a worker thread."""
        digest = hashlib.sha256(f"{self.min_battles}:{self.resamples}".encode())
        for c in comparisons:
            digest.update(f"\n{c.battle_id}\t{c.model_a}\t{c.model_b}\t{c.outcome}".encode())
        key = digest.hexdigest()
        fit = self._fits.get(key)
        if fit is None:
            fit = await asyncio.to_thread(
                fit_ratings, comparisons, min_battles=self.min_battles, resamples=self.resamples
            )
            self._fits.put(key, fit)
        return fit

    def _entries(
        self, fit: RatingFit, usage: list[ModelUsage], votes: dict[str, tuple[int, int]]
    ) -> tuple[LeaderboardEntry, ...]:
        used = {u.model_name: u for u in usage}
        rated = [r.model for r in fit.ratings]
        others = sorted((set(used) | set(votes)) - set(rated))
        registry = self.catalog.registry
        entries = []
        for model in [*rated, *others]:
            spec = registry.get(model) if model in registry else None
            use = used.get(model)
            up, down = votes.get(model, (0, 0))
            entries.append(
                LeaderboardEntry(
                    model=model,
                    rating=fit.get(model),
                    up=up,
                    down=down,
                    answers=use.answers if use else 0,
                    median_latency_ms=use.median_latency_ms if use else None,
                    cost_per_1k_answers=(
                        1000 * use.mean_cost_usd if use and use.mean_cost_usd is not None else None
                    ),
                    price=Price(spec.input_price, spec.output_price) if spec else None,
                )
            )
        return tuple(entries)


def _counted(outcome: str) -> CountedOutcome:
    if outcome not in ("a", "b", "tie"):
        raise ValueError(f"not a counted outcome: {outcome!r}")
    return cast(CountedOutcome, outcome)
