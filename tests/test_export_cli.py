"""`switchboard export` as a real subprocess, on a log the real service wrote."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.app import open_app
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.export import ALICE, BOB, CAROL, Log
from tests.fixtures.service import write_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The CLI's environment, over a log filled once for the module's tests."""
    tmp_path = tmp_path_factory.mktemp("export-cli")
    with FakeOpenAI.in_thread() as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(
            SWITCHBOARD_CONFIG=str(write_config(tmp_path / "switchboard.toml", fake.base_url)),
            SWITCHBOARD_DATA_DIR=str(tmp_path / "data"),
            SWITCHBOARD_MAX_RETRIES="0",
            HF_HUB_OFFLINE="1",
        )
        fill(env)
        yield env


def fill(env: dict[str, str]) -> None:
    """Twelve answered questions in the log the CLI reads, two of them rated."""

    async def work() -> None:
        settings = Settings(
            config=Path(env["SWITCHBOARD_CONFIG"]),
            data_dir=Path(env["SWITCHBOARD_DATA_DIR"]),
            environ={},
            max_retries=0,
        )
        async with open_app(settings, knowledge=False) as app:
            log = Log(app)
            for n in range(6):
                await log.converse([f"question {n}", f"and a follow-up {n}"], author=ALICE)
            await log.vote("question 0", BOB, 1)
            await log.vote("question 1", CAROL, -1)

    asyncio.run(work())


def switchboard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "export", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_writes_split_files_a_manifest_and_a_summary(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out" / "chat.jsonl"
    out.parent.mkdir()
    proc = switchboard(
        cli_env, "--format", "openai-chat", "--include-unrated", "--split", "0.5", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Exported 11 openai-chat examples (")  # one is disliked
    assert "from 12 answers." in proc.stdout
    assert "Left out: 1 rated below --min-rating 1." in proc.stdout
    assert "No training price for these models" in proc.stdout
    assert "Personal data redacted: " in proc.stdout
    train, validation = out.with_name("chat.train.jsonl"), out.with_name("chat.validation.jsonl")
    manifest = json.loads(out.with_name("chat.manifest.json").read_text())
    assert manifest["counts"]["train"] == len(train.read_text().splitlines())
    assert manifest["counts"]["validation"] == len(validation.read_text().splitlines())
    assert manifest["counts"]["examples"] == 11 and manifest["filters"]["split"] == 0.5
    assert not list(out.parent.glob(".*"))  # no temporary file left behind

    # A folder as --output: a file named by format and time inside it.
    proc = switchboard(cli_env, "--format", "kto", "--output", str(out.parent))
    assert proc.returncode == 0, proc.stderr
    assert (
        "KTO: 1 desirable, 1 undesirable; desirable_weight 1, undesirable_weight 1." in proc.stdout
    )
    assert "Warning: Only 2 examples: fine-tuning needs at least 10" in proc.stderr
    assert len(list(out.parent.glob("switchboard-kto-*.jsonl"))) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--format", "gpt"],
            "Unknown format 'gpt'. Choose one of: openai-chat, openai-dpo, sft, dpo, kto.",
        ),
        (
            ["--format", "sft", "--since", "last week"],
            "--since 'last week' is not an ISO date: write it like 2024-05-01 or 2024-05-01T14:30.",
        ),
        (
            ["--format", "sft", "--output", "/nonexistent/folder/x.jsonl"],
            "Cannot write the export to /nonexistent/folder/x.jsonl: there is no folder "
            "/nonexistent/folder. Choose another --output.",
        ),
        (
            ["--format", "sft", "--guild", "5"],
            "Nothing to export: of 12 answers, 12 not in --guild.",
        ),
    ],
)
def test_export_mistakes_are_one_line(
    cli_env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    proc = switchboard(
        cli_env, *args, *([] if "--output" in args else ["-o", str(tmp_path / "x.jsonl")])
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.strip().startswith(message)
    assert "Traceback" not in proc.stderr
