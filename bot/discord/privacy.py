"""Privacy in Discord: /privacy, /logging, /retention, deleted messages, and the daily purge.

- `/privacy status|opt-out|opt-in|forget` (everyone; answered only to the person): forget
  asks first, with two buttons only that person can press, and gives up after a while.
- `/logging on|off|inherit [server]` (Manage Channels; the server default needs Manage
  Server): whether what is said in a channel (its threads follow) is stored.
- `/retention set DAYS` and `/retention reset` (Manage Server): how long this server's
  exchanges are kept.
- A deleted Discord message (one or in bulk) deletes its stored prompt and what derives
  from it; the retention is applied once a day.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands, tasks

from bot.discord.checks import (
    author_of,
    ensure_can_change,
    permission_refusal,
    place_of,
    scope_for,
)
from bot.discord.respond import answering, send
from bot.present import change_line, forget_line, privacy_line, purge_line
from bot.service import ChatService
from core.errors import PermissionDenied, UserError, apology, report_unexpected
from core.messages import Author

log = logging.getLogger(__name__)

# How long the forget buttons wait for an answer.
FORGET_TIMEOUT_S = 120.0
# How often the bot applies the retention.
PURGE_EVERY = timedelta(hours=24)
MODERATORS = discord.Permissions(manage_channels=True)
SERVER_ADMINS = discord.Permissions(manage_guild=True)
MAX_DAYS = 36_500

FORGET_QUESTION = (
    "This deletes everything Switchboard stores about you, everywhere: your messages, the "
    "answers to them and the answers built on your words, your votes and corrections; your "
    "name comes off settings changes and documents you added. It cannot be undone."
)
FORGET_CANCELLED = "Cancelled: nothing was deleted."
FORGET_TIMED_OUT = "No answer within 2 minutes: nothing was deleted."
NOT_YOURS = "Only the person who asked can answer this."


class ForgetConfirmation(discord.ui.View):
    """Delete everything / Cancel, for the person who asked to be forgotten only."""

    def __init__(
        self,
        service: ChatService,
        person: Author,
        asked: discord.Interaction,
        *,
        timeout: float = FORGET_TIMEOUT_S,
    ) -> None:
        super().__init__(timeout=timeout)
        self.service = service
        self.person = person
        self.asked = asked  # the /privacy forget interaction, whose reply this view is on
        self.answered = False

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.person.id:
            return True
        await interaction.response.send_message(NOT_YOURS, ephemeral=True)
        return False

    @discord.ui.button(label="Delete everything", style=discord.ButtonStyle.danger)
    async def confirm(
        self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirmation]
    ) -> None:
        """Forget the person, then say what went."""
        self.answered = True
        self.stop()
        await interaction.response.edit_message(
            content="Deleting everything stored about you…", view=None
        )
        try:
            text = forget_line(await self.service.forget(self.person))
        except UserError as exc:
            text = f"⚠️ {exc.message}"
        except Exception as exc:
            text = apology(report_unexpected(log, exc, "forgetting a person"))
        await interaction.edit_original_response(content=text)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(
        self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirmation]
    ) -> None:
        """Leave everything as it is."""
        self.answered = True
        self.stop()
        await interaction.response.edit_message(content=FORGET_CANCELLED, view=None)

    async def on_timeout(self) -> None:
        if self.answered:
            return
        try:
            await self.asked.edit_original_response(content=FORGET_TIMED_OUT, view=None)
        except discord.HTTPException:  # the reply is gone, or the token expired: nothing to do
            log.debug("could not say the forget question timed out", exc_info=True)


class PrivacyCog(commands.Cog):
    """What the bot stores about people, and where it stores nothing."""

    privacy = app_commands.Group(
        name="privacy", description="What Switchboard stores about you, and your choices."
    )
    logging_commands = app_commands.Group(
        name="logging",
        description="Store what is said here, or not.",
        default_permissions=MODERATORS,
    )
    retention = app_commands.Group(
        name="retention",
        description="How long this server's exchanges are kept.",
        default_permissions=SERVER_ADMINS,
        guild_only=True,
    )

    def __init__(
        self,
        service: ChatService,
        *,
        manager_role: str | None = None,
        purge_every: timedelta | None = PURGE_EVERY,
        forget_timeout: float = FORGET_TIMEOUT_S,
    ) -> None:
        self.service = service
        self.manager_role = manager_role
        self.forget_timeout = forget_timeout
        self.purge_every = purge_every
        # Started when the cog loads (a first purge at once), cancelled when it unloads.
        self._purge: tasks.Loop[Any] | None = None
        if purge_every is not None:
            self._purge = tasks.loop(seconds=purge_every.total_seconds())(self._purge_once)

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        # Started once connected, not at cog load: a bot that fails to start (a wrong
        # token, a missing intent) must not leave a purge running as the app closes.
        if self._purge is not None and not self._purge.is_running():
            self._purge.start()

    async def cog_unload(self) -> None:
        if self._purge is not None:
            self._purge.cancel()

    async def _purge_once(self) -> None:
        """Apply the retention (once connected, then every `purge_every`); failures are logged."""
        try:
            report = await self.service.purge()
        except Exception as exc:
            log.warning("the daily purge failed (%s); it runs again tomorrow", exc)
            return
        if report.snapshots_problem:  # the owners read the log; nobody is waiting on a reply
            log.error("retention: %s", purge_line(report))
        elif report.messages:
            log.info("retention: %s", purge_line(report))

    # ------------------------------------------------------------ /privacy

    @privacy.command(name="status")
    async def status(self, interaction: discord.Interaction) -> None:
        """Whether your exchanges are stored, and how much of yours is."""
        async with answering(interaction, "showing privacy status", log):
            status = await self.service.privacy_status(author_of(interaction.user))
            await send(interaction, privacy_line(status), ephemeral=True)

    @privacy.command(name="opt-out")
    async def opt_out(self, interaction: discord.Interaction) -> None:
        """Keep being answered, but store nothing you write or receive from now on."""
        async with answering(interaction, "opting out", log):
            status = await self.service.opt_out(author_of(interaction.user))
            await send(interaction, privacy_line(status), ephemeral=True)

    @privacy.command(name="opt-in")
    async def opt_in(self, interaction: discord.Interaction) -> None:
        """Let your exchanges be stored again from now on."""
        async with answering(interaction, "opting in", log):
            status = await self.service.opt_in(author_of(interaction.user))
            await send(interaction, privacy_line(status), ephemeral=True)

    @privacy.command(name="forget")
    async def forget(self, interaction: discord.Interaction) -> None:
        """Delete everything stored about you (asks first)."""
        async with answering(interaction, "asking to forget", log):
            view = ForgetConfirmation(
                self.service,
                author_of(interaction.user),
                interaction,
                timeout=self.forget_timeout,
            )
            await interaction.response.send_message(
                FORGET_QUESTION,
                view=view,
                ephemeral=True,
                allowed_mentions=discord.AllowedMentions.none(),
            )

    # ------------------------------------------------------------ /logging

    async def _set_logging(
        self, interaction: discord.Interaction, enabled: bool | None, server: bool
    ) -> None:
        async with answering(interaction, "switching logging", log):
            place = place_of(interaction.channel, interaction.guild_id)
            scope = scope_for(place, server)
            ensure_can_change(interaction, scope, self.manager_role)
            change = await self.service.set_logging(
                place, scope, enabled, author_of(interaction.user)
            )
            # Said in the open: everyone here should know whether what they say is kept.
            await send(interaction, change_line(change), ephemeral=False)

    @logging_commands.command(name="on")
    @app_commands.describe(server="Set the server default instead (needs Manage Server).")
    async def logging_on(self, interaction: discord.Interaction, server: bool = False) -> None:
        """Store what is said in this channel (its threads follow)."""
        await self._set_logging(interaction, True, server)

    @logging_commands.command(name="off")
    @app_commands.describe(server="Set the server default instead (needs Manage Server).")
    async def logging_off(self, interaction: discord.Interaction, server: bool = False) -> None:
        """Store nothing said in this channel (its threads follow); it is only counted."""
        await self._set_logging(interaction, False, server)

    @logging_commands.command(name="inherit")
    @app_commands.describe(server="Reset the server default instead (needs Manage Server).")
    async def logging_inherit(self, interaction: discord.Interaction, server: bool = False) -> None:
        """Follow the setting above this channel (the server's, else the bot's: on)."""
        await self._set_logging(interaction, None, server)

    # ------------------------------------------------------------ /retention

    def _ensure_server_admin(self, interaction: discord.Interaction) -> None:
        refusal = permission_refusal(
            interaction,
            doing="Changing how long this server keeps its exchanges",
            needs="manage_guild",
            role=self.manager_role,
        )
        if refusal is not None:
            raise PermissionDenied(refusal)

    @retention.command(name="set")
    @app_commands.describe(days="Delete exchanges older than this many days; 0 keeps them forever.")
    async def retention_set(
        self, interaction: discord.Interaction, days: app_commands.Range[int, 0, MAX_DAYS]
    ) -> None:
        """Keep this server's exchanges this many days (applied daily)."""
        async with answering(interaction, "setting the retention", log):
            self._ensure_server_admin(interaction)
            place = place_of(interaction.channel, interaction.guild_id)
            change = await self.service.set_retention(place, days, author_of(interaction.user))
            await send(interaction, change_line(change), ephemeral=False)

    @retention.command(name="reset")
    async def retention_reset(self, interaction: discord.Interaction) -> None:
        """Follow the bot's retention again."""
        async with answering(interaction, "resetting the retention", log):
            self._ensure_server_admin(interaction)
            place = place_of(interaction.channel, interaction.guild_id)
            change = await self.service.set_retention(place, None, author_of(interaction.user))
            await send(interaction, change_line(change), ephemeral=False)

    # ------------------------------------------------------------ deletions

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        """A deleted message takes its stored prompt, and what derives from it, with it."""
        cached = payload.cached_message
        if cached is not None and cached.author.bot:
            return  # our answers (and other bots') are not prompts
        await self._deleted([payload.message_id])

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        """Messages deleted together (a moderator's purge) are deleted here too."""
        bots = {m.id for m in payload.cached_messages if m.author.bot}
        await self._deleted([i for i in payload.message_ids if i not in bots])

    async def _deleted(self, discord_message_ids: list[int]) -> None:
        for discord_message_id in discord_message_ids:
            try:
                await self.service.message_deleted(discord_message_id)
            except Exception as exc:  # a listener must never take the others with it
                report_unexpected(log, exc, "honouring a deleted message")
