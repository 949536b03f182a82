"""The chat cog: answers mentions, DMs, replies to its answers and threads it takes part in."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import aiohttp
import discord
from discord.ext import commands

from bot.discord.checks import author_of, place_of
from bot.discord.render import StreamingReply, footer_lines
from bot.service import ChatService
from bot.service.limits import Admission
from core.errors import UserError, apology, report_unexpected
from core.messages import (
    ChatEvent,
    ChatRequest,
    ChatResult,
    FallbackUsed,
    ReplyDelta,
    ReplyFinished,
    ReplyStarted,
)

log = logging.getLogger(__name__)

# Model output must never ping anyone; the reply may notify the person it answers.
ANSWER_MENTIONS = discord.AllowedMentions(
    everyone=False, users=False, roles=False, replied_user=True
)
QUIET_MENTIONS = discord.AllowedMentions.none()
# Message types a person writes (others are joins, pins, thread notices...).
_CHAT_TYPES = (discord.MessageType.default, discord.MessageType.reply)
# How long a shutdown waits for answers being written before cutting them off.
SHUTDOWN_GRACE_S = 10.0

EMPTY_ANSWER = "_(The model returned an empty answer.)_"


# What a reply answers: the person's message (a partial one when only its id is known,
# as for another try at an answer).
Trigger = discord.Message | discord.PartialMessage
# The buttons under a finished answer, given its id (bot/discord/feedback.py).
ButtonsFor = Callable[[str], discord.ui.View]


class _ChannelSink:
    """Posts a reply's parts: the first answers the person's message, the rest follow it."""

    def __init__(self, trigger: Trigger) -> None:
        self.trigger = trigger
        # Shown under the finished answer's last part; set once the answer is known to be good.
        self.view: discord.ui.View | None = None

    def _extra(self, last: bool) -> dict[str, Any]:
        return {"view": self.view} if last and self.view is not None else {}

    async def send(
        self, content: str, after: discord.Message | None, *, last: bool = False
    ) -> discord.Message:
        """Post a part: the first as a reply to the person, later ones as replies to the part before."""
        if after is None:
            reference = self.trigger.to_reference(fail_if_not_exists=False)
            return await self.trigger.channel.send(
                content, reference=reference, allowed_mentions=ANSWER_MENTIONS, **self._extra(last)
            )
        return await after.reply(
            content, mention_author=False, allowed_mentions=QUIET_MENTIONS, **self._extra(last)
        )

    async def edit(self, message: discord.Message, content: str, *, last: bool = False) -> None:
        """Replace a part's content; model text never pings anyone."""
        await message.edit(content=content, allowed_mentions=QUIET_MENTIONS, **self._extra(last))


class _Typing:
    """The typing indicator, shown until the first words of the answer arrive."""

    def __init__(self, channel: discord.abc.Messageable) -> None:
        self._context = channel.typing()
        self._on = False

    async def start(self) -> None:
        """Show it; a channel that refuses it is no reason to stay silent."""
        try:
            await self._context.__aenter__()
            self._on = True
        except discord.HTTPException:
            log.debug("could not show the typing indicator", exc_info=True)

    async def stop(self) -> None:
        """Stop it (safe to call more than once)."""
        if self._on:
            self._on = False
            await self._context.__aexit__(None, None, None)


class ChatCog(commands.Cog):
    """Turns messages addressed to the bot into chat requests and streams the answers back."""

    def __init__(
        self,
        bot: commands.Bot,
        service: ChatService,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        buttons: ButtonsFor | None = None,
    ) -> None:
        self.bot = bot
        self.service = service
        self.clock = clock
        self.sleep = sleep
        self.buttons = buttons
        self._answering: set[asyncio.Task[Any]] = set()

    async def cog_unload(self) -> None:
        """Let answers being written finish (briefly) before the connection closes."""
        pending = [task for task in self._answering if not task.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_S)
            for task in late:
                task.cancel()

    # -------------------------------------------------------------- deciding

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """Answer the messages addressed to the bot."""
        if message.author.bot or message.type not in _CHAT_TYPES or self.bot.user is None:
            return
        if not await self._addressed(message):
            return
        request = self.request_for(message)
        admission = self.service.admit(request)
        if not admission.allowed:
            if admission.notify:
                await self._tell_over_the_limit(message, admission)
            return
        await self.answer(message, request)

    async def _tell_over_the_limit(self, message: discord.Message, admission: Admission) -> None:
        """Say once per window that the author's further messages are skipped for a while."""
        notice = (
            f"⏳ You are sending me messages faster than I answer them ({admission.per_minute} a minute). "
            f"I will skip the ones you send in the next {math.ceil(admission.retry_after)} s."
        )
        try:
            await message.reply(notice, mention_author=False, allowed_mentions=QUIET_MENTIONS)
        except discord.HTTPException:
            log.debug("could not tell %s about the message limit", message.author.id, exc_info=True)

    async def _addressed(self, message: discord.Message) -> bool:
        """Whether the message is for the bot: a DM, a mention, a reply to it, or a thread it is in."""
        me = self.bot.user
        assert me is not None
        if message.guild is None:
            return True
        if any(user.id == me.id for user in message.mentions):
            return True
        own_role = message.guild.self_role  # people often pick the bot's role from the @ menu
        if own_role is not None and own_role in message.role_mentions:
            return True
        reference = message.reference
        if reference is not None and reference.message_id is not None:
            resolved = reference.resolved
            if isinstance(resolved, discord.Message) and resolved.author.id == me.id:
                return True
            if await self.service.is_conversation_message(reference.message_id):
                return True
        if isinstance(message.channel, discord.Thread):
            if message.mentions:
                return False  # it names someone else: it is for them, not for the bot
            # The service knows (across restarts) whether it converses here, or the thread
            # grew out of one of its answers (such a thread has the answer's id).
            return await self.service.has_conversation(message.channel.id)
        return False

    def request_for(self, message: discord.Message) -> ChatRequest:
        """The chat request a Discord message makes."""
        reference = message.reference
        reply_to = None
        if (
            reference is not None
            and reference.message_id is not None
            and reference.channel_id == message.channel.id
        ):
            reply_to = reference.message_id
        return ChatRequest(
            place=place_of(message.channel, message.guild.id if message.guild else None),
            author=author_of(message.author),
            text=prompt_text(message, self.bot.user),
            discord_message_id=message.id,
            reply_to_discord_id=reply_to,
            # The message's own time (as discord.py's command cooldowns use), not the clock's.
            sent_at=message.created_at.timestamp(),
        )

    # -------------------------------------------------------------- answering

    async def answer(self, message: discord.Message, request: ChatRequest) -> None:
        """Stream the service's answer to `message` into one or more reply messages."""
        await self.show(message, self.service.stream(request))

    async def show(
        self, message: Trigger, events: AsyncIterator[ChatEvent]
    ) -> list[discord.Message]:
        """Stream a reply (`ChatService.stream` or `retry` events) as replies to `message`.

        The finished answer gets the feedback buttons on its last part, and its messages
        are linked to it so that replies continue it. Returns the messages shown.
        """
        task = asyncio.current_task()
        if task is not None:
            self._answering.add(task)
        try:
            return await self._show(message, events)
        finally:
            if task is not None:
                self._answering.discard(task)

    async def _show(
        self, message: Trigger, events: AsyncIterator[ChatEvent]
    ) -> list[discord.Message]:
        sink = _ChannelSink(message)
        reply: StreamingReply[discord.Message] = StreamingReply(
            sink, clock=self.clock, sleep=self.sleep, passing=discord_hiccup
        )
        typing = _Typing(message.channel)
        text = ""
        started: ReplyStarted | None = None
        fallbacks: list[FallbackUsed] = []
        result: ChatResult | None = None
        try:
            await typing.start()
            # aclosing: if Discord fails mid-answer, the model's stream is closed right away.
            async with aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, ReplyStarted):
                        started = event
                    elif isinstance(event, ReplyDelta):
                        await typing.stop()
                        text += event.text
                        await reply.update(text)
                    elif isinstance(event, FallbackUsed):
                        fallbacks.append(event)
                    elif isinstance(event, ReplyFinished):
                        result = event.result
            await typing.stop()
            if result is None:
                raise RuntimeError("the chat service ended the stream without a result")
            footer = footer_lines(
                model=result.model, fallbacks=fallbacks, sources=result.sources, error=result.error
            )
            if not text and not footer:
                text = EMPTY_ANSWER
            # An answer that was not stored (an opted-out person, a place that logs
            # nothing) has nothing to vote on, correct or retry: no buttons.
            if (
                self.buttons is not None
                and result.error is None
                and result.message_id
                and result.stored
            ):
                sink.view = self.buttons(result.message_id)  # shown by the final write
            messages = await reply.finish(text, footer)
        except UserError as exc:
            await typing.stop()
            sink.view = None  # a problem shown instead of an answer: nothing to rate
            messages = await self._show_problem(message, reply, text, f"⚠️ {exc.message}")
        except discord.Forbidden:
            await typing.stop()
            log.warning("no permission to answer in channel %s", message.channel.id)
            return []
        except discord.NotFound:
            # Someone deleted the answer (or its channel) while it was being written: they
            # do not want it. The model's stream is closed and the exchange logged as stopped.
            await typing.stop()
            log.info(
                "the answer to message %s was deleted while being written; stopped", message.id
            )
            return []
        except Exception as exc:
            await typing.stop()
            error_id = report_unexpected(log, exc, f"answering message {message.id}")
            sink.view = None
            messages = await self._show_problem(message, reply, text, apology(error_id))
        if started is not None and messages:
            await self.service.link_discord_messages(
                started.message_id, started.conversation_id, [m.id for m in messages]
            )
        return messages

    async def _show_problem(
        self,
        message: Trigger,
        reply: StreamingReply[discord.Message],
        text: str,
        problem: str,
    ) -> list[discord.Message]:
        """Tell the person what went wrong: under the partial answer, or as the reply itself."""
        try:
            return await reply.finish(text, problem)
        except discord.HTTPException:
            log.warning(
                "could not show a problem to the user in channel %s",
                message.channel.id,
                exc_info=True,
            )
            return list(reply.messages)


def discord_hiccup(exc: Exception) -> bool:
    """Whether Discord failed for now rather than for good: a 5xx, a long rate limit, a dropped connection.

    discord.py has already retried these before raising, so the answer skips this edit and
    shows the text with a later one instead of giving up.
    """
    if isinstance(exc, discord.HTTPException):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, discord.RateLimited | OSError | aiohttp.ClientError)


def prompt_text(message: discord.Message, me: discord.abc.User | None) -> str:
    """The message's text as the model should read it: without the bot's mention, names for ids."""
    content = message.content
    if me is not None:
        content = re.sub(rf"<@!?{me.id}>", "", content)
    own_role = message.guild.self_role if message.guild is not None else None
    if own_role is not None:
        content = content.replace(own_role.mention, "")
    for user in message.mentions:
        content = re.sub(rf"<@!?{user.id}>", f"@{user.display_name}", content)
    for role in message.role_mentions:
        content = content.replace(role.mention, f"@{role.name}")
    for channel in message.channel_mentions:
        content = content.replace(channel.mention, f"#{channel.name}")
    return content.strip()
