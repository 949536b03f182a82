"""Who may change the bot's settings where, and translating Discord places into service ones."""

from __future__ import annotations

import discord

from core.errors import PermissionDenied, UserError
from core.messages import Author, Place, Scope


def place_of(channel: discord.abc.Messageable | discord.abc.GuildChannel | None, guild_id: int | None) -> Place:
    """The service's `Place` for a Discord channel; in a thread, `channel_id` is its parent."""
    if channel is None:
        raise UserError("I cannot tell which channel this is; try again in a text channel.")
    if isinstance(channel, discord.Thread):
        return Place(guild_id=guild_id, channel_id=channel.parent_id, thread_id=channel.id)
    return Place(guild_id=guild_id, channel_id=channel.id)  # type: ignore[union-attr]


def author_of(user: discord.abc.User) -> Author:
    """The service's `Author` for a Discord user (their display name where they have one)."""
    return Author(id=user.id, name=user.display_name)


def scope_for(place: Place, server: bool) -> Scope:
    """Where a change applies: the server default, else this thread or channel."""
    if server:
        if place.guild_id is None:
            raise UserError("There is no server here: `server` only works in a server's channels.")
        return "guild"
    return "thread" if place.thread_id is not None else "channel"


def settings_refusal(
    *,
    scope: Scope,
    in_guild: bool,
    channel_permissions: discord.Permissions | None,
    guild_permissions: discord.Permissions | None,
    role_names: list[str],
    manager_role: str | None,
) -> str | None:
    """Why this person may not change settings at `scope` (None when they may)."""
    if not in_guild:
        return None  # a DM has one person in it: their own settings
    if manager_role and any(name.casefold() == manager_role.casefold() for name in role_names):
        return None
    role_hint = f" or the **{manager_role}** role" if manager_role else ""
    if scope == "guild":
        if guild_permissions is not None and guild_permissions.manage_guild:
            return None
        return f"Changing the server default needs the **Manage Server** permission{role_hint}."
    if channel_permissions is not None and channel_permissions.manage_channels:
        return None
    return f"Changing this {scope}'s settings needs the **Manage Channels** permission{role_hint}."


def ensure_can_change(interaction: discord.Interaction, scope: Scope, manager_role: str | None) -> None:
    """Raise PermissionDenied unless the person behind `interaction` may change settings at `scope`."""
    member = interaction.user if isinstance(interaction.user, discord.Member) else None
    refusal = settings_refusal(
        scope=scope,
        in_guild=interaction.guild_id is not None,
        channel_permissions=interaction.permissions,
        guild_permissions=member.guild_permissions if member is not None else None,
        role_names=[role.name for role in member.roles] if member is not None else [],
        manager_role=manager_role,
    )
    if refusal is not None:
        raise PermissionDenied(refusal)
