"""Fine-tuning at OpenAI through the service: the snapshot uploaded, the job followed to a
candidate `ft:` model, failures scrubbed, refusals in one line, and a job picked up (or
cancelled) by another process after the one following it stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from bot.app import App, open_app
from bot.service.tune import TuneRequest
from core.errors import UserError
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from store.models import utcnow
from store.tune_jobs import TuneJobRepository
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.tune import log_liked_zorbia_answers, tune_config

KEY = "sk-ft-service-0123456789abcdef"
ADMIN = Author(7, "ada")
GUILD = 10
PLACE = Place(GUILD, 20)


def _config(path: Path, base_url: str) -> Path:
    tune_config(path, base_url)
    path.write_text(
        path.read_text() + "\n[models.mini]\n"
        'provider = "openai"\n'
        'model = "gpt-4o-mini"\n'
        f'base_url = "{base_url}"\n'
        "training_price = 3.0\n"
        "\n[models.nano]\n"
        'provider = "openai"\n'
        'model = "gpt-4.1-nano"\n'
        f'base_url = "{base_url}"\n'
    )
    return path


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@pytest.fixture
def settings(tmp_path: Path, fake_openai: FakeOpenAI) -> Settings:
    return Settings(
        config=_config(tmp_path / "switchboard.toml", fake_openai.base_url),
        data_dir=tmp_path / "data",
        environ={"OPENAI_API_KEY": KEY},
        max_retries=0,
        request_timeout=5,
        messages_per_minute=0,
        tune_poll_seconds=0.01,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    async with open_app(settings, knowledge=False) as app:
        yield app


async def test_an_openai_job_becomes_a_candidate_ft_model(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    job, summary = await app.tunes.start(
        TuneRequest(base="mini", name="mini-zorbia", guild_id=GUILD, epochs=2), ADMIN
    )
    assert job.backend == "openai" and summary.examples == 12
    # The snapshot is in OpenAI's chat format (the export's openai-chat), as uploaded.
    rows = [json.loads(line) for line in read_bytes(job.snapshot_path).decode().splitlines()]
    assert all(set(row) == {"messages"} for row in rows)

    final = await app.tunes.run(job.id)
    assert final.status == "succeeded", final.error
    assert final.model_name == "mini-zorbia" and final.gate == "candidate"
    assert final.losses and final.step == fake_openai.tuning.steps

    (remote,) = fake_openai.tuning.jobs.values()
    assert remote.metadata == {
        "switchboard_job": job.id,
        "guild": str(GUILD),
        "snapshot_sha256": job.snapshot_sha256,
        "rows": "12",
    }
    assert remote.hyperparameters == {"n_epochs": 2}
    assert fake_openai.tuning.files[remote.training_file][1] == read_bytes(job.snapshot_path)

    spec = await app.service.get_model("mini-zorbia")
    assert spec.candidate and spec.model == remote.fine_tuned_model
    assert spec.lineage is not None and spec.lineage.source == "openai-fine-tune"
    assert spec.lineage.base_model == "mini" and spec.lineage.dataset_hash == job.snapshot_sha256
    # An admin tries it in a channel: the request goes to the provider's ft: model.
    await app.service.set_model(PLACE, "channel", "mini-zorbia", ADMIN, admin=True)
    answer = await app.service.answer(ChatRequest(PLACE, ADMIN, "What is the capital of Zorbia?"))
    assert answer.error is None and answer.model == "mini-zorbia"
    assert fake_openai.chat_requests[-1].body["model"] == remote.fine_tuned_model


async def test_a_failed_job_registers_nothing_and_its_reason_is_scrubbed(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    fake_openai.tuning.fail_next_job(f"upstream said: bad credentials {KEY}")
    job, _ = await app.tunes.start(TuneRequest(base="mini", name="mini-x", guild_id=GUILD), ADMIN)
    final = await app.tunes.run(job.id)
    assert final.status == "failed" and final.error is not None
    assert (
        final.error.startswith("openai job ftjob-")
        and "upstream said: bad credentials" in final.error
    )
    assert KEY not in final.error
    assert "mini-x" not in [s.name for s in app.service.list_models()]


@pytest.mark.parametrize(
    ("base", "environ", "message"),
    [
        ("nano", {"OPENAI_API_KEY": KEY}, "`nano` is not marked as fine-tunable"),
        ("mini", {}, "No API key for `mini`: set OPENAI_API_KEY to fine-tune it."),
    ],
)
async def test_what_openai_cannot_fine_tune_is_one_line(
    settings: Settings, fake_openai: FakeOpenAI, base: str, environ: dict[str, str], message: str
) -> None:
    async with open_app(settings.model_copy(update={"environ": environ}), knowledge=False) as app:
        with pytest.raises(UserError) as refused:
            await app.tunes.start(TuneRequest(base=base, guild_id=GUILD), ADMIN)
        assert message in str(refused.value) and "\n" not in str(refused.value)
        assert await app.tunes.list() == []
    assert not fake_openai.tuning.jobs


async def test_the_provider_refusing_the_base_is_one_line_and_leaves_no_job(
    app: App, fake_openai: FakeOpenAI
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    fake_openai.tuning.refuse_models.add("gpt-4o-mini")
    job, _ = await app.tunes.start(TuneRequest(base="mini", guild_id=GUILD), ADMIN)
    final = await app.tunes.run(job.id)
    assert final.status == "failed"
    assert final.error == (
        "The provider refused to start a fine-tuning job (400): "
        "Model gpt-4o-mini is not available for fine-tuning or does not exist."
    )


async def _stop_following(app: App, job_id: str) -> str:
    """Start following a job, then stop the process's follower as a bot shutting down does."""
    task = asyncio.create_task(app.tunes.run(job_id))
    for _ in range(500):
        view = await app.tunes.job(job_id)
        async with app.sessions() as session:
            record = await TuneJobRepository(session).get(job_id)
        if record is not None and record.external_id:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    view = await app.tunes.job(job_id)
    assert view.status == "running"  # left running at the provider, not cancelled or failed
    async with app.sessions() as session, session.begin():
        # As minutes later: nobody has written a heartbeat since.
        await TuneJobRepository(session).set(job_id, heartbeat_at=utcnow() - timedelta(minutes=5))
    assert record is not None and record.external_id
    return record.external_id


async def test_a_restarted_bot_picks_up_a_provider_job_and_registers_it(
    app: App, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    job, _ = await app.tunes.start(
        TuneRequest(base="mini", name="mini-later", guild_id=GUILD), ADMIN
    )
    external = await _stop_following(app, job.id)
    assert fake_openai.tuning.jobs[external].status not in ("cancelled", "failed")

    async with open_app(settings, knowledge=False) as bot:
        assert await bot.tunes.recover() == []  # a provider job is not "interrupted"
        resumed = await bot.tunes.resume()
        assert [r.id for r in resumed] == [job.id]
        assert await bot.tunes.resume() == []  # followed now: not picked up twice
        for _ in range(500):
            view = await bot.tunes.job(job.id)
            if not view.active:
                break
            await asyncio.sleep(0.01)
        assert view.status == "succeeded" and view.model_name == "mini-later"
        assert (await bot.service.get_model("mini-later")).candidate
    assert len(fake_openai.tuning.jobs) == 1  # one job at the provider, never a second


async def test_cancel_reaches_a_provider_job_nobody_follows(
    app: App, settings: Settings, fake_openai: FakeOpenAI
) -> None:
    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    job, _ = await app.tunes.start(TuneRequest(base="mini", guild_id=GUILD), ADMIN)
    external = await _stop_following(app, job.id)
    async with open_app(settings, knowledge=False) as cli:
        view = await cli.tunes.cancel(job.id[:8], ADMIN, wait_s=10)
    assert view.status == "cancelled"
    assert fake_openai.tuning.jobs[external].status == "cancelled"
    assert job.name not in [s.name for s in app.service.list_models()]


async def test_forgetting_the_admin_who_fine_tuned_leaves_their_name_nowhere(
    app: App, fake_openai: FakeOpenAI
) -> None:
    from tests.scan import find_text

    await log_liked_zorbia_answers(app, fake_openai, guild=GUILD)
    zelda = Author(77, "zelda-the-admin")
    job, _ = await app.tunes.start(TuneRequest(base="mini", name="mini-z", guild_id=GUILD), zelda)
    assert (await app.tunes.run(job.id)).status == "succeeded"
    await app.tunes.promote("mini-z", zelda)
    assert await find_text(app.sessions, "zelda-the-admin")  # the job and the gate name her
    await app.service.forget(zelda)
    assert await find_text(app.sessions, "zelda-the-admin") == []
    view = await app.tunes.job(job.id)
    assert view.status == "succeeded" and view.started_by != "zelda-the-admin (77)"
    assert (await app.service.get_model("mini-z")).lineage.created_by == f"tune job {job.id}"  # type: ignore[union-attr]
