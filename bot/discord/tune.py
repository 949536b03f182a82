"""/tune: fine-tune a model on this server's feedback, follow it, and pass it through the gate.

    TuneCog(app.tunes, manager_role="Bot Manager")

`/tune start` runs the same job as `switchboard tune start` (`bot.service.tune`), always
on this server's log and counted against this server's one-job slot; the job runs in the
bot's process and a public message in the channel is edited as it goes (phase, step,
loss, time left), then names the candidate. `/tune status`, `/tune list`, `/tune cancel`,
`/tune promote` and `/tune rollback` are the CLI's commands for this server. Manage Server
(or the manager role) is needed for every one, and the command is shown to those people
alone by default.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.checks import permission_refusal
from bot.discord.respond import answering, fit_lines, send
from bot.present import export_summary_lines, tune_status_lines
from bot.service.tune import JobView, TuneRequest, TuneService
from core.errors import PermissionDenied, UserError
from core.messages import Author
from store.export import parse_when

log = logging.getLogger(__name__)

_EDIT_EVERY_S = 5.0  # progress edits at most this often: Discord rate-limits edits


class TuneCog(commands.Cog):
    """The /tune commands."""

    tune = app_commands.Group(
        name="tune",
        description="Fine-tune a model on this server's rated answers.",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(
        self,
        tunes: TuneService,
        *,
        manager_role: str | None = None,
        edit_every_s: float = _EDIT_EVERY_S,
    ) -> None:
        self.tunes = tunes
        self.manager_role = manager_role
        self.edit_every_s = edit_every_s
        self._followers: set[asyncio.Task[None]] = set()

    async def cog_unload(self) -> None:
        for task in list(self._followers):
            task.cancel()

    def _check(self, interaction: discord.Interaction, doing: str) -> Author:
        refusal = permission_refusal(
            interaction, doing=doing, needs="manage_guild", role=self.manager_role
        )
        if refusal is not None:
            raise PermissionDenied(refusal)
        return Author(interaction.user.id, interaction.user.name)

    async def _own(self, interaction: discord.Interaction, ref: str) -> JobView:
        """A job of this server (another server's is not found here)."""
        job = await self.tunes.job(ref)
        if job.guild_id != interaction.guild_id:
            raise UserError(f"No fine-tuning job {ref} in this server.")
        return job

    @tune.command(name="start", description="Fine-tune a model on this server's liked answers.")
    @app_commands.describe(
        base="The model to fine-tune (a local llama.cpp model, or an OpenAI one)",
        method="sft (supervised) or dpo (preferences)",
        name="The new model's name (default: BASE-tune-ID)",
        steps="Train this many steps (local models)",
        epochs="Or this many passes over the data",
        min_rating="Training targets need at least this net rating (default 1)",
        model="Only answers by this model",
        channel="Only this channel",
        since="Only answers from this ISO date on, e.g. 2024-05-01",
        until="Only answers before this ISO date",
        include_unrated="Also answers nobody rated",
    )
    async def start(
        self,
        interaction: discord.Interaction,
        base: str,
        method: Literal["sft", "dpo"] = "sft",
        name: str | None = None,
        steps: app_commands.Range[int, 1, 100_000] | None = None,
        epochs: app_commands.Range[float, 0.1, 100.0] | None = None,
        min_rating: app_commands.Range[int, 1, 1000] = 1,
        model: str | None = None,
        channel: discord.TextChannel | None = None,
        since: str | None = None,
        until: str | None = None,
        include_unrated: bool = False,
    ) -> None:
        async with answering(interaction, "starting a fine-tune", log):
            actor = self._check(interaction, "Fine-tuning models")
            request = TuneRequest(
                base=base,
                method=method,
                name=name,
                steps=steps,
                epochs=epochs,
                min_rating=min_rating,
                model=model,
                guild_id=interaction.guild_id,
                channel_id=channel.id if channel is not None else None,
                since=parse_when(since, "since") if since else None,
                until=parse_when(until, "until", end=True) if until else None,
                include_unrated=include_unrated,
            )
            await interaction.response.defer(ephemeral=True, thinking=True)
            job, summary = await self.tunes.start(request, actor)
            lines = [
                f"**Job {job.id[:8]}: fine-tuning `{job.base_model}` into `{job.name}`.**",
                *(line for line in export_summary_lines(summary) if not line.startswith("  ")),
            ]
            await send(interaction, fit_lines(lines), ephemeral=True)
            target = interaction.channel
            progress = (
                await target.send(
                    _progress_text(job), allowed_mentions=discord.AllowedMentions.none()
                )
                if isinstance(target, discord.abc.Messageable)
                else None
            )
            self._follow(job, progress)

    def _follow(self, job: JobView, message: discord.Message | None) -> None:
        """Run the job here, editing `message` as it goes (at most every `edit_every_s`)."""
        latest: list[JobView] = [job]

        def update(view: JobView) -> None:
            latest[0] = view

        runner = self.tunes.launch(job.id, update)

        async def edit() -> None:
            shown = _progress_text(job)
            while True:
                done = runner.done()
                if not done:
                    # A plain sleep, not an event: the edits are paced to Discord anyway.
                    await asyncio.sleep(self.edit_every_s)
                elif not runner.cancelled() and runner.exception() is None:
                    latest[0] = runner.result()
                text = _progress_text(latest[0])
                if message is not None and text != shown:
                    try:
                        await message.edit(content=text)
                        shown = text
                    except discord.HTTPException as exc:  # deleted, or Discord down: keep training
                        log.info("could not edit the fine-tuning progress message: %s", exc)
                if done:
                    return

        task = asyncio.create_task(edit(), name=f"tune-progress-{job.id}")
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    @tune.command(name="status", description="A fine-tuning job's phase, step, loss and time left.")
    @app_commands.describe(job="A job id (its first characters do) or the model's name")
    async def status(self, interaction: discord.Interaction, job: str | None = None) -> None:
        async with answering(interaction, "showing a fine-tuning job", log):
            self._check(interaction, "Fine-tuning models")
            view = (
                await self._own(interaction, job)
                if job
                else await self.tunes.latest(interaction.guild_id)
            )
            if view is None:
                raise UserError(
                    "No fine-tuning jobs in this server yet: start one with /tune start."
                )
            await send(interaction, fit_lines(tune_status_lines(view)), ephemeral=True)

    @tune.command(
        name="list", description="This server's fine-tuning jobs and the models they made."
    )
    async def list_jobs(self, interaction: discord.Interaction) -> None:
        async with answering(interaction, "listing fine-tuning jobs", log):
            self._check(interaction, "Fine-tuning models")
            jobs = await self.tunes.list(interaction.guild_id, limit=15)
            if not jobs:
                raise UserError(
                    "No fine-tuning jobs in this server yet: start one with /tune start."
                )
            lines = [
                f"`{j.id[:8]}` **{j.name}** ← {j.base_model} · {j.backend} {j.method} · "
                f"{j.status}"
                + (f" · loss {j.loss:.3f}" if j.loss is not None else "")
                + f" · {j.snapshot_rows} examples, sha256 {j.snapshot_sha256[:8]}"
                + (f" · model {j.model_name} ({j.gate})" if j.model_name else "")
                + f" · by {j.started_by}, {discord.utils.format_dt(j.created_at, 'R')}"
                for j in jobs
            ]
            await send(interaction, fit_lines(lines), ephemeral=True)

    @tune.command(name="cancel", description="Stop a queued or running fine-tuning job.")
    @app_commands.describe(job="The job's id (its first characters do)")
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        async with answering(interaction, "cancelling a fine-tuning job", log):
            actor = self._check(interaction, "Fine-tuning models")
            own = await self._own(interaction, job)
            await interaction.response.defer(ephemeral=True, thinking=True)
            view = await self.tunes.cancel(own.id, actor)
            await send(interaction, fit_lines(tune_status_lines(view)), ephemeral=True)

    @tune.command(name="promote", description="Let every member choose a candidate fine-tune.")
    @app_commands.describe(
        name="The candidate model's name", default="Also make it this server's default model"
    )
    async def promote(
        self, interaction: discord.Interaction, name: str, default: bool = False
    ) -> None:
        async with answering(interaction, "promoting a model", log):
            actor = self._check(interaction, "Promoting fine-tuned models")
            await self._own(interaction, name)
            change = await self.tunes.promote(
                name, actor, default_guild=interaction.guild_id if default else None
            )
            text = f"Promoted `{change.model}`: every member may choose it now."
            if change.default_guild is not None:
                text += " It is this server's default model now."
            await send(interaction, text, ephemeral=False)

    @tune.command(name="rollback", description="Make a promoted fine-tune a candidate again.")
    @app_commands.describe(name="The promoted model's name")
    async def rollback(self, interaction: discord.Interaction, name: str) -> None:
        async with answering(interaction, "rolling back a model", log):
            actor = self._check(interaction, "Promoting fine-tuned models")
            await self._own(interaction, name)
            change = await self.tunes.rollback(name, actor)
            text = f"Rolled back `{change.model}`: a candidate again (admins only)."
            for _server, model in change.restored:
                text += (
                    f" This server's default is `{model}` again."
                    if model
                    else " This server has no default model of its own again."
                )
            await send(interaction, text, ephemeral=False)


def _progress_text(job: JobView) -> str:
    """The public progress message: one line while it runs, the outcome when it ends."""
    if job.status == "succeeded":
        return (
            f"✅ Fine-tune **{job.name}** is ready: a candidate model. Admins can try it with "
            f"`/model set {job.name}`, then `/tune promote {job.name}`."
        )
    if job.status == "failed":
        return f"❌ Fine-tune **{job.name}** failed: {job.error or 'no reason given'}"
    if job.status == "cancelled":
        return f"⏹️ Fine-tune **{job.name}** was cancelled."
    step = f"step {job.step}/{job.total_steps}" if job.total_steps else f"step {job.step}"
    loss = f", loss {job.loss:.3f}" if job.loss is not None else ""
    left = f", about {int(job.eta_s)} s left" if job.eta_s else ""
    return (
        f"⏳ Fine-tuning **{job.base_model}** into **{job.name}**: {job.phase} ({step}{loss}{left})"
    )
