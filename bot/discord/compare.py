"""Comparing models in Discord: /compare side by side, /arena blind battles, /arena-pool.

- `/compare prompt [models]` asks 2-4 models the same question at once
  (`ChatService.compare`). The command is deferred at once; each model's answer is edited
  into the message as it finishes (one embed per model, in the order they finished:
  the reply shortened to fit, latency, time to first token, tokens, cost; a failure says
  why), and the finished message gets a "best" button per answer that has text.
- `/arena prompt` runs a blind battle (`ChatService.battle`): answers A and B without
  names, and the buttons A better / B better / tie / both bad, plus one that opens a
  modal for a verdict with a reason. The vote's reply, seen only by the voter, names the
  two models; a second vote, the daily cap and an invalid battle are said there too.
- `/arena-pool set|reset` (moderators) chooses the models battles here draw from.

The buttons are `DynamicItem`s whose custom ids hold what they vote on
(`sb:best:<comparison's prompt id>:<answer id>`, `sb:arena:<a|b|tie|bad|why>:<battle id>`),
registered in the bot's `setup_hook`, so they work on messages from before a restart.
Discord's limits are kept: 2,000 characters of content, 4,096 per embed description and
6,000 for all of a message's embeds together, shared fairly between the answers; a reply
that had to be shortened says so in its embed's footer.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.checks import author_of, ensure_can_change, limit_refusal, place_of, scope_for
from bot.discord.feedback import MODAL_TIMEOUT_S
from bot.discord.render import fair_shares, shorten
from bot.discord.respond import answering, send
from bot.discord.settings_cog import EMBED_COLOUR, MODERATORS, model_choices
from bot.present import (
    change_line,
    cost_text,
    duration_text,
    preference_line,
    split_models,
    verdict_line,
)
from bot.service import ChatService
from bot.service.compare import OUTCOMES, REASON_LIMIT, Battle, ModelAnswer
from core.errors import UserError, apology, report_unexpected
from core.messages import Source, Usage

log = logging.getLogger(__name__)

_ID = r"[0-9a-f]{32}"  # prompt, answer and battle ids are uuid4 hex

# Discord's limits on one message.
CONTENT_LIMIT = 2000
DESCRIPTION_LIMIT = 4096
EMBEDS_LIMIT = 6000
TITLE_LIMIT = 256
LABEL_LIMIT = 80
AUTOCOMPLETE_LIMIT = 25
CHOICE_LIMIT = 100
# Kept free below the limits: Discord may count a few characters differently from Python.
MARGIN = 100
# The footer a shortened reply gets is at most this long ("Shortened to fit: … shown.").
FOOTER_ROOM = 80
ERROR_SHOWN = 1000
SOURCES_SHOWN = 300
FAILED_COLOUR = discord.Colour.red()

# What the arena's buttons say, and their looks.
_ARENA_LOOKS: dict[str, tuple[str, str]] = {
    "a": ("\N{NEGATIVE SQUARED LATIN CAPITAL LETTER A}\N{VARIATION SELECTOR-16}", "A is better"),
    "b": ("\N{NEGATIVE SQUARED LATIN CAPITAL LETTER B}\N{VARIATION SELECTOR-16}", "B is better"),
    "tie": ("\N{HANDSHAKE}", "Tie"),
    "bad": ("\N{THUMBS DOWN SIGN}", "Both are bad"),
    "why": ("\N{MEMO}", "Vote with a reason"),
}
ARENA_ACTIONS = (*OUTCOMES, "why")


def _cog(interaction: discord.Interaction) -> CompareCog | None:
    get_cog = getattr(interaction.client, "get_cog", None)  # a commands.Bot has cogs
    cog = get_cog(CompareCog.__cog_name__) if get_cog is not None else None
    return cog if isinstance(cog, CompareCog) else None


async def _unavailable(interaction: discord.Interaction) -> None:
    await send(interaction, "⚠️ Voting is not available right now.", ephemeral=True)


class BestButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"sb:best:(?P<prompt>{_ID}):(?P<answer>{_ID})",
):
    """The "best" button of one answer of a comparison; its custom id says which."""

    def __init__(self, prompt_id: str, answer_id: str, model: str) -> None:
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                emoji="\N{TROPHY}",
                label=model[:LABEL_LIMIT],
                custom_id=f"sb:best:{prompt_id}:{answer_id}",
            )
        )
        self.prompt_id = prompt_id
        self.answer_id = answer_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> BestButton:
        label = item.label if isinstance(item, discord.ui.Button) else None
        return cls(match["prompt"], match["answer"], label or "best")

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _cog(interaction)
        if cog is None:
            await _unavailable(interaction)
            return
        await cog.best(interaction, self.prompt_id, self.answer_id)


class ArenaButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"sb:arena:(?P<action>a|b|tie|bad|why):(?P<battle>{_ID})",
):
    """One verdict button under a blind battle (or the one that asks for a reason)."""

    def __init__(self, action: str, battle_id: str) -> None:
        emoji, label = _ARENA_LOOKS[action]
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                emoji=emoji,
                label=label,
                custom_id=f"sb:arena:{action}:{battle_id}",
            )
        )
        self.action = action
        self.battle_id = battle_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> ArenaButton:
        return cls(match["action"], match["battle"])

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _cog(interaction)
        if cog is None:
            await _unavailable(interaction)
            return
        if self.action == "why":
            await interaction.response.send_modal(ReasonModal(cog, self.battle_id))
            return
        await cog.vote(interaction, self.battle_id, self.action)


# The classes the bot registers (`Client.add_dynamic_items`) so presses find them.
DYNAMIC_ITEMS = (BestButton, ArenaButton)


class ReasonModal(discord.ui.Modal):
    """A verdict on a battle, with a few words on why."""

    def __init__(self, cog: CompareCog, battle_id: str) -> None:
        super().__init__(title="Your verdict on this battle", timeout=MODAL_TIMEOUT_S)
        self.cog = cog
        self.battle_id = battle_id
        self.outcome: discord.ui.Select[discord.ui.View] = discord.ui.Select(
            custom_id="outcome",
            placeholder="Which answer was better?",
            required=True,
            options=[
                discord.SelectOption(label=_ARENA_LOOKS[o][1], value=o, emoji=_ARENA_LOOKS[o][0])
                for o in OUTCOMES
            ],
        )
        self.reason: discord.ui.TextInput[discord.ui.View] = discord.ui.TextInput(
            custom_id="reason",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=REASON_LIMIT,
            placeholder="What made the difference? (optional)",
        )
        self.add_item(discord.ui.Label(text="Verdict", component=self.outcome))
        self.add_item(discord.ui.Label(text="Why?", component=self.reason))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.cog.vote(
            interaction, self.battle_id, self.outcome.values[0], self.reason.value.strip() or None
        )


# ------------------------------------------------------------------ rendering


def tokens_text(usage: Usage | None) -> str:
    """ "12 in · 40 out", or "—" when not known."""
    if usage is None:
        return "—"
    return f"{usage.prompt_tokens:,} in · {usage.completion_tokens:,} out"


def _fill(embeds: Sequence[discord.Embed], texts: Sequence[str], room: int) -> None:
    """Give each embed its text as description, shortened so that all of them fit `room`
    characters together (beside what the embeds already hold); a shortened one says so."""
    room -= sum(len(embed) for embed in embeds) + FOOTER_ROOM * len(embeds)
    shares = fair_shares([len(t) for t in texts], room, DESCRIPTION_LIMIT - MARGIN)
    for embed, text, share in zip(embeds, texts, shares, strict=True):
        shown, cut = shorten(text, share)
        embed.description = shown
        if cut:
            embed.set_footer(
                text=f"Shortened to fit Discord: {len(shown):,} of {len(text):,} characters shown."
            )


def comparison_embeds(answers: Sequence[ModelAnswer]) -> list[discord.Embed]:
    """One embed per answer: the reply (or why there is none) and what it took."""
    embeds, texts = [], []
    for answer in answers:
        embed = discord.Embed(
            title=answer.model[:TITLE_LIMIT], colour=EMBED_COLOUR if answer.ok else FAILED_COLOUR
        )
        embed.add_field(name="Latency", value=duration_text(answer.latency_ms))
        embed.add_field(name="First token", value=duration_text(answer.ttft_ms))
        embed.add_field(name="Tokens", value=tokens_text(answer.usage))
        embed.add_field(name="Cost", value=cost_text(answer.cost_usd))
        text = answer.reply.strip()
        if answer.error:
            error, _ = shorten(f"⚠️ {answer.error}", ERROR_SHOWN)
            text = f"{text}\n\n{error}" if text else error
        texts.append(text or "(an empty answer)")
        embeds.append(embed)
    _fill(embeds, texts, EMBEDS_LIMIT - MARGIN)
    return embeds


def battle_embeds(battle: Battle) -> list[discord.Embed]:
    """Answer A and answer B, nothing that says which model wrote them."""
    embeds, texts = [], []
    for label, side in (("A", battle.a), ("B", battle.b)):
        embeds.append(
            discord.Embed(
                title=f"Answer {label}", colour=FAILED_COLOUR if side.error else EMBED_COLOUR
            )
        )
        text = side.reply.strip()
        if side.error:
            text = f"{text}\n\n⚠️ {side.error}" if text else f"⚠️ {side.error}"
        texts.append(text or "(an empty answer)")
    _fill(embeds, texts, EMBEDS_LIMIT - MARGIN)
    return embeds


def sources_line(sources: Sequence[Source]) -> str:
    """The passages every model was given, as small print ("" for none)."""
    if not sources:
        return ""
    names = " · ".join(
        f"{n}. {s.document}" + (f", {s.location}" if s.location else "")
        for n, s in enumerate(sources, 1)
    )
    return "-# Passages every model was given: " + shorten(names, SOURCES_SHOWN)[0]


def message_content(head: str, prompt: str, sources: Sequence[Source] = ()) -> str:
    """A message's text: what it is (`head`), the passages, then the question, quoted and
    shortened to fit Discord's 2,000 characters."""
    lines = [head]
    if line := sources_line(sources):
        lines.append(line)
    room = CONTENT_LIMIT - sum(len(line) + 1 for line in lines) - len(">>> ") - 40
    question, cut = shorten(prompt.strip(), room)
    if cut:
        lines.append("-# The question is shortened here.")
    lines.append(f">>> {question}")
    return "\n".join(lines)


COMPARING = "⚖️ **Side by side**: the same question and context, asked of each model at once."
BATTLING = "🥊 **Blind battle**: two models drawn at random answer the same question as A and B."


def best_buttons(prompt_id: str, answers: Sequence[ModelAnswer]) -> discord.ui.View | None:
    """A "best" button for each answer that has text, in the order shown."""
    view = discord.ui.View(timeout=None)
    for answer in answers:
        if answer.reply:
            view.add_item(BestButton(prompt_id, answer.answer_id, answer.model))
    return view if view.children else None


def arena_buttons(battle_id: str) -> discord.ui.View:
    """A better · B better · tie · both bad · vote with a reason."""
    view = discord.ui.View(timeout=None)
    for action in ARENA_ACTIONS:
        view.add_item(ArenaButton(action, battle_id))
    return view


def model_list_choices(service: ChatService, current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete for a comma-separated list of models: the last name is completed."""
    head, comma, last = current.rpartition(",")
    named = [name.strip() for name in head.split(",") if name.strip()] if comma else []
    taken = {name.casefold() for name in named}
    prefix = "".join(f"{name}, " for name in named)
    choices = []
    for choice in model_choices(service, last.strip()):
        value = prefix + str(choice.value)
        if choice.value.casefold() not in taken and len(value) <= CHOICE_LIMIT:
            choices.append(app_commands.Choice(name=value, value=value))
    return choices[:AUTOCOMPLETE_LIMIT]


class _LiveComparison:
    """A comparison's message, edited as each model finishes, then given its buttons."""

    def __init__(self, interaction: discord.Interaction, prompt: str) -> None:
        self.interaction = interaction
        self.prompt = prompt
        self.answers: list[ModelAnswer] = []  # in the order they finished
        self._editing = asyncio.Lock()  # one edit at a time, each showing all answers so far

    async def add(self, answer: ModelAnswer) -> None:
        self.answers.append(answer)
        async with self._editing:
            await self.interaction.edit_original_response(
                content=message_content(f"{COMPARING} ⏳ Waiting for the others…", self.prompt),
                embeds=comparison_embeds(self.answers),
            )

    async def finish(
        self, prompt_id: str, answers: Sequence[ModelAnswer], sources: Sequence[Source]
    ) -> None:
        order = {answer.answer_id: index for index, answer in enumerate(self.answers)}
        shown = sorted(answers, key=lambda answer: order.get(answer.answer_id, len(order)))
        view = best_buttons(prompt_id, shown)
        hint = (
            "Press 🏆 under the answer you find best (one pick per person; press another to change it)."
            if view is not None
            else "No model answered, so there is nothing to pick."
        )
        async with self._editing:
            await self.interaction.edit_original_response(
                content=message_content(f"{COMPARING}\n-# {hint}", self.prompt, sources),
                embeds=comparison_embeds(shown),
                view=view,
            )


class CompareCog(commands.Cog):
    """Side-by-side comparisons, blind battles and their arena pools."""

    # Moderators only by default (a server admin can show it to others); who may change
    # what is still checked on every use.
    arena_pool = app_commands.Group(
        name="arena-pool",
        description="Choose the models blind battles here draw from.",
        default_permissions=MODERATORS,
    )

    def __init__(self, service: ChatService, *, manager_role: str | None = None) -> None:
        self.service = service
        self.manager_role = manager_role

    # ------------------------------------------------------------ plumbing

    @asynccontextmanager
    async def _asking(
        self, interaction: discord.Interaction, what: str, prompt: str
    ) -> AsyncIterator[None]:
        """Errors in the command's own message, with the question, so nothing typed is lost."""
        try:
            yield
        except UserError as exc:
            await self._failed(interaction, f"⚠️ {exc.message}", prompt)
        except Exception as exc:
            await self._failed(interaction, apology(report_unexpected(log, exc, what)), prompt)

    async def _failed(self, interaction: discord.Interaction, line: str, prompt: str) -> None:
        room = CONTENT_LIMIT - len(line) - 60
        content = f"{line}\n-# Your question, to ask again:\n>>> {shorten(prompt.strip(), room)[0]}"
        try:
            if interaction.response.is_done():
                await interaction.edit_original_response(content=content, embeds=[], view=None)
            else:
                await send(interaction, content, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not tell %s that their command failed: %s", interaction.user, exc)

    async def _defer(self, interaction: discord.Interaction) -> int:
        """Answer Discord at once (a public "thinking…" message); the id the question is
        logged under: the message the answers will be shown in."""
        callback = await interaction.response.defer(thinking=True)
        message_id = callback.message_id if callback is not None else None
        return message_id or interaction.id

    # ------------------------------------------------------------ /compare

    @app_commands.command(name="compare")
    @app_commands.describe(
        prompt="The question every model answers.",
        models="2 to 4 model names, separated by commas (default: this channel's model "
        "and the configured comparison set).",
    )
    async def compare(
        self, interaction: discord.Interaction, prompt: str, models: str | None = None
    ) -> None:
        """Ask several models the same question at once and see their answers side by side."""
        async with self._asking(interaction, "comparing models", prompt):
            place = place_of(interaction.channel, interaction.guild_id)
            if refusal := limit_refusal(self.service, interaction):
                await self._failed(interaction, f"⏳ {refusal}", prompt)
                return
            message_id = await self._defer(interaction)
            live = _LiveComparison(interaction, prompt)
            comparison = await self.service.compare(
                place,
                author_of(interaction.user),
                prompt,
                split_models(models),
                discord_message_id=message_id,
                on_answer=live.add,
            )
            await live.finish(comparison.prompt_id, comparison.answers, comparison.sources)

    async def best(self, interaction: discord.Interaction, prompt_id: str, answer_id: str) -> None:
        """A "best" button was pressed: that answer is the person's pick."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with answering(interaction, "recording a preference", log):
            outcome = await self.service.prefer(prompt_id, answer_id, author_of(interaction.user))
            await send(interaction, preference_line(outcome), ephemeral=True)

    # ------------------------------------------------------------ /arena

    @app_commands.command(name="arena")
    @app_commands.describe(prompt="The question both anonymous models answer.")
    async def arena(self, interaction: discord.Interaction, prompt: str) -> None:
        """A blind battle: two anonymous models answer; vote for the better one to see who they were."""
        async with self._asking(interaction, "running a blind battle", prompt):
            place = place_of(interaction.channel, interaction.guild_id)
            if refusal := limit_refusal(self.service, interaction):
                await self._failed(interaction, f"⏳ {refusal}", prompt)
                return
            message_id = await self._defer(interaction)
            battle = await self.service.battle(
                place, author_of(interaction.user), prompt, discord_message_id=message_id
            )
            hint = (
                "Which is better? Vote below: after your vote you alone see which models they "
                "were. One vote per person."
            )
            await interaction.edit_original_response(
                content=message_content(f"{BATTLING}\n-# {hint}", prompt, battle.sources),
                embeds=battle_embeds(battle),
                view=arena_buttons(battle.id),
            )

    async def vote(
        self,
        interaction: discord.Interaction,
        battle_id: str,
        outcome: str,
        reason: str | None = None,
    ) -> None:
        """A verdict on a battle (a button, or the reason modal): the models are revealed."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with answering(interaction, "recording a battle vote", log):
            verdict = await self.service.battle_vote(
                battle_id, author_of(interaction.user), outcome, reason
            )
            await send(interaction, verdict_line(verdict), ephemeral=True)

    # ------------------------------------------------------------ /arena-pool

    @arena_pool.command(name="set")
    @app_commands.describe(
        models="At least two model names, separated by commas.",
        server="Set the server's pool instead of this channel's (needs Manage Server).",
    )
    async def pool_set(
        self, interaction: discord.Interaction, models: str, server: bool = False
    ) -> None:
        """Choose the models blind battles in this channel or thread draw from."""
        async with answering(interaction, "setting an arena pool", log):
            place = place_of(interaction.channel, interaction.guild_id)
            scope = scope_for(place, server)
            ensure_can_change(interaction, scope, self.manager_role)
            names = split_models(models)
            if names is None:
                raise UserError("Name at least two models, separated by commas: `main, solo`.")
            change = await self.service.set_arena_pool(
                place, scope, names, author_of(interaction.user)
            )
            await send(interaction, change_line(change), ephemeral=False)

    @arena_pool.command(name="reset")
    @app_commands.describe(server="Reset the server's pool instead of this channel's.")
    async def pool_reset(self, interaction: discord.Interaction, server: bool = False) -> None:
        """Go back to the inherited arena pool (the server's, the config's, or every model)."""
        async with answering(interaction, "resetting an arena pool", log):
            place = place_of(interaction.channel, interaction.guild_id)
            scope = scope_for(place, server)
            ensure_can_change(interaction, scope, self.manager_role)
            change = await self.service.set_arena_pool(
                place, scope, None, author_of(interaction.user)
            )
            await send(interaction, change_line(change), ephemeral=False)

    @compare.autocomplete("models")
    @pool_set.autocomplete("models")
    async def _model_lists(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return model_list_choices(self.service, current)
