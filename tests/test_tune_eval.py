"""`switchboard tune eval NAME`: a fine-tune against its base on the examples training held out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bot.app import open_app
from bot.service.tune import HELD_OUT_FILE, HOLD_OUT_FROM, TuneRequest
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.test_cli import cli_env, fake_server, switchboard  # noqa: F401 (fixtures)

KEY = "sk-tune-eval-0123456789abcdef"
QUESTIONS = [
    (f"What is the code word number {n}?", f"The code word {n} is kestrel-{n}.") for n in range(30)
]


def _add_openai_base(config: Path, base_url: str) -> None:
    config.write_text(
        config.read_text() + "\n[models.mini]\n"
        'provider = "openai"\n'
        'model = "gpt-4o-mini"\n'
        f'base_url = "{base_url}"\n'
        "training_price = 3.0\n"
    )


async def _fine_tune(settings: Settings, fake: FakeOpenAI, examples: int) -> tuple[str, Path]:
    """Liked answers in the log, then a fine-tune of `mini` at the (fake) provider."""
    answers = dict(QUESTIONS)
    fake.reply = lambda request: answers.get(request.last_user_text, "I do not know.")
    async with open_app(settings, knowledge=False) as app:
        # Fixed conversation ids: the held-out split hashes them, and these hold out 4 of
        # 30 (with random ones, none in about one run in 25).
        for n, (question, _) in enumerate(QUESTIONS[:examples]):
            request = ChatRequest(
                Place(1, 2), Author(3, "ann"), question, conversation_id=f"code-word-{n}"
            )
            result = await app.service.answer(request)
            await app.writer.drain()
            assert result.message_id is not None
            await app.service.vote(result.message_id, Author(4, "ben"), 1, source="terminal")
        await app.writer.drain()
        job, summary = await app.tunes.start(
            TuneRequest(base="mini", name="mini-codes"), Author(5, "op")
        )
        final = await app.tunes.run(job.id)
        assert final.status == "succeeded", final.error
        return job.id, Path(job.snapshot_path)


def test_a_tenth_is_held_out_and_tune_eval_reports_the_fine_tune_against_its_base(
    cli_env: dict[str, str],  # noqa: F811
    fake_server: FakeOpenAI,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = Path(cli_env["SWITCHBOARD_CONFIG"])
    _add_openai_base(config, fake_server.base_url)
    env = {**cli_env, "OPENAI_API_KEY": KEY, "COLUMNS": "160"}
    settings = Settings(
        config=config,
        data_dir=Path(cli_env["SWITCHBOARD_DATA_DIR"]),
        environ={"OPENAI_API_KEY": KEY},
        max_retries=0,
        tune_poll_seconds=0.01,
    )
    job_id, snapshot = asyncio.run(_fine_tune(settings, fake_server, examples=len(QUESTIONS)))
    assert len(QUESTIONS) >= HOLD_OUT_FROM
    # Trained on the train share only; the held-out share is beside it, no example in both.
    held_out = snapshot.with_name(HELD_OUT_FILE)
    assert snapshot.name == "snapshot.train.jsonl"
    trained = {
        json.loads(line)["messages"][-2]["content"] for line in snapshot.read_text().splitlines()
    }
    kept = {
        json.loads(line)["messages"][-2]["content"] for line in held_out.read_text().splitlines()
    }
    assert kept and trained and not kept & trained and len(kept | trained) == len(QUESTIONS)
    # What the provider trained on is the train share.
    (remote,) = fake_server.tuning.jobs.values()
    assert fake_server.tuning.files[remote.training_file][1] == snapshot.read_bytes()

    out = tmp_path / "eval"
    proc = switchboard(env, "tune", "eval", "mini-codes", "--out", str(out), "--judge", "backup")
    assert proc.returncode == 0, proc.stderr
    assert (
        f"{len(kept)} held-out examples of job {job_id[:8]}: mini-codes against its base mini"
        in (proc.stderr)
    )
    assert "mini-codes" in proc.stdout and "Report:" in proc.stdout
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"mini-codes", "mini"}
    assert {r["prompt"] for r in rows} == kept
    # The fake answers every model from the log's answers: references match exactly.
    assert all(r["exact"] == 1.0 for r in rows), rows[:2]
    assert (out / "report.html").read_text().count("mini-codes") >= 1


def _openai_settings(env: dict[str, str], fake: FakeOpenAI) -> Settings:
    """The CLI's data folder and config, with the fake provider's fine-tunable `mini` added."""
    config = Path(env["SWITCHBOARD_CONFIG"])
    _add_openai_base(config, fake.base_url)
    return Settings(
        config=config,
        data_dir=Path(env["SWITCHBOARD_DATA_DIR"]),
        environ={"OPENAI_API_KEY": KEY},
        max_retries=0,
        tune_poll_seconds=0.01,
    )


def _eval_refusal(env: dict[str, str]) -> str:
    """`tune eval mini-codes`, which must fail: its last line of stderr."""
    proc = switchboard({**env, "OPENAI_API_KEY": KEY}, "tune", "eval", "mini-codes")
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()[-1]


def test_a_fine_tune_trained_on_everything_with_nothing_logged_since_says_what_to_do(
    cli_env: dict[str, str],  # noqa: F811
    fake_server: FakeOpenAI,  # noqa: F811
) -> None:
    settings = _openai_settings(cli_env, fake_server)
    _, snapshot = asyncio.run(_fine_tune(settings, fake_server, examples=12))
    assert snapshot.name == "snapshot.jsonl"  # too few to hold any out
    refusal = _eval_refusal(cli_env)
    assert refusal.startswith(
        "mini-codes was trained on all 12 of its examples (a tenth is held out from 20 on), "
        "and no prompts were logged after its snapshot was frozen ("
    )
    assert "try the candidate in a channel first, or pass --dataset FILE." in refusal


def test_a_fine_tune_whose_held_out_examples_were_forgotten_says_so(
    cli_env: dict[str, str],  # noqa: F811
    fake_server: FakeOpenAI,  # noqa: F811
) -> None:
    settings = _openai_settings(cli_env, fake_server)
    _, snapshot = asyncio.run(_fine_tune(settings, fake_server, examples=30))
    held_out = snapshot.with_name(HELD_OUT_FILE)
    assert held_out.read_text().strip()

    async def forget_the_asker() -> None:
        async with open_app(settings, knowledge=False) as app:
            await app.service.forget(Author(3, "ann"))

    asyncio.run(forget_the_asker())
    assert held_out.read_text() == ""  # every question was hers
    assert _eval_refusal(cli_env).startswith(
        "mini-codes has no held-out examples left (its split held none out, or they went when "
        "the messages they came from were deleted), and no prompts were logged after"
    )
