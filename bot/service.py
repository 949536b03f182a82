"""The chat service: the one place that decides how a message is answered.

It picks the model and system prompt in force where the message was written (thread →
channel → server → global, see `bot.place_settings`), whether to retrieve from the
knowledge base, and which history to send; it streams the answer through a LangChain
chain, falls back when a model fails, and hands every exchange to the log writer. It never imports `discord`: the Discord cogs and the
terminal chat are thin adapters around it.

Build one with `bot.app.open_app(settings)`, which wires the registry, database, log
writer, local model servers and knowledge base together and closes them again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.place_settings import EffectiveSettings, PlaceSettings, scope_word
from chains.chat import build_messages, create_chat_chain, messages_to_dicts
from chains.dispatch import DispatchGate
from chains.failures import classify_failure
from chains.models import ChatModelFactory
from chains.registry import ModelRegistry, ModelSpec
from chains.tokens import TokenCounter, prompt_budget
from core.cache import LRU
from core.errors import NotFound, UserError
from core.messages import (
    Author,
    ChatEvent,
    ChatRequest,
    ChatResult,
    FallbackUsed,
    Place,
    ReplyDelta,
    ReplyFinished,
    ReplyStarted,
    Scope,
    Source,
    Usage,
)
from store.exchange_log import ExchangeLog
from store.repositories import ConversationRepository
from store.writer import LogWriter

log = logging.getLogger(__name__)

# Recent turns kept in memory so a busy conversation never waits on the log writer.
TURN_CACHE_SIZE = 50_000
# Logged as the error of an answer whose reader went away before it was finished.
STOPPED = "The reply was stopped before it was finished: nobody was reading it any more."


@dataclass(frozen=True, slots=True)
class _Turn:
    """One stored message, as much as history needs."""

    id: str
    conversation_id: str
    role: str
    content: str
    parent_id: str | None


@dataclass
class _Attempt:
    """The state of one model's try at an answer."""

    spec: ModelSpec
    sent: list[BaseMessage]
    text: list[str] = field(default_factory=list)
    usage: Usage | None = None
    ttft_ms: float | None = None
    error: str | None = None
    fallback_ok: bool = True


class ChatService:
    """Answers chat requests and manages per-place settings."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        models: ChatModelFactory,
        session_factory: async_sessionmaker[AsyncSession],
        writer: LogWriter,
        tokens: TokenCounter | None = None,
        knowledge: Any | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.models = models
        self.sessions = session_factory
        self.writer = writer
        self.exchange_log = ExchangeLog(writer)
        self.tokens = tokens or TokenCounter()
        self.knowledge = knowledge
        self.clock = clock
        self.place_settings = PlaceSettings(session_factory, registry)
        self._turns: LRU = LRU(TURN_CACHE_SIZE)  # message id -> _Turn
        self._leaf: LRU = LRU(TURN_CACHE_SIZE)  # conversation id -> newest message id
        self._by_discord: LRU = LRU(TURN_CACHE_SIZE)  # discord id -> (conversation, message)
        self._thread_conv: LRU = LRU(TURN_CACHE_SIZE)  # thread or DM channel id -> conversation
        self._known_convs: LRU = LRU(TURN_CACHE_SIZE)  # conversation ids known to be stored
        self._chains: dict[str, tuple[BaseChatModel, Runnable]] = {}
        self._dispatch = DispatchGate()

    # ----------------------------------------------------------------- chatting

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        """Answer `request`, yielding the reply as it is written; logs the exchange."""
        started = self.clock()
        text = request.text.strip()
        if not text:
            raise UserError("There is nothing to answer: the message is empty.")
        settings = await self.effective_settings(request.place)
        spec = self._model_for(settings)
        conversation_id, leaf_id = await self._resolve_conversation(request)
        history = await self._history(leaf_id, spec)
        sources = await self._retrieve(request, settings, text)

        user_id = uuid.uuid4().hex
        answer_id = uuid.uuid4().hex
        yield ReplyStarted(model=spec.name, conversation_id=conversation_id, message_id=answer_id)

        system_prompt = settings.system_prompt.value
        attempts: list[_Attempt] = []
        chain = self.registry.fallback_chain(spec.name)

        def finish() -> ChatResult:
            return self._finish(
                request, attempts, sources, conversation_id, user_id, answer_id, leaf_id, system_prompt, started
            )

        try:
            for position, candidate in enumerate(chain):
                try:
                    attempt = _Attempt(candidate, self._fit(system_prompt, history, text, sources, candidate))
                except UserError as exc:
                    # Too long for this model's window: a fallback with a larger one may still fit it.
                    attempt = _Attempt(candidate, [], error=exc.message)
                attempts.append(attempt)
                if attempt.sent:
                    async with aclosing(self._run(attempt, started)) as deltas:
                        async for delta in deltas:
                            yield ReplyDelta(delta)
                if attempt.error is None:
                    break
                next_spec = chain[position + 1] if position + 1 < len(chain) else None
                if attempt.text or next_spec is None or not attempt.fallback_ok:
                    break
                yield FallbackUsed(failed_model=candidate.name, model=next_spec.name, reason=attempt.error)
        except (GeneratorExit, asyncio.CancelledError):
            # The reader went away mid-answer (Discord refused the reply, the bot is shutting
            # down): the model was asked and may have written and billed, so log it anyway.
            if attempts:
                if attempts[-1].error is None:
                    attempts[-1].error = STOPPED
                finish()
            raise

        yield ReplyFinished(finish())

    async def answer(self, request: ChatRequest) -> ChatResult:
        """Answer `request` and return the finished result (no streaming)."""
        async for event in self.stream(request):
            if isinstance(event, ReplyFinished):
                return event.result
        raise RuntimeError("the reply stream ended without a result")

    async def _run(self, attempt: _Attempt, started: float) -> AsyncIterator[str]:
        """Stream one model's answer into `attempt`, recording usage, timing and failure."""
        try:
            model = await self.models.get(attempt.spec)
            await self._dispatch.turn()  # so that a burst of messages goes out as it is prepared
            async for chunk in self._chain(attempt.spec.name, model).astream(attempt.sent):
                if chunk.usage_metadata:
                    usage = chunk.usage_metadata
                    attempt.usage = Usage(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
                piece = chunk.content if isinstance(chunk.content, str) else chunk.text
                if piece:
                    if attempt.ttft_ms is None:
                        attempt.ttft_ms = (self.clock() - started) * 1000
                    attempt.text.append(piece)
                    yield piece
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every model failure becomes a message, never a traceback
            exc = await self._local_cause(attempt.spec, exc)
            failure = classify_failure(exc, attempt.spec.name, attempt.spec.api_key_env)
            attempt.error = failure.message
            attempt.fallback_ok = failure.fallback_ok
            if attempt.text:
                attempt.error = f"{failure.message} The answer above was cut off."
            log.warning("model %s failed: %s (%s)", attempt.spec.name, failure.kind, type(exc).__name__)

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

    def _chain(self, name: str, model: BaseChatModel) -> Runnable:
        """The chat chain around `model`, built once per model object."""
        cached = self._chains.get(name)
        if cached is None or cached[0] is not model:
            cached = (model, create_chat_chain(model))
            self._chains[name] = cached
        return cached[1]

    def _fit(
        self,
        system_prompt: str,
        history: Sequence[_Turn],
        text: str,
        sources: Sequence[Source],
        spec: ModelSpec,
    ) -> list[BaseMessage]:
        """The exact messages to send `spec`: history trimmed to its context window."""
        system, past, question = build_messages(
            system_prompt, [(t.role, t.content) for t in history], text, sources
        )
        return self.tokens.trim_history(system, past, question, prompt_budget(spec), model_name=spec.name)

    def _finish(
        self,
        request: ChatRequest,
        attempts: list[_Attempt],
        sources: Sequence[Source],
        conversation_id: str,
        user_id: str,
        answer_id: str,
        leaf_id: str | None,
        system_prompt: str,
        started: float,
    ) -> ChatResult:
        """Turn the attempts into a result, remember the turn and queue the log rows."""
        latency_ms = (self.clock() - started) * 1000
        final = attempts[-1]
        reply = "".join(final.text)
        ok = final.error is None
        first = attempts[0].spec.name
        fallback_from = first if final.spec.name != first else None
        usage = final.usage
        if usage is None and final.sent and (ok or final.text):
            # Some OpenAI-compatible servers send no usage, and a stream cut short never gets
            # to it: estimate what was billed rather than log nothing.
            usage = Usage(self.tokens.count_messages(final.sent), self.tokens.count_text(reply))
        cost = final.spec.cost(usage.prompt_tokens, usage.completion_tokens) if usage else None

        place = request.place
        common = {
            "conversation_id": conversation_id,
            "guild_id": place.guild_id,
            "channel_id": place.channel_id,
            "thread_id": place.thread_id,
        }
        rows: list[dict[str, Any]] = [
            {
                **common,
                "id": user_id,
                "parent_id": leaf_id,
                "role": "user",
                "content": request.text,
                "author_id": request.author.id,
                "author_name": request.author.name,
                "discord_message_id": request.discord_message_id,
            }
        ]
        for attempt in attempts:
            is_final = attempt is final
            attempt_usage = usage if is_final else attempt.usage
            status = "ok" if attempt.error is None else "error"
            if is_final and ok and fallback_from:
                status = "fallback"
            rows.append(
                {
                    **common,
                    "id": answer_id if is_final else uuid.uuid4().hex,
                    "parent_id": user_id,
                    "role": "assistant",
                    "content": "".join(attempt.text),
                    "model_name": attempt.spec.name,
                    "provider": attempt.spec.provider,
                    "provider_model": attempt.spec.model,
                    "system_prompt": system_prompt,
                    "request_messages": messages_to_dicts(attempt.sent),
                    "prompt_tokens": attempt_usage.prompt_tokens if attempt_usage else None,
                    "completion_tokens": attempt_usage.completion_tokens if attempt_usage else None,
                    "latency_ms": latency_ms if is_final else None,
                    "ttft_ms": attempt.ttft_ms,
                    "cost_usd": cost if is_final else None,
                    "status": status,
                    "error": attempt.error,
                    "fallback_from": fallback_from if is_final else None,
                    "source_ids": [s.chunk_id for s in sources],
                }
            )
        # Sent with every exchange (an insert that skips existing rows), so the log never
        # depends on knowing whether an earlier write of this conversation got through.
        conversation = {
            "id": conversation_id,
            "guild_id": place.guild_id,
            "channel_id": place.channel_id,
            "thread_id": place.thread_id,
            "started_by": request.author.id,
            "origin": "discord" if request.discord_message_id is not None else "terminal",
        }
        self._remember(conversation_id, rows)
        self.exchange_log.add(conversation, rows, f"log exchange {answer_id}")

        return ChatResult(
            reply=reply,
            model=final.spec.name if ok else None,
            conversation_id=conversation_id,
            message_id=answer_id,
            latency_ms=latency_ms,
            ttft_ms=final.ttft_ms,
            usage=usage,
            cost_usd=cost,
            fallback_from=fallback_from,
            error=None if ok else final.error,
            sources=tuple(sources),
        )

    def _remember(self, conversation_id: str, rows: list[dict[str, Any]]) -> None:
        self._known_convs.put(conversation_id, True)
        for row in rows[:1] + rows[-1:]:  # the prompt and the answer that counts
            self._turns.put(
                row["id"], _Turn(row["id"], conversation_id, row["role"], row["content"], row["parent_id"])
            )
        self._leaf.put(conversation_id, rows[-1]["id"])

    # ------------------------------------------------------ conversations & history

    async def _resolve_conversation(self, request: ChatRequest) -> tuple[str, str | None]:
        """(conversation id, the message to continue from — None for a new conversation)."""
        place = request.place
        if request.conversation_id:
            return request.conversation_id, await self._leaf_of(request.conversation_id)
        if request.reply_to_discord_id is not None:
            found = await self._find_discord(request.reply_to_discord_id)
            if found is not None:
                self._known_convs.put(found[0], True)
                return found
        # A thread is one conversation; so is a DM channel (people rarely use replies there).
        running_key = place.thread_id if place.thread_id is not None else (place.channel_id if place.is_dm else None)
        if running_key is None:
            return uuid.uuid4().hex, None
        cached = self._thread_conv.get(running_key)  # "" remembers "none here"
        if cached:
            return cached, await self._leaf_of(cached)
        conv = None
        if cached is None:
            async with self.sessions() as session:
                repo = ConversationRepository(session)
                if place.thread_id is not None:
                    conv = await repo.latest_for_thread(place.thread_id)
                else:
                    conv = await repo.latest_for_dm(place.channel_id)
        if conv is None:
            conversation_id = uuid.uuid4().hex
            self._thread_conv.put(running_key, conversation_id)
            # A thread started from one of our answers has that message's id: the
            # thread picks up the answer's line of conversation.
            started_from = await self._find_discord(place.thread_id) if place.thread_id else None
            return conversation_id, started_from[1] if started_from else None
        conversation_id = conv.id
        self._thread_conv.put(running_key, conversation_id)
        self._known_convs.put(conversation_id, True)
        return conversation_id, await self._leaf_of(conversation_id)

    async def _leaf_of(self, conversation_id: str) -> str | None:
        """The newest message of a conversation; None if it has none (it is new)."""
        leaf = self._leaf.get(conversation_id)
        if leaf is not None:
            return leaf
        if self._known_convs.get(conversation_id) is None:
            await self.writer.drain(timeout=2.0)  # it may still be on its way to the database
        async with self.sessions() as session:
            messages = await ConversationRepository(session).messages(conversation_id)
        if not messages:
            return None
        self._known_convs.put(conversation_id, True)
        return messages[-1].id

    async def _find_discord(self, discord_id: int) -> tuple[str, str] | None:
        found = self._by_discord.get(discord_id)
        if found is not None:
            return found or None  # () marks a known miss
        async with self.sessions() as session:
            found = await ConversationRepository(session).find_by_discord_message(discord_id)
        # Remember misses too: every reply between two people asks. link_* overwrites them.
        self._by_discord.put(discord_id, found or ())
        return found

    async def _history(self, leaf_id: str | None, spec: ModelSpec) -> list[_Turn]:
        """The turns from the conversation's start to `leaf_id`, oldest first."""
        if leaf_id is None:
            return []
        turns: list[_Turn] = []
        cursor: str | None = leaf_id
        while cursor is not None:
            turn = self._turns.get(cursor)
            if turn is None:
                break
            turns.append(turn)
            cursor = turn.parent_id
        if cursor is not None:
            # Older than the in-memory window: read the rest of the line from the database.
            limit = max(8, spec.context_window // 16)
            async with self.sessions() as session:
                rows = await ConversationRepository(session).lineage(cursor, limit)
            for row in reversed(rows):
                turns.append(_Turn(row.id, row.conversation_id, row.role, row.content, row.parent_id))
        turns.reverse()
        # Failed attempts carry no text worth replaying.
        return [t for t in turns if t.content]

    async def link_discord_messages(
        self, message_id: str, conversation_id: str, discord_message_ids: Sequence[int]
    ) -> None:
        """Record that `discord_message_ids` carry answer `message_id`, so replies continue it."""
        ids = list(discord_message_ids)
        for discord_id in ids:
            self._by_discord.put(discord_id, (conversation_id, message_id))

        async def write(session: AsyncSession) -> None:
            await ConversationRepository(session).link_discord_messages(message_id, conversation_id, ids)

        self.writer.submit(write, f"link discord messages of {message_id}")

    async def is_conversation_message(self, discord_message_id: int) -> bool:
        """Whether this Discord message is part of one of our answers."""
        return await self._find_discord(discord_message_id) is not None

    async def has_conversation(self, thread_id: int) -> bool:
        """Whether the bot has a conversation in this thread (or started it from an answer)."""
        cached = self._thread_conv.get(thread_id)
        if cached is not None:
            return bool(cached)  # "" remembers a miss; starting a conversation replaces it
        async with self.sessions() as session:
            conv = await ConversationRepository(session).latest_for_thread(thread_id)
        if conv is not None:
            self._thread_conv.put(thread_id, conv.id)
            self._known_convs.put(conv.id, True)
            return True
        if await self.is_conversation_message(thread_id):
            return True
        self._thread_conv.put(thread_id, "")
        return False

    async def _retrieve(self, request: ChatRequest, settings: EffectiveSettings, text: str) -> list[Source]:
        if not settings.knowledge.value or self.knowledge is None or request.place.guild_id is None:
            return []
        try:
            return list(await self.knowledge.retrieve(request.place.guild_id, text))
        except UserError:
            raise
        except Exception:
            # An answer without references beats no answer; the failure is in the log.
            log.exception("knowledge retrieval failed for guild %s", request.place.guild_id)
            return []

    # ---------------------------------------------------------------- models

    async def warm_up(self, place: Place | None = None) -> None:
        """Get the model in force at `place` (default: the global default) ready to answer.

        For a local model this starts its llama.cpp server, which takes seconds; doing
        it while the person is still typing keeps their first answer quick. Failures are
        only logged: the first real request reports them properly.
        """
        try:
            spec = self._model_for(await self.effective_settings(place)) if place else self.registry.default
            await self.models.get(spec)
        except Exception as exc:
            log.info("warm-up failed (%s); the first request will retry", exc)

    def list_models(self) -> list[ModelSpec]:
        """Every model that can be chosen."""
        return self.registry.all()

    def get_model(self, name: str) -> ModelSpec:
        """The model called `name` (NotFound with suggestions otherwise)."""
        return self.registry.get(name)

    def _model_for(self, settings: EffectiveSettings) -> ModelSpec:
        try:
            return self.registry.get(settings.model.value)
        except NotFound:
            raise UserError(
                f"This {settings.model.source}'s model `{settings.model.value}` is no longer configured. "
                "Ask a moderator to pick another with `/model set` or `/model reset`."
            ) from None

    # ---------------------------------------------------------------- settings

    async def effective_settings(self, place: Place) -> EffectiveSettings:
        """The model, system prompt and knowledge switch in force at `place`, with their sources."""
        return await self.place_settings.effective(place)

    async def set_model(self, place: Place, scope: Scope, name: str, actor: Author) -> str:
        """Choose the model for `scope`; returns a confirmation line."""
        spec = self.registry.get(name)
        old = await self.place_settings.change(place, scope, "model", spec.name, actor)
        return f"Model for this {scope_word(scope)}: **{spec.name}**" + (f" (was: {old})." if old else ".")

    async def reset_model(self, place: Place, scope: Scope, actor: Author) -> str:
        """Drop the model chosen for `scope`, so it inherits again."""
        await self.place_settings.change(place, scope, "model", None, actor)
        now = await self.effective_settings(place)
        return f"Model for this {scope_word(scope)} reset; now using **{now.model.value}** (from {now.model.source})."

    async def set_system_prompt(self, place: Place, scope: Scope, text: str, actor: Author) -> str:
        """Set the system prompt for `scope`."""
        text = text.strip()
        if not text:
            raise UserError("The system prompt is empty. To go back to the default, use `/system reset`.")
        if len(text) > 8000:
            raise UserError(f"That system prompt is {len(text)} characters; the limit is 8,000.")
        await self.place_settings.change(place, scope, "system_prompt", text, actor)
        return f"System prompt for this {scope_word(scope)} set ({len(text)} characters)."

    async def reset_system_prompt(self, place: Place, scope: Scope, actor: Author) -> str:
        """Drop the system prompt set for `scope`, so it inherits again."""
        await self.place_settings.change(place, scope, "system_prompt", None, actor)
        return f"System prompt for this {scope_word(scope)} reset to the inherited one."

    async def set_knowledge(self, place: Place, scope: Scope, enabled: bool | None, actor: Author) -> str:
        """Turn answering from the knowledge base on or off for `scope` (None: inherit)."""
        if enabled and place.guild_id is None:
            raise UserError("The knowledge base belongs to a server; it cannot be used in DMs.")
        await self.place_settings.change(place, scope, "knowledge_enabled", enabled, actor)
        state = "inherited" if enabled is None else ("on" if enabled else "off")
        return f"Knowledge base for this {scope_word(scope)}: **{state}**."
