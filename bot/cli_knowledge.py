"""`switchboard knowledge ...`: fill and inspect a server's knowledge base from the terminal.

A typer sub-app that `bot.cli` mounts; every command works on the knowledge base that
`bot.app.open_app` builds, as the bot does.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

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
from bot.present import human_size
from core.settings import Settings

if TYPE_CHECKING:
    from knowledge.base import KnowledgeBase

T = TypeVar("T")

knowledge_app = typer.Typer(
    help="The knowledge base: add, list, search and remove a server's documents.",
    no_args_is_help=True,
)

GuildOption = Annotated[
    int, typer.Option("--guild", help="The Discord server (guild) id whose knowledge base to use.")
]

_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)
_STATUS_STYLE = {"added": "green", "replaced": "cyan", "skipped": "yellow", "refused": "red"}


def _settings() -> Settings:
    """Read the settings; a bad value is one clear line."""
    settings = load_settings(_err)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    return settings


def _with_knowledge(work: Callable[[KnowledgeBase], Awaitable[T]]) -> T:
    """Open the app from the settings, run `work` on its knowledge base, close it all; a user error is one line."""
    from bot.app import open_app

    settings = _settings()

    async def opened() -> T:
        async with open_app(settings) as app:
            kb: KnowledgeBase = app.knowledge
            _ = (
                kb.embedder
            )  # a bad embedding configuration fails here, before any work on the knowledge base
            return await work(kb)

    return run_async(opened, _err)


@knowledge_app.command("add")
def add(
    paths: Annotated[
        list[Path], typer.Argument(help="Files and folders (read recursively) to add.")
    ],
    guild: GuildOption,
    uploader: Annotated[
        str, typer.Option("--as", help="Who added them, as shown by `list`.")
    ] = "terminal",
    follow_symlinks: Annotated[
        bool,
        typer.Option(
            "--follow-symlinks",
            help="Read what a PATH given here points to when it is a symbolic link. Links inside folders are never followed.",
        ),
    ] = False,
) -> None:
    """Add documents (.txt .md .pdf .html .docx); a file with the same name is replaced.

    Folders are read recursively without following symbolic links: each link, and each
    file of another type, is listed as skipped with the reason.
    """
    from knowledge.types import ProgressUpdate

    async def work(kb: KnowledgeBase) -> int:
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("passages"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=_err, transient=False) as bar:
            task = bar.add_task("Reading", total=None)

            def show(update: ProgressUpdate) -> None:
                label = f"{update.files_done}/{update.files_total} files"
                if update.current and update.files_done < update.files_total:
                    label += f" · {update.current}"
                bar.update(
                    task,
                    total=max(update.chunks_total, 1),
                    completed=update.chunks_done,
                    description=label,
                )

            # The terminal knows the uploader by the name given with --as alone.
            report = await kb.add_files(
                guild, paths, uploader=uploader, progress=show, follow_symlinks=follow_symlinks
            )
        table = Table(title=f"Knowledge base of server {guild}")
        for column in ("file", "result", "passages", "detail"):
            table.add_column(column)
        for result in report.results:
            style = _STATUS_STYLE[result.status]
            table.add_row(
                escape(result.name),
                f"[{style}]{result.status}[/{style}]",
                str(result.chunks or ""),
                escape(result.reason or ""),
            )
        _out.print(table)
        _out.print(report.summary().splitlines()[0])
        return 1 if report.by_status("refused") else 0

    raise typer.Exit(_with_knowledge(work))


@knowledge_app.command("list")
def list_(
    guild: GuildOption,
    json_mode: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """List a server's documents: passages, size, who added them and when."""

    async def work(kb: KnowledgeBase) -> None:
        docs = await kb.list_documents(guild)
        if json_mode:
            rows = [
                {
                    "id": d.id,
                    "name": d.name,
                    "chunks": d.chunks,
                    "bytes": d.bytes,
                    "uploader": d.uploader,
                    "uploader_id": d.uploader_id,
                    "added_at": d.added_at.isoformat(),
                    "content_hash": d.content_hash,
                }
                for d in docs
            ]
            print(json.dumps(rows, ensure_ascii=False))
            return
        if not docs:
            _out.print(
                f"Server {guild} has no documents yet: `switchboard knowledge add PATH --guild {guild}`."
            )
            return
        table = Table(title=f"Knowledge base of server {guild}")
        for column in ("document", "passages", "size", "added by", "added"):
            table.add_column(column)
        for d in docs:
            table.add_row(
                escape(d.name),
                str(d.chunks),
                human_size(d.bytes),
                escape(d.uploader),
                d.added_at.strftime("%Y-%m-%d %H:%M UTC"),
            )
        _out.print(table)
        _out.print(
            f"{len(docs)} documents, {sum(d.chunks for d in docs)} passages, {human_size(sum(d.bytes for d in docs))}"
        )

    _with_knowledge(work)


@knowledge_app.command("remove")
def remove(
    document: Annotated[
        str, typer.Argument(help="The document's name (as `list` shows it) or id.")
    ],
    guild: GuildOption,
) -> None:
    """Remove a document and all its passages."""

    async def work(kb: KnowledgeBase) -> None:
        doc = await kb.remove(guild, document)
        _out.print(f"Removed {doc.name} ({doc.chunks} passages).", markup=False)

    _with_knowledge(work)


@knowledge_app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    guild: GuildOption,
    k: Annotated[int, typer.Option("-k", min=1, max=50, help="How many passages to show.")] = 5,
    mode: Annotated[str, typer.Option(help="hybrid (default), vector or keyword.")] = "hybrid",
    json_mode: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show the passages that best match a query, with their scores."""
    if mode not in ("hybrid", "vector", "keyword"):
        _err.print("[red]--mode must be hybrid, vector or keyword.[/red]")
        raise typer.Exit(2)

    async def work(kb: KnowledgeBase) -> None:
        sources = await kb.search(guild, query, k=k, mode=mode)  # type: ignore[arg-type]
        if json_mode:
            rows = [
                {
                    "chunk_id": s.chunk_id,
                    "document": s.document,
                    "location": s.location,
                    "score": s.score,
                    "text": s.text,
                }
                for s in sources
            ]
            print(json.dumps(rows, ensure_ascii=False))
            return
        if not sources:
            _out.print("Nothing found.")
        for n, source in enumerate(sources, start=1):
            where = f" ({source.location})" if source.location else ""
            _out.print(
                f"[bold]\\[{n}] {escape(source.document + where)}[/bold]  score {source.score:.3f}  [dim]{escape(source.chunk_id)}[/dim]",
                highlight=False,
            )
            _out.print(source.text, highlight=False, markup=False)
            _out.print()

    _with_knowledge(work)


@knowledge_app.command("reindex")
def reindex(guild: GuildOption) -> None:
    """Re-embed a server's passages with the configured embedding model (after changing models)."""
    from knowledge.types import ProgressUpdate

    async def work(kb: KnowledgeBase) -> None:
        with Progress(
            TextColumn("Re-embedding"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=_err,
        ) as bar:
            task = bar.add_task("reindex", total=None)

            def show(update: ProgressUpdate) -> None:
                bar.update(task, total=max(update.chunks_total, 1), completed=update.chunks_done)

            count = await kb.reindex(guild, progress=show)
        _out.print(f"Re-embedded {count} passages of server {guild} with {kb.embedder.name}.")

    _with_knowledge(work)
