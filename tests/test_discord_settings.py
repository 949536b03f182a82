"""The /model, /system and /settings commands, with their permission checks, on the real service."""

from __future__ import annotations

import discord

from bot.service import ChatService
from core.messages import Place
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.discord import MANAGER_ROLE, World


def field(embed: discord.Embed, name_start: str) -> str:
    [value] = [f.value for f in embed.fields if f.name.startswith(name_start)]
    return value


async def test_member_without_permission_is_refused_and_nothing_changes(
    world: World, chat_service: ChatService
) -> None:
    world.open_to_everyone("model", "system")
    result = await world.alice.slash(world.channel, "model set", name="solo")

    assert result.ephemeral
    assert "Manage Channels" in result.response.content and MANAGER_ROLE in result.response.content
    effective = await chat_service.effective_settings(Place(world.guild.id, world.channel.id))
    assert (effective.model.value, effective.model.source) == ("main", "global")


async def test_moderator_sets_the_model_and_settings_show_it(
    world: World, fake_openai: FakeOpenAI
) -> None:
    result = await world.mod.slash(world.channel, "model set", name="solo")

    assert not result.ephemeral  # everyone sees the channel's model change
    assert result.response.content == "Model for this channel: **solo**."

    shown = await world.alice.slash(world.channel, "settings")
    assert shown.ephemeral
    assert field(shown.response.embeds[0], "Model") == "**solo** (set for this channel)"
    assert (
        "bot default" in shown.response.embeds[0].fields[1].name
    )  # the prompt is still the default

    await world.alice.send(world.channel, f"{world.bot.user.mention} hi")
    assert fake_openai.chat_requests[-1].model == "fake-solo"


async def test_manager_role_may_change_settings(world: World) -> None:
    world.open_to_everyone("model", "system")
    result = await world.manager.slash(world.channel, "system set", text="Answer like a pirate.")
    assert not result.ephemeral and "System prompt for this channel set" in result.response.content

    shown = await world.alice.slash(world.channel, "system show")
    embed = shown.response.embeds[0]
    assert "set for this channel" in embed.title and "Answer like a pirate." in embed.description


async def test_server_default_needs_manage_server(world: World, chat_service: ChatService) -> None:
    world.open_to_everyone("model", "system")
    refused = await world.mod.slash(world.channel, "model set", name="backup", server=True)
    assert refused.ephemeral and "Manage Server" in refused.response.content

    allowed = await world.admin.slash(world.channel, "model set", name="backup", server=True)
    assert not allowed.ephemeral and "server" in allowed.response.content

    other = world.guild.create_text_channel("random")
    effective = await chat_service.effective_settings(Place(world.guild.id, other.id))
    assert (effective.model.value, effective.model.source) == ("backup", "guild")

    await world.admin.slash(world.channel, "model reset", server=True)
    effective = await chat_service.effective_settings(Place(world.guild.id, other.id))
    assert effective.model.source == "global"


async def test_thread_inherits_the_channel_model_and_can_override_it(
    world: World, fake_openai: FakeOpenAI
) -> None:
    await world.mod.slash(world.channel, "model set", name="solo")
    thread = world.thread("ideas")

    await world.alice.send(thread, f"{world.bot.user.mention} hello")
    assert fake_openai.chat_requests[-1].model == "fake-solo"
    shown = await world.alice.slash(thread, "settings")
    assert field(shown.response.embeds[0], "Model") == "**solo** (set for this channel)"

    changed = await world.mod.slash(thread, "model set", name="backup")
    assert "thread" in changed.response.content
    await world.alice.send(thread, "and now?")  # the bot takes part here: no mention needed
    assert fake_openai.chat_requests[-1].model == "fake-backup"
    await world.alice.send(world.channel, f"{world.bot.user.mention} and the channel?")
    assert fake_openai.chat_requests[-1].model == "fake-solo"


async def test_unknown_model_is_a_clear_ephemeral_error(world: World) -> None:
    result = await world.mod.slash(world.channel, "model set", name="gpt-9")
    assert result.ephemeral and result.response.content.startswith("⚠️ ")
    assert "gpt-9" in result.response.content


async def test_model_list_info_and_autocomplete(world: World) -> None:
    world.open_to_everyone("model", "system")
    listed = await world.alice.slash(world.channel, "model list")
    assert listed.ephemeral
    lines = listed.response.embeds[0].description.splitlines()
    assert len(lines) == len(world.bot.service.list_models())
    [main] = [line for line in lines if line.startswith("**main**")]
    assert "openai-compatible" in main and "open weights" in main and "16k context" in main
    assert "$1 in / $2 out per 1M tokens" in main and "in use here" in main

    info = await world.alice.slash(world.channel, "model info", name="main")
    embed = info.response.embeds[0]
    assert embed.title == "main" and embed.description == "The model tests talk to."
    assert field(embed, "Falls back to") == "backup"
    assert field(embed, "Context window") == "16,384 tokens"

    choices = await world.alice.autocomplete(world.channel, "model set", "name", "ba")
    assert [c["value"] for c in choices] == ["backup"]
    everything = await world.alice.autocomplete(world.channel, "model set", "name", "")
    assert sorted(c["value"] for c in everything) == [
        "backup",
        "main",
        "solo",
        "tiny",
        "tiny-then-big",
    ]


async def test_system_prompt_reaches_the_model_and_resets(
    world: World, fake_openai: FakeOpenAI
) -> None:
    world.open_to_everyone("model", "system")
    await world.mod.slash(world.channel, "system set", text="Always answer in French.")
    await world.alice.send(world.channel, f"{world.bot.user.mention} hello")
    assert (
        fake_openai.chat_requests[-1].messages[0]["content"].startswith("Always answer in French.")
    )

    reset = await world.mod.slash(world.channel, "system reset")
    assert "reset" in reset.response.content
    shown = await world.alice.slash(world.channel, "system show")
    assert "bot default" in shown.response.embeds[0].title


async def test_settings_in_a_direct_message_are_the_persons_own(
    world: World, fake_openai: FakeOpenAI
) -> None:
    alice = world.alice.user
    changed = await alice.slash("model set", name="solo")
    assert changed.response.content == "Model for this channel: **solo**."
    refused = await alice.slash("model set", name="solo", server=True)
    assert refused.ephemeral and "no server here" in refused.response.content

    await alice.send_dm("hello")
    assert fake_openai.chat_requests[-1].model == "fake-solo"
