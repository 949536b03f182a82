"""What every `switchboard` command shares: settings read once, async work run, errors shown.

A person sees a bad setting or a user error as one red line (exit 2 and 1), never a
traceback. Anything unexpected is one line too, with an error id; its traceback goes to
the log file in the data folder (`switchboard.log`). Messages are printed as they are,
not as rich markup: they quote config tables ("[models.x]") and error texts
("[Errno 111]") that markup would swallow.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bot.present import model_facts
from core.errors import ConfigError, UserError, report_unexpected
from core.settings import Settings

if TYPE_CHECKING:
    from chains.registry import ModelSpec

T = TypeVar("T")

# The log file, in the data folder, that unexpected errors are written to with their traceback.
# The log file in the data folder: tracebacks of unexpected errors, and the chat's warnings.
LOG_FILE = "switchboard.log"
# Where this command's settings put it (set by load_settings; one command per process).
_error_log: ContextVar[Path | None] = ContextVar("switchboard_error_log", default=None)


def load_settings(err: Console) -> Settings:
    """Read the settings; a bad value is one clear line on `err` and exit code 2."""
    try:
        settings = Settings.load()
    except ConfigError as exc:
        show_error(err, exc.message)
        raise typer.Exit(2) from None
    _error_log.set(settings.data_dir / LOG_FILE)
    return settings


def run_async(work: Callable[[], Awaitable[T]], err: Console) -> T:
    """Run an async command; a user error is one red line on `err` and exit code 1.

    Anything else is one line with an error id (exit code 1); the traceback goes to the
    log file, never to the terminal.
    """
    try:
        return asyncio.run(work())
    except UserError as exc:
        show_error(err, exc.message)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        error_id, log_file = log_unexpected(exc)
        where = f"the details are in {log_file}" if log_file else "no log file could be written"
        show_error(err, f"Something went wrong (error id {error_id}): {where}.")
        raise typer.Exit(1) from None


def log_unexpected(exc: BaseException) -> tuple[str, Path | None]:
    """Append `exc` with its traceback to the error log; its error id and the file written."""
    what = "running `switchboard " + " ".join(sys.argv[1:]) + "`"
    # The data folder's log, else the system's temporary folder (the data folder may be
    # what is broken); never the terminal.
    logger = logging.getLogger("switchboard.unexpected")
    logger.propagate = False
    for path in [p for p in (_error_log.get(), Path(tempfile.gettempdir()) / LOG_FILE) if p]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:
            continue
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        try:
            return report_unexpected(logger, exc, what), path
        finally:
            logger.removeHandler(handler)
            handler.close()
    handler = logging.NullHandler()  # else logging's last resort prints the traceback
    logger.addHandler(handler)
    try:
        return report_unexpected(logger, exc, what), None
    finally:
        logger.removeHandler(handler)


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
            escape(facts.name)
            + (" *" if facts.is_default else "")
            + (" (candidate)" if facts.candidate else ""),
            facts.provider,
            escape(spec.model or spec.bundled or str(spec.path or "")),
            facts.weights + (", local" if facts.local else ""),
            facts.context,
            facts.price,
            escape(facts.fallback),
            escape(facts.description),
        )
    table.caption = "* default model · (candidate): a fine-tune only admins may pick until promoted"
    return table
