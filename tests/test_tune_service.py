"""Fine-tuning jobs through the service, without training: snapshots, refusals, one job per
server, cancel, interrupted runs, and the gate (candidate, promote, rollback)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

import bot.service.tune as tune_module
from bot.app import App, open_app
from bot.present import models_text
from bot.service.tune import TuneRequest
from chains.registry import Lineage, ModelSpec
from core.errors import PermissionDenied, UserError
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from store.models import ModelGateEvent, TuneJob, utcnow
from store.tune_jobs import TuneJobRepository
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.tune import log_corrected_zorbia_answers, log_liked_zorbia_answers

ADMIN = Author(7, "ada")
MEMBER = Author(8, "mo")
GUILD = 10
PLACE = Place(GUILD, 20)


@pytest.fixture
async def app(tune_settings: Settings) -> AsyncIterator[App]:
    async with open_app(tune_settings, knowledge=False) as app:
        yield app


def read_text(path: Path) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


async def jobs_in(app: App) -> int:
    async with app.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(TuneJob)) or 0)


async def test_start_freezes_a_snapshot_through_the_export_and_queues_one_job_per_server(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    job, summary = await app.tunes.start(
        TuneRequest(base="smol", name="smol-zorbia", steps=4, guild_id=GUILD), ADMIN
    )
    assert job.status == "queued" and job.backend == "local" and job.method == "sft"
    assert job.name == "smol-zorbia" and job.base_model == "smol" and job.steps == 4
    assert summary.examples == 12 and job.snapshot_rows == 12
    snapshot = Path(job.snapshot_path)
    assert snapshot.parent == app.tunes.jobs_dir / job.id
    rows = [json.loads(line) for line in read_text(snapshot).splitlines()]
    assert "The capital of Zorbia is Quellport." in {r["messages"][-1]["content"] for r in rows}
    manifest = json.loads(read_text(summary.manifest))
    assert manifest["files"][0]["sha256"] == job.snapshot_sha256  # the snapshot's hash, recorded
    assert job.started_by == "ada (7)"

    # One job per server at a time: the second start is refused, naming the first.
    with pytest.raises(UserError, match=f"already queued for server {GUILD}: job {job.id[:8]}"):
        await app.tunes.start(TuneRequest(base="smol", guild_id=GUILD), ADMIN)
    assert await jobs_in(app) == 1

    # A queued job is cancelled at once, leaving its snapshot as the record; then a new one may start.
    cancelled = await app.tunes.cancel(job.id[:8], ADMIN)
    assert cancelled.status == "cancelled" and cancelled.error == "cancelled by ada (7)"
    again, _ = await app.tunes.start(TuneRequest(base="smol", guild_id=GUILD), ADMIN)
    assert again.name == f"smol-tune-{again.id[:6]}"
    assert [j.id for j in await app.tunes.list()] == [again.id, job.id]


async def test_a_local_dpo_job_freezes_the_corrections_as_preference_pairs(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_corrected_zorbia_answers(app, fake_openai, guild=GUILD)
    job, summary = await app.tunes.start(
        TuneRequest(base="smol", method="dpo", steps=4, guild_id=GUILD), ADMIN
    )
    assert job.backend == "local" and job.method == "dpo" and job.snapshot_rows == 12
    rows = [json.loads(line) for line in read_text(Path(job.snapshot_path)).splitlines()]
    capital = next(
        r for r in rows if r["prompt"][-1]["content"] == "What is the capital of Zorbia?"
    )
    assert capital["chosen"] == [
        {"role": "assistant", "content": "The capital of Zorbia is Quellport."}
    ]
    assert capital["rejected"] == [
        {"role": "assistant", "content": "The capital of Zorbia is Nova Haven."}
    ]
    await app.tunes.cancel(job.id, ADMIN)
    # Liked answers alone make no pairs: a dpo job says what is missing, and starts nothing.
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD + 1)
    with pytest.raises(UserError) as refused:
        await app.tunes.start(TuneRequest(base="smol", method="dpo", guild_id=GUILD + 1), ADMIN)
    assert str(refused.value) == (
        "Cannot fine-tune: nothing to export: of 36 answers, 24 not in --guild, 12 without a "
        "preferred and a rejected answer to the same prompt."
    )
    assert await jobs_in(app) == 1


async def test_a_dpo_jobs_held_out_pairs_are_evaluated_against_the_preferred_answer(
    app: App, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Half held out rather than a tenth; the split hashes conversation ids, and these fixed
    # ones put 13 pairs in the train file and 11 in the held-out one (random ids left fewer
    # than the 10 a train file needs in about one run in seven).
    monkeypatch.setattr(tune_module, "HOLD_OUT_SPLIT", 0.5)
    right = {f"What is code word {n}?": f"Code word {n} is kestrel-{n}." for n in range(24)}
    fake_openai.reply = lambda request: "I do not know."
    for n, (question, answer) in enumerate(right.items()):
        result = await app.service.answer(
            ChatRequest(PLACE, MEMBER, question, conversation_id=f"code-word-{n}")
        )
        await app.writer.drain()
        assert result.message_id is not None
        await app.service.correct(result.message_id, ADMIN, answer)
    await app.writer.drain()
    job, summary = await app.tunes.start(
        TuneRequest(base="smol", method="dpo", guild_id=GUILD), ADMIN
    )
    train, validation = summary.files
    assert (train.examples, validation.examples) == (13, 11)
    async with app.sessions() as session, session.begin():  # as if it trained
        await TuneJobRepository(session).finish_if_active(
            job.id, status="succeeded", phase="done", model_name="smol-dpo"
        )
    _, held = await app.tunes.held_out(job.id)
    assert len(held) == validation.examples
    for example in held:  # the corrected answer is the reference, never the wrong one
        assert example.reference == right[example.prompt], example


async def test_too_few_examples_are_refused_with_the_counts_and_leave_nothing(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    # Five more answers nobody rated: left out, and counted.
    for n in range(5):
        await app.service.answer(ChatRequest(PLACE, MEMBER, f"unrated question {n}"))
    await app.writer.drain()
    with pytest.raises(UserError) as refused:
        await app.tunes.start(
            TuneRequest(base="smol", guild_id=GUILD, since=utcnow() + timedelta(days=1)), ADMIN
        )
    assert str(refused.value) == (
        "Cannot fine-tune: nothing to export: of 17 answers, 17 before --since."
    )
    with pytest.raises(UserError) as refused:
        await app.tunes.start(TuneRequest(base="smol", guild_id=GUILD, min_rating=2), ADMIN)
    assert str(refused.value).startswith(
        "Cannot fine-tune: nothing to export: of 17 answers, 5 unrated (add --include-unrated), "
        "12 rated below --min-rating 2"
    )
    with pytest.raises(UserError) as refused:
        await app.tunes.start(TuneRequest(base="smol", guild_id=99), ADMIN)
    assert "17 not in --guild" in str(refused.value)
    assert await jobs_in(app) == 0
    assert not list(app.tunes.jobs_dir.iterdir())  # no snapshot left behind


async def test_a_handful_of_examples_is_too_few(app: App, fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = lambda request: "An answer."
    for n in range(3):
        result = await app.service.answer(ChatRequest(PLACE, MEMBER, f"question {n}"))
        await app.writer.drain()
        assert result.message_id is not None
        await app.service.vote(result.message_id, ADMIN, 1, source="terminal")
    await app.writer.drain()
    with pytest.raises(UserError) as refused:
        await app.tunes.start(TuneRequest(base="smol"), ADMIN)
    assert str(refused.value).startswith(
        "Too few examples to fine-tune: 3 of 3 logged answers qualified, and at least 10 are needed."
    )
    assert await jobs_in(app) == 0


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            TuneRequest(base="main"),
            "`main` (openai-compatible) cannot be fine-tuned: choose a local llama.cpp model",
        ),
        (TuneRequest(base="smol", steps=3, epochs=1), "Give --steps or --epochs, not both."),
        (TuneRequest(base="smol", name="has space"), "`has space` cannot be a model name"),
        (TuneRequest(base="main", name="x"), "`main` (openai-compatible) cannot be fine-tuned"),
        (TuneRequest(base="smol", name="backup"), "`backup` is already a model in"),
    ],
)
async def test_what_cannot_be_fine_tuned_is_one_line(
    app: App, request_: TuneRequest, message: str
) -> None:
    with pytest.raises(UserError) as refused:
        await app.tunes.start(request_, ADMIN)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert await jobs_in(app) == 0


async def test_an_interrupted_local_run_is_marked_failed_with_the_reason(
    app: App, fake_openai: FakeOpenAI, tune_settings: Settings
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    job, _ = await app.tunes.start(TuneRequest(base="smol", guild_id=GUILD), ADMIN)
    # As a process that died mid-training leaves it: running, its heartbeat minutes old.
    async with app.sessions() as session, session.begin():
        await TuneJobRepository(session).set(
            job.id, status="running", phase="training", heartbeat_at=utcnow() - timedelta(minutes=5)
        )
    adapter = app.tunes.jobs_dir / job.id / "adapter"
    adapter.mkdir()
    # The next process to start (the bot calls recover at start) marks it.
    async with open_app(tune_settings, knowledge=False) as other:
        marked = await other.tunes.recover()
        assert [m.id for m in marked] == [job.id]
        view = await other.tunes.job(job.id)
    assert view.status == "failed" and view.error is not None
    assert view.error.startswith("interrupted: the process running it stopped (last heard from ")
    assert not adapter.exists()  # what it made is gone; the snapshot stays as the record
    assert read_text(Path(view.snapshot_path))

    # A running job whose heartbeat is fresh belongs to a live process: left alone.
    fresh, _ = await app.tunes.start(TuneRequest(base="smol", guild_id=GUILD), ADMIN)
    async with app.sessions() as session, session.begin():
        await TuneJobRepository(session).set(fresh.id, status="running", heartbeat_at=utcnow())
    assert await app.tunes.recover() == []


def candidate_spec(name: str = "main-tuned") -> ModelSpec:
    """A fine-tune as a finished job registers it (on the fake server, so it can answer)."""
    return ModelSpec(
        name=name,
        provider="openai-compatible",
        model="fake-tuned",
        base_url="http://127.0.0.1:1/v1",
        candidate=True,
        lineage=Lineage(base_model="main", source="lora", dataset_hash="ab" * 32),
    )


async def test_the_gate_candidates_for_admins_promote_and_rollback_recorded_with_who(
    app: App, tune_settings: Settings, fake_openai: FakeOpenAI
) -> None:
    spec = candidate_spec().model_copy(update={"base_url": fake_openai.base_url})
    await app.service.register_model(spec, created_by="tune job test")
    other_channel = Place(GUILD, 21)

    # A candidate: marked in the list, refused to members with one line, allowed for admins.
    assert "main-tuned (candidate: admins only until promoted)" in models_text(
        app.service.list_models(), app.service.default_model
    )
    with pytest.raises(PermissionDenied) as refused:
        await app.service.set_model(PLACE, "channel", "main-tuned", MEMBER)
    assert str(refused.value) == (
        "`main-tuned` is a candidate fine-tune: only server admins (Manage Server) can choose it "
        "until it is promoted (`switchboard tune promote main-tuned`)."
    )
    change = await app.service.set_model(PLACE, "channel", "main-tuned", ADMIN, admin=True)
    assert change.now.value == "main-tuned"
    answer = await app.service.answer(ChatRequest(PLACE, ADMIN, "hello"))
    assert answer.error is None and answer.model == "main-tuned"
    # It takes part in comparisons (and, with no pool set, in battles).
    assert "main-tuned" in [s.name for s in app.service.list_models()]

    # Another process (a second shard) sees the promotion after its next refresh.
    async with open_app(tune_settings, knowledge=False) as shard:
        assert (await shard.service.get_model("main-tuned")).candidate
        promoted = await app.tunes.promote("main-tuned", ADMIN, default_guild=GUILD)
        assert promoted.default_guild == GUILD
        await shard.service.catalog.refresh()
        assert not (await shard.service.get_model("main-tuned")).candidate
        await shard.service.set_model(other_channel, "channel", "main-tuned", MEMBER)
    effective = await app.service.effective_settings(Place(GUILD, 22))
    assert (effective.model.value, effective.model.source) == ("main-tuned", "guild")
    with pytest.raises(UserError, match="already promoted"):
        await app.tunes.promote("main-tuned", ADMIN)

    rolled = await app.tunes.rollback("main-tuned", MEMBER)
    assert rolled.restored == ((GUILD, None),)  # the server had no default of its own before
    assert (await app.service.get_model("main-tuned")).candidate
    effective = await app.service.effective_settings(Place(GUILD, 22))
    assert (effective.model.value, effective.model.source) == ("main", "global")
    with pytest.raises(PermissionDenied):
        await app.service.set_model(other_channel, "channel", "main-tuned", MEMBER)
    with pytest.raises(UserError, match="a candidate already"):
        await app.tunes.rollback("main-tuned", ADMIN)

    history = await app.tunes.history("main-tuned")
    assert [(action, who, guild) for _, action, who, guild in history] == [
        ("promoted", "ada (7)", None),
        ("default_set", "ada (7)", GUILD),
        ("rolled_back", "mo (8)", None),
    ]
    async with app.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(ModelGateEvent)) == 3


async def test_promote_gives_back_the_previous_server_default_on_rollback(app: App) -> None:
    await app.service.register_model(candidate_spec(), created_by="tune job test")
    await app.service.set_model(Place(GUILD, 0), "guild", "backup", ADMIN)
    await app.tunes.promote("main-tuned", ADMIN, default_guild=GUILD)
    assert (await app.service.effective_settings(PLACE)).model.value == "main-tuned"
    rolled = await app.tunes.rollback("main-tuned", ADMIN)
    assert rolled.restored == ((GUILD, "backup"),)
    assert (await app.service.effective_settings(PLACE)).model.value == "backup"


async def test_only_fine_tunes_pass_the_gate(app: App) -> None:
    with pytest.raises(UserError, match="`backup` is not a fine-tune made by `switchboard tune`"):
        await app.tunes.promote("backup", ADMIN)
    with pytest.raises(UserError, match="No model|Unknown model|not found|no model"):
        await app.tunes.rollback("nothing-like-it", ADMIN)
