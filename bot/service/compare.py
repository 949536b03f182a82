"""Comparing models: side by side, and in blind battles.

Both ask several models one question with identical context: the place's system prompt,
the same retrieved passages (retrieved once, by `ChatService`), and no history (a fresh
conversation). The models answer at once (asyncio), each through the answer unit
(`chains.answer.Answerer`) and without fallbacks, so a model that fails is reported in its
own result while the others still answer. Each comparison or battle is logged as one
`Exchange` (answers of kind "comparison" or "battle"); a battle's `battles` row follows
its exchange through the log writer.

- `compare`: 2-4 models, each answer with its latency, time to first token, tokens and
  cost; `prefer` records the answer a person found best (one per person, changeable).
- `battle`: two distinct models drawn at random from the place's arena pool answer as A
  and B. An answer that names its own model or maker makes the battle invalid, as
  FastChat's arena does. `vote` reveals the two models to the voter: one vote per person
  per battle, a daily cap per person; an invalid battle's vote is kept but not counted.

Votes and preferences are written at once, not through the log writer: the person is
waiting for the reveal. What was answered but not stored (see `Question.store`: its asker
opted out, its place logs nothing, or the asker was forgotten or its Discord message
deleted while it was answered) is only counted (`count_unstored`, as for chat); it can
still be voted on in this process, and nothing about the vote is stored either. Nor is
the vote or preference of a person who opted out, or one cast on what was said in a
place whose logging is off now.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.service.limits import Budget, OverBudget, priced, until
from bot.service.models import ModelCatalog
from bot.service.place_settings import Setting
from chains.answer import Answerer, Attempt, Prompt
from chains.chat import messages_to_dicts
from chains.registry import MAX_COMPARED, ModelSpec
from core.cache import LRU
from core.errors import NotFound, StorageUnavailable, UserError
from core.exchange import Exchange, LoggedAnswer, LoggedBattle, MessageKind
from core.messages import Author, Place, Source, Usage, scope_word
from core.text import clean
from store.db import failure_reason, is_outage
from store.exchange_log import ExchangeLog
from store.models import Battle as BattleRow
from store.models import Message, utcnow
from store.repositories import ArenaRepository
from store.writer import LogWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

Outcome = Literal["a", "b", "tie", "bad"]
OUTCOMES: tuple[Outcome, ...] = ("a", "b", "tie", "bad")
# Logged as the error of a model that had not finished when its comparison or battle was stopped.
STOPPED = "Stopped before this model had finished: nobody was waiting for its answer any more."
# Shown for a side of a battle whose model failed: its own error could name it.
SIDE_FAILED = "This model could not answer, so this battle will not count."
REASON_LIMIT = 1000
# How long a vote waits for the log writer to store what it is about.
WRITE_WAIT_S = 5.0
# Answered-but-not-stored comparisons and battles remembered for their votes.
UNSTORED_KEPT = 1000
UNKNOWN_BATTLE = "I don't have that battle in my log (it may have been deleted), so I cannot record a vote on it."
UNKNOWN_COMPARISON = (
    "I don't have that comparison in my log (it may have been deleted), so I cannot record "
    "which answer you preferred."
)

# Words that give a model away besides its own names: its provider's, and its family's makers.
PROVIDER_WORDS: dict[str, tuple[str, ...]] = {
    "openai": ("OpenAI", "ChatGPT"),
    "azure-openai": ("OpenAI", "ChatGPT"),
}
FAMILY_WORDS: dict[str, tuple[str, ...]] = {
    "gpt": ("OpenAI", "ChatGPT"),
    "llama": ("Meta AI",),  # "Meta" alone is an everyday word
    "claude": ("Anthropic",),
    "gemini": ("Google DeepMind", "Bard"),
    "gemma": ("Google DeepMind",),
    "mistral": ("Mistral AI",),
    "mixtral": ("Mistral AI",),
    "qwen": ("Alibaba", "Tongyi"),
    "phi": ("Microsoft",),
    "smollm": ("Hugging Face",),
    "deepseek": ("DeepSeek",),
}
# Names too ordinary to give a model away ("local" is what llama-server is often called).
ORDINARY_WORDS = frozenset(
    {"ai", "base", "chat", "default", "fast", "instruct", "large", "latest", "local", "main"}
    | {"mini", "model", "small", "tiny", "test"}
)


def model_families(spec: ModelSpec) -> set[str]:
    """The families a model belongs to, by the leading letters of its names.

    gpt-4o-mini → gpt, smollm2 → smollm, Qwen/Qwen2.5-7B → qwen, ft:gpt-4o-mini:org → gpt.
    Fewer than three letters say nothing (o1).
    """
    found: set[str] = set()
    for name in (spec.name, spec.model, spec.bundled or ""):
        last = name.lower().rsplit("/", 1)[-1]
        for part in last.split(":"):
            letters = re.match(r"[a-z]+", part)
            if letters and len(letters.group()) >= 3:
                found.add(letters.group())
                break
    return found - ORDINARY_WORDS


def identity_patterns(spec: ModelSpec) -> list[re.Pattern[str]]:
    """What an answer must not say to stay anonymous: the model's registry name, its model
    id, its family (followed by a version or not: GPT-4, SmolLM2) and its makers' names;
    case-insensitive, as whole words."""
    families = model_families(spec)
    words = {spec.name, spec.model} | ({spec.bundled} if spec.bundled else set())
    words |= set(PROVIDER_WORDS.get(spec.provider, ()))
    for family in families:
        words |= set(FAMILY_WORDS.get(family, ()))
    words = {w for w in words if w and w.lower() not in ORDINARY_WORDS}

    def whole(word: str) -> str:
        return re.escape(word).replace(r"\ ", r"\s*")

    patterns = [re.compile(rf"(?<![a-z0-9]){whole(w)}(?![a-z0-9])", re.I) for w in sorted(words)]
    # A family may run into its version (GPT4, smollm2), not into another word (gptq).
    patterns += [re.compile(rf"(?<![a-z0-9]){re.escape(f)}(?![a-z])", re.I) for f in families]
    return patterns


def gives_itself_away(text: str, spec: ModelSpec) -> str | None:
    """The words in `text` that name `spec` (its names, family or maker), or None."""
    for pattern in identity_patterns(spec):
        found = pattern.search(text)
        if found:
            return found.group()
    return None


@dataclass(frozen=True, slots=True)
class Question:
    """What every model of a comparison or battle is asked, and where (`ChatService` builds it)."""

    place: Place
    author: Author
    text: str  # cleaned (core.text.clean): what the models are sent and the log stores
    cleaned: bool
    system_prompt: str
    sources: tuple[Source, ...]
    discord_message_id: int | None = None
    # False: answered, but nothing of it is stored (ChatService decides, as for chat).
    store: bool = True
    # `Privacy.mark` when it was asked: forgetting its asker after that keeps it unstored.
    mark: int = 0


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """One model's answer in a comparison."""

    model: str
    answer_id: str
    reply: str
    latency_ms: float | None
    ttft_ms: float | None
    usage: Usage | None
    cost_usd: float | None
    error: str | None  # a message a person can act on; None when it answered

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Comparison:
    """A side-by-side comparison: each model's answer, in the order the models were named."""

    prompt_id: str
    conversation_id: str
    answers: tuple[ModelAnswer, ...]
    sources: tuple[Source, ...]
    stored: bool = True
    log_problem: str | None = None  # set while the log cannot be written (see ChatResult)


@dataclass(frozen=True, slots=True)
class PreferenceOutcome:
    """Which answer of a comparison a person now prefers, and which they preferred before."""

    prompt_id: str
    chosen_id: str
    model: str
    previous_id: str | None = None
    previous_model: str | None = None
    stored: bool = True  # False for a person who opted out, or a comparison not stored


@dataclass(frozen=True, slots=True)
class BattleAnswer:
    """One side of a battle as the voter sees it: nothing says which model wrote it."""

    answer_id: str
    reply: str
    error: str | None = None  # SIDE_FAILED: never the model's own error, which may name it


@dataclass(frozen=True, slots=True)
class Battle:
    """A blind battle: two anonymous answers, A and B, to vote on."""

    id: str
    prompt_id: str
    conversation_id: str
    a: BattleAnswer
    b: BattleAnswer
    sources: tuple[Source, ...]
    stored: bool = True
    log_problem: str | None = None


@dataclass(frozen=True, slots=True)
class BattleVerdict:
    """What a vote on a battle did, with the two models revealed."""

    battle_id: str
    outcome: Outcome  # this vote; the person's earlier one when `already_voted`
    model_a: str
    model_b: str
    counted: bool  # False when the battle is invalid, or the vote is not stored
    invalid: str | None = None  # why the battle does not count
    already_voted: bool = False
    stored: bool = True
    votes_left_today: int | None = None  # None: no daily cap


@dataclass(frozen=True, slots=True)
class _Unstored:
    """What a vote needs of a comparison or battle that was answered but not stored."""

    models: dict[str, str]  # answer id -> model, in order (A, then B)
    answered: frozenset[str]  # the answers that have text
    invalid: str | None = None


class _NotYet(Exception):
    """What a vote is about is not in the database (yet: the log writer may be on it)."""


OnAnswer = Callable[[ModelAnswer], Awaitable[None] | None]
# Counts what was answered but not stored: (guild id, model, prompt tokens, completion
# tokens, cost in USD), as `Privacy.count`.
CountUnstored = Callable[[int | None, str, int, int, float], None]


class StillStorable(Protocol):
    """Whether an exchange begun at `mark` may still be stored (`Privacy.may_store`)."""

    def __call__(
        self, *, authors: Iterable[int], mark: int, discord_message_id: int | None
    ) -> bool: ...


class Comparisons:
    """Side-by-side comparisons, blind battles, and the votes on them."""

    def __init__(
        self,
        catalog: ModelCatalog,
        answerer: Answerer,
        exchange_log: ExchangeLog,
        writer: LogWriter,
        sessions: async_sessionmaker[AsyncSession],
        *,
        votes_per_day: int = 50,
        rng: random.Random | None = None,
        opted_out: Callable[[int], Awaitable[bool]] | None = None,
        logging_on: Callable[[Place], Awaitable[bool]] | None = None,
        count_unstored: CountUnstored | None = None,
        still_storable: StillStorable | None = None,
        budget: Budget | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.catalog = catalog
        self.answerer = answerer
        self.exchange_log = exchange_log
        self.writer = writer
        self.sessions = sessions
        self.votes_per_day = votes_per_day  # 0: no cap
        self.rng = rng or random.Random()  # tests inject a seeded one
        # Whether a person opted out of storage (their votes are then not stored).
        self.opted_out = opted_out
        # Whether a place stores what is said there (votes on what was said there too).
        self.logging_on = logging_on
        self.count_unstored = count_unstored
        self.still_storable = still_storable
        self.budget = budget
        self.clock = clock
        self._unstored: LRU[str, _Unstored] = LRU(UNSTORED_KEPT)

    # ------------------------------------------------------------------ side by side

    async def compare(
        self,
        question: Question,
        names: Sequence[str],
        *,
        named: bool = True,
        on_answer: OnAnswer | None = None,
    ) -> Comparison:
        """Ask the models `names` (2-4; `named`: the person named them) the same question at once.

        `on_answer` is called with each answer as its model finishes (for progressive
        display); the result holds them all in the order named. Unknown names are
        `NotFound`; too few or too many models a `UserError`.
        """
        wanted = list(dict.fromkeys(names))
        if len(wanted) > MAX_COMPARED:
            raise UserError(
                f"A comparison asks {MAX_COMPARED} models at most; that is {len(wanted)}."
            )
        specs = [await self.catalog.get(name) for name in wanted]
        if len(specs) < 2:
            raise UserError(
                "Name at least two different models to compare."
                if named
                else f"Only {wanted[0]} would answer: name 2 to {MAX_COMPARED} models to compare, "
                "or list some in the config's comparison_models."
            )
        await self._check_budget(question, specs)
        prompt_id, conversation_id = uuid.uuid4().hex, uuid.uuid4().hex
        ids = [uuid.uuid4().hex for _ in specs]
        attempts = self._prepare(specs, question)
        try:
            await self._ask(attempts, ids, on_answer)
        except asyncio.CancelledError:
            # The reader went away: the models were asked and may have billed, so log it.
            self._log(
                question, "comparison", prompt_id, conversation_id, attempts, ids, key=prompt_id
            )
            raise
        stored = self._log(
            question, "comparison", prompt_id, conversation_id, attempts, ids, key=prompt_id
        )
        return Comparison(
            prompt_id=prompt_id,
            conversation_id=conversation_id,
            answers=tuple(
                self._answer(attempt, id) for attempt, id in zip(attempts, ids, strict=True)
            ),
            sources=question.sources,
            stored=stored,
        )

    async def prefer(self, prompt_id: str, chosen_id: str, voter: Author) -> PreferenceOutcome:
        """Record the answer of comparison `prompt_id` that `voter` found best (replacing theirs)."""
        unstored = self._unstored.get(prompt_id)
        if unstored is not None:
            model = self._pick(unstored, chosen_id)
            return PreferenceOutcome(prompt_id, chosen_id, model, stored=False)
        keep = not (self.opted_out is not None and await self.opted_out(voter.id))

        async def work(repo: ArenaRepository) -> PreferenceOutcome:
            answers = await repo.comparison_answers(prompt_id)
            if not answers:
                raise _NotYet(UNKNOWN_COMPARISON)
            models = {answer.id: answer.model_name or "?" for answer in answers}
            model = self._pick(
                _Unstored(models, frozenset(a.id for a in answers if a.content)), chosen_id
            )
            if not keep or not await self._logged(answers[0]):
                return PreferenceOutcome(prompt_id, chosen_id, model, stored=False)
            previous = await repo.prefer(prompt_id, chosen_id, voter.id)
            return PreferenceOutcome(
                prompt_id,
                chosen_id,
                model,
                previous,
                models.get(previous) if previous else None,
            )

        return await self._transaction(work, "Your choice")

    def _pick(self, facts: _Unstored, chosen_id: str) -> str:
        """The model of the chosen answer, if it may be chosen."""
        model = facts.models.get(chosen_id)
        if model is None:
            raise UserError("That answer is not one of this comparison's answers.")
        if chosen_id not in facts.answered:
            raise UserError(f"{model} did not answer, so it cannot be the best one.")
        return model

    # ---------------------------------------------------------------------- battles

    async def battle(self, question: Question, pool: Setting) -> Battle:
        """Two distinct models drawn from `pool` (the place's arena pool) answer anonymously."""
        names = await self._pool(pool)
        try:
            await self._check_budget(question, [await self.catalog.get(n) for n in names])
        except OverBudget:
            # Over a budget, the battle is drawn from the pool's free models, if two are.
            free = [n for n in names if not priced(await self.catalog.get(n))]
            if len(free) < 2:
                raise
            names = free
        specs = [await self.catalog.get(name) for name in self.rng.sample(names, 2)]
        battle_id, prompt_id, conversation_id = (uuid.uuid4().hex for _ in range(3))
        ids = [uuid.uuid4().hex, uuid.uuid4().hex]
        attempts = self._prepare(specs, question)
        try:
            await self._ask(attempts, ids, None)
        except asyncio.CancelledError:
            stopped = "It was stopped before both answers were finished."
            self._log_battle(
                question, battle_id, prompt_id, conversation_id, attempts, ids, names, stopped
            )
            raise
        invalid = self._invalid(attempts)
        stored = self._log_battle(
            question, battle_id, prompt_id, conversation_id, attempts, ids, names, invalid
        )
        a, b = (
            BattleAnswer(id, attempt.reply, None if attempt.ok else SIDE_FAILED)
            for attempt, id in zip(attempts, ids, strict=True)
        )
        return Battle(battle_id, prompt_id, conversation_id, a, b, question.sources, stored)

    async def _check_budget(self, question: Question, specs: Sequence[ModelSpec]) -> None:
        """OverBudget when a priced model among `specs` may not be asked for this person."""
        if self.budget is not None:
            discord = question.discord_message_id is not None
            await self.budget.check(question.author, question.place, specs, discord=discord)

    async def _pool(self, pool: Setting) -> list[str]:
        """The models of an arena pool that still exist: two at least."""
        configured: list[str] | None = pool.value
        names = list(dict.fromkeys(configured)) if configured else self.catalog.registry.names()
        known: list[str] = []
        for name in names:
            try:
                known.append((await self.catalog.get(name)).name)
            except NotFound:
                log.warning("arena pool (%s) names %r, which is not a model", pool.source, name)
        if len(known) >= 2:
            return known
        if configured:
            where = (
                "in the config"
                if pool.source == "global"
                else f"for this {scope_word(pool.source)}"
            )
            raise UserError(
                f"The arena pool set {where} ({', '.join(names)}) has fewer than two models that "
                "exist, so no battle can be drawn. Ask a moderator to set another pool."
            )
        raise UserError(
            "A blind battle needs two models, and only one is configured: add another to the "
            "config, or register one with `switchboard models add-gguf`."
        )

    def _invalid(self, attempts: Sequence[Attempt]) -> str | None:
        """Why a battle cannot count: an answer failed, or named its own model or maker."""
        for label, attempt in zip("AB", attempts, strict=True):
            if not attempt.ok:
                return f"Answer {label} ({attempt.spec.name}) failed: {attempt.error}"
        for label, attempt in zip("AB", attempts, strict=True):
            word = gives_itself_away(attempt.reply, attempt.spec)
            if word is not None:
                return f"Answer {label} gave its model away: it says {word!r}."
        return None

    def _log_battle(
        self,
        question: Question,
        battle_id: str,
        prompt_id: str,
        conversation_id: str,
        attempts: Sequence[Attempt],
        ids: Sequence[str],
        pool: Sequence[str],
        invalid: str | None,
    ) -> bool:
        """Log the battle's exchange, then its `battles` row (in that order, by the writer);
        whether they were stored."""
        stored = self._log(
            question,
            "battle",
            prompt_id,
            conversation_id,
            attempts,
            ids,
            key=battle_id,
            invalid=invalid,
        )
        if not stored:
            return False
        self.exchange_log.add_battle(
            LoggedBattle(
                id=battle_id,
                prompt_id=prompt_id,
                answer_a=ids[0],
                answer_b=ids[1],
                model_a=attempts[0].spec.name,
                model_b=attempts[1].spec.name,
                pool=tuple(pool),
                place=question.place,
                asked_by=question.author.id,
                invalid=invalid,
            )
        )
        return True

    async def vote(
        self, battle_id: str, voter: Author, outcome: str, reason: str | None = None
    ) -> BattleVerdict:
        """Record `voter`'s verdict on a battle and reveal its two models.

        One vote per person per battle: a second is not recorded and the verdict says so
        (with their first). Past the daily cap a vote is refused (`UserError`).
        """
        if outcome not in OUTCOMES:
            raise UserError(
                f"Vote a (A was better), b (B was better), tie, or bad (both were bad), not {outcome!r}."
            )
        verdict: Outcome = outcome
        if reason is not None:
            reason = clean(reason)[0].strip()[:REASON_LIMIT] or None
        unstored = self._unstored.get(battle_id)
        if unstored is not None:
            model_a, model_b = unstored.models.values()
            return BattleVerdict(
                battle_id, verdict, model_a, model_b, False, unstored.invalid, stored=False
            )
        keep = not (self.opted_out is not None and await self.opted_out(voter.id))

        async def work(repo: ArenaRepository) -> BattleVerdict:
            battle = await repo.battle(battle_id)
            if battle is None:
                raise _NotYet(UNKNOWN_BATTLE)
            earlier = await repo.vote_of(battle_id, voter.id)
            if earlier is not None:
                return _verdict(battle, earlier.outcome, already_voted=True)  # type: ignore[arg-type]
            if not keep or not await self._logged(battle):
                return _verdict(battle, verdict, stored=False)
            left = None
            if self.votes_per_day:
                today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
                cast = await repo.votes_since(voter.id, today)
                if cast >= self.votes_per_day:
                    raise UserError(
                        f"You have cast {cast} arena votes today, the most one person may; "
                        f"voting opens again at 00:00 UTC ({until(today + timedelta(days=1), utcnow())})."
                    )
                left = self.votes_per_day - cast - 1
            await repo.add_vote(battle_id, voter.id, verdict, reason)
            return _verdict(battle, verdict, votes_left_today=left)

        return await self._transaction(work, "Your vote")

    # ---------------------------------------------------------------------- running

    def _prepare(self, specs: Sequence[ModelSpec], question: Question) -> list[Attempt]:
        """One attempt per model, each sent exactly the same: no history, the same passages."""
        prompt = Prompt(question.system_prompt, (), question.text, question.sources)
        return [self.answerer.prepare(spec, prompt) for spec in specs]

    async def _ask(
        self, attempts: Sequence[Attempt], ids: Sequence[str], on_answer: OnAnswer | None
    ) -> None:
        """Run every attempt at once; on cancellation, those unfinished are marked STOPPED."""
        started = self.clock()  # one start for all: their times compare
        finished: set[int] = set()

        async def one(index: int) -> None:
            attempt = attempts[index]
            await self.answerer.run(attempt, started)
            finished.add(index)
            if on_answer is not None:
                await self._tell(on_answer, self._answer(attempt, ids[index]))

        try:
            await asyncio.gather(*(one(index) for index in range(len(attempts))))
        except asyncio.CancelledError:
            for index, attempt in enumerate(attempts):
                if index not in finished and attempt.error is None:
                    attempt.error = STOPPED
            raise

    async def _tell(self, on_answer: OnAnswer, answer: ModelAnswer) -> None:
        """Hand one answer to the caller's callback; its failure never sinks the comparison."""
        try:
            pending = on_answer(answer)
            if inspect.isawaitable(pending):
                await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a comparison's on_answer callback failed for %s", answer.model)

    def _answer(self, attempt: Attempt, answer_id: str) -> ModelAnswer:
        usage = self.answerer.billed(attempt)
        return ModelAnswer(
            model=attempt.spec.name,
            answer_id=answer_id,
            reply=attempt.reply,
            latency_ms=attempt.latency_ms,
            ttft_ms=attempt.ttft_ms,
            usage=usage,
            cost_usd=attempt.spec.cost(usage.prompt_tokens, usage.completion_tokens)
            if usage
            else None,
            error=attempt.error,
        )

    def _log(
        self,
        question: Question,
        kind: MessageKind,
        prompt_id: str,
        conversation_id: str,
        attempts: Sequence[Attempt],
        ids: Sequence[str],
        *,
        key: str,
        invalid: str | None = None,
    ) -> bool:
        """Log the question and every model's answer as one exchange, if it may be stored;
        else count it and remember what its votes need under `key` (the comparison's
        prompt, the battle). Whether it was logged."""
        if self.budget is not None:  # each model was asked, and may have billed
            self.budget.record(
                question.author,
                question.place,
                sum(self.answerer.cost(attempt) for attempt in attempts),
                discord=question.discord_message_id is not None,
            )
        if not self._storable(question):
            models = {id: attempt.spec.name for attempt, id in zip(attempts, ids, strict=True)}
            answered = frozenset(
                id for attempt, id in zip(attempts, ids, strict=True) if attempt.reply
            )
            self._unstored.put(key, _Unstored(models, answered, invalid))
            if self.count_unstored is not None:
                for attempt in attempts:  # each model was asked, and may have billed
                    usage = self.answerer.billed(attempt)
                    self.count_unstored(
                        question.place.guild_id,
                        attempt.spec.name,
                        usage.prompt_tokens if usage else 0,
                        usage.completion_tokens if usage else 0,
                        (
                            attempt.spec.cost(usage.prompt_tokens, usage.completion_tokens)
                            if usage
                            else None
                        )
                        or 0.0,
                    )
            return False
        answers: list[LoggedAnswer] = []
        for attempt, answer_id in zip(attempts, ids, strict=True):
            shown = self._answer(attempt, answer_id)
            spec = attempt.spec
            answers.append(
                LoggedAnswer(
                    id=answer_id,
                    kind=kind,
                    model_name=spec.name,
                    provider=spec.provider,
                    provider_model=spec.model,
                    content=attempt.reply,
                    request_messages=messages_to_dicts(attempt.sent),
                    input_ids=(prompt_id,) if attempt.sent else (),
                    status="ok" if attempt.ok else "error",
                    error=attempt.error,
                    prompt_tokens=shown.usage.prompt_tokens if shown.usage else None,
                    completion_tokens=shown.usage.completion_tokens if shown.usage else None,
                    latency_ms=attempt.latency_ms,
                    ttft_ms=attempt.ttft_ms,
                    cost_usd=shown.cost_usd,
                    cleaned=attempt.cleaned,
                )
            )
        self.exchange_log.add(
            Exchange(
                conversation_id=conversation_id,
                place=question.place,
                origin="discord" if question.discord_message_id is not None else "terminal",
                prompt_id=prompt_id,
                parent_id=None,
                author_id=question.author.id,
                author_name=clean(question.author.name)[0],
                text=question.text,
                prompt_cleaned=question.cleaned,
                system_prompt=question.system_prompt,
                answers=tuple(answers),
                source_ids=tuple(source.chunk_id for source in question.sources),
                discord_message_id=question.discord_message_id,
            ),
            f"log {kind} {prompt_id}",
        )
        return True

    def _storable(self, question: Question) -> bool:
        """Whether the exchange may be stored now that it is answered: `Question.store`
        said so, and its asker was not forgotten nor its Discord message deleted since."""
        if not question.store:
            return False
        return self.still_storable is None or self.still_storable(
            authors=(question.author.id,),
            mark=question.mark,
            discord_message_id=question.discord_message_id,
        )

    async def _logged(self, row: BattleRow | Message) -> bool:
        """Whether the place a battle or comparison was asked in stores what is said there now."""
        if self.logging_on is None:
            return True
        place = Place(row.guild_id, row.channel_id or 0, row.thread_id)
        return await self.logging_on(place)

    # ---------------------------------------------------------------------- storage

    async def _transaction(self, work: Callable[[ArenaRepository], Awaitable[T]], what: str) -> T:
        """Run `work` in one transaction; a database that is away is one line.

        Run again once the log writer has caught up when it finds nothing (what it looks
        for may still be on its way), and when a concurrent write of the same person broke
        a unique key (the second run finds that write).
        """
        drained = False
        try:
            for attempt in range(3):
                # Asked before the read, not after it: a write the writer commits while
                # the read runs is not seen by it, yet leaves nothing pending afterwards.
                writing = self.writer.pending > 0
                try:
                    async with self.sessions() as session, session.begin():
                        return await work(ArenaRepository(session))
                except _NotYet as missing:
                    if drained or not writing:
                        raise NotFound(str(missing)) from None
                    drained = True
                    await self._drain()
                except IntegrityError:
                    if attempt == 2:
                        raise
            raise RuntimeError("unreachable: the last attempt returns or raises")
        except UserError:
            raise
        except Exception as exc:
            if is_outage(exc):
                raise StorageUnavailable(
                    f"{what} could not be saved: the database cannot be written right now "
                    f"({failure_reason(exc)}). Try again in a moment."
                ) from exc
            raise

    async def _drain(self) -> None:
        try:
            await self.writer.drain(timeout=WRITE_WAIT_S)
        except TimeoutError:
            pass


def _verdict(
    battle: BattleRow,
    outcome: Outcome,
    *,
    already_voted: bool = False,
    stored: bool = True,
    votes_left_today: int | None = None,
) -> BattleVerdict:
    return BattleVerdict(
        battle_id=battle.id,
        outcome=outcome,
        model_a=battle.model_a,
        model_b=battle.model_b,
        counted=battle.invalid is None and stored,
        invalid=battle.invalid,
        already_voted=already_voted,
        stored=stored,
        votes_left_today=votes_left_today,
    )
