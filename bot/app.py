"""Wiring: build every long-lived part from the settings, once, and close them again.

`open_app(settings)` is the only place that creates clients (database engine, log
writer, local model servers, model factory, knowledge base) and the service's parts. The
CLI commands, the Discord bot, the benchmarks and the tests all go through it, so they
run the same code. It is also the only place that reads `Settings`: the parts below it
take small config objects (`chains.models.ClientConfig`, the knowledge base's config).

It builds the one `core.redact.Redactor` too, told every secret the settings and the
registry name (`secrets_redactor`), and hands it down: model failures, `models check`,
embedding errors and, for as long as the app is open, every log record (a filter on the
handlers of the root logger, which the CLI sets up) are scrubbed by it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.service.chat import ChatService
from bot.service.compare import Comparisons
from bot.service.conversations import ConversationIndex
from bot.service.evaluate import Evaluator
from bot.service.feedback import Feedback
from bot.service.leaderboard import Leaderboards
from bot.service.limits import Budget, PersonLimit
from bot.service.models import ModelCatalog
from bot.service.place_settings import PlaceSettings
from bot.service.privacy import Privacy
from bot.service.tune import TuneService
from bot.service.tune_snapshots import TuneSnapshots
from chains.answer import Answerer
from chains.models import ClientConfig
from chains.registry import ModelRegistry, ModelSpec
from chains.tokens import TokenCounter
from core.redact import RedactingFilter, Redactor
from core.settings import Settings
from knowledge.config import EmbeddingConfig, KnowledgeConfig
from migrations import upgrade_database
from store.db import (
    DATA_DIR_SETTING,
    DATABASE_URL_SETTING,
    check_database_url,
    create_engine,
    create_session_factory,
    database_errors,
    prepare_folder,
)
from store.exchange_log import ExchangeLog
from store.export import Exporter, ModelTarget
from store.writer import LogWriter

if TYPE_CHECKING:  # imported when used: they bring llama.cpp's and Chroma's machinery
    from chains.local import LocalServers
    from knowledge.base import KnowledgeBase

log = logging.getLogger(__name__)


@dataclass
class App:
    """The parts a running Switchboard is made of."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    writer: LogWriter
    registry: ModelRegistry
    service: ChatService
    local: LocalServers
    knowledge: KnowledgeBase | None
    redact: Redactor
    exporter: Exporter
    evaluator: Evaluator
    tunes: TuneService


def secrets_redactor(settings: Settings, specs: Iterable[ModelSpec] = ()) -> Redactor:
    """A redactor told every secret value this process holds.

    The keys in the variables the models' `api_key_env` name (those that are set), the
    embedding key, DISCORD_TOKEN, and the passwords and secret query values inside the
    database URL, the embeddings URL and every model's base_url.
    """
    redact = Redactor()
    redact.add(settings.discord_token, settings.secret(settings.embedding_api_key_env))
    redact.add_url(settings.database_url, settings.embedding_base_url)
    add_model_secrets(redact, settings, specs)
    return redact


def add_model_secrets(redact: Redactor, settings: Settings, specs: Iterable[ModelSpec]) -> None:
    """Tell `redact` the keys and base_url secrets of these models."""
    for spec in specs:
        if spec.api_key_env:
            redact.add(settings.secret(spec.api_key_env))
        redact.add_url(spec.base_url)


@contextmanager
def redacted_logs(redact: Redactor) -> Iterator[None]:
    """Scrub every record the root logger's handlers (the CLI's) write, until the block ends."""
    scrub = RedactingFilter(redact)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(scrub)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(scrub)


def client_config(settings: Settings, redact: Redactor | None = None) -> ClientConfig:
    """How model clients behave, from the settings."""
    return ClientConfig(
        request_timeout=settings.request_timeout,
        max_retries=settings.max_retries,
        secret=settings.secret,
        redact=redact if redact is not None else secrets_redactor(settings),
    )


def knowledge_config(settings: Settings, redact: Redactor | None = None) -> KnowledgeConfig:
    """The knowledge base's share of the settings (the API key read from the environment)."""
    embedding = EmbeddingConfig(
        provider=settings.embedding_provider,
        model=settings.embedding_model,
        base_url=settings.embedding_base_url,
        api_key=settings.secret(settings.embedding_api_key_env),
        api_key_env=settings.embedding_api_key_env,
        timeout=settings.request_timeout,
        redact=redact if redact is not None else secrets_redactor(settings),
    )
    return KnowledgeConfig(
        chroma_path=settings.data_dir / "chroma",
        chroma_host=settings.chroma_host,
        chroma_port=settings.chroma_port,
        collection_prefix=settings.knowledge_collection_prefix,
        max_file_bytes=int(settings.knowledge_max_file_mb * 1024 * 1024),
        max_guild_bytes=int(settings.knowledge_max_guild_mb * 1024 * 1024),
        chunk_chars=settings.knowledge_chunk_chars,
        top_k=settings.knowledge_top_k,
        min_relevance=settings.knowledge_min_relevance,
        embedding=embedding,
    )


def database_setting(settings: Settings) -> str:
    """The setting that decides where the database is: what a message about it names."""
    return DATABASE_URL_SETTING if settings.database_url else DATA_DIR_SETTING


def freeze_long_lived_heap() -> None:
    """Keep what is alive now out of the garbage collector's full collections.

    A long-running process calls this once it has started: its imported modules, ORM
    mappers, registry and clients live until it exits, yet each full collection walks them
    all. During a burst of 200 replies one such collection stalled every reply for about
    150 ms (`python -m bench concurrency`); after this it takes under 10 ms. Objects made
    later are collected as usual. The knowledge base calls it again once Chroma or the
    local embedding model has loaded (torch alone makes a full collection take ~250 ms).
    """
    gc.collect()
    gc.freeze()


@asynccontextmanager
async def open_app(
    settings: Settings, *, knowledge: bool | KnowledgeBase = True, migrate: bool = True
) -> AsyncIterator[App]:
    """Open everything Switchboard needs; close it all on exit, even after an error.

    `knowledge` is False for no knowledge base, True to build one from the settings, or
    a ready KnowledgeBase (tests share one embedder this way); it is closed on exit.
    """
    from chains.local import LocalServers
    from chains.models import ChatModelFactory

    # A folder, URL or database that cannot be used is one ConfigError line naming the setting.
    prepare_folder(settings.data_dir, DATA_DIR_SETTING)
    url, setting = settings.sqlalchemy_url, database_setting(settings)
    check_database_url(url, setting)
    async with AsyncExitStack() as stack:
        redact = secrets_redactor(settings)  # the models' secrets once the registry is read
        stack.enter_context(redacted_logs(redact))  # left last: closing may log too
        if migrate:
            await upgrade_database(url, setting=setting)
        engine = create_engine(url)
        stack.push_async_callback(engine.dispose)
        sessions = create_session_factory(engine)
        # A config named explicitly must exist; the default one may be absent (built-in model).
        registry = ModelRegistry.from_toml(
            settings.config, required="config" in settings.model_fields_set
        )
        catalog = ModelCatalog(registry, sessions)
        with database_errors(url, setting):  # the first query, when not migrated above
            await catalog.refresh()
        stack.push_async_callback(catalog.aclose)
        add_model_secrets(redact, settings, registry.all())

        # What cannot be written before a shutdown (the database is away) waits here.
        unwritten = settings.data_dir / "unwritten"
        writer = LogWriter(
            sessions, spill_dir=unwritten, logger=logging.getLogger("switchboard.log_writer")
        )
        await writer.start()
        stack.push_async_callback(writer.aclose)
        exchange_log = ExchangeLog(writer)
        exchange_log.replay_folder(unwritten)

        local = LocalServers(max_loaded=settings.max_local_models)
        stack.push_async_callback(local.aclose)
        models = ChatModelFactory(client_config(settings, redact), local)
        stack.push_async_callback(models.aclose)

        kb = None
        if knowledge is True:
            from knowledge.base import KnowledgeBase

            # Chroma and torch load on first use, long after start-up: freeze them then.
            kb = KnowledgeBase(knowledge_config(settings, redact), on_loaded=freeze_long_lived_heap)
        elif knowledge:
            kb = knowledge
        if kb is not None:
            stack.push_async_callback(kb.aclose)

        conversations = ConversationIndex(sessions, writer)
        place_settings = PlaceSettings(sessions, registry, retention_days=settings.retention_days)
        tune_dir = settings.data_dir / "tune"
        # The fine-tune snapshots, which forgetting and retention rewrite (and tunes make).
        snapshots = TuneSnapshots(sessions, tune_dir / "jobs")
        privacy = Privacy(
            sessions,
            writer,
            exchange_log,
            conversations,
            place_settings,
            uploads=kb,
            snapshots=snapshots,
        )
        # Before the writer closes (LIFO): rewrites begun for deleted messages finish.
        stack.push_async_callback(privacy.settle)
        counter = TokenCounter()
        answerer = Answerer(models, counter)
        budget = Budget(
            person_daily_usd=settings.person_daily_budget_usd,
            server_daily_usd=settings.server_daily_budget_usd,
            sessions=sessions,
            exchange_log=exchange_log,
        )
        service = ChatService(
            catalog=catalog,
            answerer=answerer,
            conversations=conversations,
            place_settings=place_settings,
            exchange_log=exchange_log,
            writer=writer,
            feedback=Feedback(
                sessions, writer, opted_out=privacy.opted_out, logging_on=privacy.logging_on
            ),
            leaderboards=Leaderboards(
                sessions, catalog, min_battles=settings.leaderboard_min_battles
            ),
            comparisons=Comparisons(
                catalog,
                answerer,
                exchange_log,
                writer,
                sessions,
                votes_per_day=settings.arena_votes_per_day,
                opted_out=privacy.opted_out,
                logging_on=privacy.logging_on,
                count_unstored=privacy.count,
                still_storable=privacy.may_store,
                budget=budget,
            ),
            privacy=privacy,
            limits=PersonLimit(settings.messages_per_minute),
            budget=budget,
            knowledge=kb,
        )
        evaluator = Evaluator(catalog, answerer, sessions)
        exporter = Exporter(
            sessions,
            counter,
            targets=lambda: export_targets(catalog.all()),
            default_model=lambda: catalog.registry.default_model,
        )
        from bot.service.tune_local import LocalLoraBackend
        from bot.service.tune_openai import OpenAIBackend

        tunes = TuneService(
            sessions,
            catalog,
            service.place_settings,
            exporter,
            backends={
                "local": LocalLoraBackend(tune_dir / "bases"),
                "openai": OpenAIBackend(
                    settings.secret, redact, poll_interval_s=settings.tune_poll_seconds
                ),
            },
            jobs_dir=tune_dir / "jobs",
            snapshots=snapshots,
        )
        stack.push_async_callback(tunes.aclose)
        yield App(
            settings,
            engine,
            sessions,
            writer,
            registry,
            service,
            local,
            kb,
            redact,
            exporter,
            evaluator,
            tunes,
        )


def export_targets(specs: Iterable[ModelSpec]) -> dict[str, ModelTarget]:
    """What the dataset export needs of each model: its window and its training price."""
    return {
        spec.name: ModelTarget(spec.name, spec.context_window, spec.training_price)
        for spec in specs
    }
