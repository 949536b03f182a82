"""Feedback on answers in Discord: buttons under every answer, 👍/👎 reactions, /feedback stats.

Every finished answer carries four buttons on its last part: 👍, 👎, ✏️ (suggest a better
answer) and 🔁 (another answer). They are `DynamicItem`s whose custom id holds the
answer id (`sb:up:<answer id>`), registered once in the bot's `setup_hook`, so the
buttons under an answer from before a restart still work. Every press is acknowledged
at once (a deferred ephemeral reply, or the modal itself) before the service is asked:
Discord gives an interaction three seconds.

- 👍 records the vote; 👎 records it and offers a "say what was wrong" button that opens
  a modal (a reason and free text) whose answer updates the vote.
- ✏️ opens a modal holding the answer's text; what the person makes of it is stored as a
  correction (a better answer to the same prompt).
- 🔁 offers a menu of models (the one that answered first), then streams another answer
  as a new reply to the person's question, rendered by the chat cog like any answer.
- A 👍 or 👎 reaction on any part of an answer counts as that vote (one per person per
  answer; taking the reaction away takes the vote back). Reactions from bots, and on
  messages that carry no answer we know, are ignored.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from datetime import timedelta
from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.charts import share_chart
from bot.discord.chat import ChatCog
from bot.discord.checks import author_of, limit_refusal, permission_refusal, place_of
from bot.discord.respond import answering, send
from bot.discord.settings_cog import EMBED_COLOUR, model_choices
from bot.present import REASON_WORDS, reasons_text, share_text, vote_line
from bot.service import ChatService
from bot.service.feedback import ModelFeedback
from core.errors import NotFound, PermissionDenied, UserError
from core.exchange import VOTE_REASONS
from core.messages import Author

log = logging.getLogger(__name__)

_ANSWER = r"(?P<answer>[0-9a-f]{32})"  # answer ids are uuid4 hex
# How long ✏️ may wait for the answer's text: the modal must be Discord's first response.
PREFILL_WAIT_S = 2.0
# Discord's limits: a text input holds 4,000 characters, a select 25 options, a message 10 embeds.
TEXT_INPUT_LIMIT = 4000
COMMENT_LIMIT = 1000
SELECT_LIMIT = 25
EMBED_LIMIT = 10
# A modal left open is dropped after this long (Discord never says it was closed).
MODAL_TIMEOUT_S = 30 * 60
CHART_NAME = "feedback.png"

_THUMBS = {"\N{THUMBS UP SIGN}": 1, "\N{THUMBS DOWN SIGN}": -1}
# Skin-tone variants of 👍 and 👎 are the same vote.
_SKIN_TONES = re.compile("[\U0001f3fb-\U0001f3ff]")

REASON_HINTS: dict[str, str] = {
    "wrong": "It got facts or reasoning wrong.",
    "unhelpful": "It did not help with what I asked.",
    "unsafe": "It was harmful or dangerous.",
    "off_topic": "It answered something else.",
    "too_long": "It could have been much shorter.",
    "refused": "It refused something it should have done.",
    "other": "Something else (say what below).",
}

# What each button looks like: its emoji, and the label of the one that has words.
_LOOKS: dict[str, tuple[str, str | None, discord.ButtonStyle]] = {
    "up": ("\N{THUMBS UP SIGN}", None, discord.ButtonStyle.secondary),
    "down": ("\N{THUMBS DOWN SIGN}", None, discord.ButtonStyle.secondary),
    "fix": ("\N{PENCIL}\N{VARIATION SELECTOR-16}", None, discord.ButtonStyle.secondary),
    "retry": (
        "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}",
        None,
        discord.ButtonStyle.secondary,
    ),
    "why": ("\N{MEMO}", "Say what was wrong", discord.ButtonStyle.primary),
}
ANSWER_ACTIONS = ("up", "down", "fix", "retry")


def thumb_value(emoji: discord.PartialEmoji | discord.Emoji | str) -> int | None:
    """+1 for a 👍 reaction, -1 for 👎 (any skin tone), None for anything else."""
    return _THUMBS.get(_SKIN_TONES.sub("", str(emoji)))


def _cog(interaction: discord.Interaction) -> FeedbackCog | None:
    get_cog = getattr(interaction.client, "get_cog", None)  # a commands.Bot has cogs
    cog = get_cog(FeedbackCog.__cog_name__) if get_cog is not None else None
    return cog if isinstance(cog, FeedbackCog) else None


async def _unavailable(interaction: discord.Interaction) -> None:
    await send(interaction, "⚠️ Feedback is not available right now.", ephemeral=True)


class AnswerButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"sb:(?P<action>up|down|fix|retry|why):{_ANSWER}",
):
    """One feedback button on one answer; the custom id says which, so it survives restarts."""

    def __init__(self, action: str, answer_id: str) -> None:
        emoji, label, style = _LOOKS[action]
        super().__init__(
            discord.ui.Button(
                style=style, emoji=emoji, label=label, custom_id=f"sb:{action}:{answer_id}"
            )
        )
        self.action = action
        self.answer_id = answer_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> AnswerButton:
        return cls(match["action"], match["answer"])

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _cog(interaction)
        if cog is None:
            await _unavailable(interaction)
            return
        await cog.pressed(interaction, self.action, self.answer_id)


class RetryMenu(
    discord.ui.DynamicItem[discord.ui.Select[discord.ui.View]],
    template=rf"sb:again:{_ANSWER}",
):
    """The menu of models that 🔁 offers; choosing one asks it for another answer."""

    def __init__(self, answer_id: str, options: list[discord.SelectOption]) -> None:
        super().__init__(
            discord.ui.Select(
                custom_id=f"sb:again:{answer_id}",
                placeholder="Which model should answer again?",
                options=options,
            )
        )
        self.answer_id = answer_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> RetryMenu:
        options = item.options if isinstance(item, discord.ui.Select) else []
        return cls(match["answer"], list(options))

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _cog(interaction)
        if cog is None:
            await _unavailable(interaction)
            return
        await cog.retry_chosen(interaction, self.answer_id, self.item.values[0])


# The classes the bot registers (`Client.add_dynamic_items`) so presses find them.
DYNAMIC_ITEMS = (AnswerButton, RetryMenu)


def answer_buttons(answer_id: str) -> discord.ui.View:
    """👍 👎 ✏️ 🔁 for the last part of a finished answer."""
    view = discord.ui.View(timeout=None)
    for action in ANSWER_ACTIONS:
        view.add_item(AnswerButton(action, answer_id))
    return view


class WhyModal(discord.ui.Modal):
    """Why a 👎: a reason from the list and, if the person likes, a few words."""

    def __init__(self, cog: FeedbackCog, answer_id: str) -> None:
        super().__init__(title="What was wrong with the answer?", timeout=MODAL_TIMEOUT_S)
        self.cog = cog
        self.answer_id = answer_id
        self.reason: discord.ui.Select[discord.ui.View] = discord.ui.Select(
            custom_id="reason",
            placeholder="Pick what fits best",
            required=False,
            options=[
                discord.SelectOption(
                    label=REASON_WORDS[reason], value=reason, description=REASON_HINTS[reason]
                )
                for reason in VOTE_REASONS
            ],
        )
        self.comment: discord.ui.TextInput[discord.ui.View] = discord.ui.TextInput(
            custom_id="comment",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=COMMENT_LIMIT,
            placeholder="What would the right answer have said? (optional)",
        )
        self.add_item(discord.ui.Label(text="Reason", component=self.reason))
        self.add_item(discord.ui.Label(text="Anything to add?", component=self.comment))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        reason = self.reason.values[0] if self.reason.values else None
        await self.cog.explained(interaction, self.answer_id, reason, self.comment.value)


class CorrectionModal(discord.ui.Modal):
    """The answer's text, for the person to turn into the answer they wanted."""

    def __init__(self, cog: FeedbackCog, answer_id: str, text: str) -> None:
        super().__init__(title="Suggest a better answer", timeout=MODAL_TIMEOUT_S)
        self.cog = cog
        self.answer_id = answer_id
        self.original = text[:TEXT_INPUT_LIMIT]
        cut = len(text) > TEXT_INPUT_LIMIT
        self.text: discord.ui.TextInput[discord.ui.View] = discord.ui.TextInput(
            custom_id="text",
            style=discord.TextStyle.paragraph,
            default=self.original,
            required=True,
            max_length=TEXT_INPUT_LIMIT,
        )
        description = (
            "The answer is cut to 4,000 characters to fit here."
            if cut
            else "Edit it into the answer you would have wanted."
        )
        self.add_item(
            discord.ui.Label(
                text="Your better answer", description=description, component=self.text
            )
        )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.cog.corrected(interaction, self.answer_id, self.text.value, self.original)


def model_embed(model: ModelFeedback) -> discord.Embed:
    """One model's feedback: answers, votes, share 👍 with its interval, reasons, corrections."""
    embed = discord.Embed(title=model.model, colour=EMBED_COLOUR)
    embed.add_field(name="Answers", value=f"{model.answers:,}")
    embed.add_field(name="Votes", value=f"👍 {model.up:,} · 👎 {model.down:,}")
    embed.add_field(name="Share 👍", value=share_text(model))
    embed.add_field(name="Top 👎 reasons", value=reasons_text(model.top_reasons()))
    embed.add_field(name="Better answers suggested", value=f"{model.corrections:,}")
    return embed


class FeedbackCog(commands.Cog):
    """Votes, corrections and retries on answers, and how the answers are rated here."""

    # Everyone sees it: channel stats are sums without names. Server scope is checked.
    feedback = app_commands.Group(
        name="feedback", description="How people rate the bot's answers here."
    )

    def __init__(
        self,
        bot: commands.Bot,
        service: ChatService,
        chat: ChatCog,
        *,
        manager_role: str | None = None,
    ) -> None:
        self.bot = bot
        self.service = service
        self.chat = chat
        self.manager_role = manager_role

    # ------------------------------------------------------------ buttons

    async def pressed(self, interaction: discord.Interaction, action: str, answer_id: str) -> None:
        """A feedback button on an answer was pressed."""
        if action == "fix":
            await self._offer_correction(interaction, answer_id)
        elif action == "why":
            await interaction.response.send_modal(WhyModal(self, answer_id))
        elif action == "retry":
            await self._offer_retry(interaction, answer_id)
        else:
            await self._vote(interaction, answer_id, 1 if action == "up" else -1)

    async def _vote(self, interaction: discord.Interaction, answer_id: str, value: int) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with answering(interaction, "recording a vote", log):
            outcome = await self.service.vote(
                answer_id, author_of(interaction.user), value, source="button"
            )
            line, view = vote_line(outcome), None
            if value < 0 and outcome.stored:
                view = discord.ui.View(timeout=None)
                view.add_item(AnswerButton("why", answer_id))
                line += " If you like, say what was wrong: it helps more than the 👎 alone."
            await send(interaction, line, view=view, ephemeral=True)

    async def explained(
        self, interaction: discord.Interaction, answer_id: str, reason: str | None, comment: str
    ) -> None:
        """The 👎 modal was submitted: its reason and words go on the person's vote."""
        comment = comment.strip()
        if reason is None and not comment:
            await send(interaction, "Nothing added; your 👎 stands.", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with answering(interaction, "recording why an answer was bad", log):
            outcome = await self.service.vote(
                answer_id,
                author_of(interaction.user),
                -1,
                source="button",
                reason=reason,
                comment=comment or None,
            )
            if not outcome.stored:
                await send(interaction, vote_line(outcome), ephemeral=True)
                return
            noted = f" (**{REASON_WORDS[reason]}**)" if reason else ""
            await send(interaction, f"Thanks, that helps{noted}.", ephemeral=True)

    async def _offer_correction(self, interaction: discord.Interaction, answer_id: str) -> None:
        async with answering(interaction, "opening a correction", log):
            try:
                text = await asyncio.wait_for(
                    self.service.answer_text(answer_id), timeout=PREFILL_WAIT_S
                )
            except TimeoutError:
                raise UserError(
                    "That answer is still being saved; press ✏️ again in a moment."
                ) from None
            await interaction.response.send_modal(CorrectionModal(self, answer_id, text))

    async def corrected(
        self, interaction: discord.Interaction, answer_id: str, text: str, original: str
    ) -> None:
        """The ✏️ modal was submitted: store the better answer."""
        if text.strip() == original.strip():
            await send(
                interaction,
                "That is the answer as it was, so nothing is saved. Press ✏️ again and change it "
                "into the answer you wanted.",
                ephemeral=True,
            )
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with answering(interaction, "storing a correction", log):
            await self.service.correct(answer_id, author_of(interaction.user), text)
            await send(
                interaction,
                "✏️ Thanks! Your better answer is saved beside the original, to learn from.",
                ephemeral=True,
            )

    # ------------------------------------------------------------ another answer

    def _model_options(self, answered_by: str | None) -> list[discord.SelectOption]:
        """The models to pick from: the one that answered first, then the others."""
        # An option's value holds 100 characters; a longer name cannot be offered whole.
        specs = sorted(
            (spec for spec in self.service.list_models() if len(spec.name) <= 100),
            key=lambda spec: spec.name != answered_by,
        )
        options = []
        for spec in specs[:SELECT_LIMIT]:
            about = "wrote this answer" if spec.name == answered_by else spec.description
            options.append(
                discord.SelectOption(
                    label=spec.name, value=spec.name, description=about[:100] or None
                )
            )
        return options

    async def _offer_retry(self, interaction: discord.Interaction, answer_id: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with answering(interaction, "offering another answer", log):
            origin = await self.service.answer_origin(answer_id)
            options = self._model_options(origin.model)
            if len(options) <= 1:  # nothing to choose from: ask again straight away
                refusal = self._refusal(interaction)
                if refusal is not None:
                    await send(interaction, f"⏳ {refusal}", ephemeral=True)
                    return
                await self._retry(interaction, answer_id, None)
                return
            view = discord.ui.View(timeout=None)
            view.add_item(RetryMenu(answer_id, options))
            await send(
                interaction, "🔁 Which model should answer again?", view=view, ephemeral=True
            )

    async def retry_chosen(
        self, interaction: discord.Interaction, answer_id: str, model: str
    ) -> None:
        """A model was picked from the 🔁 menu."""
        refusal = self._refusal(interaction)
        if refusal is not None:
            await interaction.response.edit_message(content=f"⏳ {refusal}", view=None)
            return
        await interaction.response.edit_message(
            content=f"🔁 Asking **{model}** for another answer…", view=None
        )
        async with answering(interaction, "answering again", log):
            await self._retry(interaction, answer_id, model)

    def _refusal(self, interaction: discord.Interaction) -> str | None:
        """Why the person may not have another answer now (it asks a model like a message)."""
        return limit_refusal(self.service, interaction)

    async def _retry(
        self, interaction: discord.Interaction, answer_id: str, model: str | None
    ) -> None:
        """Stream another answer as a reply to the question, and say where it is."""
        origin = await self.service.answer_origin(answer_id)
        channel = interaction.channel
        get_message = getattr(channel, "get_partial_message", None)
        if origin.prompt_discord_id is None or get_message is None:
            raise NotFound("I cannot find the question that answer answered any more.")
        question: discord.PartialMessage = get_message(origin.prompt_discord_id)
        chosen = None if model == origin.model else model  # its own model keeps its fallbacks
        author = author_of(interaction.user)
        shown = await self.chat.show(question, self.service.retry(answer_id, author, chosen))
        by = f" from **{model}**" if model else ""
        where = f": {shown[0].jump_url}" if shown else "."
        await interaction.edit_original_response(content=f"🔁 Another answer{by}{where}", view=None)

    # ------------------------------------------------------------ reactions

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """👍 or 👎 on an answer of ours is a vote."""
        await self._reacted(payload, added=True)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        """Taking the reaction away takes the vote back."""
        await self._reacted(payload, added=False)

    async def _reacted(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        value = thumb_value(payload.emoji)
        me = self.bot.user
        if value is None or me is None or payload.user_id == me.id:
            return
        if payload.message_author_id is not None and payload.message_author_id != me.id:
            return  # someone else's message (Discord says whose on additions)
        user: discord.abc.User | None = payload.member or self.bot.get_user(payload.user_id)
        if user is not None and user.bot:
            return
        voter = Author(payload.user_id, user.display_name if user else str(payload.user_id))
        try:
            if added:
                if user is None:  # a DM from someone not in the cache: ask for their name
                    voter = author_of(await self.bot.fetch_user(payload.user_id))
                await self.service.vote_on_discord_message(payload.message_id, voter, value)
            else:
                await self.service.vote_on_discord_message(
                    payload.message_id, voter, None, taking_back=value
                )
        except UserError as exc:
            # A reaction has nowhere to show a reply; the person can still use the buttons.
            log.info("reaction on message %s not counted: %s", payload.message_id, exc.message)
        except Exception:
            log.exception("counting a reaction on message %s failed", payload.message_id)

    # ------------------------------------------------------------ /feedback stats

    @feedback.command(name="stats")
    @app_commands.describe(
        scope="This channel (with its threads), or the whole server (needs Manage Channels).",
        model="Only this model's answers.",
        days="Only the last this many days (default: all time).",
    )
    async def stats(
        self,
        interaction: discord.Interaction,
        scope: Literal["channel", "server"] = "channel",
        model: str | None = None,
        days: app_commands.Range[int, 1, 3650] | None = None,
    ) -> None:
        """Show how people rated the answers here: per model, with a chart."""
        async with answering(interaction, "showing feedback stats", log):
            place = place_of(interaction.channel, interaction.guild_id)
            if scope == "server":
                if place.guild_id is None:
                    raise UserError(
                        "There is no server here: `server` only works in a server's channels."
                    )
                refusal = permission_refusal(
                    interaction,
                    doing="Feedback stats for the whole server",
                    needs="manage_channels",
                    role=self.manager_role,
                )
                if refusal is not None:
                    raise PermissionDenied(refusal)
            await interaction.response.defer(ephemeral=True, thinking=True)
            since = discord.utils.utcnow() - timedelta(days=days) if days else None
            stats = await self.service.feedback_stats(
                place.guild_id,
                None if scope == "server" else place.channel_id,
                model=model,
                since=since,
            )
            where = "this server" if scope == "server" else "this channel"
            when = f" in the last {days} day{'s' if days != 1 else ''}" if days else ""
            by = f" by **{model}**" if model else ""
            if not stats.models:
                await send(interaction, f"No answers{by} in {where}{when} yet.", ephemeral=True)
                return
            shown = stats.models[:EMBED_LIMIT]
            lines = [
                f"Feedback in {where}{when}{by}: {sum(m.answers for m in stats.models):,} answers, "
                f"{stats.votes:,} votes."
            ]
            if len(stats.models) > len(shown):
                rest = len(stats.models) - len(shown)
                lines.append(
                    f"The {len(shown)} most voted models are shown; {rest} more: pick one with `model`."
                )
            file = None
            if stats.votes:
                png = await asyncio.to_thread(share_chart, stats.models)
                file = discord.File(io.BytesIO(png), filename=CHART_NAME)
            else:
                lines.append("Nobody has voted yet: the 👍 and 👎 under each answer count.")
            await send(
                interaction,
                "\n".join(lines),
                embeds=[model_embed(m) for m in shown],
                file=file,
                ephemeral=True,
            )

    @stats.autocomplete("model")
    async def _model_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return model_choices(self.service, current)
