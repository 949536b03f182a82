"""Settings: the one place that reads the environment.

The CLI builds a `Settings` once and passes it (or the parts it needs) down; nothing
else reads `os.environ`. Secrets are `SecretStr` so they never show up in a repr or a log.
API keys named by the model registry's `api_key_env` are looked up through
`Settings.secret(name)`, which reads the environment captured at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError


class Settings(BaseSettings):
    """Everything Switchboard reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore")

    config: Path = Field(default=Path("switchboard.toml"), description="Model registry TOML file.")
    data_dir: Path = Field(
        default=Path("data"), description="Folder for the SQLite file, Chroma and logs."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; SQLite in the data folder when unset."
    )
    manager_role: str | None = Field(
        default=None,
        description="Role name that may change channel settings besides Manage Channels.",
    )
    knowledge_role: str | None = Field(
        default=None,
        description="Role name that may manage the knowledge base besides Manage Server.",
    )
    max_local_models: int = Field(
        default=2, ge=1, description="How many local llama.cpp models stay loaded at once."
    )
    messages_per_minute: int = Field(
        default=20,
        ge=0,
        description="Messages one person may address to the bot in Discord per minute; 0 for no limit.",
    )
    person_daily_budget_usd: float = Field(
        default=0.0,
        ge=0,
        description="What one person's answers from priced models may cost per day (UTC), "
        "in USD, across every server; 0 for no budget.",
    )
    server_daily_budget_usd: float = Field(
        default=0.0,
        ge=0,
        description="What a server's answers from priced models may cost per day (UTC), in "
        "USD; 0 for no budget.",
    )
    tune_poll_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often a provider's fine-tuning job is polled for its status, in seconds.",
    )
    arena_votes_per_day: int = Field(
        default=50,
        ge=0,
        description="Blind-battle votes one person may cast per day (UTC); 0 for no limit.",
    )
    request_timeout: float = Field(
        default=60.0, gt=0, description="Seconds before a model request is given up."
    )
    max_retries: int = Field(
        default=2,
        ge=0,
        description="Retries of a failed model request before its fallback answers.",
    )
    retention_days: int | None = Field(
        default=None,
        ge=0,
        description="Delete logged exchanges older than this many days (daily, and with "
        "`switchboard db purge`); unset or 0 keeps them. A server may set its own with /retention.",
    )
    log_level: str = Field(default="INFO")
    leaderboard_min_battles: int = Field(
        default=20,
        ge=1,
        description="Battles a model needs before the leaderboard ranks it (fewer: 'unranked').",
    )
    shard_count: int | None = Field(
        default=None,
        ge=1,
        description="Total Discord shards (sharding across processes); automatic when unset.",
    )
    shard_ids: list[int] | None = Field(
        default=None, description="The shards this process runs, as a JSON list, e.g. [0, 1]."
    )
    test_postgres_url: str | None = Field(
        default=None,
        description="PostgreSQL server for the tests marked `postgres` (scripts/postgres.sh start prints one).",
    )

    # Knowledge base (Chroma + embeddings).
    embedding_provider: str = Field(
        default="local",
        description="'local' (bundled all-MiniLM-L6-v2), 'openai' or 'openai-compatible'.",
    )
    embedding_model: str | None = Field(
        default=None,
        description="Embedding model name; all-MiniLM-L6-v2 locally, text-embedding-3-small for OpenAI when unset.",
    )
    embedding_base_url: str | None = Field(
        default=None, description="Base URL of an OpenAI-compatible embeddings endpoint."
    )
    embedding_api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Environment variable holding the embeddings API key."
    )
    knowledge_max_file_mb: float = Field(
        default=20.0, gt=0, description="Largest document one upload may be."
    )
    knowledge_max_guild_mb: float = Field(
        default=200.0, gt=0, description="Total document size one server may keep."
    )
    knowledge_top_k: int = Field(default=4, ge=1, le=50, description="Passages put into a prompt.")
    knowledge_min_relevance: float = Field(
        default=0.25, ge=0, le=1, description="Passages scoring below this are left out of prompts."
    )
    knowledge_chunk_chars: int = Field(
        default=900, ge=200, description="Target characters per chunk."
    )
    knowledge_collection_prefix: str = Field(
        default="switchboard-",
        description="Prefix of the Chroma collection names (one per server).",
    )

    discord_token: SecretStr | None = Field(default=None, validation_alias="DISCORD_TOKEN")
    chroma_host: str | None = Field(default=None, validation_alias="CHROMA_HOST")
    chroma_port: int = Field(default=8000, validation_alias="CHROMA_PORT")

    # The process environment as it was when the settings were read: the registry
    # names the variables that hold API keys, so they cannot be fields.
    environ: dict[str, str] = Field(
        default_factory=lambda: dict(os.environ), exclude=True, repr=False
    )

    @classmethod
    def load(cls) -> Settings:
        """Read the environment; a bad value is a ConfigError naming the variable, never its value."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(
                f"{_variable(error['loc'])}: {error['msg']}"
                for error in exc.errors(include_input=False)
            )
            raise ConfigError(f"Invalid configuration: {problems}") from None

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL in effect."""
        if self.database_url:
            return _async_url(self.database_url)
        return f"sqlite+aiosqlite:///{(self.data_dir / 'switchboard.db').resolve()}"

    def secret(self, name: str) -> SecretStr | None:
        """The value of the environment variable `name`, kept secret; None if unset or empty."""
        value = self.environ.get(name, "").strip()
        return SecretStr(value) if value else None


def _async_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://, sqlite://) and pick async drivers."""
    for plain, driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def _variable(loc: tuple[int | str, ...]) -> str:
    """The environment variable behind a settings field's error location."""
    name = str(loc[0]) if loc else "?"
    return name if name.isupper() else f"SWITCHBOARD_{name.upper()}"
