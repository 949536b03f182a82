"""The small data model the adapters and the chat service exchange.

Adapters (Discord, terminal) turn their events into a `ChatRequest` and render the
`ChatEvent`s that `ChatService.stream` yields; they never see LangChain or SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Scope = Literal["thread", "channel", "guild", "global"]


def scope_word(scope: Scope) -> str:
    """How a person calls a scope: "server" for a guild, "bot" for the global defaults."""
    return {"guild": "server", "global": "bot"}.get(scope, scope)


@dataclass(frozen=True, slots=True)
class Place:
    """Where a message was said. In a thread, `channel_id` is the thread's parent channel."""

    guild_id: int | None  # None in DMs
    channel_id: int
    thread_id: int | None = None

    @property
    def is_dm(self) -> bool:
        return self.guild_id is None


@dataclass(frozen=True, slots=True)
class Author:
    """Who said it."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One user message to answer."""

    place: Place
    author: Author
    text: str
    # Discord: the user's own message id, and the id of the message it replies to (if any).
    discord_message_id: int | None = None
    reply_to_discord_id: int | None = None
    # Discord: when the message was sent (seconds since the epoch, by Discord's clock).
    sent_at: float | None = None
    # Terminal: the conversation to continue (None starts a new one).
    conversation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Source:
    """A retrieved passage an answer drew on."""

    chunk_id: str
    document: str
    location: str | None  # "page 3", "## Install", ...
    score: float
    text: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class ReplyStarted:
    """The model that is about to answer, and the ids the answer will be stored under."""

    model: str
    conversation_id: str
    message_id: str


@dataclass(frozen=True, slots=True)
class ReplyDelta:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class FallbackUsed:
    """`failed_model` failed for `reason`; `model` answers instead."""

    failed_model: str
    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The finished exchange, as logged."""

    reply: str
    model: str | None
    conversation_id: str
    message_id: str | None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    usage: Usage | None = None
    cost_usd: float | None = None
    fallback_from: str | None = None
    error: str | None = None  # a user-facing message when no model could answer
    sources: tuple[Source, ...] = ()
    # Set while the log cannot be written: the exchange is kept and written later.
    log_problem: str | None = None
    # False when the exchange was answered but not stored (an opted-out person, a place
    # that logs nothing): there is no stored answer to vote on, retry or export.
    stored: bool = True


@dataclass(frozen=True, slots=True)
class ReplyFinished:
    result: ChatResult


ChatEvent = ReplyStarted | ReplyDelta | FallbackUsed | ReplyFinished
