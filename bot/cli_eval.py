"""`switchboard leaderboard` and `switchboard eval`: how models compare, from the log and offline.

`bot.cli` holds the commands' options (and handles SIGTERM and errors as every command
does); this module runs them through what `bot.app.open_app` builds and prints the
result: a rich table for people, one JSON object per model (`--json`) for programs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bot.charts import leaderboard_chart
from bot.eval_report import SCORE_WORDS, percent, write_report
from bot.present import (
    blended_price_text,
    dollars,
    latency_text,
    leaderboard_caption,
    rank_text,
    rating_text,
    record_text,
)
from bot.service.evaluate import (
    DEFAULT_CONCURRENCY,
    JUDGE_MODES,
    RESULTS_FILE,
    SCORES,
    EvalProgress,
    EvalResults,
    load_dataset,
    write_dataset,
)
from bot.service.leaderboard import Leaderboard, LeaderboardEntry, LeaderboardScope
from core.errors import UserError
from core.settings import Settings
from store.export import ExportOptions, parse_when


def leaderboard_scope(guild: int | None, channel: int | None) -> LeaderboardScope:
    """--channel: that channel (of --guild, if given); --guild alone: that server; neither: all."""
    if channel is not None:
        return "channel"
    return "server" if guild is not None else "global"


def entry_json(entry: LeaderboardEntry, board: Leaderboard) -> dict[str, Any]:
    """The JSON object `leaderboard --json` prints for one model."""
    rating = entry.rating

    def rounded(value: float | None, digits: int = 1) -> float | None:
        return round(value, digits) if value is not None else None

    return {
        "model": entry.model,
        "rank": entry.rank,
        "ranked": entry.rank is not None,
        "rating": rounded(rating.rating if rating else None),
        "rating_low": rounded(rating.low if rating else None),
        "rating_high": rounded(rating.high if rating else None),
        "battles": entry.battles,
        "wins": rating.wins if rating else 0,
        "losses": rating.losses if rating else 0,
        "ties": rating.ties if rating else 0,
        "up": entry.up,
        "down": entry.down,
        "share_up": rounded(entry.share_up, 4),
        "answers": entry.answers,
        "median_latency_ms": rounded(entry.median_latency_ms),
        "cost_per_1k_answers_usd": rounded(entry.cost_per_1k_answers, 6),
        "input_price_per_1m": entry.price.input if entry.price else None,
        "output_price_per_1m": entry.price.output if entry.price else None,
        "blended_price_per_1m": rounded(entry.price.blended, 6) if entry.price else None,
        "scope": board.scope,
        "guild_id": board.guild_id,
        "channel_id": board.channel_id,
        "min_battles": board.min_battles,
    }


def leaderboard_table(board: Leaderboard) -> Table:
    """The leaderboard as a table: the rated models best first, then those without battles."""
    table = Table(title="Leaderboard", caption=leaderboard_caption(board), caption_justify="left")
    for column, justify in (
        ("rank", "left"),
        ("model", "left"),
        ("rating (95%)", "right"),
        ("battles", "right"),
        ("W–L–T", "right"),
        ("👍", "right"),
        ("median latency", "right"),
        ("1,000 answers", "right"),
        ("price", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for entry in board.entries:
        share = (
            f"{100 * entry.share_up:.0f}% of {entry.votes}" if entry.share_up is not None else ""
        )
        table.add_row(
            escape(rank_text(entry)),
            escape(entry.model),
            rating_text(entry),
            f"{entry.battles:,}" if entry.rating else "",
            record_text(entry),
            share,
            latency_text(entry.median_latency_ms),
            dollars(entry.cost_per_1k_answers),
            blended_price_text(entry),
        )
    return table


async def run_leaderboard(
    settings: Settings,
    *,
    guild: int | None,
    channel: int | None,
    chart: Path | None,
    json_mode: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Print the leaderboard (and write its chart); the exit code."""
    from bot.app import open_app

    err = Console(stderr=True, soft_wrap=True)
    scope = leaderboard_scope(guild, channel)
    async with open_app(settings, knowledge=False) as sb:
        fitting = err.status("Fitting the ratings…") if not json_mode and err.is_terminal else None
        if fitting is not None:
            fitting.start()
        try:
            board = await sb.service.leaderboard(scope, guild_id=guild, channel_id=channel)
        finally:
            if fitting is not None:
                fitting.stop()
    if json_mode:
        for entry in board.entries:
            out.write(json.dumps(entry_json(entry, board), ensure_ascii=False) + "\n")
        out.flush()
    elif board.entries:
        Console(file=out, soft_wrap=False).print(leaderboard_table(board))
    else:
        out.write(
            "No battles and no answers here yet: battles come from /arena, in Discord or in "
            "`switchboard chat`.\n"
        )
    if chart is not None:
        try:
            image = await asyncio.to_thread(leaderboard_chart, board)
        except ValueError:
            raise UserError(
                f"Nothing to chart yet (no battles and no votes here), so {chart} was not written."
            ) from None
        try:
            await asyncio.to_thread(chart.write_bytes, image)
        except OSError as exc:
            raise UserError(f"Cannot write the chart to {chart}: {exc.strerror or exc}.") from None
        err.print(f"Chart written to {chart}.", markup=False, highlight=False)
    return 0


# ------------------------------------------------------------------------------ eval


LOGGED_DATASET = "dataset.jsonl"  # --from-log: the prompts taken, beside the results


@dataclass(frozen=True, slots=True)
class LogFilters:
    """--from-log and the export's filters that go with it."""

    guild: int | None = None
    channel: int | None = None
    model: str | None = None
    since: str | None = None
    until: str | None = None
    limit: int = 100
    redact: bool = True

    def options(self) -> ExportOptions:
        """The export's options for these filters (the format only picks its query order)."""
        return ExportOptions(
            "sft",
            model=self.model,
            guild_id=self.guild,
            channel_id=self.channel,
            since=parse_when(self.since, "--since") if self.since else None,
            until=parse_when(self.until, "--until", end=True) if self.until else None,
            redact=self.redact,
        )


def split_models(models: str) -> list[str]:
    """ "a, b,c" → ["a", "b", "c"]."""
    return [name.strip() for name in models.split(",") if name.strip()]


def eval_summary_table(results: EvalResults) -> Table:
    """One row per model: answered, failed, each score that applies, speed, tokens, cost."""
    shown = [n for n in SCORES if any(s.scores.get(n) is not None for s in results.summaries)]
    table = Table(title=f"Evaluation: {len(results.examples):,} rows")
    table.add_column("model")
    for column in ("answered", "failed", *[SCORE_WORDS[n] for n in shown]):
        table.add_column(column, justify="right")
    for column in ("median latency", "tokens in / out", "cost", "per 1,000 answers"):
        table.add_column(column, justify="right")
    for s in results.summaries:
        table.add_row(
            escape(s.model),
            f"{s.answered:,}",
            f"[red]{s.failed:,}[/red]" if s.failed else "0",
            *[percent(s.scores.get(n)) for n in shown],
            latency_text(s.median_latency_ms),
            f"{s.prompt_tokens:,} / {s.completion_tokens:,}",
            dollars(s.cost_usd) if s.cost_known else "",
            dollars(s.cost_per_1k_answers),
        )
    return table


async def run_eval(
    settings: Settings,
    dataset: Path | None,
    models: list[str],
    folder: Path,
    *,
    judge: str | None = None,
    judge_mode: str = "pairwise",
    system: str | None = None,
    regex: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry_failed: bool = False,
    log: LogFilters | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run (or resume) an evaluation into `folder`, write its report, print the summary.

    With `log`, the prompts come from the log (written to `folder/dataset.jsonl` too, so
    the same rows can be run again as a file)."""
    from bot.app import open_app

    err = Console(stderr=True, soft_wrap=True)
    if dataset is None and log is None:
        raise UserError(
            "Give the dataset to evaluate on (switchboard eval DATASET.jsonl ...), "
            "or --from-log to take the prompts from the log."
        )
    if dataset is not None and log is not None:
        raise UserError("Give a dataset or --from-log, not both.")
    if judge_mode not in JUDGE_MODES:
        raise UserError(f"--judge-mode is {' or '.join(JUDGE_MODES)}, not {judge_mode!r}.")
    options = log.options() if log is not None else None
    examples = await asyncio.to_thread(load_dataset, dataset) if dataset is not None else []
    bar = Progress(
        TextColumn("[bold]Evaluating[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("eval", total=None, failed="")

    def show(progress: EvalProgress) -> None:
        failed = f"[red]{progress.failed} failed[/red]" if progress.failed else ""
        bar.update(task, total=progress.total, completed=progress.done, failed=failed)

    recorded = folder / RESULTS_FILE
    async with open_app(settings, knowledge=False) as sb:
        if log is not None and options is not None:
            examples, logged = await sb.evaluator.from_log(options, log.limit)
            taken = folder / LOGGED_DATASET
            try:
                await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
                await asyncio.to_thread(write_dataset, taken, examples)
            except OSError as exc:
                raise UserError(f"Cannot write {taken}: {exc.strerror or exc}.") from None
            newest = f"the newest {len(examples):,} of {logged.found:,}"
            err.print(
                f"{len(examples):,} prompt{'s' if len(examples) != 1 else ''} from the log ("
                + (newest if logged.found > len(examples) else "all that match")
                + (f"; {logged.left_out:,} left out for privacy" if logged.left_out else "")
                + f"), written to {taken}.",
                markup=False,
                highlight=False,
            )
        try:
            with bar:
                results = await sb.evaluator.run(
                    examples,
                    models,
                    folder,
                    judge=judge,
                    judge_mode=judge_mode,
                    system_prompt=system,
                    default_regex=regex,
                    concurrency=concurrency,
                    retry_failed=retry_failed,
                    on_progress=show,
                )
        except asyncio.CancelledError:
            err.print(
                f"Stopped. What finished is kept in {recorded}: run the same command again "
                "to go on from there.",
                markup=False,
                highlight=False,
            )
            raise
    try:
        files = await asyncio.to_thread(write_report, results, folder)
    except OSError as exc:
        raise UserError(f"Cannot write the report into {folder}: {exc.strerror or exc}.") from None
    console = Console(file=out, soft_wrap=False)
    console.print(eval_summary_table(results))
    failed = sum(s.failed for s in results.summaries)
    if failed:
        console.print(
            f"{failed:,} calls failed: their errors are in the report. Run again with "
            "--retry-failed to ask them again.",
            style="yellow",
            markup=False,
        )
    console.print(f"Report: {files.html}", markup=False, highlight=False)
    console.print(
        f"Per row: {files.examples_csv}, {files.examples_jsonl}; summary: {files.summary_json}, "
        f"{files.summary_csv}; charts: {', '.join(str(c) for c in files.charts)}",
        markup=False,
        highlight=False,
    )
    return 0
