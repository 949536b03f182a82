"""`switchboard compare "PROMPT" --models a,b,c`: several models answer one prompt side by side.

`bot.cli` holds the command's options (and handles SIGTERM and errors as every command
does); this module runs the comparison through the service that `bot.app.open_app`
builds, as `/compare` in Discord does, and prints it: a table for people, or one JSON
object per model (`--json`) for programs.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bot.service.compare import Comparison, ModelAnswer
from bot.terminal import user_id_for
from core.messages import Author, Place
from core.settings import Settings


def answer_json(answer: ModelAnswer, comparison: Comparison) -> dict[str, Any]:
    """The JSON object `compare --json` prints for one model."""
    usage = answer.usage
    return {
        "model": answer.model,
        "reply": answer.reply if answer.ok or answer.reply else None,
        "latency_ms": round(answer.latency_ms, 1) if answer.latency_ms is not None else None,
        "ttft_ms": round(answer.ttft_ms, 1) if answer.ttft_ms is not None else None,
        "usage": (
            {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            }
            if usage
            else None
        ),
        "cost_usd": answer.cost_usd,
        "error": answer.error,
        "answer_id": answer.answer_id,
        "prompt_id": comparison.prompt_id,
    }


def comparison_table(comparison: Comparison) -> Table:
    """The comparison as a table: one row per model, in the order named."""
    table = Table(title="Side by side", show_lines=True)
    for column, justify in (
        ("model", "left"),
        ("reply", "left"),
        ("latency", "right"),
        ("first token", "right"),
        ("tokens", "right"),
        ("cost", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for answer in comparison.answers:
        reply = escape(answer.reply)
        if answer.error:
            reply += ("\n" if reply else "") + f"[red]{escape(answer.error)}[/red]"
        table.add_row(
            escape(answer.model),
            reply,
            f"{answer.latency_ms:,.0f} ms" if answer.latency_ms is not None else "",
            f"{answer.ttft_ms:,.0f} ms" if answer.ttft_ms is not None else "",
            f"{answer.usage.total_tokens:,}" if answer.usage else "",
            f"${answer.cost_usd:.6f}" if answer.cost_usd else ("free" if answer.ok else ""),
        )
    return table


async def run_compare(
    settings: Settings,
    prompt: str,
    models: list[str] | None,
    *,
    guild: int,
    channel: int,
    user: str,
    json_mode: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Compare, print, and return the exit code: 0 when at least one model answered."""
    from bot.app import open_app

    err = Console(stderr=True, soft_wrap=True)
    async with open_app(settings) as sb:
        asking = err.status("Asking the models…") if not json_mode and err.is_terminal else None
        with asking or contextlib.nullcontext():
            comparison = await sb.service.compare(
                Place(guild_id=guild, channel_id=channel),
                Author(user_id_for(user), user),
                prompt,
                models,
            )
    if json_mode:
        for answer in comparison.answers:
            out.write(json.dumps(answer_json(answer, comparison), ensure_ascii=False) + "\n")
        out.flush()
    else:
        console = Console(file=out, soft_wrap=False)
        console.print(comparison_table(comparison))
        for i, source in enumerate(comparison.sources, 1):
            where = f", {source.location}" if source.location else ""
            console.print(f"  [{i}] {source.document}{where}", style="dim", markup=False)
        if comparison.log_problem:
            console.print(comparison.log_problem, style="yellow", markup=False)
    return 0 if any(answer.ok for answer in comparison.answers) else 1
