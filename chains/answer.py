"""One model's attempt at an answer: the unit that chat, retry, compare, arena and eval share.

    attempt = answerer.prepare(spec, Prompt(system_prompt, history, question, sources))
    async for piece in answerer.stream(attempt):     # or: await answerer.run(attempt)
        ...
    attempt.reply, attempt.usage, attempt.ttft_ms, attempt.latency_ms, attempt.error

`prepare` fits the prompt into the model's context window (the oldest history goes first);
`stream` sends it, records the text, token usage and timings, and turns any failure into a
message a person can act on (`attempt.error`), never an exception. Nothing here knows about
conversations, places or the log. `with_fallbacks` is the fallback policy around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable

from chains.chat import build_messages, create_chat_chain
from chains.dispatch import DispatchGate
from chains.failures import classify_failure
from chains.models import ChatModelFactory
from chains.registry import ModelSpec
from chains.tokens import TokenCounter, prompt_budget
from core.errors import UserError
from core.messages import FallbackUsed, ReplyDelta, Source, Usage
from core.text import clean

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prompt:
    """What to ask: the system prompt, the history before the question, and retrieved passages."""

    system_prompt: str | None  # None: the default prompt; "": none of our own
    history: Sequence[tuple[str, str]]  # ("user" | "assistant", text), oldest first
    question: str
    sources: Sequence[Source] = ()


@dataclass(slots=True)
class Attempt:
    """One model's try at an answer: what it was sent, what it wrote, what it cost, how it failed."""

    spec: ModelSpec
    sent: list[BaseMessage]  # empty when the prompt did not fit this model's window
    history_used: int = 0  # how many of the prompt's history messages were sent (the newest)
    text: list[str] = field(default_factory=list)
    usage: Usage | None = None  # as the provider reported it
    ttft_ms: float | None = None  # from `started` to the first piece of text
    latency_ms: float | None = None  # from `started` to the end of the stream
    error: str | None = None  # a message a person can act on; None when it answered
    fallback_ok: bool = True  # False when another model must not be asked the same thing
    cleaned: bool = False  # the model wrote characters no database stores; they were cleaned

    @property
    def reply(self) -> str:
        return "".join(self.text)

    @property
    def ok(self) -> bool:
        return self.error is None


class Answerer:
    """Runs one model on one prompt; shared by everything that asks a model for an answer."""

    def __init__(
        self,
        models: ChatModelFactory,
        tokens: TokenCounter,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.models = models
        self.tokens = tokens
        self.clock = clock
        self._chains: dict[str, tuple[BaseChatModel, Runnable[Any, Any]]] = {}
        self._dispatch = DispatchGate()

    def prepare(self, spec: ModelSpec, prompt: Prompt) -> Attempt:
        """An attempt holding the exact messages to send `spec`: history trimmed to its window.

        A prompt too long for the window even without history gives an attempt that is
        already failed (nothing to send), so that a fallback with a larger window may try.
        """
        system, past, question = build_messages(
            prompt.system_prompt, prompt.history, prompt.question, prompt.sources
        )
        try:
            sent = self.tokens.trim_history(
                system, past, question, prompt_budget(spec), model_name=spec.name
            )
        except UserError as exc:
            return Attempt(spec, [], error=exc.message)
        return Attempt(spec, sent, history_used=len(sent) - len(system) - len(question))

    async def stream(
        self, attempt: Attempt, started: float | None = None
    ) -> AsyncGenerator[str, None]:
        """Stream the model's answer into `attempt`, yielding each piece of text as it arrives.

        Times count from `started` (a `clock()` reading; default: now). A failure ends the
        stream quietly, with `attempt.error` set; only cancellation propagates.
        """
        if started is None:
            started = self.clock()
        if not attempt.sent:
            if attempt.error is None:
                attempt.error = "There was nothing to send to the model."
            return
        spec = attempt.spec
        try:
            model = await self.models.get(spec)
            await self._dispatch.turn()  # so that a burst of messages goes out as it is prepared
            async for chunk in self._chain(spec.name, model).astream(attempt.sent):
                if chunk.usage_metadata:
                    usage = chunk.usage_metadata
                    attempt.usage = Usage(
                        usage.get("input_tokens", 0), usage.get("output_tokens", 0)
                    )
                piece = chunk.content if isinstance(chunk.content, str) else chunk.text
                if piece:
                    piece, changed = clean(piece)
                    if changed:
                        attempt.cleaned = True
                    if attempt.ttft_ms is None:
                        attempt.ttft_ms = (self.clock() - started) * 1000
                    attempt.text.append(piece)
                    yield piece
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every model failure becomes a message, never a traceback
            exc = await self._local_cause(spec, exc)
            # Scrubbed of every secret the app holds: this text is shown, logged and stored.
            failure = classify_failure(exc, spec.name, spec.api_key_env, self.models.redact)
            attempt.error = failure.message
            attempt.fallback_ok = failure.fallback_ok
            if attempt.text:
                attempt.error = f"{failure.message} The answer above was cut off."
            log.warning(
                "model %s failed: %s (%s): %s",
                spec.name,
                failure.kind,
                type(exc).__name__,
                failure.message,
            )
        finally:
            attempt.latency_ms = (self.clock() - started) * 1000

    async def run(self, attempt: Attempt, started: float | None = None) -> Attempt:
        """Run `attempt` to its end without streaming; returns it."""
        async with aclosing(self.stream(attempt, started)) as pieces:
            async for _ in pieces:
                pass
        return attempt

    def cost(self, attempt: Attempt) -> float:
        """What the attempt cost in USD, from `billed` (0 unbilled, or without a price)."""
        usage = self.billed(attempt)
        return attempt.spec.cost(usage.prompt_tokens, usage.completion_tokens) if usage else 0.0

    def billed(self, attempt: Attempt) -> Usage | None:
        """The tokens the attempt was billed for: as reported, else estimated from what was sent.

        Some OpenAI-compatible servers send no usage, and a stream cut short never gets to it;
        an estimate beats logging nothing. None when nothing was sent or nothing came back.
        """
        if attempt.usage is not None:
            return attempt.usage
        if attempt.sent and (attempt.ok or attempt.text):
            return Usage(
                self.tokens.count_messages(attempt.sent), self.tokens.count_text(attempt.reply)
            )
        return None

    async def _local_cause(self, spec: ModelSpec, exc: Exception) -> Exception:
        """For a local model, a dropped connection usually means its server died: say so."""
        local = self.models.local
        if not spec.is_local or local is None:
            return exc
        try:
            await local.raise_if_dead(spec)
        except UserError as died:
            return died
        return exc

    def _chain(self, name: str, model: BaseChatModel) -> Runnable[Any, Any]:
        """The chat chain around `model`, built once per model object."""
        cached = self._chains.get(name)
        if cached is None or cached[0] is not model:
            cached = (model, create_chat_chain(model))
            self._chains[name] = cached
        return cached[1]


async def with_fallbacks(
    answerer: Answerer,
    chain: Sequence[ModelSpec],
    prompt: Prompt,
    attempts: list[Attempt],
    started: float,
) -> AsyncGenerator[ReplyDelta | FallbackUsed, None]:
    """Ask each model of `chain` in turn until one answers; each try is appended to `attempts`.

    The next model is asked only when the last one failed before writing anything and its
    failure allows it (a content-policy refusal does not: asking another model would
    sidestep it). Yields the text as it arrives, and a `FallbackUsed` before each fallback.
    """
    for position, spec in enumerate(chain):
        attempt = answerer.prepare(spec, prompt)
        attempts.append(attempt)
        if attempt.sent:
            async with aclosing(answerer.stream(attempt, started)) as pieces:
                async for piece in pieces:
                    yield ReplyDelta(piece)
        if attempt.ok:
            return
        following = chain[position + 1] if position + 1 < len(chain) else None
        if attempt.text or following is None or not attempt.fallback_ok:
            return
        yield FallbackUsed(failed_model=spec.name, model=following.name, reason=attempt.error or "")
