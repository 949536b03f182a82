"""`/leaderboard [scope]`: the models rated from blind battles, as an embed with a chart.

The board comes from `ChatService.leaderboard` (a Bradley–Terry fit of this channel's,
server's or every server's battles, beside each model's 👍 share, median latency and
cost); this module only lays it out: one field per model (rank, rating with its 95%
interval, battles and record, share of 👍, median latency, cost of 1,000 answers), the
method in the footer, and the PNG chart (`bot.charts.leaderboard_chart`) attached and
shown as the embed's image. Discord's limits (25 fields, 6,000 characters an embed) are
kept: models that do not fit are counted and the command line named for the rest.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.charts import leaderboard_chart
from bot.discord.checks import place_of
from bot.discord.respond import answering, send
from bot.discord.settings_cog import EMBED_COLOUR
from bot.present import LEADERBOARD_WHERE, dollars, latency_text, leaderboard_caption, rank_text
from bot.service import ChatService
from bot.service.leaderboard import Leaderboard, LeaderboardEntry
from core.errors import UserError

log = logging.getLogger(__name__)

CHART_NAME = "leaderboard.png"
# Discord's limits on one embed.
FIELDS_LIMIT = 25
EMBED_LIMIT = 6000
FIELD_NAME_LIMIT = 256
FOOTER_LIMIT = 2048
# Kept free below the limits: Discord may count a few characters differently from Python,
# and the note on models left out must still fit.
MARGIN = 300


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def entry_field(entry: LeaderboardEntry, confidence: float) -> tuple[str, str]:
    """One model's field: its rank and name; its rating, record, 👍, speed and cost."""
    name = f"{rank_text(entry)} · {entry.model}"[:FIELD_NAME_LIMIT]
    rating = entry.rating
    if rating is None:
        first = "No counted battles yet"
    else:
        first = (
            f"Rating **{rating.rating:,.0f}** ({confidence:.0%} interval "
            f"{rating.low:,.0f}–{rating.high:,.0f}) · {_plural(entry.battles, 'battle')} "
            f"(W–L–T {rating.wins}–{rating.losses}–{rating.ties})"
        )
    share = (
        f"👍 {100 * entry.share_up:.0f}% of {_plural(entry.votes, 'vote')}"
        if entry.share_up is not None
        else "👍 no votes"
    )
    latency = latency_text(entry.median_latency_ms) or "—"
    cost = dollars(entry.cost_per_1k_answers) or "—"
    second = f"{share} · median latency {latency} · {cost} per 1,000 answers"
    return name, f"{first}\n{second}"


def leaderboard_embed(board: Leaderboard, *, chart: bool) -> discord.Embed:
    """The board as one embed: a field per model, best first, as many as Discord allows."""
    where = LEADERBOARD_WHERE[board.scope]
    embed = discord.Embed(
        title=f"Leaderboard: {where}",
        colour=EMBED_COLOUR,
        description=f"{_plural(board.battles, 'battle')} counted in {where}.",
    )
    embed.set_footer(text=leaderboard_caption(board)[:FOOTER_LIMIT])
    if chart:
        embed.set_image(url=f"attachment://{CHART_NAME}")
    shown = 0
    for entry in board.entries:
        name, value = entry_field(entry, board.fit.confidence)
        if shown == FIELDS_LIMIT or len(embed) + len(name) + len(value) > EMBED_LIMIT - MARGIN:
            break
        embed.add_field(name=name, value=value, inline=False)
        shown += 1
    if left := len(board.entries) - shown:
        embed.description = (
            f"{embed.description}\nThe first {shown} of {len(board.entries)} models are shown "
            f"({left} more): `switchboard leaderboard` lists them all."
        )
    return embed


class LeaderboardCog(commands.Cog):
    """The leaderboard of blind battles."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    @app_commands.command(name="leaderboard")
    @app_commands.describe(
        scope="This channel's battles (the default), this server's, or every server's."
    )
    async def leaderboard(
        self,
        interaction: discord.Interaction,
        scope: Literal["channel", "server", "global"] = "channel",
    ) -> None:
        """Rank the models from the blind battles (/arena), with their 👍 share, speed and cost."""
        async with answering(interaction, "showing the leaderboard", log):
            place = place_of(interaction.channel, interaction.guild_id)
            if scope == "server" and place.guild_id is None:
                raise UserError(
                    "There is no server here: `server` only works in a server's channels."
                )
            await interaction.response.defer(thinking=True)  # the fit takes a moment
            board = await self.service.leaderboard(
                scope, guild_id=place.guild_id, channel_id=place.channel_id
            )
            where = LEADERBOARD_WHERE[scope]
            if not board.entries:
                await send(
                    interaction,
                    f"No battles and no answers in {where} yet: start a blind battle with "
                    "`/arena`.",
                    ephemeral=False,
                )
                return
            try:
                png: bytes | None = await asyncio.to_thread(leaderboard_chart, board)
            except ValueError:  # nothing to draw: no battles and no votes
                png = None
            embed = leaderboard_embed(board, chart=png is not None)
            await send(
                interaction,
                None if png is not None else "No chart yet: no model here has battles or votes.",
                embed=embed,
                file=discord.File(io.BytesIO(png), filename=CHART_NAME) if png else None,
                ephemeral=False,
            )
