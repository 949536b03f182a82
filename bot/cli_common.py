"""What every `switchboard` command shares: settings read once, async work run, user errors shown.

A person sees a bad setting or a user error as one red line (exit 2 and 1), never a
traceback. Messages are printed as they are, not as rich markup: they quote config
tables ("[models.x]") and error texts ("[Errno 111]") that markup would swallow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bot.present import model_facts
from core.errors import ConfigError, UserError
from core.settings import Settings

if TYPE_CHECKING:
    from chains.registry import ModelSpec

T = TypeVar("T")


def load_settings(err: Console) -> Settings:
    """Read the settings; a bad value is one clear line on `err` and exit code 2."""
    try:
        return Settings.load()
    except ConfigError as exc:
        show_error(err, exc.message)
        raise typer.Exit(2) from None


def run_async(work: Callable[[], Awaitable[T]], err: Console) -> T:
    """Run an async command; a user error is one red line on `err` and exit code 1."""
    try:
        return asyncio.run(work())
    except UserError as exc:
        show_error(err, exc.message)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def show_error(err: Console, message: str) -> None:
    """One error line, in red, exactly as written."""
    err.print(message, style="red", markup=False, highlight=False)


def models_table(specs: list[ModelSpec], default_model: str, title: str = "Models") -> Table:
    """The model list as a table (`switchboard models list` and the terminal's `/model list`)."""
    table = Table(title=title)
    for column in (
        "name",
        "provider",
        "model",
        "weights",
        "context",
        "price",
        "fallback",
        "description",
    ):
        table.add_column(column)
    for spec in specs:
        facts = model_facts(spec, default_model)
        table.add_row(
            escape(facts.name) + (" *" if facts.is_default else ""),
            facts.provider,
            escape(spec.model or spec.bundled or str(spec.path or "")),
            facts.weights + (", local" if facts.local else ""),
            facts.context,
            facts.price,
            escape(facts.fallback),
            escape(facts.description),
        )
    table.caption = "* default model"
    return table
