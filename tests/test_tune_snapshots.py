"""A fine-tune job's snapshot files obey forgetting and retention: the export records which
logged messages each line was built from, and a forget or a purge rewrites every snapshot
without the lines built on what it deleted (real SQLite or PostgreSQL, the real export,
the real privacy service, no training)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

import bot.service.tune as tune_module
from bot.app import App, open_app
from bot.present import forget_line, purge_line
from bot.service.tune import JobView, TuneRequest
from core.messages import Author, ChatRequest, ChatResult, Place
from core.settings import Settings
from store.export import ExportOptions, sources_path
from store.export.prune import temp_path
from store.models import Message, MessageInput
from store.tune_jobs import TuneJobRepository
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.export import Log

ALICE, BOB, CAROL, DAVE = (
    Author(1, "alice"),
    Author(2, "bob"),
    Author(3, "carol"),
    Author(4, "dave"),
)
ADMIN = Author(7, "ada")
GUILD = 10
PLACE = Place(GUILD, 20)
PER_PERSON = 20
# What each asks about: their names are redacted in the snapshot, their topics are not.
TOPIC = {ALICE.id: "tea", BOB.id: "coffee"}


@pytest.fixture
async def app(tune_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[App]:
    # Half the conversations held out instead of a tenth: with 40 of them, both people's
    # are in both files but once in about a million runs (the split hashes random ids).
    monkeypatch.setattr(tune_module, "HOLD_OUT_SPLIT", 0.5)
    settings = tune_settings.model_copy(update={"retention_days": 30})
    async with open_app(settings, knowledge=False) as app:
        yield app


async def ask(app: App, person: Author, text: str, conversation: str | None = None) -> ChatResult:
    result = await app.service.answer(
        ChatRequest(PLACE, person, text, conversation_id=conversation)
    )
    assert result.error is None and result.message_id is not None, result.error
    return result


async def log_two_people(app: App, fake: FakeOpenAI) -> ChatResult:
    """Alice and Bob ask PER_PERSON questions each, every answer liked by Carol; then Bob
    follows up in Alice's first conversation. The follow-up's answer."""
    fake.reply = lambda request: f"Answer: {request.last_user_text}"
    results = [
        await ask(app, person, f"{TOPIC[person.id]} question {n}?")
        for person in (ALICE, BOB)
        for n in range(PER_PERSON)
    ]
    await app.writer.drain()
    follow_up = await ask(app, BOB, "a follow-up from bob?", results[0].conversation_id)
    await app.writer.drain()
    for result in [*results, follow_up]:
        assert result.message_id is not None
        await app.service.vote(result.message_id, CAROL, 1, source="terminal")
    await app.writer.drain()
    return follow_up


async def start_job(
    app: App, *, finished: bool = False, examples: int = 2 * PER_PERSON + 1
) -> JobView:
    job, summary = await app.tunes.start(TuneRequest(base="smol", guild_id=GUILD), ADMIN)
    assert summary.examples == examples and Path(job.snapshot_path).name == ("snapshot.train.jsonl")
    if finished:  # as if it trained: what it trained on stays its record
        async with app.sessions() as session, session.begin():
            await TuneJobRepository(session).finish_if_active(
                job.id, status="succeeded", phase="done", model_name="smol-tuned"
            )
    return await app.tunes.job(job.id)


def folder_of(job: JobView) -> Path:
    return Path(job.snapshot_path).parent


def data_files(job: JobView) -> dict[str, Path]:
    folder = folder_of(job)
    return {split: folder / f"snapshot.{split}.jsonl" for split in ("train", "validation")}


def askers(path: Path) -> list[str]:
    """Who asked the last question of each line: "tea" (Alice), "coffee" (Bob) or "both"
    (Bob's follow-up to Alice)."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        texts = [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
        found.append("both" if len(texts) > 1 else texts[-1].split()[0])
    return found


def manifest_of(job: JobView) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder_of(job) / "snapshot.manifest.json").read_text())
    return data


def contents(job: JobView) -> dict[str, bytes]:
    """Every file in the job's folder (temporary ones too), but the prunes' lock."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder_of(job).iterdir())
        if p.is_file() and p.suffix != ".lock"
    }


def check_consistent(job: JobView) -> dict[str, Any]:
    """Every data file lines up with its sidecar, and the manifest says what is on disk."""
    manifest = manifest_of(job)
    total = 0
    for entry in manifest["files"]:
        data = folder_of(job) / entry["name"]
        sidecar = sources_path(data)
        raw = data.read_bytes()
        lines = raw.splitlines()
        assert len(lines) == len(sidecar.read_bytes().splitlines()) == entry["examples"]
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"]
        assert hashlib.sha256(sidecar.read_bytes()).hexdigest() == entry["sources"]["sha256"]
        assert entry["tokens"] == sum(
            json.loads(line)["tokens"] for line in sidecar.read_bytes().splitlines()
        )
        assert manifest["counts"][entry["split"]] == entry["examples"]
        total += entry["examples"]
    assert manifest["counts"]["examples"] == total
    return manifest


# --- provenance ------------------------------------------------------------------------------


async def test_an_export_with_sources_names_every_message_each_line_was_built_from(
    log: Log, tmp_path: Path
) -> None:
    first = await log.converse(["where is the tea?", "and the milk?"], author=ALICE)
    for result in first:
        await log.vote(result, BOB, 1)
    out = tmp_path / "data.jsonl"

    plain = await log.app.exporter.run(ExportOptions("sft"), out)
    assert plain.files[0].sources is None and not sources_path(out).exists()
    assert "sources" not in json.loads(plain.manifest.read_text())["files"][0]

    summary = await log.app.exporter.run(ExportOptions("sft"), out, sources=True)
    (file,) = summary.files
    assert file.sources is not None and file.sources.path == sources_path(out)
    sidecar = [json.loads(line) for line in sources_path(out).read_text().splitlines()]
    assert len(sidecar) == len(out.read_text().splitlines()) == 2
    assert all(set(entry) == {"tokens", "sources"} for entry in sidecar)  # ids only, no text
    # The second line: its answer, its prompt, and the history before it (both messages
    # of the first exchange), as the log links them.
    async with log.app.sessions() as session:
        second = await session.get(Message, first[1].message_id)
        assert second is not None
        inputs = set(
            (
                await session.scalars(
                    select(MessageInput.input_id).where(MessageInput.answer_id == second.id)
                )
            ).all()
        )
    assert first[0].message_id in inputs and second.parent_id in inputs
    assert set(sidecar[1]["sources"]) == {second.id, *inputs}
    assert set(sidecar[0]["sources"]) >= {first[0].message_id}
    entry = json.loads(summary.manifest.read_text())["files"][0]
    assert entry["sources"]["sha256"] == hashlib.sha256(sources_path(out).read_bytes()).hexdigest()


# --- forgetting -------------------------------------------------------------------------------


async def test_forgetting_a_person_takes_their_lines_out_of_every_snapshot(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_two_people(app, fake_openai)
    job = await start_job(app, finished=True)
    files = data_files(job)
    before = {split: askers(path) for split, path in files.items()}
    assert all({"tea", "coffee"} <= set(found) for found in before.values()), before
    bob_lines = sum(found.count("coffee") for found in before.values())
    held_before = (await app.tunes.held_out(job.id))[1]
    assert any(e.prompt.startswith("tea") for e in held_before)

    report = await app.service.forget(ALICE)
    # Hers and the follow-up built on her words.
    assert report.snapshot_lines == PER_PERSON + 1 and report.snapshots_problem is None
    assert f"{PER_PERSON + 1} examples built on them were taken out of fine-tuning" in (
        forget_line(report)
    )
    after = {split: askers(path) for split, path in files.items()}
    assert all(set(found) == {"coffee"} for found in after.values()), after
    assert sum(found.count("coffee") for found in after.values()) == bob_lines
    manifest = check_consistent(job)
    assert manifest["counts"]["examples"] == bob_lines
    (later,) = manifest["removed_later"]
    assert later["cause"] == "forget" and later["lines"] == PER_PERSON + 1
    assert later["files"]["train"] + later["files"]["validation"] == PER_PERSON + 1
    assert "alice" not in json.dumps(manifest)  # nobody's name
    async with app.sessions() as session:  # nor any id (Bob's remain in the log)
        ids = set((await session.scalars(select(Message.id))).all())
    assert not any(i in json.dumps(manifest) for i in ids)
    # `tune eval` no longer asks her questions; what the job trained on stays its record.
    held = (await app.tunes.held_out(job.id))[1]
    assert held and all(e.prompt.startswith("coffee") for e in held)
    assert (await app.tunes.job(job.id)).snapshot_sha256 == job.snapshot_sha256
    # Forgetting someone with nothing in any snapshot changes no file.
    untouched = contents(job)
    nothing = await app.service.forget(DAVE)
    assert nothing.snapshot_lines == 0 and contents(job) == untouched


async def test_a_queued_job_trains_on_what_is_left(app: App, fake_openai: FakeOpenAI) -> None:
    await log_two_people(app, fake_openai)
    job = await start_job(app)
    await app.service.forget(BOB)
    now = await app.tunes.job(job.id)
    train = data_files(job)["train"]
    assert set(askers(train)) == {"tea"}
    assert now.snapshot_sha256 == hashlib.sha256(train.read_bytes()).hexdigest()
    assert now.snapshot_rows == len(askers(train)) and now.status == "queued"


async def test_a_deleted_discord_message_takes_its_lines_out(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_two_people(app, fake_openai)
    deleted = await app.service.answer(
        ChatRequest(PLACE, ALICE, "tea question to delete?", discord_message_id=555)
    )
    assert deleted.message_id is not None
    await app.writer.drain()
    await app.service.vote(deleted.message_id, CAROL, 1, source="terminal")
    await app.writer.drain()
    job = await start_job(app, examples=2 * PER_PERSON + 2)
    assert any(b"tea question to delete?" in data for data in contents(job).values())

    await app.service.message_deleted(555)
    await app.writer.drain()
    await app.service.privacy.settle()
    assert not any(b"tea question to delete?" in data for data in contents(job).values())
    manifest = check_consistent(job)
    (later,) = manifest["removed_later"]
    assert later["cause"] == "deleted" and later["lines"] == 1
    assert manifest["counts"]["examples"] == 2 * PER_PERSON + 1


# --- retention --------------------------------------------------------------------------------


async def age(app: App, prefix: str, days: int) -> None:
    """Make the exchanges whose prompts start with `prefix` `days` old."""
    when = datetime.now(UTC) - timedelta(days=days)
    async with app.sessions() as session, session.begin():
        prompts = select(Message.id).where(Message.content.startswith(prefix)).scalar_subquery()
        await session.execute(
            update(Message)
            .where(Message.id.in_(prompts) | Message.parent_id.in_(prompts))
            .values(created_at=when)
        )


async def test_the_purge_takes_expired_messages_out_of_the_snapshots(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_two_people(app, fake_openai)
    job = await start_job(app, finished=True)
    await age(app, "tea question", 40)

    untouched = contents(job)
    dry = await app.service.purge(dry_run=True)
    assert dry.prompts == PER_PERSON and dry.snapshot_lines == 0 and contents(job) == untouched

    report = await app.service.purge()
    assert report.prompts == PER_PERSON and report.snapshots_problem is None
    # Bob's follow-up stays in the log (retention goes by age), but its line was built on
    # Alice's expired words: it goes from the snapshot too.
    assert report.snapshot_lines == PER_PERSON + 1
    assert f"{PER_PERSON + 1} examples built on them were taken out" in purge_line(report)
    for path in data_files(job).values():
        assert set(askers(path)) == {"coffee"}
    manifest = check_consistent(job)
    assert [e["cause"] for e in manifest["removed_later"]] == ["retention"]
    held = (await app.tunes.held_out(job.id))[1]
    assert held and all(e.prompt.startswith("coffee") for e in held)


# --- snapshots made before sources, and failures ----------------------------------------------


async def test_a_snapshot_without_sources_is_deleted_by_the_next_deletion(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_two_people(app, fake_openai)
    job = await start_job(app)
    # As snapshots were made before the export recorded sources.
    manifest = manifest_of(job)
    for entry in manifest["files"]:
        (folder_of(job) / entry.pop("sources")["name"]).unlink()
    (folder_of(job) / "snapshot.manifest.json").write_text(json.dumps(manifest))

    report = await app.service.forget(ALICE)
    assert report.snapshot_lines == 2 * PER_PERSON + 1  # every line: none can be told apart
    assert not any(path.exists() for path in data_files(job).values())
    after = manifest_of(job)
    assert all(entry["deleted"] for entry in after["files"]) and after["counts"]["examples"] == 0
    (later,) = after["removed_later"]
    assert later["deleted"] and "no sources" in later["why"]
    # The queued job cannot train on a deleted snapshot: it failed, saying why.
    failed = await app.tunes.job(job.id)
    assert failed.status == "failed" and "start it again" in (failed.error or "")
    assert (await app.tunes.job(job.id)).snapshot_sha256 == job.snapshot_sha256


async def forget_alice_while_a_rewrite_fails(app: App, fake: FakeOpenAI) -> JobView:
    """Forget Alice while her finished job's snapshot cannot be rewritten; the job."""
    await log_two_people(app, fake)
    job = await start_job(app, finished=True)
    before = contents(job)
    # The validation file's sidecar cannot be written: the train file was rewritten in a
    # temporary file already, and nothing may be renamed. (A folder in the way rather than
    # a read-only folder: the tests may run as root.)
    blocker = temp_path(sources_path(data_files(job)["validation"]))
    blocker.mkdir()

    report = await app.service.forget(ALICE)
    assert report.messages == PER_PERSON  # the database part is done
    assert report.snapshot_lines == 0 and report.snapshots_problem is not None
    assert "could not be rewritten" in forget_line(report)
    blocker.rmdir()
    assert contents(job) == before  # no file changed, no temporary file left
    return job


async def test_a_snapshot_that_cannot_be_rewritten_stays_whole_and_is_told(
    app: App, fake_openai: FakeOpenAI
) -> None:
    job = await forget_alice_while_a_rewrite_fails(app, fake_openai)

    # The next deletion tries again, with what the failed one could not take out.
    again = await app.service.forget(DAVE)
    assert again.snapshot_lines == PER_PERSON + 1 and again.snapshots_problem is None
    for path in data_files(job).values():
        assert set(askers(path)) == {"coffee"}
    check_consistent(job)


async def test_what_a_stopped_process_could_not_rewrite_is_caught_up_at_the_next_start(
    app: App, fake_openai: FakeOpenAI, tune_settings: Settings
) -> None:
    job = await forget_alice_while_a_rewrite_fails(app, fake_openai)
    # This process stops before any other deletion retries it; the next one to start
    # on the same data finds the lines of messages that are gone, and takes them out.
    async with open_app(tune_settings, knowledge=False) as later:
        caught = await later.tunes.snapshots.catch_up()
    assert caught.lines == PER_PERSON + 1 and caught.problem is None
    for path in data_files(job).values():
        assert set(askers(path)) == {"coffee"}
    manifest = check_consistent(job)
    assert [entry["cause"] for entry in manifest["removed_later"]] == ["catch-up"]
    # Caught up, a second look changes nothing; tune eval's held-out set is Bob's only.
    assert (await app.tunes.snapshots.catch_up()).lines == 0
    _, held = await app.tunes.held_out(job.id)
    assert held and all(example.prompt.startswith("coffee") for example in held)
