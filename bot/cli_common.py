"""What every `switchboard` command shares: settings read once, async work run, user errors shown.

A person sees a bad setting or a user error as one red line (exit 2 and 1), never a
traceback. Messages are printed as they are, not as rich markup: they quote config
tables ("[models.x]") and error texts ("[Errno 111]") that markup would swallow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from rich.console import Console

from core.errors import ConfigError, UserError
from core.settings import Settings

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
