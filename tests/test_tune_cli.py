"""The fine-tuning loop as a user runs it: `switchboard tune ...` and `chat --json` as real processes.

Liked answers in the log carry a fact SmolLM2 cannot know; `tune start --wait` trains the
bundled model on them (a real snapshot through the export, a real `tune.worker` run, the
adapter written as a GGUF LoRA) and registers a candidate; selected in a channel through
`chat --json`, it answers with the fact and its base does not. The converted base is
shared with the other tune tests (`prepared_base`), so the conversion runs once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.app import open_app
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.tune import (
    FACT_ANSWER_WORD,
    FACT_QUESTION,
    log_liked_zorbia_answers,
    tune_config,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STEPS = 16  # SmolLM2 learns the fact from the twelve rows by then (see test_tune_loop)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.in_thread() as fake:
        yield fake


@pytest.fixture
def cli_env(tmp_path: Path, fake_server: FakeOpenAI, prepared_base: Path) -> dict[str, str]:
    """A data folder whose log holds twelve liked Zorbia answers; the session's converted base."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_CONFIG=str(tune_config(tmp_path / "switchboard.toml", fake_server.base_url)),
        SWITCHBOARD_DATA_DIR=str(tmp_path / "data"),
        SWITCHBOARD_MAX_RETRIES="0",
        HF_HUB_OFFLINE="1",
    )
    # The cache of converted bases, shared with the other tests of the session.
    (tmp_path / "data" / "tune").mkdir(parents=True)
    (tmp_path / "data" / "tune" / "bases").symlink_to(prepared_base.parent)

    async def fill() -> None:
        settings = Settings(
            config=Path(env["SWITCHBOARD_CONFIG"]),
            data_dir=Path(env["SWITCHBOARD_DATA_DIR"]),
            environ={},
            max_retries=0,
        )
        async with open_app(settings, knowledge=False) as app:
            await log_liked_zorbia_answers(app, fake_server)

    asyncio.run(fill())
    return env


def switchboard(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env,
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ask(env: dict[str, str], channel: int, model: str, question: str) -> dict[str, object]:
    """Choose `model` in a channel and ask there, through `switchboard chat --json`."""
    proc = switchboard(
        env,
        "chat",
        "--json",
        "--guild",
        "10",
        "--channel",
        str(channel),
        stdin=f"/model set {model}\n{question}\n",
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    command, reply = (json.loads(line) for line in proc.stdout.splitlines())
    assert command["ok"], command
    return reply


def model_list(env: dict[str, str]) -> str:
    """The terminal's `/model list`: a plain line per model."""
    proc = switchboard(env, "chat", "--json", stdin="/model list\n", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["message"])


def test_tune_start_wait_makes_a_candidate_that_knows_the_fact(cli_env: dict[str, str]) -> None:
    started = time.monotonic()
    proc = switchboard(
        cli_env, "tune", "start", "--base", "smol", "--name", "smol-zorbia", "--steps", str(STEPS),
        "--wait",
    )  # fmt: skip
    loop_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Exported 12 sft examples (")  # the validation summary
    assert lines[-1] == "smol-zorbia"  # the new model's name, last
    assert "New candidate model: smol-zorbia" in proc.stdout
    assert f"succeeded (done, step {STEPS}/{STEPS}, loss " in proc.stdout
    print(f"\ntune start --wait: {loop_s:.0f} s (snapshot, training, export, registration)")

    listed = switchboard(cli_env, "tune", "list")
    assert listed.returncode == 0, listed.stderr
    assert "smol-zorbia" in listed.stdout and "candidate" in listed.stdout
    assert "smol-zorbia (candidate: admins only until promoted): llama.cpp" in model_list(cli_env)

    tuned = ask(cli_env, 30, "smol-zorbia", FACT_QUESTION)
    plain = ask(cli_env, 31, "smol", FACT_QUESTION)
    print(f"base: {plain['reply']!r}\ncandidate: {tuned['reply']!r}")
    assert tuned["model"] == "smol-zorbia" and tuned["error"] is None
    assert plain["model"] == "smol" and plain["error"] is None
    assert FACT_ANSWER_WORD in str(tuned["reply"]), tuned
    assert FACT_ANSWER_WORD not in str(plain["reply"]), plain

    promoted = switchboard(cli_env, "tune", "promote", "smol-zorbia", "--default", "--guild", "10")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.splitlines() == [
        "Promoted smol-zorbia: every member may choose it now.",
        "It is server 10's default model now.",
    ]
    # The server's channels answer with it now, without anyone choosing it.
    proc = switchboard(
        cli_env, "chat", "--json", "--guild", "10", "--channel", "32", stdin=FACT_QUESTION + "\n"
    )
    reply = json.loads(proc.stdout.splitlines()[0])
    assert reply["model"] == "smol-zorbia" and FACT_ANSWER_WORD in str(reply["reply"]), reply

    rolled = switchboard(cli_env, "tune", "rollback", "smol-zorbia")
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.splitlines() == [
        "Rolled back smol-zorbia: a candidate again (admins only).",
        "Server 10 has no default model of its own again.",
    ]


def test_a_background_job_is_followed_and_cancelled_from_another_process(
    cli_env: dict[str, str],
) -> None:
    proc = switchboard(
        cli_env, "tune", "start", "--base", "smol", "--name", "smol-long", "--epochs", "50"
    )
    assert proc.returncode == 0, proc.stderr
    job_line = next(line for line in proc.stdout.splitlines() if line.startswith("Job "))
    job_id = job_line.split()[1].rstrip(":")
    assert "Running in the background; follow it with `switchboard tune status" in proc.stdout

    deadline = time.monotonic() + 300
    status = ""
    while time.monotonic() < deadline:  # until the detached runner is training
        status = switchboard(cli_env, "tune", "status", job_id[:8]).stdout
        if "running (training, step " in status and "step 0/" not in status:
            break
        time.sleep(2)
    assert "running (training, step " in status, status

    again = switchboard(cli_env, "tune", "start", "--base", "smol")
    assert again.returncode == 1
    assert (
        f"A fine-tune is already running for this installation (no --guild): job {job_id[:8]}"
        in (again.stderr)
    )

    cancelled = switchboard(cli_env, "tune", "cancel", job_id[:8])
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"Job {job_id} — smol-long: cancelled" in cancelled.stdout
    assert "note: cancelled by cli:" in cancelled.stdout
    assert "smol-long" not in model_list(cli_env)  # nothing half-registered
    folder = Path(cli_env["SWITCHBOARD_DATA_DIR"]) / "tune" / "jobs" / job_id
    assert sorted(p.name for p in folder.iterdir()) == [
        "runner.log",
        "snapshot.jsonl",
        "snapshot.jsonl.sources",  # which logged messages each line came from
        "snapshot.manifest.json",
    ]
