"""Who may change the bot's settings and a server's knowledge base, and translating Discord places into service ones."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import discord

from core.errors import PermissionDenied, UserError
from core.messages import Author, ChatRequest, Place, Scope

if TYPE_CHECKING:
    from bot.service import ChatService


def place_of(
    channel: discord.abc.Messageable | discord.abc.GuildChannel | None, guild_id: int | None
) -> Place:
    """The service's `Place` for a Discord channel; in a thread, `channel_id` is its parent."""
    if channel is None:
        raise UserError("I cannot tell which channel this is; try again in a text channel.")
    if isinstance(channel, discord.Thread):
        return Place(guild_id=guild_id, channel_id=channel.parent_id, thread_id=channel.id)
    return Place(guild_id=guild_id, channel_id=channel.id)  # type: ignore[union-attr]


def author_of(user: discord.abc.User) -> Author:
    """The service's `Author` for a Discord user (their display name where they have one)."""
    return Author(id=user.id, name=user.display_name)


def limit_refusal(service: ChatService, interaction: discord.Interaction) -> str | None:
    """Why the person behind `interaction` may not ask a model now (the per-person limit of
    messages a minute); None if they may. Whatever asks a model counts like a message."""
    admission = service.admit(
        ChatRequest(
            place_of(interaction.channel, interaction.guild_id),
            author_of(interaction.user),
            "",
            discord_message_id=interaction.id,
            sent_at=interaction.created_at.timestamp(),
        )
    )
    if admission.allowed:
        return None
    return (
        f"You are asking me faster than I answer ({admission.per_minute} a minute); "
        f"try again in {max(1, math.ceil(admission.retry_after))} s."
    )


def scope_for(place: Place, server: bool) -> Scope:
    """Where a change applies: the server default, else this thread or channel."""
    if server:
        if place.guild_id is None:
            raise UserError("There is no server here: `server` only works in a server's channels.")
        return "guild"
    return "thread" if place.thread_id is not None else "channel"


_PERMISSION_WORDS: dict[str, str] = {
    "manage_guild": "Manage Server",
    "manage_channels": "Manage Channels",
}


def permission_refusal(
    interaction: discord.Interaction,
    *,
    doing: str,
    needs: Literal["manage_guild", "manage_channels"],
    role: str | None,
) -> str | None:
    """Why the person behind `interaction` may not be `doing` something (None when they may).

    They may with the `needs` permission or with the role named `role`; `doing` starts the
    refusal, as in "Changing the knowledge base".
    """
    member = interaction.user if isinstance(interaction.user, discord.Member) else None
    if (
        role
        and member is not None
        and any(r.name.casefold() == role.casefold() for r in member.roles)
    ):
        return None
    # Manage Channels counts in the channel the command was used in; Manage Server server-wide.
    if needs == "manage_channels":
        permissions = interaction.permissions
    else:
        permissions = member.guild_permissions if member is not None else None
    if permissions is not None and getattr(permissions, needs):
        return None
    role_hint = f" or the **{role}** role" if role else ""
    return f"{doing} needs the **{_PERMISSION_WORDS[needs]}** permission{role_hint}."


def ensure_can_change(
    interaction: discord.Interaction, scope: Scope, manager_role: str | None
) -> None:
    """Raise PermissionDenied unless the person behind `interaction` may change settings at `scope`."""
    if interaction.guild_id is None:
        return  # a DM has one person in it: their own settings
    if scope == "guild":
        refusal = permission_refusal(
            interaction,
            doing="Changing the server default",
            needs="manage_guild",
            role=manager_role,
        )
    else:
        refusal = permission_refusal(
            interaction,
            doing=f"Changing this {scope}'s settings",
            needs="manage_channels",
            role=manager_role,
        )
    if refusal is not None:
        raise PermissionDenied(refusal)
