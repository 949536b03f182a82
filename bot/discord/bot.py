"""The Discord bot: its dependencies come in through the constructor, as in discord.py's examples.

    bot = SwitchboardBot(service, manager_role="Bot Manager", extra_cogs=[KnowledgeCog(...)])
    await run_bot(token, service, manager_role=...)     # what the CLI calls

The bot is an `AutoShardedBot`: with no `shard_count` Discord recommends one; a process
that runs some shards of a bigger bot passes `shard_count` and its `shard_ids`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import aiohttp
import discord
from discord.ext import commands

from bot.discord.chat import ChatCog
from bot.discord.compare import DYNAMIC_ITEMS as COMPARE_ITEMS
from bot.discord.compare import CompareCog
from bot.discord.feedback import DYNAMIC_ITEMS, FeedbackCog, answer_buttons
from bot.discord.leaderboard import LeaderboardCog
from bot.discord.privacy import PURGE_EVERY, PrivacyCog
from bot.discord.settings_cog import SettingsCog
from bot.discord.usage import UsageCog
from bot.service import ChatService
from core.errors import ConfigError, UserError

log = logging.getLogger(__name__)


def bot_intents() -> discord.Intents:
    """Just what the bot needs: servers and channels, messages in them and in DMs, their text,
    and 👍/👎 reactions on its answers (votes)."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True  # privileged: enable it in the developer portal
    intents.guild_reactions = True
    intents.dm_reactions = True
    return intents


class SwitchboardBot(commands.AutoShardedBot):
    """Switchboard's Discord face: the chat, settings, feedback, compare, leaderboard and
    privacy cogs, plus any extra cogs given."""

    def __init__(
        self,
        service: ChatService,
        *,
        manager_role: str | None = None,
        extra_cogs: Sequence[commands.Cog] = (),
        sync_commands: bool = True,
        shard_count: int | None = None,
        shard_ids: Sequence[int] | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        purge_every: timedelta | None = PURGE_EVERY,
    ) -> None:
        # The bot never joins voice channels: discord.py's warnings that voice support
        # libraries are missing are noise before every start.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        super().__init__(
            # No text commands: people talk to the bot by mentioning it, so a prefix would
            # turn "@bot help me" into a command. Everything else is a slash command.
            command_prefix=commands.when_mentioned,
            help_command=None,
            intents=bot_intents(),
            allowed_mentions=discord.AllowedMentions.none(),
            shard_count=shard_count,
            shard_ids=list(shard_ids) if shard_ids is not None else None,
        )
        self.service = service
        self.manager_role = manager_role
        self.extra_cogs = list(extra_cogs)
        self.sync_commands = sync_commands
        self.clock = clock
        self.sleep = sleep
        self.purge_every = purge_every  # how often the retention is applied (None: never)
        self._notices: set[asyncio.Task[None]] = set()
        self._unwatch_log: Callable[[], None] | None = None

    async def setup_hook(self) -> None:
        """Add the cogs, publish the slash commands, and watch the log for the operators."""
        self._unwatch_log = self.service.watch_log(self._log_changed)
        # The feedback buttons under answers, and the voting buttons under comparisons and
        # battles, carry what they vote on in their custom id: registered here, they work
        # on messages from before a restart too.
        self.add_dynamic_items(*DYNAMIC_ITEMS, *COMPARE_ITEMS)
        chat = ChatCog(
            self, self.service, clock=self.clock, sleep=self.sleep, buttons=answer_buttons
        )
        await self.add_cog(chat)
        await self.add_cog(SettingsCog(self.service, manager_role=self.manager_role))
        await self.add_cog(FeedbackCog(self, self.service, chat, manager_role=self.manager_role))
        await self.add_cog(CompareCog(self.service, manager_role=self.manager_role))
        await self.add_cog(LeaderboardCog(self.service))
        await self.add_cog(UsageCog(self.service))
        await self.add_cog(
            PrivacyCog(self.service, manager_role=self.manager_role, purge_every=self.purge_every)
        )
        for cog in self.extra_cogs:
            await self.add_cog(cog)
        if self.sync_commands:
            # Global commands; Discord keeps them between restarts, so syncing once per start is cheap.
            synced = await self.tree.sync()
            log.info("synced %d slash commands", len(synced))

    def _log_changed(self, problem: str | None) -> None:
        """The log stopped (or resumed) being written: the bot's owners hear it once, by DM."""
        if problem is None:
            note = "✅ Switchboard's log is being written again; what was kept meanwhile is saved."
        else:
            note = f"⚠️ Switchboard: {problem} Replies go on meanwhile."
        task = self.loop.create_task(self._tell_owners(note))
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _tell_owners(self, note: str) -> None:
        try:
            info = await self.application_info()
        except discord.HTTPException:
            log.warning("could not look up the bot's owners to tell them: %s", note)
            return
        owners = [member for member in info.team.members] if info.team else [info.owner]
        for owner in owners:
            if self.user is not None and owner.id == self.user.id:
                continue
            try:
                await owner.send(note, allowed_mentions=discord.AllowedMentions.none())
            except discord.HTTPException:
                log.warning("could not tell %s by DM: %s", owner, note)

    async def on_message(self, message: discord.Message) -> None:
        """Text commands are off; the chat cog's listener handles messages."""

    async def close(self) -> None:
        """Stop watching the log, then close as discord.py does."""
        if self._unwatch_log is not None:
            self._unwatch_log()
            self._unwatch_log = None
        await super().close()

    async def on_ready(self) -> None:
        """Say in the log who the bot is and where."""
        log.info(
            "logged in as %s (%s) in %d servers",
            self.user,
            getattr(self.user, "id", "?"),
            len(self.guilds),
        )


async def run_bot(
    token: str,
    service: ChatService,
    *,
    manager_role: str | None = None,
    extra_cogs: Sequence[commands.Cog] = (),
    shard_count: int | None = None,
    shard_ids: Sequence[int] | None = None,
) -> None:
    """Log in and serve until the bot is closed, SIGINT/SIGTERM arrives, or the task is cancelled."""
    bot = SwitchboardBot(
        service,
        manager_role=manager_role,
        extra_cogs=extra_cogs,
        shard_count=shard_count,
        shard_ids=shard_ids,
    )
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, lambda: loop.create_task(bot.close()))
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    try:
        async with bot:  # closes the bot (cogs first, so answers can finish) on the way out
            await bot.start(token)
    except discord.LoginFailure:
        raise ConfigError(
            "Discord refused the token: check DISCORD_TOKEN (Bot → Reset Token in the developer portal)."
        ) from None
    except discord.PrivilegedIntentsRequired:
        raise ConfigError(
            "The bot needs the Message Content intent: turn it on under Bot → Privileged Gateway Intents "
            "in the Discord developer portal."
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        # Once connected, discord.py reconnects by itself; this is the log-in failing.
        raise UserError(
            f"Could not reach Discord ({exc or type(exc).__name__}). The bot needs HTTPS access to discord.com: "
            "check this machine's network connection."
        ) from None
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
