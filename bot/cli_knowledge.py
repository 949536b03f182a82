"""`switchboard knowledge ...`: fill and inspect a server's knowledge base from the terminal.

A typer sub-app that `bot.cli` mounts; it builds its own `KnowledgeBase` from the settings.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
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

from bot.cli_common import load_settings, run_async
from core.settings import Settings

T = TypeVar("T")

knowledge_app = typer.Typer(help="The knowledge base: add, list, search and remove a server's documents.", no_args_is_help=True)

GuildOption = Annotated[int, typer.Option("--guild", help="The Discord server (guild) id whose knowledge base to use.")]

_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)
_STATUS_STYLE = {"added": "green", "replaced": "cyan", "skipped": "yellow", "refused": "red"}


def _settings() -> Settings:
    """Read the settings; a bad value is one clear line."""
    settings = load_settings(_err)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return settings


def _run(work: Callable[[], Awaitable[T]]) -> T:
    return run_async(work, _err)


@knowledge_app.command("add")
def add(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders (read recursively) to add.")],
    guild: GuildOption,
    uploader: Annotated[str, typer.Option("--as", help="Who added them, as shown by `list`.")] = "terminal",
) -> None:
    """Add documents (.txt .md .pdf .html .docx); a file with the same name is replaced."""
    from knowledge.base import KnowledgeBase
    from knowledge.types import ProgressUpdate

    kb = KnowledgeBase(_settings())

    async def work() -> int:
        _ = kb.embedder  # a bad embedding configuration fails here, before any work
        columns = (
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("passages"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        try:
            with Progress(*columns, console=_err, transient=False) as bar:
                task = bar.add_task("Reading", total=None)

                def show(update: ProgressUpdate) -> None:
                    label = f"{update.files_done}/{update.files_total} files"
                    if update.current and update.files_done < update.files_total:
                        label += f" · {update.current}"
                    bar.update(task, total=max(update.chunks_total, 1), completed=update.chunks_done, description=label)

                report = await kb.add_files(guild, paths, uploader=uploader, progress=show)
        finally:
            await kb.aclose()
        table = Table(title=f"Knowledge base of server {guild}")
        for column in ("file", "result", "passages", "detail"):
            table.add_column(column)
        for result in report.results:
            style = _STATUS_STYLE[result.status]
            table.add_row(escape(result.name), f"[{style}]{result.status}[/{style}]", str(result.chunks or ""), escape(result.reason or ""))
        _out.print(table)
        _out.print(report.summary().splitlines()[0])
        return 1 if report.by_status("refused") else 0

    raise typer.Exit(_run(work))


@knowledge_app.command("list")
def list_(
    guild: GuildOption,
    json_mode: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List a server's documents: passages, size, who added them and when."""
    from knowledge.base import KnowledgeBase

    kb = KnowledgeBase(_settings())

    async def work() -> None:
        _ = kb.embedder  # a bad embedding configuration fails here
        try:
            docs = await kb.list_documents(guild)
        finally:
            await kb.aclose()
        if json_mode:
            rows = [
                {"id": d.id, "name": d.name, "chunks": d.chunks, "bytes": d.bytes, "uploader": d.uploader,
                 "added_at": d.added_at.isoformat(), "content_hash": d.content_hash}
                for d in docs
            ]
            print(json.dumps(rows, ensure_ascii=False))
            return
        if not docs:
            _out.print(f"Server {guild} has no documents yet: `switchboard knowledge add PATH --guild {guild}`.")
            return
        table = Table(title=f"Knowledge base of server {guild}")
        for column in ("document", "passages", "size", "added by", "added"):
            table.add_column(column)
        for d in docs:
            table.add_row(escape(d.name), str(d.chunks), human_size(d.bytes), escape(d.uploader), d.added_at.strftime("%Y-%m-%d %H:%M UTC"))
        _out.print(table)
        _out.print(f"{len(docs)} documents, {sum(d.chunks for d in docs)} passages, {human_size(sum(d.bytes for d in docs))}")

    _run(work)


@knowledge_app.command("remove")
def remove(
    document: Annotated[str, typer.Argument(help="The document's name (as `list` shows it) or id.")],
    guild: GuildOption,
) -> None:
    """Remove a document and all its passages."""
    from knowledge.base import KnowledgeBase

    kb = KnowledgeBase(_settings())

    async def work() -> None:
        _ = kb.embedder  # a bad embedding configuration fails here
        try:
            doc = await kb.remove(guild, document)
        finally:
            await kb.aclose()
        _out.print(f"Removed {doc.name} ({doc.chunks} passages).", markup=False)

    _run(work)


@knowledge_app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    guild: GuildOption,
    k: Annotated[int, typer.Option("-k", min=1, max=50, help="How many passages to show.")] = 5,
    mode: Annotated[str, typer.Option(help="hybrid (default), vector or keyword.")] = "hybrid",
    json_mode: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show the passages that best match a query, with their scores."""
    from knowledge.base import KnowledgeBase

    if mode not in ("hybrid", "vector", "keyword"):
        _err.print("[red]--mode must be hybrid, vector or keyword.[/red]")
        raise typer.Exit(2)
    kb = KnowledgeBase(_settings())

    async def work() -> None:
        _ = kb.embedder  # a bad embedding configuration fails here
        try:
            sources = await kb.search(guild, query, k=k, mode=mode)  # type: ignore[arg-type]
        finally:
            await kb.aclose()
        if json_mode:
            rows = [{"chunk_id": s.chunk_id, "document": s.document, "location": s.location, "score": s.score, "text": s.text} for s in sources]
            print(json.dumps(rows, ensure_ascii=False))
            return
        if not sources:
            _out.print("Nothing found.")
        for n, source in enumerate(sources, start=1):
            where = f" ({source.location})" if source.location else ""
            _out.print(f"[bold]\\[{n}] {escape(source.document + where)}[/bold]  score {source.score:.3f}  [dim]{escape(source.chunk_id)}[/dim]", highlight=False)
            _out.print(source.text, highlight=False, markup=False)
            _out.print()

    _run(work)


@knowledge_app.command("reindex")
def reindex(guild: GuildOption) -> None:
    """Re-embed a server's passages with the configured embedding model (after changing models)."""
    from knowledge.base import KnowledgeBase
    from knowledge.types import ProgressUpdate

    kb = KnowledgeBase(_settings())

    async def work() -> None:
        _ = kb.embedder  # a bad embedding configuration fails here
        try:
            with Progress(TextColumn("Re-embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=_err) as bar:
                task = bar.add_task("reindex", total=None)

                def show(update: ProgressUpdate) -> None:
                    bar.update(task, total=max(update.chunks_total, 1), completed=update.chunks_done)

                count = await kb.reindex(guild, progress=show)
        finally:
            await kb.aclose()
        _out.print(f"Re-embedded {count} passages of server {guild} with {kb.embedder.name}.")

    _run(work)


def human_size(size: int) -> str:
    """Bytes for people: 1536 → "1.5 KB"."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
