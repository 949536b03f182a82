"""The `switchboard` command line: run the bot, chat in the terminal, manage models and the database."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import logging.handlers
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bot.cli_common import LOG_FILE, load_settings, models_table, run_async, show_error
from bot.cli_export import export
from bot.cli_knowledge import knowledge_app
from bot.cli_tune import tune_app
from core.errors import NotFound, UserError
from core.settings import Settings

T = TypeVar("T")

app = typer.Typer(
    name="switchboard",
    help="Switchboard: a Discord bot with a model-swapping backend.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(
    help="The model registry: list, check, add and remove models.", no_args_is_help=True
)
db_app = typer.Typer(
    help="The database: apply migrations, apply the retention.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(knowledge_app, name="knowledge")
app.add_typer(tune_app, name="tune")
app.command("export")(export)

err = Console(stderr=True, soft_wrap=True)  # one-line messages stay one line
out = Console(soft_wrap=True, markup=False)  # the db commands print paths and revisions as they are


# Our own loggers; everything else is a library, kept to warnings unless --verbose.
OWN_LOGGERS = ("bot", "chains", "core", "knowledge", "store", "migrations", "switchboard")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHAT_HISTORY = "chat-history"  # the terminal chat's line history, in the data folder
# The list commands of this command line, for "See ..." hints (see core.errors.NotFound).
CLI_LISTINGS = {
    "model list": "`switchboard models list`",
    "knowledge list": "`switchboard knowledge list --guild ID`",
    "tune list": "`switchboard tune list`",
}


def _settings() -> Settings:
    return load_settings(err)


def _logging(
    settings: Settings,
    quiet: bool = False,
    *,
    verbose: bool = False,
    handlers: list[logging.Handler] | None = None,
) -> None:
    """Our loggers at the configured level (WARNING when `quiet`), libraries at WARNING.

    Library INFO lines (Alembic's plugins and migrations, discord.py's log-in, HTTP
    requests) would bury a command's own one-line message; `verbose` lets them through.
    """
    level = logging.WARNING if quiet else getattr(logging, settings.log_level.upper(), logging.INFO)
    if handlers is None:
        stderr = logging.StreamHandler(sys.stderr)
        handlers = [stderr]
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level if verbose else logging.WARNING, handlers=handlers, force=True)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)


def _chat_logging(settings: Settings, json_mode: bool) -> Path | None:
    """Log the chat to data/switchboard.log (and warnings to stderr in --json mode).

    Returns the log file, or None when it cannot be written (then logs go to stderr).
    """
    path = settings.data_dir / LOG_FILE
    handlers: list[logging.Handler] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                path, maxBytes=10 * 1024 * 1024, backupCount=3, encoding="utf-8"
            )
        )
    except OSError as exc:
        err.print(f"Cannot write the log file {path} ({exc}); logging to stderr.", markup=False)
        path = None
    if json_mode or path is None:
        # stderr is not the chat's screen in --json mode: warnings may go there too.
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setLevel(logging.WARNING)
        handlers.append(stderr)
    _logging(settings, handlers=handlers)
    return path


def _run(work: Callable[[], Awaitable[T]]) -> T:
    """Run a command's async work, as `run_async` does, and:

    - SIGTERM (how systemd, Docker and Kubernetes stop a process) stops it as Ctrl-C
      would: the work is cancelled, so replies in flight are logged as stopped, and
      everything `open_app` opened closes (the log writer drains) before exit 0;
    - a NotFound that names a list points to this command line's command for it.
    """
    stopping = False

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop() -> None:
            nonlocal stopping
            stopping = True
            task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, stop)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
        try:
            return await work()
        except NotFound as exc:
            if exc.listing in CLI_LISTINGS:
                raise UserError(exc.pointing_to(CLI_LISTINGS[exc.listing])) from None
            raise
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)

    try:
        return run_async(guarded, err)
    except asyncio.CancelledError:
        if stopping:
            raise typer.Exit(0) from None
        raise


def extra_cogs(sb: Any) -> list[Any]:
    """The cogs built around the app's parts besides the service: /export, /tune, /knowledge."""
    from bot.discord.export import ExportCog
    from bot.discord.tune import TuneCog

    cogs: list[Any] = [
        ExportCog(sb.exporter, manager_role=sb.settings.manager_role),
        TuneCog(sb.tunes, manager_role=sb.settings.manager_role),
    ]
    if sb.knowledge is None:
        return cogs
    from bot.discord.knowledge import KnowledgeCog

    return [
        *cogs,
        KnowledgeCog(
            sb.knowledge,
            sb.service,
            knowledge_role=sb.settings.knowledge_role,
            manager_role=sb.settings.manager_role,
        ),
    ]


@app.command()
def run(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show the libraries' log lines below WARNING.")
    ] = False,
) -> None:
    """Run the Discord bot (needs DISCORD_TOKEN)."""
    settings = _settings()
    if settings.discord_token is None:
        err.print(
            "DISCORD_TOKEN is not set: export DISCORD_TOKEN=<your bot token> (see README, 'Discord set-up')."
        )
        raise typer.Exit(2)
    _logging(settings, verbose=verbose)

    async def main() -> None:
        from bot.app import freeze_long_lived_heap, open_app
        from bot.discord.bot import run_bot

        async with open_app(settings) as sb:
            for job in await sb.tunes.recover():  # local runs that died with the last process
                logging.getLogger("switchboard").warning(
                    "fine-tuning job %s (%s) was interrupted: marked failed", job.id[:8], job.name
                )
            for job in await sb.tunes.resume():  # provider jobs: polled from here on
                logging.getLogger("switchboard").info(
                    "following fine-tuning job %s (%s) at its provider", job.id[:8], job.name
                )
            # Snapshot lines of messages deleted while no rewrite could happen (a failed
            # rewrite before the last stop, a deletion by another process meanwhile).
            caught = await sb.tunes.snapshots.catch_up()
            if caught.problem:
                logging.getLogger("switchboard").error(
                    "fine-tuning snapshots not rewritten: %s", caught.problem
                )
            freeze_long_lived_heap()
            token = settings.discord_token.get_secret_value()  # type: ignore[union-attr]
            warm = asyncio.create_task(sb.service.warm_up())
            try:
                await run_bot(
                    token,
                    sb.service,
                    manager_role=settings.manager_role,
                    extra_cogs=extra_cogs(sb),
                    shard_count=settings.shard_count,
                    shard_ids=settings.shard_ids,
                )
            finally:
                warm.cancel()

    _run(main)


@app.command()
def chat(
    guild: Annotated[int, typer.Option(help="Server id whose settings apply.")] = 0,
    channel: Annotated[int, typer.Option(help="Channel id whose settings and history apply.")] = 0,
    thread: Annotated[
        int | None, typer.Option(help="Thread id (inside --channel), if any.")
    ] = None,
    user: Annotated[str, typer.Option(help="Who you are, for history and logs.")] = "terminal",
    json_mode: Annotated[
        bool, typer.Option("--json", help="Read lines from stdin, print one JSON object per line.")
    ] = False,
) -> None:
    """Chat with the bot's service in the terminal, as if in a Discord channel."""
    settings = _settings()
    log_file = _chat_logging(settings, json_mode)
    # A reply is printed whatever it holds: what the terminal cannot show becomes "?".
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")

    async def main() -> int:
        from bot.app import freeze_long_lived_heap, open_app
        from bot.terminal import (
            TerminalChat,
            prompt_reader,
            run_interactive,
            run_json,
            stream_reader,
            user_id_for,
        )
        from core.messages import Author, Place

        interactive = not json_mode and sys.stdin.isatty()
        async with contextlib.AsyncExitStack() as stack:
            with err.status("Starting Switchboard…") if interactive else contextlib.nullcontext():
                sb = await stack.enter_async_context(open_app(settings))
            freeze_long_lived_heap()
            place = Place(guild_id=guild, channel_id=channel, thread_id=thread)
            session = TerminalChat(
                sb.service, place, Author(user_id_for(user), user), knowledge=sb.knowledge
            )
            warm = asyncio.create_task(sb.service.warm_up(place))
            try:
                if json_mode:
                    return await run_json(session)
                read = (
                    prompt_reader(settings.data_dir / CHAT_HISTORY)
                    if interactive
                    else stream_reader(sys.stdin)
                )
                return await run_interactive(session, read, log_file=log_file)
            finally:
                warm.cancel()

    raise typer.Exit(_run(main))


@app.command()
def compare(
    prompt: Annotated[str, typer.Argument(help="What every model is asked.")],
    models: Annotated[
        str | None,
        typer.Option(
            help="2 to 4 models, comma-separated (default: the channel's model and the "
            "config's comparison_models)."
        ),
    ] = None,
    guild: Annotated[int, typer.Option(help="Server id whose settings apply.")] = 0,
    channel: Annotated[int, typer.Option(help="Channel id whose settings apply.")] = 0,
    user: Annotated[str, typer.Option(help="Who is asking, for the log.")] = "terminal",
    json_mode: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per model instead of a table.")
    ] = False,
) -> None:
    """Ask several models the same prompt at once and show their answers side by side."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> int:
        from bot.cli_compare import run_compare
        from bot.present import split_models

        return await run_compare(
            settings,
            prompt,
            split_models(models),
            guild=guild,
            channel=channel,
            user=user,
            json_mode=json_mode,
        )

    raise typer.Exit(_run(main))


@app.command()
def leaderboard(
    guild: Annotated[
        int | None, typer.Option(help="Only this server's battles (with --channel: its channel).")
    ] = None,
    channel: Annotated[int | None, typer.Option(help="Only this channel's battles.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the chart (PNG) to this file.")
    ] = None,
    json_mode: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per model instead of a table.")
    ] = False,
) -> None:
    """Models rated from blind battles (Bradley–Terry, 95% intervals), with 👍, speed and cost."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> int:
        from bot.cli_eval import run_leaderboard

        return await run_leaderboard(
            settings, guild=guild, channel=channel, chart=out, json_mode=json_mode
        )

    raise typer.Exit(_run(main))


@app.command()
def usage(
    top: Annotated[
        int, typer.Option(help="How many people to list, the biggest spenders first.")
    ] = 20,
    json_mode: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables.")
    ] = False,
) -> None:
    """Today's spending on paid models (UTC), per server and per person, against the budgets."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> int:
        import json

        from bot.app import open_app
        from bot.present import spending_report_json, spending_report_lines

        async with open_app(settings, knowledge=False) as sb:
            report = await sb.service.spending_report()
        if json_mode:
            print(json.dumps(spending_report_json(report, top)))
            return 0
        heading, servers, people = spending_report_lines(report, top)
        out.print(heading)
        for title, rows in (("server", servers), ("person", people)):
            if not rows:
                continue
            table = Table(title=f"by {title}")
            for column in (title, "spent", "of the budget"):
                table.add_column(column, justify="left" if column == title else "right")
            for row in rows:
                table.add_row(*row)
            out.print(table)
        return 0

    raise typer.Exit(_run(main))


@app.command("eval")
def eval_command(
    dataset: Annotated[
        Path | None,
        typer.Argument(
            help='JSON Lines: "prompt", and optionally "reference", "system", "regex", "id", "history".'
        ),
    ] = None,
    models: Annotated[str, typer.Option(help="The models to evaluate, comma-separated.")] = "",
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for the results and the report; running again resumes there."
        ),
    ] = Path("eval"),
    judge: Annotated[
        str | None, typer.Option(help="A model that judges the answers (see --judge-mode).")
    ] = None,
    judge_mode: Annotated[
        str,
        typer.Option(
            help="pairwise: every two answers compared, in both orders; rubric: each rated 1-10."
        ),
    ] = "pairwise",
    system: Annotated[
        str | None, typer.Option(help="System prompt for rows without one (default: the bot's).")
    ] = None,
    regex: Annotated[
        str | None, typer.Option(help="A pattern answers must contain, for rows without one.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Model calls at once.")] = 4,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Ask again what failed in an earlier run.")
    ] = False,
    from_log: Annotated[
        bool,
        typer.Option(
            "--from-log",
            help="Take the prompts from the log (the export's filters below) instead of a file.",
        ),
    ] = False,
    guild: Annotated[int | None, typer.Option(help="--from-log: only this server id.")] = None,
    channel: Annotated[int | None, typer.Option(help="--from-log: only this channel id.")] = None,
    log_model: Annotated[
        str | None, typer.Option(help="--from-log: only prompts this model answered.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="--from-log: from this ISO date or time on (UTC).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="--from-log: before this ISO time; a date keeps its day.")
    ] = None,
    limit: Annotated[int, typer.Option(help="--from-log: the newest this many prompts.")] = 100,
    no_redact: Annotated[
        bool,
        typer.Option(
            "--no-redact", help="--from-log: keep personal data in the prompts (sent and written)."
        ),
    ] = False,
) -> None:
    """Run models on a dataset: exact, contains, regex and judge scores, speed, tokens, cost."""
    settings = _settings()
    # Failed calls are results here: their warnings go to the log file, not over the bar.
    _chat_logging(settings, json_mode=False)

    async def main() -> int:
        from bot.cli_eval import LogFilters, run_eval, split_models

        return await run_eval(
            settings,
            dataset,
            split_models(models),
            out,
            judge=judge,
            judge_mode=judge_mode,
            system=system,
            regex=regex,
            concurrency=concurrency,
            retry_failed=retry_failed,
            log=LogFilters(guild, channel, log_model, since, until, limit, not no_redact)
            if from_log
            else None,
        )

    raise typer.Exit(_run(main))


@models_app.command("list")
def models_list() -> None:
    """List the configured and registered models."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> None:
        from bot.app import open_app

        async with open_app(settings, knowledge=False) as sb:
            service = sb.service
            Console().print(
                models_table(
                    service.list_models(), service.default_model, f"Models ({settings.config})"
                )
            )

    _run(main)


@models_app.command("check")
def models_check(
    name: Annotated[
        list[str] | None, typer.Argument(help="Models to check (default: all).")
    ] = None,
) -> None:
    """Reach each configured endpoint and say what works."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> int:
        from bot.app import open_app

        async with open_app(settings, knowledge=False) as sb:
            results = await sb.service.check_models(name or None)
            table = Table(title="Model check")
            for column in ("model", "ok", "latency", "detail"):
                table.add_column(column)
            for res in results:
                table.add_row(
                    escape(res.name),
                    "[green]yes[/green]" if res.ok else "[red]no[/red]",
                    f"{res.latency_ms:.0f} ms" if res.latency_ms is not None else "",
                    escape(res.detail),
                )
            Console().print(table)
            return 0 if all(r.ok for r in results) else 1

    raise typer.Exit(_run(main))


@models_app.command("add-gguf")
def models_add_gguf(
    path: Annotated[Path, typer.Argument(help="A GGUF model file you already have.")],
    name: Annotated[str, typer.Option(help="The name to choose it by, e.g. with /model set.")],
    context_size: Annotated[int | None, typer.Option(help="Context size to run it with.")] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace", help="Replace a registered model of that name (never a configured one)."
        ),
    ] = False,
) -> None:
    """Register a local GGUF file as a model (checked: exists, is a GGUF, loads)."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> None:
        from bot.app import open_app
        from bot.service.models import NameTaken

        async with open_app(settings, knowledge=False) as sb:
            try:
                with err.status(f"Loading {path} to check it…"):
                    spec = await sb.service.gguf_model(
                        name, path, context_size=context_size, replace=replace
                    )
                await sb.service.register_model(spec, created_by="cli", replace=replace)
            except NameTaken as exc:
                if exc.replaceable:
                    raise UserError(f"{exc.message} To replace it, add --replace.") from None
                raise
        Console().print(
            f"Registered [bold]{escape(name)}[/bold] ({escape(str(path))}). "
            f"Choose it with `/model set {escape(name)}` in Discord or in `switchboard chat`."
        )

    _run(main)


@models_app.command("remove")
def models_remove(
    name: Annotated[
        str, typer.Argument(help="A registered model (see `switchboard models list`).")
    ],
) -> None:
    """Remove a model registered with add-gguf (configured models stay: edit the file)."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> None:
        from bot.app import open_app

        async with open_app(settings, knowledge=False) as sb:
            await sb.service.remove_model(name)
        Console().print(
            f"Removed [bold]{escape(name)}[/bold]. Places that had chosen it need another model "
            "(`/model set` or `/model reset`)."
        )

    _run(main)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[
        str, typer.Argument(help="Target revision: head (the default), an id such as 0002, or +1.")
    ] = "head",
) -> None:
    """Apply the database migrations (also done on every start)."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> None:
        from bot.app import database_setting
        from migrations import database_revision, upgrade_database
        from store.db import database_errors

        url, setting = settings.sqlalchemy_url, database_setting(settings)
        await upgrade_database(url, revision, setting=setting)
        with database_errors(url, setting):
            now = await database_revision(url)
        out.print(f"Database at revision {now or 'base (no tables)'}.")

    _run(main)


# ignore_unknown_options: "-1" is a revision here, not an option.
@db_app.command("downgrade", context_settings={"ignore_unknown_options": True})
def db_downgrade(
    revision: Annotated[
        str,
        typer.Argument(
            help="Target revision: an id such as 0002, base (nothing), or -1 (one back)."
        ),
    ],
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", help="Go ahead even though tables or columns holding data are dropped."
        ),
    ] = False,
) -> None:
    """Undo migrations down to REVISION. Refuses to drop data without --yes; backs a SQLite file up first."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> int:
        from bot.app import database_setting
        from migrations import downgrade_database, plan_downgrade
        from store.db import DATA_DIR_SETTING, backup_sqlite, prepare_folder, sqlite_file

        url, setting = settings.sqlalchemy_url, database_setting(settings)
        plan = await plan_downgrade(url, revision, setting=setting)
        if not plan.undone:
            out.print(f"Database at revision {plan.current or 'base'}: nothing to undo.")
            return 0
        target = plan.target or "base"
        path = sqlite_file(url)
        if plan.losing and not yes:
            backup = (
                f"{path} is copied to {settings.data_dir / 'backups'} first"
                if path is not None
                else "back the database up first, e.g. with pg_dump"
            )
            show_error(
                err,
                f"Downgrading from {plan.current} to {target} would drop "
                f"{', '.join(map(str, plan.losing))}; nothing was changed. Run it again with "
                f"--yes to go ahead ({backup}).",
            )
            return 2
        if path is not None:
            folder = settings.data_dir / "backups"
            prepare_folder(folder, DATA_DIR_SETTING)
            copy = await asyncio.to_thread(backup_sqlite, path, folder, f"at-{plan.current}")
            out.print(f"Backed up {path} to {copy}.")
        await downgrade_database(url, target, setting=setting)
        dropped = ", ".join(map(str, plan.dropped)) or "no tables or columns"
        out.print(
            f"Database downgraded from {plan.current} to {target} "
            f"(undid {', '.join(plan.undone)}; dropped {dropped})."
        )
        return 0

    raise typer.Exit(_run(main))


@db_app.command("purge")
def db_purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be deleted; change nothing.")
    ] = False,
) -> None:
    """Delete exchanges older than the retention: a server's /retention, else SWITCHBOARD_RETENTION_DAYS."""
    settings = _settings()
    _logging(settings, quiet=True)

    async def main() -> int:
        from bot.app import open_app
        from bot.present import purge_line

        async with open_app(settings, knowledge=False) as sb:
            report = await sb.service.purge(dry_run=dry_run)
        out.print(purge_line(report))
        return 1 if report.snapshots_problem else 0  # the rows went; a snapshot did not

    raise typer.Exit(_run(main))
