"""/export through simcord: the real bot, service and exporter on a log the service wrote."""

from __future__ import annotations

import json

import pytest

from bot.app import App
from bot.discord.bot import SwitchboardBot
from bot.discord.export import ExportCog
from core.messages import Place
from tests.fixtures.discord import MANAGER_ROLE, World
from tests.fixtures.export import ALICE, BOB, Log


@pytest.fixture
def simcord_bot(chat_app: App) -> SwitchboardBot:
    """The real bot with the export cog, as `switchboard run` builds it."""
    cog = ExportCog(chat_app.exporter, manager_role=MANAGER_ROLE)
    return SwitchboardBot(
        chat_app.service, manager_role=MANAGER_ROLE, shard_count=1, extra_cogs=[cog]
    )


@pytest.fixture
async def logged(world: World, chat_app: App) -> Log:
    """Conversations in this server's channel and in another server, some liked."""
    log = Log(chat_app)
    here = Place(world.guild.id, world.channel.id)
    for n in range(3):
        await log.converse([f"question {n}"], place=here)
    await log.converse(["somewhere else"], author=BOB, place=Place(world.guild.id + 1, 5))
    await log.vote("question 0", BOB, 1)
    await log.vote("somewhere else", ALICE, 1)
    return log


def reply(result):  # noqa: ANN001, ANN201
    """What the bot answered: after "thinking…", the first follow-up replaces that message."""
    return result.followups[0] if result.followups else result.response


def attachment_text(world: World, attachment) -> str:  # noqa: ANN001
    data = world.env.backend.cdn.get(attachment.url)
    assert data is not None
    return data.decode()


async def test_only_server_managers_see_and_may_run_export(world: World, logged: Log) -> None:
    assert "export" in world.admin.available_commands(world.channel)
    assert "export" not in world.alice.available_commands(world.channel)
    assert "export" not in world.mod.available_commands(
        world.channel
    )  # Manage Channels is not enough
    world.open_to_everyone("export")
    refused = await world.alice.slash(world.channel, "export", format="sft")
    assert refused.ephemeral
    assert "needs the **Manage Server** permission or the **Switchboard Manager** role" in (
        refused.response.content
    )
    allowed = await world.manager.slash(world.channel, "export", format="sft")
    assert reply(allowed).attachments


async def test_export_attaches_this_servers_dataset_and_its_manifest(
    world: World, logged: Log
) -> None:
    result = await world.admin.slash(
        world.channel, "export", format="openai-chat", include_unrated=True
    )
    assert result.ephemeral
    answer = reply(result)
    assert answer.ephemeral
    assert answer.content.startswith("**Exported 3 openai-chat examples (")
    assert "⚠️ Only 3 examples" in answer.content
    data, manifest = answer.attachments
    assert data.filename == f"{world.guild.id}-openai-chat.jsonl"
    examples = [json.loads(line) for line in attachment_text(world, data).splitlines()]
    # Only this server: the other server's liked answer is not in it.
    assert [e["messages"][-1]["content"] for e in examples] == [
        "Echo: question 0",
        "Echo: question 1",
        "Echo: question 2",
    ]
    info = json.loads(attachment_text(world, manifest))
    assert info["filters"]["guild_id"] == world.guild.id
    assert info["removed"]["guild"] == 1


async def test_a_mistake_is_one_ephemeral_line(world: World, logged: Log) -> None:
    bad = await world.admin.slash(world.channel, "export", format="sft", since="yesterday")
    assert bad.ephemeral
    assert bad.response.content == (
        "⚠️ since 'yesterday' is not an ISO date: write it like 2024-05-01 or 2024-05-01T14:30."
    )
    nothing = await world.admin.slash(world.channel, "export", format="dpo")
    assert reply(nothing).content.startswith(
        "⚠️ Nothing to export: of 4 answers, 1 not in --guild, 3 without"
    )


async def test_an_export_too_large_to_upload_names_the_cli_command(
    world: World, logged: Log
) -> None:
    world.bot.get_cog("ExportCog").size_limit = 200
    result = await world.admin.slash(
        world.channel, "export", format="sft", include_unrated=True, split=0.5
    )
    answer = reply(result)
    assert not answer.attachments
    assert "more than the 200 B Discord lets me upload here" in answer.content
    assert (
        f"switchboard export --format sft --guild {world.guild.id} --include-unrated --split 0.5"
        in answer.content
    )
