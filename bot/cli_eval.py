"""`switchboard leaderboard` and `switchboard eval`: how models compare, from the log and offline.

`bot.cli` holds the commands' options (and handles SIGTERM and errors as every command
does); this module runs them through what `bot.app.open_app` builds and prints the
result: a rich table for people, one JSON object per model (`--json`) for programs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bot.charts import leaderboard_chart
from bot.present import (
    blended_price_text,
    dollars,
    latency_text,
    leaderboard_caption,
    rank_text,
    rating_text,
    record_text,
)
from bot.service.leaderboard import Leaderboard, LeaderboardEntry, LeaderboardScope
from core.errors import UserError
from core.settings import Settings


def leaderboard_scope(guild: int | None, channel: int | None) -> LeaderboardScope:
    """--channel: that channel (of --guild, if given); --guild alone: that server; neither: all."""
    if channel is not None:
        return "channel"
    return "server" if guild is not None else "global"


def entry_json(entry: LeaderboardEntry, board: Leaderboard) -> dict[str, Any]:
    """The JSON object `leaderboard --json` prints for one model."""
    rating = entry.rating

    def rounded(value: float | None, digits: int = 1) -> float | None:
        return round(value, digits) if value is not None else None

    return {
        "model": entry.model,
        "rank": entry.rank,
        "ranked": entry.rank is not None,
        "rating": rounded(rating.rating if rating else None),
        "rating_low": rounded(rating.low if rating else None),
        "rating_high": rounded(rating.high if rating else None),
        "battles": entry.battles,
        "wins": rating.wins if rating else 0,
        "losses": rating.losses if rating else 0,
        "ties": rating.ties if rating else 0,
        "up": entry.up,
        "down": entry.down,
        "share_up": rounded(entry.share_up, 4),
        "answers": entry.answers,
        "median_latency_ms": rounded(entry.median_latency_ms),
        "cost_per_1k_answers_usd": rounded(entry.cost_per_1k_answers, 6),
        "input_price_per_1m": entry.price.input if entry.price else None,
        "output_price_per_1m": entry.price.output if entry.price else None,
        "blended_price_per_1m": rounded(entry.price.blended, 6) if entry.price else None,
        "scope": board.scope,
        "guild_id": board.guild_id,
        "channel_id": board.channel_id,
        "min_battles": board.min_battles,
    }


def leaderboard_table(board: Leaderboard) -> Table:
    """The leaderboard as a table: the rated models best first, then those without battles."""
    table = Table(title="Leaderboard", caption=leaderboard_caption(board), caption_justify="left")
    for column, justify in (
        ("rank", "left"),
        ("model", "left"),
        ("rating (95%)", "right"),
        ("battles", "right"),
        ("W–L–T", "right"),
        ("👍", "right"),
        ("median latency", "right"),
        ("1,000 answers", "right"),
        ("price", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for entry in board.entries:
        share = (
            f"{100 * entry.share_up:.0f}% of {entry.votes}" if entry.share_up is not None else ""
        )
        table.add_row(
            escape(rank_text(entry)),
            escape(entry.model),
            rating_text(entry),
            f"{entry.battles:,}" if entry.rating else "",
            record_text(entry),
            share,
            latency_text(entry.median_latency_ms),
            dollars(entry.cost_per_1k_answers),
            blended_price_text(entry),
        )
    return table


async def run_leaderboard(
    settings: Settings,
    *,
    guild: int | None,
    channel: int | None,
    chart: Path | None,
    json_mode: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Print the leaderboard (and write its chart); the exit code."""
    from bot.app import open_app

    err = Console(stderr=True, soft_wrap=True)
    scope = leaderboard_scope(guild, channel)
    async with open_app(settings, knowledge=False) as sb:
        fitting = err.status("Fitting the ratings…") if not json_mode and err.is_terminal else None
        if fitting is not None:
            fitting.start()
        try:
            board = await sb.service.leaderboard(scope, guild_id=guild, channel_id=channel)
        finally:
            if fitting is not None:
                fitting.stop()
    if json_mode:
        for entry in board.entries:
            out.write(json.dumps(entry_json(entry, board), ensure_ascii=False) + "\n")
        out.flush()
    elif board.entries:
        Console(file=out, soft_wrap=False).print(leaderboard_table(board))
    else:
        out.write(
            "No battles and no answers here yet: battles come from /arena, in Discord or in "
            "`switchboard chat`.\n"
        )
    if chart is not None:
        try:
            image = await asyncio.to_thread(leaderboard_chart, board)
        except ValueError:
            raise UserError(
                f"Nothing to chart yet (no battles and no votes here), so {chart} was not written."
            ) from None
        try:
            await asyncio.to_thread(chart.write_bytes, image)
        except OSError as exc:
            raise UserError(f"Cannot write the chart to {chart}: {exc.strerror or exc}.") from None
        err.print(f"Chart written to {chart}.", markup=False, highlight=False)
    return 0
