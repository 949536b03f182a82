"""An exchange as it is logged: one prompt and the answers given to it.

The chat service builds an `Exchange` when an answer is finished (or stopped); `store`
maps it to rows (`store.exchange_log`). Everything a later fine-tune, comparison or
privacy request needs is here: the exact messages each model was sent, which stored
messages went into it, and what kind of answer each one is. A blind battle's own record
(`LoggedBattle`: which answer was A and which B) is logged after its exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from core.messages import Place

# What a stored message is. Answers to one prompt are siblings; only these kinds exist:
# - "prompt": what a person wrote;
# - "answer": the answer the conversation continues from;
# - "attempt": a model that failed before its fallback answered (kept for the record);
# - "alternative": another answer to the same prompt, asked for on purpose (a retry);
# - "comparison", "battle": answers given side by side, or anonymously in a blind battle;
# - "correction": a person's better answer to the prompt (the one it corrects in
#   `alternative_to`): the strongest training signal there is.
MessageKind = Literal[
    "prompt", "answer", "attempt", "alternative", "comparison", "battle", "correction"
]
MESSAGE_KINDS: tuple[MessageKind, ...] = (
    "prompt",
    "answer",
    "attempt",
    "alternative",
    "comparison",
    "battle",
    "correction",
)
# Why a person disliked an answer (the 👎 modal, `/bad REASON`).
VoteReason = Literal["wrong", "unhelpful", "unsafe", "off_topic", "too_long", "refused", "other"]
VOTE_REASONS: tuple[VoteReason, ...] = (
    "wrong",
    "unhelpful",
    "unsafe",
    "off_topic",
    "too_long",
    "refused",
    "other",
)

Status = Literal["ok", "error", "fallback"]
Origin = Literal["discord", "terminal"]


@dataclass(frozen=True, slots=True)
class LoggedAnswer:
    """One model's answer (or failed attempt) to the exchange's prompt."""

    id: str
    kind: MessageKind
    model_name: str
    provider: str
    provider_model: str
    content: str
    # The exact messages sent, in OpenAI's role/content form.
    request_messages: list[dict[str, Any]]
    # The stored messages those were built from, oldest first (history turns, then the prompt).
    input_ids: tuple[str, ...]
    status: Status
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    cost_usd: float | None = None
    fallback_from: str | None = None
    # For an "alternative" (a retry) or a "correction": the answer it is another try at.
    alternative_to: str | None = None
    # Who wrote it, for a "correction" (a person, not a model).
    author_id: int | None = None
    author_name: str | None = None
    # The model's text had characters no database stores (see core.text.clean) and was cleaned.
    cleaned: bool = False


@dataclass(frozen=True, slots=True)
class Exchange:
    """A prompt, the answers to it, and where it happened."""

    conversation_id: str
    place: Place
    origin: Origin
    prompt_id: str
    # The message the prompt follows (the previous answer); None when it starts the conversation.
    parent_id: str | None
    author_id: int
    author_name: str
    text: str
    system_prompt: str
    answers: tuple[LoggedAnswer, ...]
    source_ids: tuple[str, ...] = ()
    discord_message_id: int | None = None
    # False when the prompt is already stored (another answer to it, such as a retry).
    new_prompt: bool = True
    # The person's text had characters no database stores and was cleaned before it was sent.
    prompt_cleaned: bool = False


@dataclass(frozen=True, slots=True)
class LoggedBattle:
    """A blind battle, logged after its exchange: which answer was A, which B, drawn from what.

    `invalid` says why its votes do not count (an answer gave its model away, or failed).
    """

    id: str
    prompt_id: str
    answer_a: str
    answer_b: str
    model_a: str
    model_b: str
    pool: tuple[str, ...]
    place: Place
    asked_by: int
    invalid: str | None = None
