"""Building the bot: intents, sharding, extra cogs and their slash commands."""

from __future__ import annotations

import discord
import pytest
import simcord
from discord import app_commands
from discord.ext import commands

from bot.discord.bot import SwitchboardBot, bot_intents
from bot.service import ChatService


class EchoCog(commands.Cog):
    """A stand-in for a feature cog added from outside (like the knowledge cog)."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    @app_commands.command(name="ping")
    async def ping(self, interaction: discord.Interaction) -> None:
        """Say pong and how many models there are."""
        await interaction.response.send_message(f"pong ({len(self.service.list_models())} models)", ephemeral=True)


def test_intents_are_the_few_the_bot_needs() -> None:
    intents = bot_intents()
    assert intents.message_content and intents.guilds and intents.guild_messages and intents.dm_messages
    assert not intents.members and not intents.presences and not intents.guild_typing


async def test_extra_cogs_are_added_and_their_commands_synced(chat_service: ChatService) -> None:
    bot = SwitchboardBot(chat_service, extra_cogs=[EchoCog(chat_service)], shard_count=2)
    assert isinstance(bot, commands.AutoShardedBot)
    async with simcord.run(bot) as env:
        assert sorted(bot.shards) == [0, 1]
        guild = env.create_guild(shard_id=1)
        channel = guild.create_text_channel("general")
        alice = guild.add_member(env.create_user("alice"))

        result = await alice.slash(channel, "ping")
        assert result.response.content == f"pong ({len(chat_service.list_models())} models)"
        assert {"model set", "system show", "settings", "ping"} <= set(alice.available_commands(channel))

        await alice.send(channel, f"{bot.user.mention} hi from shard one")
        assert channel.last_message.content == "Echo: hi from shard one"


async def test_without_syncing_the_commands_are_not_published(chat_service: ChatService) -> None:
    bot = SwitchboardBot(chat_service, sync_commands=False, shard_count=1)
    async with simcord.run(bot) as env:
        channel = env.create_guild().create_text_channel("general")
        alice = env.guild.add_member(env.create_user("alice"))
        assert alice.available_commands(channel) == ()
        with pytest.raises(simcord.SetupError, match="never synced"):
            await alice.slash(channel, "settings")


def test_bot_keeps_its_dependencies(chat_service: ChatService) -> None:
    bot = SwitchboardBot(chat_service, manager_role="Bot Manager")
    assert isinstance(bot, SwitchboardBot)
    assert bot.service is chat_service and bot.manager_role == "Bot Manager"
    assert bot.shard_count is None  # Discord recommends the count when the bot starts
