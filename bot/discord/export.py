"""/export: this server's log as a fine-tuning dataset, attached to an ephemeral reply.

    ExportCog(app.exporter, manager_role="Bot Manager")

The same export as `switchboard export` (`store.export`), with the same options, always
limited to the server it is used in. Only people with Manage Server (or the manager
role) may run it, and the command is shown to them alone by default. When the files are
larger than Discord lets the bot upload here, the reply names the CLI command that
writes them on the bot's machine instead.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.checks import permission_refusal
from bot.discord.respond import answering, fit_lines, send
from bot.present import export_command, export_summary_lines, human_size
from core.errors import PermissionDenied
from store.export import Exporter, ExportOptions, parse_format, parse_when

log = logging.getLogger(__name__)

FormatName = Literal["openai-chat", "openai-dpo", "sft", "dpo", "kto"]


class ExportCog(commands.Cog):
    """The /export command."""

    def __init__(
        self, exporter: Exporter, *, manager_role: str | None = None, size_limit: int | None = None
    ) -> None:
        self.exporter = exporter
        self.manager_role = manager_role
        # Discord's upload limit comes with each interaction; tests set a smaller one.
        self.size_limit = size_limit

    @app_commands.command(
        name="export", description="Export this server's conversations as a fine-tuning dataset."
    )
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.describe(
        format="openai-chat, openai-dpo (OpenAI) or sft, dpo, kto (Hugging Face TRL)",
        min_rating="Training targets need at least this net rating (default 1)",
        model="Only answers by this model",
        channel="Only this channel",
        since="Only answers from this ISO date on, e.g. 2024-05-01",
        until="Only answers before this ISO date (a date keeps that whole day)",
        include_unrated="Also answers nobody rated",
        with_context="Keep the knowledge-base passages the model was sent",
        split="Train/validation split: the share for training, e.g. 0.9",
        redact="Replace personal data with placeholders (default: on)",
    )
    async def export(
        self,
        interaction: discord.Interaction,
        format: FormatName,
        min_rating: app_commands.Range[int, 1, 1000] = 1,
        model: str | None = None,
        channel: discord.TextChannel | None = None,
        since: str | None = None,
        until: str | None = None,
        include_unrated: bool = False,
        with_context: bool = False,
        split: app_commands.Range[float, 0.01, 0.99] | None = None,
        redact: bool = True,
    ) -> None:
        async with answering(interaction, "exporting a dataset", log):
            refusal = permission_refusal(
                interaction,
                doing="Exporting this server's conversations",
                needs="manage_guild",
                role=self.manager_role,
            )
            if refusal is not None:
                raise PermissionDenied(refusal)
            options = ExportOptions(
                format=parse_format(format),
                min_rating=min_rating,
                model=model,
                guild_id=interaction.guild_id,
                channel_id=channel.id if channel is not None else None,
                since=parse_when(since, "since") if since else None,
                until=parse_when(until, "until", end=True) if until else None,
                include_unrated=include_unrated,
                with_context=with_context,
                split=split,
                redact=redact,
            )
            await interaction.response.defer(ephemeral=True, thinking=True)
            with tempfile.TemporaryDirectory(prefix="switchboard-export-") as folder:
                out = Path(folder) / f"{interaction.guild_id}-{options.format}.jsonl"
                summary = await self.exporter.run(options, out)
                paths = [f.path for f in summary.files] + [summary.manifest]
                size = sum(path.stat().st_size for path in paths)
                limit = self.size_limit or interaction.filesize_limit
                lines = export_summary_lines(summary)
                warnings = [f"⚠️ {warning}" for warning in summary.warnings]
                if size > limit:
                    command = export_command(options)
                    await send(
                        interaction,
                        f"The export is {human_size(size)}, more than the {human_size(limit)} "
                        f"Discord lets me upload here. Run it on the bot's machine instead:\n"
                        f"```\n{command}\n```",
                        ephemeral=True,
                    )
                    return
                text = fit_lines(
                    [
                        f"**{lines[0]}**",
                        *(line for line in lines[1:] if not line.startswith("  ")),
                        *warnings,
                    ]
                )
                files = [discord.File(path, filename=path.name) for path in paths]
                await interaction.followup.send(
                    text,
                    files=files,
                    ephemeral=True,
                    allowed_mentions=discord.AllowedMentions.none(),
                )
