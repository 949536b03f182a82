"""`switchboard tune`: fine-tune a model from the logged feedback, follow it, pass it through the gate.

    switchboard tune start --base smol --steps 30 --wait   # snapshot, train, register a candidate
    switchboard tune status [JOB] · tune list · tune cancel JOB
    switchboard tune eval NAME [--dataset FILE] [--judge MODEL]  # the candidate against its base
    switchboard tune promote NAME [--default --guild ID] · tune rollback NAME

A typer group that `bot.cli` mounts; the work is `bot.service.tune.TuneService`, built by
`bot.app.open_app`. Without `--wait`, `start` hands the job to a detached
`switchboard tune run JOB` process (its output in the job's folder) and prints the id.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import subprocess
import sys
from datetime import UTC
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bot.cli_common import load_settings, run_async
from bot.present import export_summary_lines, tune_status_lines
from core.messages import Author
from store.export import parse_when

tune_app = typer.Typer(
    help="Fine-tune a model on the logged feedback, and promote or roll back what it makes.",
    no_args_is_help=True,
)
_out = Console(soft_wrap=True, markup=False, highlight=False)
_err = Console(stderr=True, soft_wrap=True)
# The folder holding the `bot` package this process runs: a detached runner runs it too.
_CODE_ROOT = Path(__file__).resolve().parent.parent
RUNNER_LOG = "runner.log"


def cli_actor() -> Author:
    """Who a command-line change is recorded as: the operator's login."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Author(0, f"cli:{user}")


def _quiet_logs() -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )


@tune_app.command("start")
def start(
    base: Annotated[str, typer.Option(help="The model to fine-tune (a local llama.cpp model).")],
    method: Annotated[str, typer.Option(help="sft (supervised) or dpo (preferences).")] = "sft",
    name: Annotated[
        str | None, typer.Option(help="The new model's name (default: BASE-tune-ID).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Train this many optimizer steps.")] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Or this many passes over the data (default 3).")
    ] = None,
    min_rating: Annotated[
        int, typer.Option(help="Training targets need at least this net rating (likes - dislikes).")
    ] = 1,
    model: Annotated[str | None, typer.Option(help="Only answers by this model.")] = None,
    guild: Annotated[
        int | None, typer.Option(help="Only this server's log; the job counts against it.")
    ] = None,
    channel: Annotated[int | None, typer.Option(help="Only this channel id.")] = None,
    since: Annotated[str | None, typer.Option(help="Only answers from this ISO date on.")] = None,
    until: Annotated[str | None, typer.Option(help="Only answers before this ISO date.")] = None,
    include_unrated: Annotated[
        bool, typer.Option("--include-unrated", help="Also answers nobody rated.")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Stay with a progress bar; print the model's name.")
    ] = False,
) -> None:
    """Freeze a dataset snapshot from the log and fine-tune BASE on it; the result is a candidate."""
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> None:
        from bot.app import open_app
        from bot.service.tune import TuneRequest
        from core.errors import UserError

        if method not in ("sft", "dpo"):
            raise UserError(f"Unknown method '{method}': choose sft or dpo.")
        request = TuneRequest(
            base=base,
            method=method,  # type: ignore[arg-type]
            name=name,
            steps=steps,
            epochs=epochs,
            min_rating=min_rating,
            model=model,
            guild_id=guild,
            channel_id=channel,
            since=parse_when(since, "--since") if since else None,
            until=parse_when(until, "--until", end=True) if until else None,
            include_unrated=include_unrated,
        )
        async with open_app(settings, knowledge=False) as sb:
            with _err.status("Freezing the dataset snapshot…"):
                job, summary = await sb.tunes.start(request, cli_actor())
            for line in export_summary_lines(summary):
                _out.print(line)
            _out.print(f"Job {job.id}: fine-tuning {job.base_model} into {job.name}.")
            if not wait:
                folder = sb.tunes.jobs_dir / job.id
                _detach(job.id, folder / RUNNER_LOG)
                _out.print(
                    f"Running in the background; follow it with `switchboard tune status {job.id[:8]}`."
                )
                return
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=_err, transient=True) as bar:
                task = bar.add_task("starting", total=None, loss="")

                def show(view: object) -> None:
                    from bot.service.tune import JobView

                    assert isinstance(view, JobView)
                    bar.update(
                        task,
                        description=view.phase,
                        total=view.total_steps,
                        completed=view.step,
                        loss=f"loss {view.loss:.3f}" if view.loss is not None else "",
                    )

                final = await sb.tunes.run(job.id, on_update=show)
        for line in tune_status_lines(final):
            (_out if final.status == "succeeded" else _err).print(line)
        if final.status != "succeeded":
            raise typer.Exit(1)
        _out.print(
            f"New candidate model: {final.model_name} — try it with `/model set {final.model_name}`"
            f" (admins), then `switchboard tune promote {final.model_name}`."
        )
        _out.print(final.model_name or "")

    run_async(work, _err)


def _detach(job_id: str, log_path: Path) -> None:
    """Start `switchboard tune run JOB` in a session of its own, outliving this command."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_CODE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    with open(log_path, "ab") as log_file:
        subprocess.Popen(
            [sys.executable, "-m", "bot", "tune", "run", job_id],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


@tune_app.command("run", hidden=True)
def run_job(job: Annotated[str, typer.Argument(help="A queued job's id.")]) -> None:
    """Run a queued job to its end (what `tune start` without --wait starts in the background)."""
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> None:
        from bot.app import open_app

        async with open_app(settings, knowledge=False) as sb:
            final = await sb.tunes.run(job)
        for line in tune_status_lines(final):
            _out.print(line)

    run_async(work, _err)


@tune_app.command("status")
def status(
    job: Annotated[
        str | None, typer.Argument(help="A job id (its first characters do) or model name.")
    ] = None,
) -> None:
    """A job's phase, step, loss, elapsed and remaining time (default: the latest job)."""
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> None:
        from bot.app import open_app
        from core.errors import UserError

        async with open_app(settings, knowledge=False) as sb:
            await sb.tunes.recover()
            view = await sb.tunes.job(job) if job else await sb.tunes.latest()
        if view is None:
            raise UserError(
                "No fine-tuning jobs yet: start one with `switchboard tune start --base MODEL`."
            )
        for line in tune_status_lines(view):
            _out.print(line)

    run_async(work, _err)


@tune_app.command("list")
def list_jobs(
    guild: Annotated[int | None, typer.Option(help="Only this server's jobs.")] = None,
) -> None:
    """Jobs and the models they made, with their lineage."""
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> None:
        from bot.app import open_app

        async with open_app(settings, knowledge=False) as sb:
            jobs = await sb.tunes.list(guild)
        if not jobs:
            _out.print(
                "No fine-tuning jobs yet: start one with `switchboard tune start --base MODEL`."
            )
            return
        table = Table(title="Fine-tuning jobs")
        for column in (
            "job", "model", "status", "base", "backend", "snapshot", "rows", "steps", "loss",
            "started by", "when",
        ):  # fmt: skip
            table.add_column(column)
        for job in jobs:
            model = job.model_name or job.name
            state = job.gate if job.status == "succeeded" else job.status
            table.add_row(
                job.id[:8],
                escape(model),
                escape(f"{state}" + (f" ({job.phase})" if job.active else "")),
                escape(job.base_model),
                f"{job.backend} {job.method}",
                job.snapshot_sha256[:12],
                str(job.snapshot_rows),
                f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step),
                f"{job.loss:.4f}" if job.loss is not None else "",
                escape(job.started_by),
                f"{job.created_at.astimezone(UTC):%Y-%m-%d %H:%M}",
            )
        # Piped, the table keeps its full width rather than the 80 columns rich assumes.
        Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200).print(table)

    run_async(work, _err)


@tune_app.command("cancel")
def cancel(
    job: Annotated[str, typer.Argument(help="The job's id (its first characters do).")],
) -> None:
    """Stop a queued or running job; nothing of it is registered."""
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> None:
        from bot.app import open_app

        async with open_app(settings, knowledge=False) as sb:
            with _err.status("Stopping the job…"):
                view = await sb.tunes.cancel(job, cli_actor())
        for line in tune_status_lines(view):
            _out.print(line)

    run_async(work, _err)


@tune_app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="The candidate model's name.")],
    default: Annotated[
        bool, typer.Option("--default", help="Also make it the server's default (needs --guild).")
    ] = False,
    guild: Annotated[
        int | None, typer.Option(help="The server for --default (default: the job's server).")
    ] = None,
) -> None:
    """Make a candidate a normal model everyone may choose (and, with --default, the server's default)."""
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> None:
        from bot.app import open_app
        from core.errors import UserError

        async with open_app(settings, knowledge=False) as sb:
            where = guild
            if default and where is None:
                made = await sb.tunes.job(name)
                where = made.guild_id
                if where is None:
                    raise UserError(
                        "--default needs --guild ID: which server's default should it be?"
                    )
            change = await sb.tunes.promote(
                name, cli_actor(), default_guild=where if default else None
            )
        _out.print(f"Promoted {change.model}: every member may choose it now.")
        if change.default_guild is not None:
            _out.print(f"It is server {change.default_guild}'s default model now.")

    run_async(work, _err)


@tune_app.command("rollback")
def rollback(name: Annotated[str, typer.Argument(help="A promoted fine-tune.")]) -> None:
    """Undo a promotion: the model is a candidate again and server defaults it took are given back."""
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> None:
        from bot.app import open_app

        async with open_app(settings, knowledge=False) as sb:
            change = await sb.tunes.rollback(name, cli_actor())
        _out.print(f"Rolled back {change.model}: a candidate again (admins only).")
        for server, model in change.restored:
            _out.print(
                f"Server {server}'s default is {model} again."
                if model
                else f"Server {server} has no default model of its own again."
            )

    run_async(work, _err)


@tune_app.command("eval")
def eval_candidate(
    name: Annotated[str, typer.Argument(help="The fine-tune (the model a job made).")],
    dataset: Annotated[
        Path | None,
        typer.Option(help="A dataset file to evaluate on instead of the held-out questions."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="The report's folder (default: eval/ in the job's folder)."),
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="A model that judges which answer is better.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many logged prompts.")] = 100,
    concurrency: Annotated[int, typer.Option(help="Model calls at once.")] = 4,
) -> None:
    """Evaluate a fine-tune against its base on questions it was not trained on; an HTML report.

    The questions are its snapshot's held-out share (a tenth of the conversations, from
    20 examples on), with the liked answers as references; for a smaller job, the prompts
    logged in its server and channel after the snapshot was frozen. It runs `switchboard
    eval` with the two models (scores, judge preference with --judge, latency, cost).
    """
    settings = load_settings(_err)
    _quiet_logs()

    async def work() -> int:
        from bot.app import open_app
        from bot.cli_eval import LogFilters, run_eval
        from bot.service.evaluate import write_dataset
        from bot.service.tune import HOLD_OUT_FROM
        from core.errors import UserError

        async with open_app(settings, knowledge=False) as sb:
            job = await sb.tunes.job(name)
            folder = out or sb.tunes.jobs_dir / job.id / "eval"
            if job.model_name is None:
                raise UserError(f"Job {job.id[:8]} ({job.name}) made no model: it {job.status}.")
            held_out = (await sb.tunes.held_out(job.id))[1] if dataset is None else []
        models = [job.model_name, job.base_model]
        if held_out:
            dataset_file = folder / "held_out.jsonl"
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(write_dataset, dataset_file, held_out)
            _err.print(
                f"{len(held_out)} held-out examples of job {job.id[:8]}: {job.model_name} "
                f"against its base {job.base_model}.",
                markup=False,
                highlight=False,
            )
            return await run_eval(
                settings, dataset_file, models, folder, judge=judge, concurrency=concurrency
            )
        log = None
        if dataset is None:
            log = LogFilters(
                guild=job.guild_id,
                channel=job.filters_channel,
                since=job.created_at.isoformat(),
                limit=limit,
            )
        try:
            return await run_eval(
                settings, dataset, models, folder, judge=judge, log=log, concurrency=concurrency
            )
        except UserError as exc:
            if log is None or not str(exc).startswith("No logged prompts"):
                raise
            why = (
                f"{job.name} was trained on all {job.snapshot_rows} of its examples (a tenth is "
                f"held out from {HOLD_OUT_FROM} on)"
                if job.snapshot_rows < HOLD_OUT_FROM
                else f"{job.name} has no held-out examples left (its split held none out, or "
                "they went when the messages they came from were deleted)"
            )
            raise UserError(
                f"{why}, and no prompts were logged after its snapshot was frozen "
                f"({job.created_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC): try the candidate in a "
                "channel first, or pass --dataset FILE."
            ) from None

    raise typer.Exit(run_async(work, _err))
