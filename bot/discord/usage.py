"""`/usage`: what you and this server spent today on paid models, against the daily budgets.

The budgets themselves are the operator's settings (`SWITCHBOARD_PERSON_DAILY_BUDGET_USD`,
`SWITCHBOARD_SERVER_DAILY_BUDGET_USD`); the service checks them before each call to a
priced model (`bot.service.limits.Budget`). This cog only shows where a person stands.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.checks import author_of, place_of
from bot.discord.respond import answering, send
from bot.present import spending_line
from bot.service import ChatService

log = logging.getLogger(__name__)


class UsageCog(commands.Cog):
    """Today's spending on paid models."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    @app_commands.command(name="usage")
    async def usage(self, interaction: discord.Interaction) -> None:
        """What you and this server spent today on paid models, and the daily budgets."""
        async with answering(interaction, "showing today's spending", log):
            place = place_of(interaction.channel, interaction.guild_id)
            spent = await self.service.spending(author_of(interaction.user), place)
            await send(
                interaction, spending_line(spent, place.guild_id is not None), ephemeral=True
            )
