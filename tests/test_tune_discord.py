"""/tune through simcord: the real bot and service, a job at the fake OpenAI server, the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.app import App
from bot.discord.bot import SwitchboardBot
from bot.discord.tune import TuneCog
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.discord import MANAGER_ROLE, World
from tests.fixtures.service import write_config

KEY = "sk-discord-tune-0123456789abcdef"
LIKED = [(f"What is fact number {n}?", f"Fact {n} is true.") for n in range(12)]


@pytest.fixture
def service_settings(tmp_path: Path, fake_openai: FakeOpenAI) -> Settings:
    """The service tests' models plus an OpenAI base the provider fine-tunes (on the fake)."""
    config = write_config(tmp_path / "switchboard.toml", fake_openai.base_url)
    config.write_text(
        config.read_text() + "\n[models.mini]\n"
        'provider = "openai"\n'
        'model = "gpt-4o-mini"\n'
        f'base_url = "{fake_openai.base_url}"\n'
        "training_price = 3.0\n"
    )
    return Settings(
        config=config,
        data_dir=tmp_path / "data",
        environ={"OPENAI_API_KEY": KEY},
        max_retries=0,
        request_timeout=5,
        messages_per_minute=0,
        tune_poll_seconds=0.01,
    )


@pytest.fixture
def simcord_bot(chat_app: App) -> SwitchboardBot:
    cog = TuneCog(chat_app.tunes, manager_role=MANAGER_ROLE, edit_every_s=0.01)
    return SwitchboardBot(
        chat_app.service, manager_role=MANAGER_ROLE, shard_count=1, extra_cogs=[cog]
    )


async def _liked_log(app: App, fake: FakeOpenAI, guild: int, channel: int) -> None:
    answers = dict(LIKED)
    fake.reply = lambda request: answers.get(request.last_user_text, "I do not know.")
    asker, rater = Author(1, "alice"), Author(2, "bob")
    for question, _ in LIKED:
        result = await app.service.answer(ChatRequest(Place(guild, channel), asker, question))
        await app.writer.drain()
        assert result.message_id is not None
        await app.service.vote(result.message_id, rater, 1, source="terminal")
    await app.writer.drain()


@pytest.fixture(autouse=True)
def patient(world: World) -> None:
    """A job is a few dozen real requests to the fake provider: give settling room for them."""
    world.env.settle_timeout = 60.0


def reply(result):  # noqa: ANN001, ANN201
    return result.followups[0] if result.followups else result.response


async def test_only_server_managers_see_and_may_use_tune(world: World, chat_app: App) -> None:
    assert "tune start" in world.admin.available_commands(world.channel)
    for member in (world.alice, world.mod):  # Manage Channels is not enough
        assert not any(c.startswith("tune") for c in member.available_commands(world.channel))
    world.open_to_everyone("tune")
    refused = await world.alice.slash(world.channel, "tune list")
    assert refused.ephemeral
    assert "needs the **Manage Server** permission or the **Switchboard Manager** role" in (
        refused.response.content
    )


async def test_tune_start_runs_the_job_and_edits_its_progress_to_the_candidate(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    await _liked_log(chat_app, fake_openai, world.guild.id, world.channel.id)
    result = await world.admin.slash(world.channel, "tune start", base="mini", name="mini-facts")
    answer = reply(result)
    assert answer.ephemeral
    assert answer.content.startswith("**Job ")
    assert "fine-tuning `mini` into `mini-facts`" in answer.content
    assert "Exported 12 openai-chat examples" in answer.content
    await world.env.settle()
    job = await chat_app.tunes.job("mini-facts")
    assert job.status == "succeeded", job.error
    assert job.guild_id == world.guild.id and job.started_by.startswith("admin")
    # The public progress message ends naming the candidate.
    progress = [m for m in world.channel.history() if "mini-facts" in (m.content or "")]
    assert progress and progress[-1].content.startswith("✅ Fine-tune **mini-facts** is ready")

    status = await world.admin.slash(world.channel, "tune status", job="mini-facts")
    assert "mini-facts: succeeded" in status.response.content
    listed = await world.admin.slash(world.channel, "tune list")
    assert "**mini-facts** ← mini · openai sft · succeeded" in listed.response.content
    assert "(candidate)" in listed.response.content

    promoted = await world.admin.slash(
        world.channel, "tune promote", name="mini-facts", default=True
    )
    assert not promoted.ephemeral
    assert promoted.response.content == (
        "Promoted `mini-facts`: every member may choose it now. "
        "It is this server's default model now."
    )
    assert not (await chat_app.service.get_model("mini-facts")).candidate
    rolled = await world.admin.slash(world.channel, "tune rollback", name="mini-facts")
    assert rolled.response.content.startswith("Rolled back `mini-facts`: a candidate again")
    assert (await chat_app.service.get_model("mini-facts")).candidate


async def test_a_refused_start_is_one_ephemeral_line(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    few = await world.admin.slash(world.channel, "tune start", base="mini")
    assert reply(few).ephemeral
    assert reply(few).content.startswith("⚠️ Cannot fine-tune: nothing to export")
    wrong = await world.admin.slash(world.channel, "tune start", base="solo")
    assert reply(wrong).content.startswith("⚠️ `solo` (openai-compatible) cannot be fine-tuned")
    bad_date = await world.admin.slash(world.channel, "tune start", base="mini", since="soon")
    assert bad_date.response.content.startswith("⚠️ since 'soon' is not an ISO date")
    assert await chat_app.tunes.list() == []


async def test_a_failed_job_says_why_in_the_channel(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    await _liked_log(chat_app, fake_openai, world.guild.id, world.channel.id)
    fake_openai.tuning.fail_next_job(f"the provider broke while holding {KEY}")
    await world.admin.slash(world.channel, "tune start", base="mini", name="mini-broken")
    await world.env.settle()
    progress = [m for m in world.channel.history() if "mini-broken" in (m.content or "")]
    assert progress[-1].content.startswith("❌ Fine-tune **mini-broken** failed: openai job ftjob-")
    assert "the provider broke while holding" in progress[-1].content
    assert KEY not in progress[-1].content
    assert "mini-broken" not in [s.name for s in chat_app.service.list_models()]


async def test_another_servers_jobs_are_not_found_here(
    world: World, chat_app: App, fake_openai: FakeOpenAI
) -> None:
    await _liked_log(chat_app, fake_openai, world.guild.id + 1, 5)
    from bot.service.tune import TuneRequest

    job, _ = await chat_app.tunes.start(
        TuneRequest(base="mini", name="elsewhere", guild_id=world.guild.id + 1), Author(9, "x")
    )
    result = await world.admin.slash(world.channel, "tune cancel", job=job.id[:8])
    assert result.response.content == f"⚠️ No fine-tuning job {job.id[:8]} in this server."
    assert (await chat_app.tunes.job(job.id)).status == "queued"
