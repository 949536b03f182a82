"""Offline evaluation against the fake OpenAI server: scores, failures, slow models, resuming."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bot.app import App
from bot.service.evaluate import (
    RESULTS_FILE,
    EvalExample,
    EvalProgress,
    contains_score,
    exact_score,
    parse_rating,
    parse_verdict,
    read_dataset,
    read_results,
    regex_score,
    write_dataset,
)
from core.errors import NotFound, UserError
from core.messages import Place
from store.export import ExportOptions
from tests.fakes.openai_server import FakeOpenAI, FakeRequest
from tests.fixtures.export import BOB, CAROL, GUILD, OTHER_CHANNEL, OTHER_GUILD, Log

# The test registry's models and the provider ids the fake server sees.
GOOD, BAD, BROKEN, JUDGE = "main", "solo", "tiny", "backup"
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo"}


def dataset() -> list[EvalExample]:
    rows = [
        {"id": country, "prompt": f"What is the capital of {country}?", "reference": city}
        for country, city in CAPITALS.items()
    ]
    rows.append({"id": "greet", "prompt": "Say hello.", "regex": r"(?i)\bhello\b"})
    return read_dataset([json.dumps(row) for row in rows], "test.jsonl")


def judge_prefers_paris_like_answers(text: str) -> str:
    """A judge that picks the answer naming a capital; given none, it says A (position bias)."""
    a = text.split("[Answer A]")[1].split("[End of answer A]")[0]
    b = text.split("[Answer B]")[1].split("[End of answer B]")[0]
    a_right = any(city in a for city in CAPITALS.values())
    b_right = any(city in b for city in CAPITALS.values())
    if a_right and not b_right:
        return "A names the city. [[A]]"
    if b_right and not a_right:
        return "B names the city. [[B]]"
    return "Both the same; the first one, then. [[A]]"


def replies(request: FakeRequest) -> str:
    """main knows the capitals, solo does not; backup judges."""
    text = request.last_user_text
    if request.model == "fake-backup":
        if "[Answer A]" in text:
            return judge_prefers_paris_like_answers(text)
        return "Decent. [[8]]"
    for country, city in CAPITALS.items():
        if country in text:
            return f"{city}." if request.model == "fake-model" else "I am not sure."
    return "Hello there!" if request.model == "fake-model" else "Hi."


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reply = replies
    fake_openai.fail_model("fake-tiny", 500)
    return fake_openai


# ----------------------------------------------------------------------------- dataset


def test_rows_are_read_with_their_ids_and_every_mistake_names_its_line(tmp_path: Path) -> None:
    lines = [
        '{"prompt": "one", "reference": "1"}',
        "",
        '{"prompt": "two", "system": "", "id": 7, "history": [{"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "hello"}]}',
    ]
    first, second = read_dataset(lines, "d.jsonl")
    assert first.id.startswith("row1-") and first.reference == "1" and first.system is None
    assert (
        second.id == "7"
        and second.system == ""
        and second.history
        == (
            ("user", "hi"),
            ("assistant", "hello"),
        )
    )
    path = tmp_path / "again.jsonl"
    write_dataset(path, [first, second])
    assert read_dataset(path.read_text().splitlines(), "again") == [first, second]

    for bad, message in [
        (['{"prompt": "a"}', "not json"], "d.jsonl line 2: not JSON"),
        (['{"reference": "x"}'], 'd.jsonl line 1: no "prompt"'),
        (['{"prompt": "  "}'], '"prompt" is empty'),
        (['{"prompt": 3}'], '"prompt" must be a string, not int'),
        (['["a"]'], "a row must be a JSON object, not list"),
        (['{"prompt": "a", "regex": "("}'], '"regex" is not a valid regular expression'),
        (['{"prompt": "a", "history": [{"role": "system", "content": "x"}]}'], '"history" turn'),
        (['{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": "x"}'], "also on line 1"),
        ([""], "has no rows"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
            read_dataset(bad, "d.jsonl")


def test_the_scores() -> None:
    assert exact_score("  Paris. ", "paris") == 1.0
    assert exact_score("Paris, France", "Paris") == 0.0
    assert exact_score("anything", None) is None
    assert contains_score("It is PARIS, of course", "Paris") == 1.0
    assert contains_score("Lyon", "Paris") == 0.0
    assert contains_score("x", None) is None
    assert regex_score("Hello!", r"(?i)hello") == 1.0
    assert regex_score("Hi", r"hello") == 0.0
    assert regex_score("Hi", None) is None
    assert parse_verdict("A is better... final: [[B]]") == "B"
    assert parse_verdict("[[A]] no wait [[ tie ]]") == "C"
    assert parse_verdict("A is better") is None
    assert parse_rating("Rating: [[7]]") == 7
    assert parse_rating("[[10/10]]") == 10
    assert parse_rating("[[0]] or [[11]]") is None


# ----------------------------------------------------------------------------- running


async def test_models_are_scored_timed_and_costed_and_a_failing_one_is_recorded(
    chat_app: App, fake: FakeOpenAI, tmp_path: Path
) -> None:
    results = await chat_app.evaluator.run(dataset(), [GOOD, BAD, BROKEN], tmp_path)

    good, bad, broken = (results.summary(m) for m in (GOOD, BAD, BROKEN))
    assert (good.answered, good.failed) == (5, 0)
    assert good.scores["exact"] == 1.0 and good.scores["contains"] == 1.0
    assert good.scores["regex"] == 1.0 and good.scored["exact"] == 4 and good.scored["regex"] == 1
    assert bad.scores["exact"] == 0.0 and bad.scores["regex"] == 0.0
    assert good.scores["judge"] is None  # no judge asked
    # A model that fails every call: recorded as failures, scored 0, the run goes on.
    assert (broken.answered, broken.failed) == (0, 5)
    assert broken.scores["exact"] == 0.0
    failed = [r for r in results.rows if r.model == BROKEN]
    assert all(r.answer is not None and r.answer.error for r in failed)
    assert failed[0].answer is not None
    assert (
        failed[0].answer.error
        == "tiny's provider had a server error (HTTP 500). Try again shortly."
    )
    # Latency, tokens and cost: main has prices ($1 in, $2 out per 1M), solo is free.
    assert good.median_latency_ms is not None and good.p90_latency_ms is not None
    assert good.prompt_tokens > 0 and good.completion_tokens > 0
    assert good.cost_usd == pytest.approx(
        (good.prompt_tokens * 1.0 + good.completion_tokens * 2.0) / 1_000_000
    )
    assert good.cost_per_1k_answers == pytest.approx(1000 * good.cost_usd / 5)
    assert bad.cost_usd == 0.0 and bad.cost_known
    assert results.complete
    # The bot's default system prompt went to rows without one.
    sent = fake.chat_requests[0].messages
    assert sent[0]["role"] == "system" and "Switchboard" in sent[0]["content"]
    # Nothing of an evaluation is in the chat log.
    async with chat_app.sessions() as session:
        from store.repositories import ConversationRepository

        assert await ConversationRepository(session).count_messages() == 0


async def test_a_slow_model_waits_its_turn_under_the_concurrency_limit(
    chat_app: App, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.slow_model("fake-solo", 0.2)
    seen: list[EvalProgress] = []
    results = await chat_app.evaluator.run(
        dataset(),
        [GOOD, BAD],
        tmp_path,
        concurrency=2,
        on_progress=lambda p: seen.append(EvalProgress(p.total, p.done, p.failed)),
    )
    assert fake.max_active == 2  # never more than the limit at once
    assert results.complete and results.summary(BAD).answered == 5
    assert [p.done for p in seen] == list(range(11))
    assert {p.total for p in seen} == {10}


async def test_an_interrupted_run_resumes_where_it_stopped(
    chat_app: App, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.slow_model("fake-solo", 0.3)
    three = asyncio.Event()

    def watch(progress: EvalProgress) -> None:
        if progress.done >= 3:
            three.set()

    run = asyncio.create_task(
        chat_app.evaluator.run(dataset(), [GOOD, BAD], tmp_path, concurrency=2, on_progress=watch)
    )
    await three.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    kept = read_results(tmp_path / RESULTS_FILE)
    assert 3 <= len(kept) < 10
    # A write cut off by the interruption: the rerun drops it.
    with (tmp_path / RESULTS_FILE).open("a", encoding="utf-8") as file:
        file.write('{"type": "answer", "example": "Fra')
    asked_before = len(fake.chat_requests)

    results = await chat_app.evaluator.run(dataset(), [GOOD, BAD], tmp_path, concurrency=2)
    assert results.complete
    assert len(fake.chat_requests) - asked_before == 10 - len(kept)  # only what was missing
    lines = (tmp_path / RESULTS_FILE).read_text().splitlines()
    assert len(lines) == 10 and all(json.loads(line) for line in lines)
    assert results.summary(GOOD).scores["exact"] == 1.0


async def test_failures_are_asked_again_only_when_asked(
    chat_app: App, fake: FakeOpenAI, tmp_path: Path
) -> None:
    first = await chat_app.evaluator.run(dataset(), [GOOD, BROKEN], tmp_path)
    assert first.summary(BROKEN).failed == 5
    fake.reset()
    fake.reply = replies  # tiny answers now
    again = await chat_app.evaluator.run(dataset(), [GOOD, BROKEN], tmp_path)
    assert fake.chat_requests == [] and again.summary(BROKEN).failed == 5
    retried = await chat_app.evaluator.run(dataset(), [GOOD, BROKEN], tmp_path, retry_failed=True)
    assert len(fake.chat_requests) == 5 and retried.summary(BROKEN).answered == 5


async def test_a_changed_row_or_a_new_model_is_asked_and_nothing_else(
    chat_app: App, fake: FakeOpenAI, tmp_path: Path
) -> None:
    await chat_app.evaluator.run(dataset(), [GOOD], tmp_path)
    changed = [
        EvalExample(e.id, e.prompt + " Be brief.", e.reference) if e.id == "Italy" else e
        for e in dataset()
    ]
    before = len(fake.chat_requests)
    results = await chat_app.evaluator.run(changed, [GOOD, BAD], tmp_path)
    asked = fake.chat_requests[before:]
    assert len(asked) == 1 + 5  # the changed row for main; every row for the new model
    assert sum(1 for r in asked if r.model == "fake-model") == 1
    assert results.complete and len(results.rows) == 10


async def test_the_pairwise_judge_swaps_positions(
    chat_app: App, fake: FakeOpenAI, tmp_path: Path
) -> None:
    results = await chat_app.evaluator.run(dataset(), [GOOD, BAD], tmp_path, judge=JUDGE)
    good, bad = results.summary(GOOD), results.summary(BAD)
    judged = [r for r in fake.chat_requests if r.model == "fake-backup"]
    assert len(judged) == 5 * 2  # each row's pair, in both orders
    # On the capitals the judge prefers main in both positions; on "Say hello." it always
    # says A, whichever is first: with positions swapped that is a tie.
    assert good.scores["judge"] == pytest.approx((4 * 1.0 + 0.5) / 5)
    assert bad.scores["judge"] == pytest.approx((4 * 0.0 + 0.5) / 5)
    assert len(results.verdicts) == 10 and results.judge_calls.prompt_tokens
    # Judged once: a rerun asks the judge nothing.
    before = len(fake.chat_requests)
    again = await chat_app.evaluator.run(dataset(), [GOOD, BAD], tmp_path, judge=JUDGE)
    assert len(fake.chat_requests) == before and again.summary(GOOD).scores == good.scores


async def test_the_rubric_judge_rates_each_answer(
    chat_app: App, fake: FakeOpenAI, tmp_path: Path
) -> None:
    results = await chat_app.evaluator.run(
        dataset(), [GOOD, BROKEN], tmp_path, judge=JUDGE, judge_mode="rubric"
    )
    good, broken = results.summary(GOOD), results.summary(BROKEN)
    assert good.judge_rating == 8.0 and good.scores["judge"] == pytest.approx(7 / 9)
    assert broken.scores["judge"] == 0.0  # nothing to rate: its failures count as 0
    assert sum(1 for r in fake.chat_requests if r.model == "fake-backup") == 5


async def test_what_cannot_run_is_one_line(chat_app: App, fake: FakeOpenAI, tmp_path: Path) -> None:
    evaluator = chat_app.evaluator
    with pytest.raises(NotFound, match="nope"):
        await evaluator.run(dataset(), [GOOD, "nope"], tmp_path)
    with pytest.raises(UserError, match="two or more"):
        await evaluator.run(dataset(), [GOOD], tmp_path, judge=JUDGE)
    with pytest.raises(UserError, match="at least one model"):
        await evaluator.run(dataset(), [" "], tmp_path)
    with pytest.raises(UserError, match="--regex"):
        await evaluator.run(dataset(), [GOOD], tmp_path, default_regex="(")
    assert fake.chat_requests == []


# ----------------------------------------------------------------------------- --from-log


async def test_prompts_from_the_log_follow_the_exports_filters_and_privacy(
    log: Log, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    await log.converse(["What is a switchboard?", "Who invented it? Mail me at al@example.com"])
    await log.set_replies(fake_openai, "Another answer.")
    await log.retry("What is a switchboard?")  # a second answer: still one prompt
    await log.converse(["in another server"], author=BOB, place=Place(OTHER_GUILD, 5))
    await log.converse(["carol asks"], author=CAROL)
    await log.opt_out(CAROL)
    fake_openai.reply = replies
    evaluator = log.app.evaluator

    examples, logged = await evaluator.from_log(ExportOptions("sft", guild_id=GUILD))
    assert [e.prompt for e in examples] == [
        "What is a switchboard?",
        "Who invented it? Mail me at <EMAIL>",  # redacted as the export redacts
    ]
    assert (logged.found, logged.left_out) == (2, 1)  # Carol opted out
    first, second = examples
    assert first.history == ()
    assert first.system is not None and first.system.startswith("You are Switchboard")  # as used
    assert second.history == (
        ("user", "What is a switchboard?"),
        ("assistant", "Echo: What is a switchboard?"),
    )
    assert (
        first.id
        == f"log-{(await log.message(log.answers['What is a switchboard?'].message_id)).parent_id}"
    )

    newest, logged = await evaluator.from_log(ExportOptions("sft", guild_id=GUILD), limit=1)
    assert [e.prompt for e in newest] == [second.prompt] and logged.found == 2
    unredacted, _ = await evaluator.from_log(ExportOptions("sft", guild_id=GUILD, redact=False))
    assert unredacted[1].prompt.endswith("al@example.com")
    with pytest.raises(UserError, match="No logged prompts match those filters"):
        await evaluator.from_log(ExportOptions("sft", guild_id=GUILD, channel_id=OTHER_CHANNEL))
    with pytest.raises(UserError, match="--limit"):
        await evaluator.from_log(ExportOptions("sft"), limit=0)

    # The models get the conversation as it was before the question; a rerun asks nothing.
    before = len(fake_openai.chat_requests)
    results = await evaluator.run(examples, [GOOD], tmp_path)
    assert results.complete and results.summary(GOOD).answered == 2
    sent = fake_openai.chat_requests[before:]
    turns = sorted(([m["role"] for m in r.messages] for r in sent), key=len)
    assert turns == [["system", "user"], ["system", "user", "assistant", "user"]]
    again, _ = await evaluator.from_log(ExportOptions("sft", guild_id=GUILD))
    await evaluator.run(again, [GOOD], tmp_path)
    assert len(fake_openai.chat_requests) == before + 2
