"""The dataset export on a log the real service wrote (fake model server; SQLite and PostgreSQL).

Each format is checked line by line against its published rules (OpenAI's fine-tuning
and preference-tuning data formats; TRL's conversational dataset types), written here
from the documentation rather than taken from the exporter, and loaded by the Hugging
Face `datasets` JSON loader, offline.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import datasets
import pytest
from sqlalchemy import update

from core.errors import UserError
from core.messages import ChatRequest, Place
from store.export import ExportOptions, ModelTarget, parse_format, parse_when
from store.export.redact import PersonalData
from store.models import Message
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.export import (
    ALICE,
    BOB,
    CAROL,
    CHANNEL,
    DAVE,
    GUILD,
    OTHER_CHANNEL,
    OTHER_GUILD,
    PLACE,
    Log,
)

ROLES = {"system", "user", "assistant"}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[Path]:
    return list(folder.iterdir())


def manifest(out: Path) -> dict[str, Any]:
    return json.loads(out.with_name(f"{out.stem}.manifest.json").read_text(encoding="utf-8"))


# --- the published rules, per format ------------------------------------------------------


def check_message(message: dict[str, Any], *, weight: bool = False) -> None:
    allowed = (
        {"role", "content", "weight"}
        if weight and message["role"] == "assistant"
        else {"role", "content"}
    )
    assert {"role", "content"} <= set(message) <= allowed, message
    assert message["role"] in ROLES
    assert isinstance(message["content"], str) and message["content"].strip()


def check_conversation(
    messages: list[dict[str, Any]], *, ends_with: str, weight: bool = False
) -> None:
    assert isinstance(messages, list) and messages
    for index, message in enumerate(messages):
        check_message(message, weight=weight)
        assert message["role"] != "system" or index == 0, "a system message comes first"
    first = messages[1] if messages[0]["role"] == "system" else messages[0]
    assert first["role"] == "user"
    assert messages[-1]["role"] == ends_with


def check_output(output: list[dict[str, Any]]) -> str:
    assert isinstance(output, list) and len(output) == 1
    check_message(output[0])
    assert output[0]["role"] == "assistant"
    return output[0]["content"]


def check_openai_chat(example: dict[str, Any]) -> None:
    # OpenAI chat fine-tuning: {"messages": [...]}, "weight" 0 or 1 on assistant messages.
    assert set(example) == {"messages"}
    messages = example["messages"]
    check_conversation(messages, ends_with="assistant", weight=True)
    assistants = [m for m in messages if m["role"] == "assistant"]
    assert all(m.get("weight") in (0, 1) and type(m.get("weight")) is int for m in assistants)
    assert assistants[-1]["weight"] == 1  # the answer that qualified is trained on
    assert all(m["weight"] == 0 for m in assistants[:-1])  # earlier turns are not


def check_openai_dpo(example: dict[str, Any]) -> None:
    # OpenAI preference fine-tuning: input.messages, then one preferred and one
    # non-preferred assistant message (the last assistant turn).
    assert set(example) == {"input", "preferred_output", "non_preferred_output"}
    assert set(example["input"]) <= {"messages", "tools", "parallel_tool_calls"}
    check_conversation(example["input"]["messages"], ends_with="user")
    assert check_output(example["preferred_output"]) != check_output(
        example["non_preferred_output"]
    )


def check_sft(example: dict[str, Any]) -> None:
    # TRL conversational language modelling: {"messages": [{"role", "content"}, ...]}.
    assert set(example) == {"messages"}
    check_conversation(example["messages"], ends_with="assistant")


def check_dpo(example: dict[str, Any]) -> None:
    # TRL conversational preference: prompt messages, chosen and rejected completions.
    assert set(example) == {"prompt", "chosen", "rejected"}
    check_conversation(example["prompt"], ends_with="user")
    assert check_output(example["chosen"]) != check_output(example["rejected"])


def check_kto(example: dict[str, Any]) -> None:
    # TRL conversational unpaired preference: prompt, completion, boolean label.
    assert set(example) == {"prompt", "completion", "label"}
    check_conversation(example["prompt"], ends_with="user")
    check_output(example["completion"])
    assert type(example["label"]) is bool


CHECKS = {
    "openai-chat": check_openai_chat,
    "openai-dpo": check_openai_dpo,
    "sft": check_sft,
    "dpo": check_dpo,
    "kto": check_kto,
}


async def feedback_log(log: Log, fake: FakeOpenAI) -> None:
    """A log with something for every format: likes, dislikes, a correction, a retry."""
    await log.converse(["What is a switchboard?", "Who invented it?", "Thanks!"])
    await log.converse(["How do I reset the router?"], author=BOB)
    await log.converse(["Is the kettle descaled weekly?"], author=CAROL)
    await log.vote("What is a switchboard?", BOB, 1)
    await log.vote("Thanks!", CAROL, 1)
    await log.vote("Who invented it?", BOB, -1, reason="wrong")
    await log.correct(
        "Who invented it?", CAROL, "Tivadar Puskás built the first telephone exchange."
    )
    await log.vote("How do I reset the router?", ALICE, -1)
    await log.set_replies(fake, "Hold the reset button for ten seconds, then wait.")
    retried = await log.retry("How do I reset the router?", BOB)
    await log.vote(retried, ALICE, 1)
    await log.vote("Is the kettle descaled weekly?", DAVE, 1)


@pytest.mark.parametrize("fmt", list(CHECKS))
async def test_each_format_keeps_its_published_rules_and_loads_with_datasets(
    fmt: str, sqlite_log: Log, fake_openai: FakeOpenAI, out: Path, tmp_path: Path
) -> None:
    await feedback_log(sqlite_log, fake_openai)
    summary = await sqlite_log.app.exporter.run(ExportOptions(parse_format(fmt)), out)
    examples = lines(out)
    assert examples and len(examples) == summary.examples
    for example in examples:
        CHECKS[fmt](example)

    loaded = datasets.load_dataset(
        "json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert loaded.num_rows == len(examples)
    assert set(loaded.column_names) == set(examples[0])

    data = manifest(out)
    assert data["format"] == fmt and data["counts"]["examples"] == len(examples)
    assert data["files"][0]["sha256"] == sha256(out)
    assert data["database_revision"] is not None
    if fmt == "kto":
        kto = data["kto"]
        assert kto["desirable"] + kto["undesirable"] == len(examples)
        assert kto["desirable"] == sum(e["label"] for e in examples)
        # TRL: desirable_weight × desirable over undesirable_weight × undesirable in [1, 4/3].
        ratio = (
            kto["desirable_weight"]
            * kto["desirable"]
            / (kto["undesirable_weight"] * kto["undesirable"])
        )
        assert 1 <= ratio <= 4 / 3


async def test_openai_chat_is_the_conversation_as_sent_trained_on_the_liked_answer_only(
    sqlite_log: Log, fake_openai: FakeOpenAI, out: Path
) -> None:
    await feedback_log(sqlite_log, fake_openai)
    await sqlite_log.app.exporter.run(ExportOptions("openai-chat"), out)
    examples = {e["messages"][-1]["content"]: e["messages"] for e in lines(out)}
    # Liked: two answers and Dave's like; the correction replaces the disliked answer.
    assert set(examples) == {
        "Echo: What is a switchboard?",
        "Tivadar Puskás built the first telephone exchange.",
        "Echo: Thanks!",
        "Hold the reset button for ten seconds, then wait.",
        "Echo: Is the kettle descaled weekly?",
    }
    thanks = examples["Echo: Thanks!"]
    sent = (await sqlite_log.message(sqlite_log.answers["Thanks!"].message_id)).request_messages
    # The system prompt and the history exactly as they were sent, then the answer.
    assert [{"role": m["role"], "content": m["content"]} for m in thanks[:-1]] == sent
    assert [m.get("weight") for m in thanks if m["role"] == "assistant"] == [0, 0, 1]
    # The correction follows the history the corrected answer had; the original is not there.
    corrected = examples["Tivadar Puskás built the first telephone exchange."]
    assert [m["content"] for m in corrected[1:]] == [
        "What is a switchboard?",
        "Echo: What is a switchboard?",
        "Who invented it?",
        "Tivadar Puskás built the first telephone exchange.",
    ]


async def test_preferences_come_from_corrections_and_a_liked_retry_over_a_disliked_answer(
    sqlite_log: Log, fake_openai: FakeOpenAI, out: Path
) -> None:
    await feedback_log(sqlite_log, fake_openai)
    summary = await sqlite_log.app.exporter.run(ExportOptions("dpo"), out)
    pairs = {(e["chosen"][0]["content"], e["rejected"][0]["content"]) for e in lines(out)}
    assert pairs == {
        ("Tivadar Puskás built the first telephone exchange.", "Echo: Who invented it?"),
        ("Hold the reset button for ten seconds, then wait.", "Echo: How do I reset the router?"),
    }
    assert summary.removed["no_pair"] == 3  # the liked answers with nothing to compare to
    openai = out.with_name("openai.jsonl")
    await sqlite_log.app.exporter.run(ExportOptions("openai-dpo"), openai)
    assert {
        (e["preferred_output"][0]["content"], e["non_preferred_output"][0]["content"])
        for e in lines(openai)
    } == pairs


async def test_filters_split_duplicates_and_opted_out_people(log: Log, out: Path) -> None:
    # Alice in two channels of the server, Bob in another server, Carol in a DM.
    await log.converse(["first in general", "second in general"])
    await log.converse(["in the other channel"], place=Place(GUILD, OTHER_CHANNEL))
    await log.converse(["in another server"], author=BOB, place=Place(OTHER_GUILD, 5))
    await log.converse(["a direct message"], author=CAROL, place=Place(None, 77))
    # The same question twice gets the same answer: one example.
    await log.converse(["same question"], author=DAVE)
    await log.converse(["same question"], author=DAVE)
    everything = ExportOptions("sft", include_unrated=True)
    summary = await log.app.exporter.run(everything, out)
    assert summary.examples == 6 and summary.removed["duplicate"] == 1

    only_here = await log.app.exporter.run(
        ExportOptions("sft", include_unrated=True, guild_id=GUILD, channel_id=CHANNEL), out
    )
    assert only_here.examples == 3  # first, second, same question
    assert only_here.removed["guild"] == 2 and only_here.removed["channel"] == 1

    # Rated: nothing liked yet, so the default finds nothing and says why.
    with pytest.raises(UserError) as nothing:
        await log.app.exporter.run(ExportOptions("sft"), out)
    assert nothing.value.message == (
        "Nothing to export: of 7 answers, 7 unrated (add --include-unrated)."
    )
    await log.vote("second in general", BOB, 1)
    await log.vote("in the other channel", BOB, 1)
    await log.vote("in the other channel", CAROL, -1)  # net 0: below --min-rating 1
    liked = await log.app.exporter.run(ExportOptions("sft"), out)
    assert [e["messages"][-1]["content"] for e in lines(out)] == ["Echo: second in general"]
    assert liked.removed["rating"] == 1 and liked.removed["unrated"] == 5

    # Dates: answers at or after --since and before --until.
    later = datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(UserError, match="before --since"):
        await log.app.exporter.run(ExportOptions("sft", include_unrated=True, since=later), out)
    before = await log.app.exporter.run(
        ExportOptions("sft", include_unrated=True, until=later), out
    )
    assert before.examples == 5  # the other channel's answer is now rated: net 0

    # Split: by conversation, the same every time, nothing in both files.
    split = ExportOptions("sft", include_unrated=True, split=0.5)
    first = await log.app.exporter.run(split, out)
    train = text(out.with_name("data.train.jsonl"))
    validation = text(out.with_name("data.validation.jsonl"))
    await log.app.exporter.run(split, out)
    assert text(out.with_name("data.train.jsonl")) == train
    assert text(out.with_name("data.validation.jsonl")) == validation
    train_lines, validation_lines = set(train.splitlines()), set(validation.splitlines())
    assert not train_lines & validation_lines
    assert len(train_lines) + len(validation_lines) == first.examples == 5
    data = manifest(out)
    assert data["counts"]["train"] + data["counts"]["validation"] == 5
    assert [f["split"] for f in data["files"]] == ["train", "validation"]
    conversations = {
        "train": {e["messages"][1]["content"] for e in lines(out.with_name("data.train.jsonl"))},
        "validation": {
            e["messages"][1]["content"] for e in lines(out.with_name("data.validation.jsonl"))
        },
    }
    # Alice's second answer has her first question as history: both in the same file.
    assert (
        "first in general" in conversations["train"]
        or "first in general" in conversations["validation"]
    )

    # Alice opts out: nothing she wrote is exported, nor any answer to her; Bob's vote
    # still counts, hers would not.
    await log.opt_out(ALICE)
    after = await log.app.exporter.run(everything, out)
    assert after.removed["opted_out"] == 3
    assert not any("general" in line or "other channel" in line for line in text(out).splitlines())


async def test_a_person_who_opted_out_is_not_exported_from_anyone_elses_answer(
    log: Log, out: Path
) -> None:
    # One conversation, two people: Bob's answer was built on Alice's words.
    first = await log.converse(["the first question"], author=ALICE)
    result = await log.app.service.answer(
        ChatRequest(PLACE, BOB, "a follow-up", conversation_id=first[0].conversation_id)
    )
    await log.app.writer.drain()
    await log.vote(first[0], CAROL, 1)
    await log.vote(result, CAROL, 1)
    await log.vote(result, DAVE, -1)
    await log.opt_out(DAVE)  # his dislike stops counting
    summary = await log.app.exporter.run(ExportOptions("sft"), out)
    assert [e["messages"][-1]["content"] for e in lines(out)] == [
        "Echo: the first question",
        "Echo: a follow-up",
    ]
    assert summary.examples == 2
    await log.opt_out(ALICE)
    with pytest.raises(UserError, match="2 by or for people who opted out"):
        await log.app.exporter.run(ExportOptions("sft"), out)


async def test_personal_data_is_replaced_unless_redaction_is_off(
    sqlite_log: Log, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await sqlite_log.converse(
        [
            "Mail me at ada.lovelace@example.com or call +44 20 7946 0958.",
            "Ask <@123456789012345678> or bob in <#987654321098765432>, "
            "join https://discord.gg/abcDEF, my key is sk-proj-abcdefgh12345678.",
        ]
    )
    await sqlite_log.converse(["hello from bob"], author=BOB)
    summary = await sqlite_log.app.exporter.run(ExportOptions("sft", include_unrated=True), out)
    written = text(out)
    for secret in (
        "ada.lovelace@example.com",
        "7946",
        "123456789012345678",
        "abcDEF",
        "sk-proj",
        "bob",
    ):
        assert secret not in written
    assert "Mail me at <EMAIL> or call <PHONE>." in written
    assert "Ask <USER> or <USER> in <CHANNEL>, join <INVITE>, my key is <SECRET>." in written
    assert summary.placeholders["EMAIL"] >= 1 and summary.placeholders["PHONE"] >= 1
    assert manifest(out)["redaction"]["enabled"] is True

    raw = await sqlite_log.app.exporter.run(
        ExportOptions("sft", include_unrated=True, redact=False), out
    )
    assert "ada.lovelace@example.com" in text(out)
    assert manifest(out)["redaction"]["enabled"] is False and raw.examples == 3

    # Fail closed: a text whose check still finds something leaves its example out.
    found = PersonalData.find
    monkeypatch.setattr(
        PersonalData, "find", lambda self, t: "email" if "EMAIL" in t else found(self, t)
    )
    closed = await sqlite_log.app.exporter.run(ExportOptions("sft", include_unrated=True), out)
    assert closed.removed["redaction"] == 2 and closed.examples == 1
    assert "hello from" in text(out)


async def test_with_context_keeps_the_passages_as_sent(sqlite_log: Log, out: Path) -> None:
    # An answer that was sent reference passages (as the knowledge base adds them).
    [result] = await sqlite_log.converse(["What does E-4711 mean?"])
    row = await sqlite_log.message(result.message_id)
    sent = [
        {"role": "system", "content": row.system_prompt + "\n\nUse the references."},
        {
            "role": "user",
            "content": '<reference n="1" source="guide.md">E-4711: lid</reference>\n\nWhat does E-4711 mean?',
        },
    ]
    async with sqlite_log.app.sessions() as session, session.begin():
        await session.execute(
            update(Message).where(Message.id == row.id).values(request_messages=sent)
        )
    plain = await sqlite_log.app.exporter.run(ExportOptions("sft", include_unrated=True), out)
    [example] = lines(out)
    assert example["messages"][0]["content"] == row.system_prompt
    assert example["messages"][1]["content"] == "What does E-4711 mean?"
    assert plain.examples == 1
    await sqlite_log.app.exporter.run(
        ExportOptions("sft", include_unrated=True, with_context=True), out
    )
    [example] = lines(out)
    assert [{"role": m["role"], "content": m["content"]} for m in example["messages"][:-1]] == sent


async def test_examples_longer_than_the_target_window_are_left_out(
    sqlite_log: Log, out: Path
) -> None:
    [result] = await sqlite_log.converse(["short question"])
    await sqlite_log.correct(result, BOB, "word " * 400)  # ~400 tokens
    # "tiny" has a 300-token window: as the target, the long correction does not fit.
    summary = await sqlite_log.app.exporter.run(
        ExportOptions("sft", include_unrated=True, model="main"), out
    )
    assert summary.examples == 1  # main's window is 16,384 tokens
    targets = sqlite_log.app.exporter.targets
    sqlite_log.app.exporter.targets = lambda: {
        **targets(),
        "main": ModelTarget("main", 300, 2.0),
    }
    with pytest.raises(UserError, match="1 too long for the model's window"):
        await sqlite_log.app.exporter.run(ExportOptions("sft", include_unrated=True), out)


async def test_the_summary_estimates_the_training_cost_at_the_registry_price(
    sqlite_log: Log, out: Path
) -> None:
    await sqlite_log.converse([f"question {n}" for n in range(3)])
    exporter = sqlite_log.app.exporter
    targets = exporter.targets
    exporter.targets = lambda: {**targets(), "main": ModelTarget("main", 16384, 25.0)}
    summary = await exporter.run(ExportOptions("openai-chat", include_unrated=True), out)
    assert summary.cost_usd == pytest.approx(summary.tokens * 25.0 / 1_000_000)
    assert summary.priced_examples == summary.examples == 3
    assert summary.warnings == (
        "Only 3 examples: fine-tuning needs at least 10 (OpenAI refuses fewer).",
    )
    assert manifest(out)["estimated_training_cost_usd"] == pytest.approx(summary.cost_usd, abs=1e-6)


async def test_clear_errors(sqlite_log: Log, out: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Unknown format 'opanai-chat'. Did you mean openai-chat?"):
        parse_format("opanai-chat")
    with pytest.raises(UserError, match="--since '2024-13-01' is not an ISO date"):
        parse_when("2024-13-01", "--since")
    assert parse_when("2024-05-31", "--until", end=True) == datetime(2024, 6, 1, tzinfo=UTC)
    with pytest.raises(UserError, match="--split 1.5 is not a share"):
        ExportOptions("sft", split=1.5)
    with pytest.raises(UserError, match="--min-rating must be 1 or more"):
        ExportOptions("sft", min_rating=0)
    with pytest.raises(UserError, match="Nothing to export: the log holds no answers yet."):
        await sqlite_log.app.exporter.run(ExportOptions("sft"), out)
    await sqlite_log.converse(["hello"])
    with pytest.raises(UserError, match="No model named 'mian'.*Did you mean 'main'"):
        await sqlite_log.app.exporter.run(ExportOptions("sft", model="mian"), out)
    with pytest.raises(UserError, match="there is no folder"):
        await sqlite_log.app.exporter.run(ExportOptions("sft"), tmp_path / "missing" / "x.jsonl")
    with pytest.raises(UserError, match="it is a folder"):
        await sqlite_log.app.exporter.run(ExportOptions("sft"), tmp_path)
    # Nothing is left behind by a failed export.
    assert listing(out.parent) == []


STYLES = {"fake-model": "Red.", "fake-solo": "Blue.", "fake-backup": "Green.", "fake-tiny": "Grey."}


def arena_reply(request: Any) -> str:
    """Each model answers in its own words; asked who it is, every one says (and is found out)."""
    if "Who are you?" in request.last_user_text:
        return f"I am {request.model}."
    return f"{STYLES[request.model]} ({request.last_user_text})"


async def test_arena_votes_and_comparison_picks_are_pairs_and_kto_labels(
    log: Log, fake_openai: FakeOpenAI, out: Path
) -> None:
    fake_openai.reply = arena_reply
    svc = log.app.service
    # A comparison: Bob and Carol pick main's answer, Dave picks solo's; backup is never picked.
    compared = await svc.compare(PLACE, ALICE, "Name a colour.", ["main", "solo", "backup"])
    by_model = {answer.model: answer for answer in compared.answers}
    for voter, model in [(BOB, "main"), (CAROL, "main"), (DAVE, "solo")]:
        await svc.prefer(compared.prompt_id, by_model[model].answer_id, voter)
    # A battle Bob says A won and Carol called a tie; one with only a tie and "both bad";
    # one invalid (the answers name their models), whatever its votes say.
    # Two models with answers of their own (tiny and tiny-then-big answer alike).
    await svc.set_arena_pool(PLACE, "channel", ["main", "solo"], ALICE)
    won = await svc.battle(PLACE, ALICE, "Pick a colour.")
    await svc.battle_vote(won.id, BOB, "a")
    await svc.battle_vote(won.id, CAROL, "tie")
    even = await svc.battle(PLACE, ALICE, "Any colour?")
    await svc.battle_vote(even.id, BOB, "tie")
    await svc.battle_vote(even.id, CAROL, "bad")
    invalid = await svc.battle(PLACE, ALICE, "Who are you?")
    await svc.battle_vote(invalid.id, BOB, "a")
    await log.app.writer.drain()  # the battles' rows are written after their answers
    # Dave's pick stops counting once he opts out.
    before_opt_out = await log.app.exporter.run(ExportOptions("dpo"), out)
    assert before_opt_out.examples == 3 + 1, (lines(out), before_opt_out.removed)
    await log.opt_out(DAVE)
    await log.app.writer.drain()

    red, blue, green = (by_model[m].reply for m in ("main", "solo", "backup"))
    expected = {(red, blue), (red, green), (won.a.reply, won.b.reply)}
    await log.app.exporter.run(ExportOptions("dpo"), out)
    dpo = lines(out)
    assert {(e["chosen"][0]["content"], e["rejected"][0]["content"]) for e in dpo} == expected
    for example in dpo:
        check_dpo(example)
        assert example["prompt"][-1]["content"] in {"Name a colour.", "Pick a colour."}
    openai = out.with_name("openai.jsonl")
    await log.app.exporter.run(ExportOptions("openai-dpo"), openai)
    assert {
        (e["preferred_output"][0]["content"], e["non_preferred_output"][0]["content"])
        for e in lines(openai)
    } == expected

    kto_out = out.with_name("kto.jsonl")
    summary = await log.app.exporter.run(ExportOptions("kto"), kto_out)
    labels = {e["completion"][0]["content"]: e["label"] for e in lines(kto_out)}
    assert labels == {red: True, blue: False, green: False, won.a.reply: True, won.b.reply: False}
    assert summary.kto is not None and summary.kto["desirable"] == 2
    # The tied and the invalid battles' answers are in no format.
    for answer in (even.a, even.b, invalid.a, invalid.b):
        assert answer.reply not in labels
