"""`switchboard tune eval`: a fine-tune against its base, on prompts logged after its snapshot."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from bot.app import open_app
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from store.models import TuneJob, utcnow
from store.tune_jobs import TuneJobRepository
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.tune import tune_config
from tests.test_tune_service import candidate_spec

REPO = Path(__file__).resolve().parent.parent


def switchboard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "tune", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_tune_eval_compares_the_candidate_with_its_base_on_held_out_prompts(
    tmp_path: Path,
) -> None:
    with FakeOpenAI.in_thread() as fake:
        config = tune_config(tmp_path / "switchboard.toml", fake.base_url)
        settings = Settings(config=config, data_dir=tmp_path / "data", environ={}, max_retries=0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(
            SWITCHBOARD_CONFIG=str(config),
            SWITCHBOARD_DATA_DIR=str(tmp_path / "data"),
            SWITCHBOARD_MAX_RETRIES="0",
            HF_HUB_OFFLINE="1",
        )

        async def made_by_a_job() -> None:
            """A finished job and the candidate it registered (as TuneService.run leaves them)."""
            async with open_app(settings, knowledge=False) as app:
                spec = candidate_spec().model_copy(update={"base_url": fake.base_url})
                await app.service.register_model(spec, created_by="tune job")
                async with app.sessions() as session, session.begin():
                    await TuneJobRepository(session).add(
                        TuneJob(
                            name="main-tuned",
                            base_model="main",
                            backend="local",
                            method="sft",
                            guild_id=10,
                            snapshot_path="snapshot.jsonl",
                            snapshot_sha256="ab" * 32,
                            snapshot_rows=12,
                            filters={},
                            status="succeeded",
                            phase="done",
                            step=16,
                            losses=[],
                            cancel_requested=False,
                            started_by="cli:test",
                            created_at=utcnow(),
                            model_name="main-tuned",
                        )
                    )

        async def later_prompts() -> None:
            async with open_app(settings, knowledge=False) as app:
                for n in range(3):
                    result = await app.service.answer(
                        ChatRequest(Place(10, 20), Author(1, "alice"), f"held-out question {n}")
                    )
                    assert result.error is None, result.error
                await app.writer.drain()

        asyncio.run(made_by_a_job())
        nothing = switchboard(env, "eval", "main-tuned")
        assert nothing.returncode == 1
        assert nothing.stderr.startswith(
            "main-tuned was trained on all 12 of its examples (a tenth is held out from 20 on), "
            "and no prompts were logged after its snapshot was frozen ("
        )
        assert "pass --dataset FILE." in nothing.stderr

        asyncio.run(later_prompts())
        out = tmp_path / "report"
        proc = switchboard(env, "eval", "main-tuned", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "3 prompts from the log" in proc.stderr
    assert "Evaluation: 3 rows" in proc.stdout
    summary = (out / "summary.csv").read_text().splitlines()
    assert sorted(line.split(",")[0] for line in summary[1:]) == ["main", "main-tuned"]
    assert (out / "report.html").is_file()
