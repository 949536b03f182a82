"""`switchboard export`: the log as a fine-tuning dataset, with a progress bar and a summary.

A typer command that `bot.cli` mounts; the export itself is `store.export`, built by
`bot.app.open_app` like everything else.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bot.cli_common import load_settings, run_async
from bot.present import export_summary_lines
from store.export import FORMATS, ExportOptions, parse_format, parse_when

_out = Console(soft_wrap=True, markup=False, highlight=False)
_err = Console(stderr=True, soft_wrap=True)


def default_output(fmt: str) -> Path:
    """Where an export goes when --output is not given: the current folder, named by format and time."""
    return Path(f"switchboard-{fmt}-{datetime.now(UTC):%Y%m%d-%H%M%S}.jsonl")


def export(
    format: Annotated[
        str,
        typer.Option(
            "--format", "-f", help=f"The dataset format: {', '.join(FORMATS)}.", show_default=False
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The file to write (a folder: a file named by format and time in it). "
            "With --split, NAME.train.jsonl and NAME.validation.jsonl. The manifest goes beside it.",
        ),
    ] = None,
    min_rating: Annotated[
        int,
        typer.Option(
            help="Training targets need at least this net rating (likes minus dislikes); "
            "corrections always count, disliked answers never."
        ),
    ] = 1,
    model: Annotated[
        str | None, typer.Option(help="Only answers by this model (and corrections of them).")
    ] = None,
    guild: Annotated[int | None, typer.Option(help="Only this server (guild) id.")] = None,
    channel: Annotated[
        int | None, typer.Option(help="Only this channel id (a thread counts as its channel).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only answers from this ISO date or time on (UTC).")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Only answers before this ISO time; a date keeps that whole day."),
    ] = None,
    include_unrated: Annotated[
        bool,
        typer.Option(
            "--include-unrated",
            help="Also answers nobody rated (as targets; in pairs, as the rejected side).",
        ),
    ] = False,
    with_context: Annotated[
        bool,
        typer.Option(
            "--with-context",
            help="Keep the knowledge-base passages as they were sent (default: the person's own text).",
        ),
    ] = False,
    split: Annotated[
        float | None,
        typer.Option(
            help="Write train and validation files: this share of the conversations for training (e.g. 0.9)."
        ),
    ] = None,
    redact: Annotated[
        bool,
        typer.Option(
            "--redact/--no-redact",
            help="Replace personal data (e-mails, phones, mentions, ids, keys, members' names) "
            "with placeholders; examples where any is left are left out.",
        ),
    ] = True,
) -> None:
    """Export logged conversations and feedback as a fine-tuning dataset (OpenAI or TRL)."""
    settings = load_settings(_err)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )

    async def work() -> None:
        from bot.app import open_app

        fmt = parse_format(format)
        options = ExportOptions(
            format=fmt,
            min_rating=min_rating,
            model=model,
            guild_id=guild,
            channel_id=channel,
            since=parse_when(since, "--since") if since else None,
            until=parse_when(until, "--until", end=True) if until else None,
            include_unrated=include_unrated,
            with_context=with_context,
            split=split,
            redact=redact,
        )
        out = output or default_output(fmt)
        if out.is_dir():
            out = out / default_output(fmt)
        async with open_app(settings, knowledge=False) as sb:
            columns = (
                TextColumn("Exporting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("answers"),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=_err, transient=True) as bar:
                task = bar.add_task("export", total=None)

                def show(done: int, total: int) -> None:
                    bar.update(task, total=total, completed=done)

                summary = await sb.exporter.run(options, out, progress=show)
        for line in export_summary_lines(summary):
            _out.print(line)
        for warning in summary.warnings:
            _err.print(f"Warning: {warning}", style="yellow", markup=False, highlight=False)

    run_async(work, _err)
