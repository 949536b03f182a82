"""The chat service: the one place that decides how a message is answered.

For each message it picks the model and system prompt in force where the message was
written (thread → channel → server → global, `PlaceSettings`), which conversation it
continues and the history that brings (`ConversationIndex`), whether to retrieve from the
knowledge base, and then asks the model through the answer unit (`chains.answer`), falling
back when a model fails. Every exchange goes to the log as an `Exchange` record. It never
imports `discord`: the Discord cogs and the terminal chat are thin adapters around it.

Build one with `bot.app.open_app(settings)`, which wires every part together.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from bot.service.compare import (
    Battle,
    BattleVerdict,
    Comparison,
    Comparisons,
    OnAnswer,
    PreferenceOutcome,
    Question,
)
from bot.service.conversations import ConversationIndex, Turn
from bot.service.feedback import (
    AnswerOrigin,
    Correction,
    Feedback,
    FeedbackStats,
    VoteOutcome,
    VoteSource,
)
from bot.service.leaderboard import Leaderboard, Leaderboards, LeaderboardScope
from bot.service.limits import (
    Admission,
    Budget,
    OverBudget,
    PersonLimit,
    SpendingReport,
    Spent,
    priced,
)
from bot.service.models import ModelCatalog
from bot.service.place_settings import EffectiveSettings, PlaceSettings, SettingChange
from bot.service.privacy import ForgetReport, Privacy, PrivacyStatus, PurgeReport
from chains.answer import Answerer, Attempt, Prompt, with_fallbacks
from chains.chat import messages_to_dicts
from chains.check import CheckResult, check_model
from chains.registry import Lineage, ModelSpec
from core.errors import ConfigError, NotFound, PermissionDenied, Unavailable, UserError
from core.exchange import Exchange, LoggedAnswer, MessageKind, Status
from core.messages import (
    Author,
    ChatEvent,
    ChatRequest,
    ChatResult,
    Place,
    ReplyFinished,
    ReplyStarted,
    Scope,
    Source,
)
from core.text import clean
from store.exchange_log import ExchangeLog
from store.writer import LogWriter

log = logging.getLogger(__name__)

# Logged as the error of an answer whose reader went away before it was finished.
STOPPED = "The reply was stopped before it was finished: nobody was reading it any more."
SYSTEM_PROMPT_LIMIT = 8000
MAX_RETENTION_DAYS = 36_500


class Retriever(Protocol):
    """What the service needs of the knowledge base."""

    async def retrieve(self, guild_id: int, query: str) -> Sequence[Source]: ...


@dataclass(frozen=True, slots=True)
class _Asked:
    """Everything about one request that its log record needs, besides the attempts."""

    request: ChatRequest
    conversation_id: str
    leaf_id: str | None
    history: list[Turn]
    prompt_id: str
    answer_id: str
    question: str  # the person's text as the model is sent it
    cleaned: bool  # it had to be cleaned (core.text.clean)
    system_prompt: str
    sources: list[Source]
    started: float
    # False: answered, counted, never stored (its author opted out, or its place logs
    # nothing: see ChatService._may_store); True: stored unless `_storable` finds otherwise.
    store: bool
    privacy_mark: int  # Privacy.mark when it began
    # A retry: the prompt is stored already, and this is another try at `alternative_to`.
    kind: MessageKind = "answer"
    alternative_to: str | None = None
    prompt_author_id: int | None = None  # a retry's: who wrote the prompt (else the requester)


def candidate_refusal(name: str) -> str:
    """Why a member may not choose the candidate fine-tune `name` (one line)."""
    return (
        f"`{name}` is a candidate fine-tune: only server admins (Manage Server) can choose it "
        f"until it is promoted (`switchboard tune promote {name}`)."
    )


class ChatService:
    """Answers chat requests and changes per-place settings."""

    def __init__(
        self,
        *,
        catalog: ModelCatalog,
        answerer: Answerer,
        conversations: ConversationIndex,
        place_settings: PlaceSettings,
        exchange_log: ExchangeLog,
        writer: LogWriter,
        feedback: Feedback,
        leaderboards: Leaderboards,
        comparisons: Comparisons,
        privacy: Privacy,
        limits: PersonLimit | None = None,
        budget: Budget | None = None,
        knowledge: Retriever | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.catalog = catalog
        self.answerer = answerer
        self.conversations = conversations
        self.place_settings = place_settings
        self.exchange_log = exchange_log
        self.writer = writer
        self.feedback = feedback
        self.leaderboards = leaderboards
        self.comparisons = comparisons
        self.privacy = privacy
        self.limits = limits or PersonLimit(0)
        self.budget = budget
        self.knowledge = knowledge
        self.clock = clock

    # ----------------------------------------------------------------- chatting

    def admit(self, request: ChatRequest) -> Admission:
        """Whether `request` may be answered now (the per-person limit); adapters ask first."""
        return self.limits.admit(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        """Answer `request`, yielding the reply as it is written; logs the exchange."""
        started = self.clock()
        # Cleaned once, here: what the model is sent is what the log stores.
        text, cleaned = clean(request.text)
        text = text.strip()
        if not text:
            raise UserError("There is nothing to answer: the message is empty.")
        settings = await self.place_settings.effective(request.place)
        spec = await self._model_for(settings)
        where = await self.conversations.resolve(request)
        history = await self.conversations.history(
            where.leaf_id, limit=max(8, spec.context_window // 16)
        )
        sources = await self._retrieve(request, settings, text)
        asked = _Asked(
            request=request,
            conversation_id=where.conversation_id,
            leaf_id=where.leaf_id,
            history=history,
            prompt_id=uuid.uuid4().hex,
            answer_id=uuid.uuid4().hex,
            question=text,
            cleaned=cleaned,
            system_prompt=settings.system_prompt.value,
            sources=sources,
            started=started,
            store=await self._may_store(request, settings),
            privacy_mark=self.privacy.mark,
        )
        chain = await self._affordable(request, self.catalog.registry.fallback_chain(spec.name))
        async with aclosing(self._run(asked, chain)) as events:
            async for event in events:
                yield event

    async def _run(
        self, asked: _Asked, chain: Sequence[ModelSpec]
    ) -> AsyncGenerator[ChatEvent, None]:
        """Ask `chain` (a model and its fallbacks) what `asked` asks; log what happened."""
        yield ReplyStarted(
            model=chain[0].name, conversation_id=asked.conversation_id, message_id=asked.answer_id
        )
        history = [(t.role, t.content) for t in asked.history]
        prompt = Prompt(asked.system_prompt, history, asked.question, asked.sources)
        attempts: list[Attempt] = []
        started = asked.started
        try:
            async with aclosing(
                with_fallbacks(self.answerer, chain, prompt, attempts, started)
            ) as events:
                async for event in events:
                    yield event
        except (GeneratorExit, asyncio.CancelledError):
            # The reader went away mid-answer (Discord refused the reply, the bot is shutting
            # down): the model was asked and may have written and billed, so log it anyway.
            if attempts:
                if attempts[-1].error is None:
                    attempts[-1].error = STOPPED
                self._finish(asked, attempts)
            raise
        yield ReplyFinished(self._finish(asked, attempts))

    async def retry(
        self, answer_id: str, author: Author, model: str | None = None
    ) -> AsyncIterator[ChatEvent]:
        """Answer the prompt `answer_id` answered again, with the history it had.

        With `model`, that model answers (and no fallback: it was chosen); else the model
        that answered, or the one in force there now. The new answer is an "alternative"
        sibling of the original, and the conversation continues from it.
        """
        started = self.clock()
        original = await self.feedback.answer(answer_id)
        prompt = (
            await self.conversations.stored_message(original.parent_id)
            if original.parent_id
            else None
        )
        if prompt is None:
            raise NotFound("The question that answer answered is no longer in my log.")
        place = Place(original.guild_id, original.channel_id or 0, original.thread_id)
        settings = await self.place_settings.effective(place)
        if model is not None:
            chain = [await self.catalog.get(model)]
        elif original.model_name and original.model_name in self.catalog.registry:
            chain = self.catalog.registry.fallback_chain(original.model_name)
        else:
            chain = self.catalog.registry.fallback_chain((await self._model_for(settings)).name)
        history = await self.conversations.history(
            prompt.parent_id, limit=max(8, chain[0].context_window // 16)
        )
        request = ChatRequest(
            place, author, prompt.content, discord_message_id=prompt.discord_message_id
        )
        sources = (
            await self._retrieve(request, settings, prompt.content) if original.source_ids else []
        )
        asked = _Asked(
            request=request,
            conversation_id=original.conversation_id,
            leaf_id=prompt.parent_id,
            history=history,
            prompt_id=prompt.id,
            answer_id=uuid.uuid4().hex,
            question=prompt.content,
            cleaned=False,
            system_prompt=original.system_prompt or settings.system_prompt.value,
            sources=sources,
            started=started,
            store=await self._may_store(request, settings),
            privacy_mark=self.privacy.mark,
            kind="alternative",
            alternative_to=original.id,
            prompt_author_id=prompt.author_id,
        )
        chain = await self._affordable(request, chain)
        async with aclosing(self._run(asked, chain)) as events:
            async for event in events:
                yield event

    async def _affordable(
        self, request: ChatRequest, chain: Sequence[ModelSpec]
    ) -> Sequence[ModelSpec]:
        """`chain` as the budgets allow it: refused (OverBudget) when its model is priced
        and a budget is spent; else without the priced fallbacks."""
        if self.budget is None:
            return chain
        discord = request.discord_message_id is not None
        try:
            await self.budget.check(request.author, request.place, chain, discord=discord)
        except OverBudget:
            if priced(chain[0]):
                raise
            return [spec for spec in chain if not priced(spec)]
        return chain

    async def answer(self, request: ChatRequest) -> ChatResult:
        """Answer `request` and return the finished result (no streaming)."""
        async for event in self.stream(request):
            if isinstance(event, ReplyFinished):
                return event.result
        raise RuntimeError("the reply stream ended without a result")

    def _finish(self, asked: _Asked, attempts: list[Attempt]) -> ChatResult:
        """Turn the attempts into a result, remember the turn and log the exchange."""
        latency_ms = (self.clock() - asked.started) * 1000
        final = attempts[-1]
        ok = final.ok
        first = attempts[0].spec.name
        fallback_from = first if final.spec.name != first else None
        usage = self.answerer.billed(final)
        cost = final.spec.cost(usage.prompt_tokens, usage.completion_tokens) if usage else None

        request = asked.request
        if self.budget is not None:  # every attempt that was billed, fallbacks too
            self.budget.record(
                request.author,
                request.place,
                sum(self.answerer.cost(attempt) for attempt in attempts),
                discord=request.discord_message_id is not None,
            )
        store = self._storable(asked, attempts)
        # What an answer was built from: only messages that are stored (or on their way).
        storable = (
            {
                turn.id
                for turn in asked.history
                if turn.stored and not self.privacy.is_deleted(turn.id)
            }
            if store
            else set()
        )
        history_ids = [turn.id for turn in asked.history]
        answers: list[LoggedAnswer] = []
        for attempt in attempts:
            is_final = attempt is final
            attempt_usage = usage if is_final else attempt.usage
            status: Status = "ok" if attempt.ok else "error"
            if is_final and ok and fallback_from:
                status = "fallback"
            used = (
                history_ids[len(history_ids) - attempt.history_used :]
                if attempt.history_used
                else []
            )
            used = [turn_id for turn_id in used if turn_id in storable]
            answers.append(
                LoggedAnswer(
                    id=asked.answer_id if is_final else uuid.uuid4().hex,
                    kind=asked.kind if is_final else "attempt",
                    model_name=attempt.spec.name,
                    provider=attempt.spec.provider,
                    provider_model=attempt.spec.model,
                    content=attempt.reply,
                    request_messages=messages_to_dicts(attempt.sent),
                    input_ids=(*used, asked.prompt_id) if attempt.sent else (),
                    status=status,
                    error=attempt.error,
                    prompt_tokens=attempt_usage.prompt_tokens if attempt_usage else None,
                    completion_tokens=attempt_usage.completion_tokens if attempt_usage else None,
                    latency_ms=latency_ms if is_final else None,
                    ttft_ms=attempt.ttft_ms,
                    cost_usd=cost if is_final else None,
                    fallback_from=fallback_from if is_final else None,
                    cleaned=attempt.cleaned,
                    alternative_to=asked.alternative_to if is_final else None,
                )
            )
        if store:
            # The line goes on from the newest message that is stored: turns answered but
            # not stored (and messages deleted meanwhile) are skipped.
            parent_id = self.conversations.stored_ancestor(asked.leaf_id)
            if parent_id is not None and self.privacy.is_deleted(parent_id):
                parent_id = None
            self.exchange_log.add(
                Exchange(
                    conversation_id=asked.conversation_id,
                    place=request.place,
                    origin="discord" if request.discord_message_id is not None else "terminal",
                    prompt_id=asked.prompt_id,
                    parent_id=parent_id,
                    author_id=request.author.id,
                    author_name=clean(request.author.name)[0],
                    text=asked.question,
                    prompt_cleaned=asked.cleaned,
                    new_prompt=asked.alternative_to is None,
                    system_prompt=asked.system_prompt,
                    answers=tuple(answers),
                    source_ids=tuple(s.chunk_id for s in asked.sources),
                    discord_message_id=request.discord_message_id,
                )
            )
        else:
            self.privacy.count(
                request.place.guild_id,
                final.spec.name,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
                cost or 0.0,
            )
        reply = final.reply
        # Remembered either way, so the conversation goes on; a private turn's text is never
        # stored later as another answer's history. A retry's prompt is stored already.
        retry = asked.alternative_to is not None
        author_id = asked.prompt_author_id if retry else request.author.id
        self.conversations.remember(
            asked.conversation_id,
            Turn(
                asked.prompt_id,
                asked.conversation_id,
                "user",
                asked.question,
                asked.leaf_id,
                author_id,
                stored=store or retry,
                private=not asked.store and not retry,
            ),
            Turn(
                asked.answer_id,
                asked.conversation_id,
                "assistant",
                reply,
                asked.prompt_id,
                stored=store,
                private=not asked.store,
            ),
        )
        return ChatResult(
            reply=reply,
            model=final.spec.name if ok else None,
            conversation_id=asked.conversation_id,
            message_id=asked.answer_id,
            latency_ms=latency_ms,
            ttft_ms=final.ttft_ms,
            usage=usage,
            cost_usd=cost,
            fallback_from=fallback_from,
            error=None if ok else final.error,
            sources=tuple(asked.sources),
            log_problem=self.log_problem if store else None,
            stored=store,
        )

    def _storable(self, asked: _Asked, attempts: list[Attempt]) -> bool:
        """Whether this exchange may be stored now that it is answered: `_may_store` said
        so, it was built on nothing that may not be stored (a private turn, a message
        deleted meanwhile), nobody whose words it holds was forgotten and its Discord
        message was not deleted while it was being answered."""
        if not asked.store:
            return False
        request = asked.request
        sent = max((attempt.history_used for attempt in attempts), default=0)
        used = asked.history[len(asked.history) - sent :] if sent else []
        if any(turn.private or self.privacy.is_gone(turn.id) for turn in used):
            return False
        if asked.alternative_to is not None and self.privacy.is_deleted(asked.prompt_id):
            return False
        # Whose words it holds: its author's, and those of every prompt in its history.
        authors = {request.author.id}
        if asked.prompt_author_id is not None:
            authors.add(asked.prompt_author_id)
        authors.update(turn.author_id for turn in used if turn.author_id is not None)
        return self.privacy.may_store(
            authors=authors, mark=asked.privacy_mark, discord_message_id=request.discord_message_id
        )

    async def _may_store(self, request: ChatRequest, settings: EffectiveSettings) -> bool:
        """Whether what `request` asks, and its answers, may be stored: the one decision
        chat, retries, comparisons and battles share. Not when its author opted out, nor
        where nothing is logged; what is not stored is only counted."""
        if not settings.logging.value:
            return False
        return not await self.privacy.opted_out(request.author.id)

    async def _retrieve(
        self, request: ChatRequest, settings: EffectiveSettings, text: str
    ) -> list[Source]:
        if not settings.knowledge.value or self.knowledge is None or request.place.guild_id is None:
            return []
        try:
            return list(await self.knowledge.retrieve(request.place.guild_id, text))
        except Unavailable as exc:  # the embeddings endpoint is down: answer without passages
            log.warning("knowledge retrieval skipped for guild %s: %s", request.place.guild_id, exc)
            return []
        except UserError:
            raise
        except Exception:
            # An answer without references beats no answer; the failure is in the log.
            log.exception("knowledge retrieval failed for guild %s", request.place.guild_id)
            return []

    @property
    def log_problem(self) -> str | None:
        """Why the log cannot be written right now, in a line a person can read; None when it can."""
        problem = self.writer.problem
        if problem is None:
            return None
        return (
            f"Not saved yet: the database cannot be written ({problem}). The bot keeps this "
            "exchange and writes it when the database is back."
        )

    def watch_log(self, watcher: Callable[[str | None], None]) -> Callable[[], None]:
        """Call `watcher(line)` when the log stops being written, and `watcher(None)` when it
        resumes; returns what stops it."""
        return self.writer.watch(
            lambda problem: watcher(None if problem is None else self.log_problem)
        )

    # ------------------------------------------------------ conversations

    async def link_discord_messages(
        self, message_id: str, conversation_id: str, discord_message_ids: Sequence[int]
    ) -> None:
        """Record that `discord_message_ids` carry answer `message_id`, so replies continue it."""
        ids = list(discord_message_ids)
        self.conversations.link_carriers(message_id, conversation_id, ids)
        if self.conversations.is_stored(message_id):  # else there is no row to link to
            self.exchange_log.link_discord_messages(message_id, conversation_id, ids)

    async def is_conversation_message(self, discord_message_id: int) -> bool:
        """Whether this Discord message is part of one of our answers."""
        return await self.conversations.find_carrier(discord_message_id) is not None

    async def has_conversation(self, thread_id: int) -> bool:
        """Whether the bot has a conversation in this thread (or started it from an answer)."""
        return await self.conversations.has_conversation(thread_id)

    # ---------------------------------------------------------------- feedback

    async def vote(
        self,
        answer_id: str,
        voter: Author,
        value: int,
        *,
        source: VoteSource,
        reason: str | None = None,
        comment: str | None = None,
    ) -> VoteOutcome:
        """Record `voter`'s 👍 (1) or 👎 (-1) on an answer (replacing theirs)."""
        return await self.feedback.vote(
            answer_id, voter, value, source=source, reason=reason, comment=comment
        )

    async def unvote(self, answer_id: str, voter: Author) -> VoteOutcome:
        """Take back `voter`'s vote on an answer."""
        return await self.feedback.unvote(answer_id, voter)

    async def vote_on_discord_message(
        self,
        discord_message_id: int,
        voter: Author,
        value: int | None,
        *,
        source: VoteSource = "reaction",
        taking_back: int | None = None,
    ) -> VoteOutcome | None:
        """A vote by reaction on a Discord message of ours (None removes it); None when the
        message carries no answer we know (so it is not ours to count).

        A removal may say which thumb was `taking_back`: the vote then goes only while it
        is that thumb (the person may have reacted with both, or changed it by button).
        """
        found = await self.conversations.find_carrier(discord_message_id)
        if found is None or found.leaf_id is None:
            return None
        if value is None:
            return await self.feedback.unvote(found.leaf_id, voter, only=taking_back)
        return await self.feedback.vote(found.leaf_id, voter, value, source=source)

    async def answer_of_discord_message(self, discord_message_id: int) -> str | None:
        """The id of the answer a Discord message of ours carries, if we know it."""
        found = await self.conversations.find_carrier(discord_message_id)
        return found.leaf_id if found is not None else None

    async def answer_origin(self, answer_id: str) -> AnswerOrigin:
        """The model that wrote an answer and the Discord message that asked for it
        (where another try is shown); NotFound for an answer the log does not know."""
        original = await self.feedback.answer(answer_id)
        prompt = (
            await self.conversations.stored_message(original.parent_id)
            if original.parent_id
            else None
        )
        return AnswerOrigin(
            answer_id, original.model_name, prompt.discord_message_id if prompt else None
        )

    async def correct(self, answer_id: str, author: Author, text: str) -> Correction:
        """Store `author`'s better answer to the prompt `answer_id` answered."""
        return await self.feedback.correct(answer_id, author, text)

    async def answer_text(self, answer_id: str) -> str:
        """The text of an answer (to start a correction from)."""
        return await self.feedback.answer_text(answer_id)

    async def feedback_stats(
        self,
        guild_id: int | None,
        channel_id: int | None = None,
        model: str | None = None,
        since: datetime | None = None,
    ) -> FeedbackStats:
        """Per model: answers, votes, share 👍 with a 95% interval, top reasons, corrections."""
        return await self.feedback.stats(
            guild_id=guild_id, channel_id=channel_id, model=model, since=since
        )

    # --------------------------------------------------------------- comparing

    async def compare(
        self,
        place: Place,
        author: Author,
        text: str,
        models: Sequence[str] | None = None,
        *,
        discord_message_id: int | None = None,
        on_answer: OnAnswer | None = None,
    ) -> Comparison:
        """Ask 2-4 models `text` side by side (default: the place's model and the config's
        comparison_models), with the place's system prompt and the same passages."""
        question, settings = await self._question(place, author, text, discord_message_id)
        named = bool(models)
        if not models:
            default = (await self._model_for(settings)).name
            models = [default, *self.catalog.registry.comparison_models]
        comparison = await self.comparisons.compare(
            question, models, named=named, on_answer=on_answer
        )
        return replace(comparison, log_problem=self.log_problem if comparison.stored else None)

    async def prefer(
        self, prompt_id: str, chosen_answer_id: str, voter: Author
    ) -> PreferenceOutcome:
        """Record the answer of a comparison `voter` found best (one per person; changeable)."""
        return await self.comparisons.prefer(prompt_id, chosen_answer_id, voter)

    async def battle(
        self, place: Place, author: Author, text: str, *, discord_message_id: int | None = None
    ) -> Battle:
        """A blind battle: two models of the place's arena pool answer `text` as A and B."""
        question, settings = await self._question(place, author, text, discord_message_id)
        battle = await self.comparisons.battle(question, settings.arena_pool)
        return replace(battle, log_problem=self.log_problem if battle.stored else None)

    async def battle_vote(
        self, battle_id: str, voter: Author, outcome: str, reason: str | None = None
    ) -> BattleVerdict:
        """`voter`'s verdict on a battle ("a", "b", "tie" or "bad"), revealing its models."""
        return await self.comparisons.vote(battle_id, voter, outcome, reason)

    async def leaderboard(
        self,
        scope: LeaderboardScope,
        guild_id: int | None = None,
        channel_id: int | None = None,
    ) -> Leaderboard:
        """Models rated from the blind battles of a channel, a server or everywhere, with
        95% intervals and ranks, beside their 👍 share, median latency, cost and price.

        "channel" needs `channel_id` (and the server's `guild_id`; None for a DM),
        "server" needs `guild_id`, "global" neither.
        """
        return await self.leaderboards.board(scope, guild_id, channel_id)

    async def _question(
        self, place: Place, author: Author, text: str, discord_message_id: int | None
    ) -> tuple[Question, EffectiveSettings]:
        """What every model of a comparison or battle is asked: the cleaned text, the
        place's system prompt and the passages (retrieved once, so all get the same)."""
        text, cleaned = clean(text)
        text = text.strip()
        if not text:
            raise UserError("There is nothing to ask: the question is empty.")
        settings = await self.place_settings.effective(place)
        request = ChatRequest(place, author, text, discord_message_id=discord_message_id)
        question = Question(
            place=place,
            author=author,
            text=text,
            cleaned=cleaned,
            system_prompt=settings.system_prompt.value,
            sources=tuple(await self._retrieve(request, settings, text)),
            discord_message_id=discord_message_id,
            store=await self._may_store(request, settings),
            mark=self.privacy.mark,
        )
        return question, settings

    # ---------------------------------------------------------------- models

    async def warm_up(self, place: Place | None = None) -> None:
        """Get the model in force at `place` (default: the global default) ready to answer.

        For a local model this starts its llama.cpp server, which takes seconds; doing
        it while the person is still typing keeps their first answer quick. Failures are
        only logged: the first real request reports them properly.
        """
        try:
            if place is None:
                spec = self.catalog.registry.default
            else:
                spec = await self._model_for(await self.effective_settings(place))
            await self.answerer.models.get(spec)
        except Exception as exc:
            log.info("warm-up failed (%s); the first request will retry", exc)

    @property
    def default_model(self) -> str:
        """The bot's default model (what a place that sets none uses)."""
        return self.catalog.registry.default_model

    def list_models(self) -> list[ModelSpec]:
        """Every model that can be chosen."""
        return self.catalog.all()

    async def get_model(self, name: str) -> ModelSpec:
        """The model called `name` (NotFound with suggestions otherwise)."""
        return await self.catalog.get(name)

    async def check_models(self, names: Sequence[str] | None = None) -> list[CheckResult]:
        """Send each model (default: all) a tiny prompt now; one result per model, in order."""
        specs = [await self.catalog.get(name) for name in names] if names else self.catalog.all()
        return list(
            await asyncio.gather(*(check_model(spec, self.answerer.models) for spec in specs))
        )

    async def gguf_model(
        self, name: str, path: Path, *, context_size: int | None = None, replace: bool = False
    ) -> ModelSpec:
        """A model entry for a local GGUF file, once llama.cpp has shown that it loads it."""
        from chains.local import gguf_spec, validate_gguf

        await self.catalog.refresh()  # another process may have taken the name
        self.catalog.ensure_name_free(name, replace=replace)  # before the slow part
        await validate_gguf(path)
        entry = gguf_spec(name, path, context_size=context_size)
        try:
            return ModelSpec(**entry, lineage=Lineage(source="gguf-file"))
        except ValidationError as exc:
            raise ConfigError(
                f"Cannot register {path.name} as '{name}': {exc.errors()[0]['msg']}."
            ) from None

    async def register_model(
        self, spec: ModelSpec, created_by: str, *, replace: bool = False
    ) -> ModelSpec:
        """Register a model (a GGUF file, a fine-tune) so every process can choose it.

        A name already taken is refused (`NameTaken`); `replace` lets a registered model of
        that name be replaced, never a configured one.
        """
        return await self.catalog.register(spec, created_by, replace=replace)

    async def remove_model(self, name: str) -> None:
        """Unregister a registered model everywhere; configured models stay (ConfigError)."""
        await self.catalog.unregister(name)

    async def _model_for(self, settings: EffectiveSettings) -> ModelSpec:
        try:
            return await self.catalog.get(settings.model.value)
        except NotFound:
            raise UserError(
                f"This {settings.model.source}'s model `{settings.model.value}` is no longer configured. "
                "Ask a moderator to pick another with `/model set` or `/model reset`."
            ) from None

    # ---------------------------------------------------------------- settings

    async def effective_settings(self, place: Place) -> EffectiveSettings:
        """The settings in force at `place` (model, system prompt, knowledge, arena pool,
        logging, retention), with their sources."""
        return await self.place_settings.effective(place)

    async def set_model(
        self, place: Place, scope: Scope, name: str, actor: Author, *, admin: bool = False
    ) -> SettingChange:
        """Choose the model for `scope`; a candidate fine-tune only when the actor is an `admin`."""
        spec = await self.catalog.get(name)
        if spec.candidate and not admin:
            raise PermissionDenied(candidate_refusal(spec.name))
        return await self.place_settings.change(place, scope, "model", spec.name, actor)

    async def reset_model(self, place: Place, scope: Scope, actor: Author) -> SettingChange:
        """Drop the model chosen for `scope`, so it inherits again."""
        return await self.place_settings.change(place, scope, "model", None, actor)

    async def set_system_prompt(
        self, place: Place, scope: Scope, text: str, actor: Author
    ) -> SettingChange:
        """Set the system prompt for `scope`."""
        text = clean(text)[0].strip()
        if not text:
            raise UserError(
                "The system prompt is empty. To go back to the default, use `/system reset`."
            )
        if len(text) > SYSTEM_PROMPT_LIMIT:
            raise UserError(
                f"That system prompt is {len(text)} characters; the limit is {SYSTEM_PROMPT_LIMIT:,}."
            )
        return await self.place_settings.change(place, scope, "system_prompt", text, actor)

    async def reset_system_prompt(self, place: Place, scope: Scope, actor: Author) -> SettingChange:
        """Drop the system prompt set for `scope`, so it inherits again."""
        return await self.place_settings.change(place, scope, "system_prompt", None, actor)

    async def set_knowledge(
        self, place: Place, scope: Scope, enabled: bool | None, actor: Author
    ) -> SettingChange:
        """Turn answering from the knowledge base on or off for `scope` (None: inherit)."""
        if enabled and place.guild_id is None:
            raise UserError("The knowledge base belongs to a server; it cannot be used in DMs.")
        return await self.place_settings.change(place, scope, "knowledge", enabled, actor)

    async def set_arena_pool(
        self, place: Place, scope: Scope, names: Sequence[str] | None, actor: Author
    ) -> SettingChange:
        """The models blind battles in `scope` draw from (None: inherit); two at least."""
        pool = None
        if names is not None:
            pool = [(await self.catalog.get(name)).name for name in dict.fromkeys(names)]
            if len(pool) < 2:
                raise UserError("An arena pool needs at least two different models.")
        return await self.place_settings.change(place, scope, "arena_pool", pool, actor)

    async def set_logging(
        self, place: Place, scope: Scope, enabled: bool | None, actor: Author
    ) -> SettingChange:
        """Store what is said in `scope`, or not (False: only counted; None: inherit)."""
        return await self.place_settings.change(place, scope, "logging", enabled, actor)

    async def set_retention(self, place: Place, days: int | None, actor: Author) -> SettingChange:
        """How many days this server keeps its exchanges (0: forever; None: the bot's default)."""
        if place.guild_id is None:
            raise UserError(
                "Retention is a server's setting: use it in one of the server's channels."
            )
        if days is not None and not 0 <= days <= MAX_RETENTION_DAYS:
            raise UserError(
                f"Retention is a number of days from 1 to {MAX_RETENTION_DAYS:,}, or 0 to keep "
                "exchanges forever."
            )
        return await self.place_settings.change(place, "guild", "retention", days, actor)

    # ---------------------------------------------------------------- privacy

    async def privacy_status(self, author: Author) -> PrivacyStatus:
        """Whether `author` opted out, and how much of theirs is stored."""
        return await self.privacy.status(author)

    async def opt_out(self, author: Author) -> PrivacyStatus:
        """Answer `author` from now on without storing anything they write or receive."""
        return await self.privacy.set_opted_out(author, True)

    async def opt_in(self, author: Author) -> PrivacyStatus:
        """Store `author`'s exchanges again from now on."""
        return await self.privacy.set_opted_out(author, False)

    async def forget(self, author: Author, *, by_name: bool = False) -> ForgetReport:
        """Delete everything stored about `author`; says what went (see `Privacy.forget`)."""
        report = await self.privacy.forget(author, by_name=by_name)
        if self.budget is not None:
            self.budget.forget(author.id)
        return report

    async def message_deleted(self, discord_message_id: int) -> None:
        """A person deleted their Discord message: delete its prompt and what derives from it."""
        self.privacy.message_deleted(discord_message_id)

    async def spending(self, author: Author, place: Place) -> Spent | None:
        """What `author` (everywhere) and the server of `place` spent today on priced
        models, against the daily budgets; None when no budget is set."""
        if self.budget is None or not self.budget.enabled:
            return None
        return await self.budget.spent(author, place)

    async def spending_report(self) -> SpendingReport | None:
        """Today's spending on priced models per server and person; None without budgets."""
        if self.budget is None or not self.budget.enabled:
            return None
        return await self.budget.report()

    async def purge(self, dry_run: bool = False) -> PurgeReport:
        """Apply the retention: delete exchanges older than it (a dry run only counts)."""
        return await self.privacy.purge(dry_run=dry_run)
