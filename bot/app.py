"""Wiring: build every long-lived part from the settings, once, and close them again.

`open_app(settings)` is the only place that creates clients (database engine, log
writer, local model servers, model factory, knowledge base) and the service's parts. The
CLI commands, the Discord bot, the benchmarks and the tests all go through it, so they
run the same code. It is also the only place that reads `Settings`: the parts below it
take small config objects (`chains.models.ClientConfig`, the knowledge base's config).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.service.chat import ChatService
from bot.service.conversations import ConversationIndex
from bot.service.limits import PersonLimit
from bot.service.models import ModelCatalog
from bot.service.place_settings import PlaceSettings
from chains.answer import Answerer
from chains.models import ClientConfig
from chains.registry import ModelRegistry
from chains.tokens import TokenCounter
from core.settings import Settings
from knowledge.config import EmbeddingConfig, KnowledgeConfig
from migrations import upgrade_database
from store.db import create_engine, create_session_factory
from store.exchange_log import ExchangeLog
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


def client_config(settings: Settings) -> ClientConfig:
    """How model clients behave, from the settings."""
    return ClientConfig(
        request_timeout=settings.request_timeout,
        max_retries=settings.max_retries,
        secret=settings.secret,
    )


def knowledge_config(settings: Settings) -> KnowledgeConfig:
    """The knowledge base's share of the settings (the API key read from the environment)."""
    embedding = EmbeddingConfig(
        provider=settings.embedding_provider,
        model=settings.embedding_model,
        base_url=settings.embedding_base_url,
        api_key=settings.secret(settings.embedding_api_key_env),
        api_key_env=settings.embedding_api_key_env,
        timeout=settings.request_timeout,
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

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.sqlalchemy_url
    if migrate:
        await upgrade_database(url)
    async with AsyncExitStack() as stack:
        engine = create_engine(url)
        stack.push_async_callback(engine.dispose)
        sessions = create_session_factory(engine)
        # A config named explicitly must exist; the default one may be absent (built-in model).
        registry = ModelRegistry.from_toml(
            settings.config, required="config" in settings.model_fields_set
        )
        catalog = ModelCatalog(registry, sessions)
        await catalog.refresh()
        stack.push_async_callback(catalog.aclose)

        writer = LogWriter(sessions, logger=logging.getLogger("switchboard.log_writer"))
        await writer.start()
        stack.push_async_callback(writer.aclose)

        local = LocalServers(max_loaded=settings.max_local_models)
        stack.push_async_callback(local.aclose)
        models = ChatModelFactory(client_config(settings), local)
        stack.push_async_callback(models.aclose)

        kb = None
        if knowledge is True:
            from knowledge.base import KnowledgeBase

            # Chroma and torch load on first use, long after start-up: freeze them then.
            kb = KnowledgeBase(knowledge_config(settings), on_loaded=freeze_long_lived_heap)
        elif knowledge:
            kb = knowledge
        if kb is not None:
            stack.push_async_callback(kb.aclose)

        service = ChatService(
            catalog=catalog,
            answerer=Answerer(models, TokenCounter()),
            conversations=ConversationIndex(sessions, writer),
            place_settings=PlaceSettings(sessions, registry),
            exchange_log=ExchangeLog(writer),
            writer=writer,
            limits=PersonLimit(settings.messages_per_minute),
            knowledge=kb,
        )
        yield App(settings, engine, sessions, writer, registry, service, local, kb)
