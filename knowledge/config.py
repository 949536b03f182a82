"""What the knowledge base needs to know: where Chroma is, its limits, and which embedder to use.

The wiring (`bot.app.knowledge_config`) fills these from the settings; this package never
reads the settings itself, so it can be built and tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from core.redact import Redactor


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingConfig:
    """Which embedder to use and how to reach it."""

    provider: str  # "local", "openai" or "openai-compatible", as configured (checked when the embedder is made)
    model: str | None  # None: the provider's default model
    base_url: str | None
    api_key: SecretStr | None  # already read from the environment
    api_key_env: str  # the variable the key came from, named in messages about it
    timeout: float  # seconds per request to an embeddings endpoint
    # Scrubs the endpoint's error messages (the app's, knowing every secret it holds).
    redact: Redactor = field(default_factory=Redactor)


@dataclass(frozen=True, slots=True, kw_only=True)
class KnowledgeConfig:
    """Where the collections live, what an upload may bring, and how retrieval is cut off."""

    chroma_path: Path  # the embedded store's folder, used when there is no Chroma server
    chroma_host: str | None  # a Chroma server, or None for the embedded store
    chroma_port: int
    collection_prefix: str
    max_file_bytes: int
    max_guild_bytes: int
    chunk_chars: int  # target characters per passage
    top_k: int  # passages put into a prompt
    min_relevance: float  # passages scoring below this are left out of prompts
    embedding: EmbeddingConfig
