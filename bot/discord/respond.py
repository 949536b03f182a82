"""Answering slash commands: one way to respond, and one way to show errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import discord

from core.errors import UserError, apology, report_unexpected

MESSAGE_ROOM = 1900  # a message holds 2,000 characters; room for what is added around


async def send(
    interaction: discord.Interaction,
    content: str | None = None,
    *,
    embed: discord.Embed | None = None,
    embeds: list[discord.Embed] | None = None,
    view: discord.ui.View | None = None,
    file: discord.File | None = None,
    ephemeral: bool,
) -> None:
    """Respond to an interaction, or follow up if it was already answered; never pings anyone."""
    kwargs: dict[str, Any] = {
        "content": content,
        "ephemeral": ephemeral,
        "allowed_mentions": discord.AllowedMentions.none(),
    }
    if embed is not None:
        kwargs["embed"] = embed
    if embeds:
        kwargs["embeds"] = embeds
    if view is not None:
        kwargs["view"] = view
    if file is not None:
        kwargs["file"] = file
    if interaction.response.is_done():
        await interaction.followup.send(**kwargs)
    else:
        await interaction.response.send_message(**kwargs)


@asynccontextmanager
async def answering(
    interaction: discord.Interaction, what: str, log: logging.Logger
) -> AsyncIterator[None]:
    """Show user-facing errors ephemerally; log anything else with its traceback and apologise."""
    try:
        yield
    except UserError as exc:
        await send(interaction, f"⚠️ {exc.message}", ephemeral=True)
    except Exception as exc:
        await send(interaction, apology(report_unexpected(log, exc, what)), ephemeral=True)


def fit_lines(lines: list[str]) -> str:
    """Lines joined, cut to what one message holds."""
    text = "\n".join(lines)
    return text if len(text) <= MESSAGE_ROOM else text[: MESSAGE_ROOM - 1] + "…"
