"""SQLAlchemy models: channel settings, conversations, messages, registered models.

The schema changes only through Alembic revisions in `migrations/`; a test checks that
these models and the migrations agree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.exchange import MESSAGE_KINDS, VOTE_REASONS

SETTING_SCOPES: tuple[str, ...] = ("guild", "channel", "thread")
SETTING_FIELDS: tuple[str, ...] = (
    "model",
    "system_prompt",
    "knowledge_enabled",
    "log_enabled",
    "retention_days",
    "arena_pool",
)

# Stable constraint names, so later migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    """A fresh id for our own rows: 32 hex characters of a uuid4."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops the zone; we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; store timezone-aware UTC times")
        value = value.astimezone(UTC)
        # SQLite stores the text without a zone, so store it already in UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSON None is stored as SQL NULL, not the JSON text 'null', so "IS NULL" finds it.
JSONValue = JSON(none_as_null=True)


class Base(DeclarativeBase):
    """Declarative base with the naming conventions on its metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def table_of(model: type[Base]) -> Table:
    """A model's table, for Core statements (plain INSERTs on the logging hot path)."""
    return cast(Table, model.__table__)


class ChannelSetting(Base):
    """Settings for one guild, channel (DMs included) or thread. NULL means inherit.

    A row is keyed by its scope, its server and its id: Discord's ids are unique
    everywhere, but the terminal's are made up (`chat --guild 1 --channel 5` and
    `--guild 2 --channel 5` are two channels). A DM channel has no server (NULL), and
    NULLs never collide in a unique constraint, so DMs have a unique index of their own.
    """

    __tablename__ = "channel_settings"
    __table_args__ = (
        UniqueConstraint("scope", "guild_id", "scope_id"),
        Index(
            "uq_channel_settings_scope_scope_id_no_guild",
            "scope",
            "scope_id",
            unique=True,
            sqlite_where=text("guild_id IS NULL"),
            postgresql_where=text("guild_id IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(16))
    scope_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str | None] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    knowledge_enabled: Mapped[bool | None] = mapped_column(Boolean)
    # False: nothing said here is stored (only anonymous counts).
    log_enabled: Mapped[bool | None] = mapped_column(Boolean)
    # Server scope only: keep exchanges this many days (0: forever); NULL: the bot's default.
    retention_days: Mapped[int | None] = mapped_column(Integer)
    # The models blind battles (/arena) draw from here; NULL: the config's arena_pool.
    arena_pool: Mapped[list[str] | None] = mapped_column(JSONValue)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    updated_by: Mapped[int | None] = mapped_column(BigInteger)

    def get(self, field: str) -> Any:
        """The value of one setting field (None when it inherits)."""
        if field not in SETTING_FIELDS:
            raise ValueError(f"unknown setting field {field!r}")
        return getattr(self, field)


class SettingChange(Base):
    """One change to a setting: who changed which field from what to what."""

    __tablename__ = "setting_changes"
    __table_args__ = (Index("ix_setting_changes_scope_scope_id", "scope", "scope_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(16))
    scope_id: Mapped[int] = mapped_column(BigInteger)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    field: Mapped[str] = mapped_column(String(32))
    old_value: Mapped[str | None] = mapped_column(Text)
    new_value: Mapped[str | None] = mapped_column(Text)
    actor_id: Mapped[int] = mapped_column(BigInteger)
    actor_name: Mapped[str] = mapped_column(String(200))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Conversation(Base):
    """A Discord thread, a reply chain in a channel, or a terminal session."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    # Indexed: a thread, and a DM channel, each hold one running conversation.
    channel_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    thread_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    started_by: Mapped[int | None] = mapped_column(BigInteger)
    origin: Mapped[str] = mapped_column(String(16), default="discord")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # The database cascades the delete; the ORM need not load the rows first.
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="raise",
    )


def default_kind(role: str | None) -> str:
    """The kind of a message logged without one: a person's prompt, or the answer to it."""
    return "prompt" if role == "user" else "answer"


def _kind_default(context: DefaultExecutionContext) -> str:
    """Column default for `kind`, from the row's `role`."""
    parameters: dict[str, Any] = context.get_current_parameters()  # type: ignore[no-untyped-call]
    return default_kind(parameters.get("role"))


class Message(Base):
    """One prompt, or one answer to it (of a `kind`); `parent_id` links it to what it follows."""

    __tablename__ = "messages"
    __table_args__ = (
        # Named (ck_messages_kind), so SQLite batch mode carries it over and can drop it.
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{kind}'" for kind in MESSAGE_KINDS) + ")", name="kind"
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    # CASCADE: deleting a message deletes what derives from it (its answers, and the
    # rest of the line built on it), so nothing keeps a forgotten message's words.
    # SQLite refuses a cascade more than 1,000 levels deep, so delete through
    # ConversationRepository.delete_messages / delete, which go newest first.
    parent_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    # core.exchange.MESSAGE_KINDS; the answer a conversation continues from is "answer".
    kind: Mapped[str] = mapped_column(String(16), default=_kind_default)
    content: Mapped[str] = mapped_column(Text)
    # True when the text as it arrived could not be stored as it was (a NUL byte, a lone
    # surrogate) and was cleaned first; `content` is what the model saw (core.text.clean).
    cleaned: Mapped[bool | None] = mapped_column(Boolean)
    author_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    author_name: Mapped[str | None] = mapped_column(String(200))
    # Indexed, like created_at and model_name: the export filters on them.
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    channel_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    thread_id: Mapped[int | None] = mapped_column(BigInteger)
    # Indexed (0007): every Discord message deletion the bot hears of is looked up by it.
    discord_message_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    # Assistant answers only: what a later fine-tune or comparison needs.
    model_name: Mapped[str | None] = mapped_column(String(200), index=True)
    provider: Mapped[str | None] = mapped_column(String(64))
    provider_model: Mapped[str | None] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    request_messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONValue)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    fallback_from: Mapped[str | None] = mapped_column(String(200))
    source_ids: Mapped[list[str] | None] = mapped_column(JSONValue)
    # An "alternative" (a retry) or "correction": the answer it is another try at.
    alternative_to: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )

    conversation: Mapped[Conversation] = relationship(back_populates="messages", lazy="raise")


class MessageInput(Base):
    """One stored message that went into an answer: the answer's input at `position`.

    So "which answers used this person's words" is one query on `input_id`.
    """

    __tablename__ = "message_inputs"

    answer_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    # 0 is the oldest history turn; the prompt comes last.
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    input_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )


class DiscordMessage(Base):
    """A Discord message the bot sent for an answer (a long answer spans several)."""

    __tablename__ = "discord_messages"

    # Discord assigns the id; never let PostgreSQL make this a serial.
    discord_message_id: Mapped[int] = mapped_column(
        BigInteger, primary_key=True, autoincrement=False
    )
    message_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    conversation_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )


class RegisteredModel(Base):
    """A model added at run time (a GGUF file, a fine-tune): a registry entry without secrets."""

    __tablename__ = "registered_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))


class Vote(Base):
    """One person's 👍 (+1) or 👎 (-1) on one answer, with an optional reason and comment."""

    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("answer_id", "voter_id"),  # one vote per person per answer
        CheckConstraint("value IN (-1, 1)", name="value"),
        CheckConstraint(
            "reason IS NULL OR reason IN (" + ", ".join(f"'{r}'" for r in VOTE_REASONS) + ")",
            name="reason",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    answer_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    voter_id: Mapped[int] = mapped_column(BigInteger, index=True)
    voter_name: Mapped[str | None] = mapped_column(String(200))
    value: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))  # button, reaction, terminal
    # The answer's place, copied so that stats and exports filter without a join.
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Person(Base):
    """What a person chose about their data: opted out, they are answered but not stored."""

    __tablename__ = "people"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AnonymousCount(Base):
    """Exchanges that were answered but not stored (opted-out people, places that log
    nothing), counted per day, server and model: nothing about who or what."""

    __tablename__ = "anonymous_counts"
    __table_args__ = (UniqueConstraint("day", "guild_id", "model_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    day: Mapped[date] = mapped_column(Date)
    guild_id: Mapped[int] = mapped_column(BigInteger, default=0)  # 0: DMs and the terminal
    model_name: Mapped[str] = mapped_column(String(200))
    exchanges: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)


class Spending(Base):
    """What one person spent on priced models in one server on one day (UTC), in USD:
    the budgets' running totals (bot.service.limits). Kept for opted-out people too (a
    sum, no words); a forgotten person's rows pass to person 0, so the server's total
    stays; the purge deletes the days that are over."""

    __tablename__ = "spending"
    __table_args__ = (UniqueConstraint("day", "guild_id", "person_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    day: Mapped[date] = mapped_column(Date)
    guild_id: Mapped[int] = mapped_column(BigInteger, default=0)  # 0: DMs
    person_id: Mapped[int] = mapped_column(BigInteger, index=True)  # 0: forgotten people
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)


class Battle(Base):
    """A blind battle: two models answered one prompt anonymously as A and B.

    Invalid (with the reason) when an answer gave its model away: its votes do not count.
    """

    __tablename__ = "battles"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    prompt_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    answer_a: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"))
    answer_b: Mapped[str] = mapped_column(String(32), ForeignKey("messages.id", ondelete="CASCADE"))
    # The models' names, kept here so the leaderboard fit reads one table.
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    pool: Mapped[list[str] | None] = mapped_column(JSONValue)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    channel_id: Mapped[int | None] = mapped_column(BigInteger)
    thread_id: Mapped[int | None] = mapped_column(BigInteger)
    asked_by: Mapped[int | None] = mapped_column(BigInteger, index=True)
    invalid: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class BattleVote(Base):
    """One person's verdict on a battle: A better, B better, a tie, or both bad."""

    __tablename__ = "battle_votes"
    __table_args__ = (
        UniqueConstraint("battle_id", "voter_id"),  # one vote per person per battle
        CheckConstraint("outcome IN ('a', 'b', 'tie', 'bad')", name="outcome"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    battle_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("battles.id", ondelete="CASCADE"), index=True
    )
    voter_id: Mapped[int] = mapped_column(BigInteger, index=True)
    outcome: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Preference(Base):
    """In a side-by-side comparison, the answer one person found best (one per person)."""

    __tablename__ = "preferences"
    __table_args__ = (UniqueConstraint("prompt_id", "voter_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    prompt_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    chosen_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE")
    )
    voter_id: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


MESSAGE_FIELDS: frozenset[str] = frozenset(Message.__table__.columns.keys())


TUNE_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
# Queued or running: a server has at most one such job (a partial unique index).
TUNE_ACTIVE: tuple[str, ...] = ("queued", "running")
GATE_ACTIONS: tuple[str, ...] = ("candidate", "promoted", "rolled_back", "default_set")
_ACTIVE_SQL = "status IN ('queued', 'running')"


class TuneJob(Base):
    """A fine-tuning job: what it trains from (a frozen export), how far it got, what it made."""

    __tablename__ = "tune_jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in TUNE_STATUSES) + ")", name="status"
        ),
        CheckConstraint("method IN ('sft', 'dpo')", name="method"),
        # One queued or running job per server (0: jobs started outside any server).
        Index(
            "uq_tune_jobs_active_guild",
            "guild_key",
            unique=True,
            sqlite_where=text(_ACTIVE_SQL),
            postgresql_where=text(_ACTIVE_SQL),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    guild_key: Mapped[int] = mapped_column(BigInteger, default=0)  # guild_id, or 0
    name: Mapped[str] = mapped_column(String(200))  # the model it registers
    base_model: Mapped[str] = mapped_column(String(200))
    backend: Mapped[str] = mapped_column(String(32))  # "local", "openai"
    method: Mapped[str] = mapped_column(String(8))
    # The frozen snapshot: the export's data file, its SHA-256 and rows, and its filters.
    snapshot_path: Mapped[str] = mapped_column(Text)
    snapshot_sha256: Mapped[str] = mapped_column(String(64))
    snapshot_rows: Mapped[int] = mapped_column(Integer)
    filters: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    steps: Mapped[int | None] = mapped_column(Integer)  # asked for (or epochs)
    epochs: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    phase: Mapped[str] = mapped_column(String(32), default="queued")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    losses: Mapped[list[float]] = mapped_column(JSONValue, default=list)
    eta_s: Mapped[float | None] = mapped_column(Float)
    external_id: Mapped[str | None] = mapped_column(String(200))  # the provider's job id
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    started_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Written every few seconds by the process running a local job: a stale one died.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(200))  # registered on success


class ModelGateEvent(Base):
    """One step of a fine-tune's way to people: registered as a candidate, promoted, rolled back."""

    __tablename__ = "model_gate_events"
    __table_args__ = (
        CheckConstraint(
            "action IN (" + ", ".join(f"'{a}'" for a in GATE_ACTIONS) + ")", name="action"
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("tune_jobs.id", ondelete="SET NULL"), index=True
    )
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    # What was the server's default before a promote --default set it (a rollback restores it).
    previous_default: Mapped[str | None] = mapped_column(String(200))
    actor: Mapped[str] = mapped_column(String(200))  # "cli", a Discord user id and name, a job
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
