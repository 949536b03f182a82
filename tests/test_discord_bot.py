"""Building and starting the bot: intents, sharding, extra cogs, slash commands, and log-in failures."""

from __future__ import annotations

import socket

import discord
import pytest
import simcord
from discord import app_commands
from discord.ext import commands

from bot.discord.bot import SwitchboardBot, bot_intents, run_bot
from bot.service import ChatService
from core.errors import ConfigError, UserError
from tests.fakes.discord_edge import FakeDiscordEdge


class EchoCog(commands.Cog):
    """A stand-in for a feature cog added from outside (like the knowledge cog)."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    @app_commands.command(name="ping")
    async def ping(self, interaction: discord.Interaction) -> None:
        """Say pong and how many models there are."""
        await interaction.response.send_message(
            f"pong ({len(self.service.list_models())} models)", ephemeral=True
        )


def test_intents_are_the_few_the_bot_needs() -> None:
    intents = bot_intents()
    assert (
        intents.message_content
        and intents.guilds
        and intents.guild_messages
        and intents.dm_messages
        and intents.guild_reactions  # 👍/👎 on answers are votes
        and intents.dm_reactions
    )
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
        assert {"settings", "ping"} <= set(alice.available_commands(channel))
        # The moderators' groups are shown to moderators (Manage Channels) by default.
        mods = guild.create_role("Mods", permissions=discord.Permissions(manage_channels=True))
        mod = guild.add_member(env.create_user("mod"), roles=[mods])
        assert {"model set", "system show", "settings", "ping"} <= set(
            mod.available_commands(channel)
        )
        assert "model set" not in alice.available_commands(channel)

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


# Starting up: discord.py's real log-in and gateway code against a fake Discord edge.


async def test_a_wrong_token_is_one_message_saying_where_to_get_a_new_one(
    chat_service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeDiscordEdge(token="right.token") as edge:
        monkeypatch.setattr(discord.http.Route, "BASE", edge.api_url)
        with pytest.raises(ConfigError, match="Discord refused the token: check DISCORD_TOKEN"):
            await run_bot("wrong.token", chat_service)
    assert edge.identified == []


async def test_a_missing_message_content_intent_says_where_to_turn_it_on(
    chat_service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeDiscordEdge(token="right.token", close_code=4014) as edge:
        monkeypatch.setattr(discord.http.Route, "BASE", edge.api_url)
        with pytest.raises(ConfigError, match="Message Content intent: turn it on under Bot"):
            await run_bot("right.token", chat_service)  # the shard count comes from the edge
    # It got as far as publishing its commands and identifying with the intents it needs.
    assert {"model", "system", "settings"} <= {command["name"] for command in edge.synced_commands}
    # The moderators' groups are hidden from other members by default; /settings is for everyone.
    shown_to = {
        command["name"]: command.get("default_member_permissions")
        for command in edge.synced_commands
    }
    moderators = discord.Permissions(manage_channels=True).value
    assert shown_to["model"] == shown_to["system"] == moderators and shown_to["settings"] is None
    [identify] = edge.identified
    assert identify["intents"] == bot_intents().value and identify["shard"] == [0, 1]


async def test_an_unreachable_discord_is_one_message_not_a_traceback(
    chat_service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    with pytest.raises(
        UserError,
        match=r"Could not reach Discord \(.*127\.0\.0\.1.*\)\. The bot needs HTTPS access",
    ):
        await run_bot("some.token", chat_service)
