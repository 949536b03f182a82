"""Slash commands for per-place settings: /model, /system and /settings."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.checks import (
    author_of,
    ensure_can_change,
    permission_refusal,
    place_of,
    scope_for,
)
from bot.discord.respond import answering, send
from bot.present import (
    SOURCE_WORDS,
    change_line,
    context_size,
    endpoint,
    logging_words,
    pool_text,
    price,
    retention_words,
)
from bot.service import ChatService
from core.messages import Place, Scope

if TYPE_CHECKING:
    from chains.registry import ModelSpec

log = logging.getLogger(__name__)

# An embed description holds 4,096 characters; keep room for the "and N more" line.
_DESCRIPTION_ROOM = 3900
_PROMPT_PREVIEW = 300
_AUTOCOMPLETE_MAX = 25
EMBED_COLOUR = discord.Colour.blurple()
# Who sees the moderators' command groups by default.
MODERATORS = discord.Permissions(manage_channels=True)


def model_line(spec: ModelSpec, current: str | None = None) -> str:
    """One model as a line of the /model list."""
    where = "runs locally" if spec.is_local else spec.provider
    here = " ← **in use here**" if spec.name == current else ""
    if spec.candidate:
        here = " · *candidate (admins only until promoted)*" + here
    weights = "open weights" if spec.open_weights else "closed weights"
    return f"**{spec.name}** · {where} · {weights} · {context_size(spec.context_window)} context · {price(spec)}{here}"


def model_embed(spec: ModelSpec) -> discord.Embed:
    """Everything worth knowing about one model."""
    embed = discord.Embed(
        title=spec.name, description=spec.description or None, colour=EMBED_COLOUR
    )
    embed.add_field(name="Provider", value=spec.provider)
    embed.add_field(name="Model id", value=f"`{spec.model}`")
    embed.add_field(name="Weights", value="open" if spec.open_weights else "closed")
    embed.add_field(
        name="Runs", value="locally, on this bot's machine" if spec.is_local else "through an API"
    )
    if where := endpoint(spec):
        embed.add_field(name="Endpoint", value=f"`{where}`")
    embed.add_field(name="Context window", value=f"{spec.context_window:,} tokens")
    embed.add_field(name="Price", value=price(spec))
    if spec.fallback:
        embed.add_field(name="Falls back to", value=spec.fallback)
    return embed


def model_choices(service: ChatService, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete for a model option: the names containing what has been typed, best first."""
    typed = current.casefold()
    names = [spec.name for spec in service.list_models()]
    matches = sorted(
        (n for n in names if typed in n.casefold()),
        key=lambda n: (not n.casefold().startswith(typed), n),
    )
    return [app_commands.Choice(name=n, value=n) for n in matches[:_AUTOCOMPLETE_MAX]]


def prompt_preview(text: str, limit: int = _PROMPT_PREVIEW) -> str:
    """A system prompt shortened for display, quoted."""
    short = text if len(text) <= limit else text[:limit].rstrip() + "…"
    return "\n".join(f"> {line}" for line in short.splitlines() or [""])


class SettingsCog(commands.Cog):
    """Choose the model and the system prompt per channel, thread or server, and show what applies."""

    # Shown to moderators only by default (a server admin can open them to others under
    # Server Settings → Integrations); who may change what is still checked on every use.
    model = app_commands.Group(
        name="model",
        description="Choose the language model that answers here.",
        default_permissions=MODERATORS,
    )
    system = app_commands.Group(
        name="system",
        description="Set the instructions the model follows here.",
        default_permissions=MODERATORS,
    )

    def __init__(self, service: ChatService, *, manager_role: str | None = None) -> None:
        self.service = service
        self.manager_role = manager_role

    # ------------------------------------------------------------ plumbing

    def _change(self, interaction: discord.Interaction, server: bool) -> tuple[Place, Scope]:
        """Where a change applies, after checking the person may make it."""
        place = place_of(interaction.channel, interaction.guild_id)
        scope = scope_for(place, server)
        ensure_can_change(interaction, scope, self.manager_role)
        return place, scope

    # ------------------------------------------------------------ /model

    @model.command(name="list")
    async def model_list(self, interaction: discord.Interaction) -> None:
        """List the models you can choose from."""
        async with answering(interaction, "listing models", log):
            place = place_of(interaction.channel, interaction.guild_id)
            current = (await self.service.effective_settings(place)).model.value
            lines = [model_line(spec, current) for spec in self.service.list_models()]
            shown: list[str] = []
            for line in lines:
                if sum(len(s) + 1 for s in shown) + len(line) > _DESCRIPTION_ROOM:
                    shown.append(
                        f"…and {len(lines) - len(shown)} more; `/model info` tells you about one."
                    )
                    break
                shown.append(line)
            embed = discord.Embed(title="Models", description="\n".join(shown), colour=EMBED_COLOUR)
            embed.set_footer(text="Pick one with /model set · details with /model info")
            await send(interaction, embed=embed, ephemeral=True)

    @model.command(name="info")
    @app_commands.describe(name="The model's name, as /model list shows it.")
    async def model_info(self, interaction: discord.Interaction, name: str) -> None:
        """Show a model's provider, context window, prices and weights."""
        async with answering(interaction, "showing a model", log):
            await send(
                interaction, embed=model_embed(await self.service.get_model(name)), ephemeral=True
            )

    @model.command(name="set")
    @app_commands.describe(
        name="The model's name, as /model list shows it.",
        server="Set the server default instead of this channel's model (needs Manage Server).",
    )
    async def model_set(
        self, interaction: discord.Interaction, name: str, server: bool = False
    ) -> None:
        """Choose the model that answers in this channel or thread."""
        async with answering(interaction, "setting a model", log):
            place, scope = self._change(interaction, server)
            admin = interaction.guild_id is not None and (
                permission_refusal(
                    interaction, doing="", needs="manage_guild", role=self.manager_role
                )
                is None
            )
            change = await self.service.set_model(
                place, scope, name, author_of(interaction.user), admin=admin
            )
            await send(interaction, change_line(change), ephemeral=False)

    @model.command(name="reset")
    @app_commands.describe(server="Reset the server default instead of this channel's model.")
    async def model_reset(self, interaction: discord.Interaction, server: bool = False) -> None:
        """Go back to the inherited model (server default or the bot's default)."""
        async with answering(interaction, "resetting a model", log):
            place, scope = self._change(interaction, server)
            change = await self.service.reset_model(place, scope, author_of(interaction.user))
            await send(interaction, change_line(change), ephemeral=False)

    @model_set.autocomplete("name")
    @model_info.autocomplete("name")
    async def _model_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """Model names containing what has been typed so far."""
        return model_choices(self.service, current)

    # ------------------------------------------------------------ /system

    @system.command(name="set")
    @app_commands.describe(
        text="What the model should know or how it should behave here.",
        server="Set the server default instead of this channel's prompt (needs Manage Server).",
    )
    async def system_set(
        self, interaction: discord.Interaction, text: str, server: bool = False
    ) -> None:
        """Set the system prompt for this channel or thread."""
        async with answering(interaction, "setting a system prompt", log):
            place, scope = self._change(interaction, server)
            change = await self.service.set_system_prompt(
                place, scope, text, author_of(interaction.user)
            )
            await send(interaction, change_line(change), ephemeral=False)

    @system.command(name="show")
    async def system_show(self, interaction: discord.Interaction) -> None:
        """Show the system prompt in force here and where it comes from."""
        async with answering(interaction, "showing the system prompt", log):
            setting = (
                await self.service.effective_settings(
                    place_of(interaction.channel, interaction.guild_id)
                )
            ).system_prompt
            embed = discord.Embed(
                title=f"System prompt ({SOURCE_WORDS.get(setting.source, setting.source)})",
                description=prompt_preview(str(setting.value), 3800),
                colour=EMBED_COLOUR,
            )
            await send(interaction, embed=embed, ephemeral=True)

    @system.command(name="reset")
    @app_commands.describe(server="Reset the server default instead of this channel's prompt.")
    async def system_reset(self, interaction: discord.Interaction, server: bool = False) -> None:
        """Go back to the inherited system prompt."""
        async with answering(interaction, "resetting the system prompt", log):
            place, scope = self._change(interaction, server)
            change = await self.service.reset_system_prompt(
                place, scope, author_of(interaction.user)
            )
            await send(interaction, change_line(change), ephemeral=False)

    # ------------------------------------------------------------ /settings

    @app_commands.command(name="settings")
    async def settings(self, interaction: discord.Interaction) -> None:
        """Show the settings in force here and where each comes from."""
        async with answering(interaction, "showing settings", log):
            effective = await self.service.effective_settings(
                place_of(interaction.channel, interaction.guild_id)
            )
            embed = discord.Embed(title="Settings here", colour=EMBED_COLOUR)
            embed.add_field(
                name="Model",
                value=f"**{effective.model.value}** ({SOURCE_WORDS.get(effective.model.source, effective.model.source)})",
                inline=False,
            )
            embed.add_field(
                name=f"System prompt ({SOURCE_WORDS.get(effective.system_prompt.source, effective.system_prompt.source)})",
                value=prompt_preview(str(effective.system_prompt.value)),
                inline=False,
            )
            embed.add_field(
                name="Knowledge base",
                value=("on" if effective.knowledge.value else "off")
                + f" ({SOURCE_WORDS.get(effective.knowledge.source, effective.knowledge.source)})",
                inline=False,
            )
            embed.add_field(
                name="Arena pool",
                value=f"{pool_text(effective.arena_pool.value)} "
                f"({SOURCE_WORDS.get(effective.arena_pool.source, effective.arena_pool.source)})",
                inline=False,
            )
            embed.add_field(name="Logging", value=logging_words(effective.logging), inline=False)
            if interaction.guild_id is not None:
                embed.add_field(
                    name="Retention", value=retention_words(effective.retention), inline=False
                )
            await send(interaction, embed=embed, ephemeral=True)
