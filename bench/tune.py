"""tune: `switchboard tune start --wait` vs. a bare TRL script, and the whole loop's time.

A fixed log (the twelve liked answers of tests/fixtures/tune.py that teach "the capital
of Zorbia is Quellport", logged through the real service from the fake OpenAI server)
and fixed settings (rank 16, batch 4, lr 1e-3, STEPS steps, the worker's thread count) on
the bundled SmolLM2-135M:

- switchboard: `python -m bot tune start --base smol --steps STEPS --wait`, a real
  process timed from its start to its exit: the snapshot through the export, the job's
  bookkeeping, the `tune.worker` process (loading, training, saving), the GGUF LoRA
  and the candidate's registration;
- bare: `python -m bench._tune_bare` on the same snapshot file, the same TRL SFTTrainer
  + peft LoRA written plainly, timed from its start to its exit, with the worker's
  priority, thread count and OpenMP policy. The ratio is what Switchboard costs on top.

Throughput is non-padding tokens trained (the job's own record, and the script's) over
that wall time. The first switchboard run starts from a cold cache and is the loop's
timing only; then bare, switchboard, switchboard, bare, so a drift in the machine's load
hits both sides alike, and each side's best run counts. The loop-only rate (tokens over
the training loop's own seconds) is printed as well.

The whole loop is that first run (snapshot → converted base → trained → exported →
registered) plus `switchboard chat --json` choosing the candidate in a channel, to its
first answer (llama.cpp started with the adapter). Peak memory is the largest resident
size of any process it started (the CLI, the conversion, the training, llama.cpp).

Last line: `tune: ratio X (goal >= 0.9)`, X = switchboard tokens/s / bare tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench._support import REPO
from bot.app import open_app
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAI
from tests.fixtures.tune import FACT_QUESTION, log_liked_zorbia_answers, tune_config
from tune.process import DEFAULT_NICE, default_training_threads, worker_environment
from tune.worker import RESULT

STEPS = 30  # the measured path: 30 LoRA steps at batch 4
GOAL = 0.9
ORDER = ("bare", "switchboard", "switchboard", "bare")


@dataclass(frozen=True, slots=True)
class Run:
    """One training run's numbers."""

    side: str
    tokens: int
    wall_s: float
    train_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def loop_tokens_per_s(self) -> float:
        return self.tokens / self.train_s


def cli_env(folder: Path) -> dict[str, str]:
    """The environment of a `switchboard` process on the bench's data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_CONFIG=str(folder / "switchboard.toml"),
        SWITCHBOARD_DATA_DIR=str(folder / "data"),
        SWITCHBOARD_MAX_RETRIES="0",
        HF_HUB_OFFLINE="1",
    )
    return env


def fill_log(folder: Path, fake: FakeOpenAI) -> None:
    """Twelve liked answers in a fresh data folder's log, through the real service."""
    settings = Settings(
        config=tune_config(folder / "switchboard.toml", fake.base_url),
        data_dir=folder / "data",
        environ={},
        max_retries=0,
    )

    async def fill() -> None:
        async with open_app(settings, knowledge=False) as app:
            await log_liked_zorbia_answers(app, fake)

    asyncio.run(fill())


def switchboard(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    """Run `python -m bot ARGS`; its stdout, or RuntimeError with its last lines."""
    done = subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"switchboard {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def switchboard_run(env: dict[str, str], folder: Path, name: str) -> tuple[Run, Path]:
    """`tune start --wait` for a new candidate `name`; its run and the job's folder."""
    before = set((folder / "data" / "tune" / "jobs").glob("*"))
    started = time.monotonic()
    out = switchboard(env, "tune", "start", "--base", "smol", "--name", name, "--steps",
                      str(STEPS), "--wait")  # fmt: skip
    wall = time.monotonic() - started
    if out.splitlines()[-1] != name:
        raise RuntimeError(f"tune start did not name the candidate: {out[-500:]}")
    (job,) = set((folder / "data" / "tune" / "jobs").glob("*")) - before
    record = json.loads((job / "adapter" / RESULT).read_text(encoding="utf-8"))
    return Run("switchboard", record["tokens"], wall, record["train_seconds"]), job


def bare_run(base: Path, dataset: Path, out: Path, threads: int) -> Run:
    """The baseline script in its own process, with the worker's priority and environment."""
    command = [sys.executable, "-m", "bench._tune_bare", "--base", str(base), "--dataset",
               str(dataset), "--out", str(out), "--steps", str(STEPS), "--threads", str(threads)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=REPO,
        env=worker_environment(threads),
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.nice(DEFAULT_NICE),
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the bare TRL run failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Run("bare", result["tokens"], wall, result["train_seconds"])


def ask(env: dict[str, str], channel: int, model: str) -> tuple[float, str]:
    """Choose `model` in a channel and ask the fact there, through `chat --json`; seconds, reply."""
    started = time.monotonic()
    out = switchboard(env, "chat", "--json", "--guild", "10", "--channel", str(channel),
                      stdin=f"/model set {model}\n{FACT_QUESTION}\n")  # fmt: skip
    seconds = time.monotonic() - started
    command, reply = (json.loads(line) for line in out.splitlines())
    if not command["ok"] or reply["error"]:
        raise RuntimeError(f"no answer from {model}: {command} {reply}")
    return seconds, str(reply["reply"])


def run() -> float:
    console = Console()
    threads = default_training_threads()
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="switchboard-bench-tune-") as tmp,
        FakeOpenAI.in_thread() as fake,
    ):
        folder = Path(tmp)
        env = cli_env(folder)
        with console.status("logging twelve liked answers…"):
            fill_log(folder, fake)
        with console.status("the whole loop from a cold cache: tune start --wait…"):
            cold, job = switchboard_run(env, folder, "smol-zorbia")
        snapshot = job / "snapshot.jsonl"
        (base,) = (folder / "data" / "tune" / "bases").glob("llama-*")
        with console.status("serving the fine-tune and asking it…"):
            served_s, tuned = ask(env, 30, "smol-zorbia")
            _, plain = ask(env, 31, "smol")
        loop_s = cold.wall_s + served_s
        for index, side in enumerate(ORDER):
            with console.status(f"training: {side} run {index + 1} of {len(ORDER)}…"):
                if side == "bare":
                    runs.append(bare_run(base, snapshot, folder / f"bare-{index}", threads))
                else:
                    runs.append(switchboard_run(env, folder, f"smol-zorbia-{index}")[0])

    table = Table(
        title=f"tune: bundled SmolLM2-135M, {STEPS} LoRA steps (rank 16, batch 4), {threads} threads"
    )
    for column in ("run", "side", "tokens", "wall s", "tokens/s", "loop tokens/s"):
        table.add_column(column)
    for index, r in enumerate([cold, *runs]):
        table.add_row(
            "cold" if index == 0 else str(index),
            r.side,
            str(r.tokens),
            f"{r.wall_s:.1f}",
            f"{r.tokens_per_s:.1f}",
            f"{r.loop_tokens_per_s:.1f}",
        )
    console.print(table)
    ours = max(r.tokens_per_s for r in runs if r.side == "switchboard")
    bare = max(r.tokens_per_s for r in runs if r.side == "bare")
    ours_loop = max(r.loop_tokens_per_s for r in runs if r.side == "switchboard")
    bare_loop = max(r.loop_tokens_per_s for r in runs if r.side == "bare")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    console.print(
        f"whole loop: {loop_s:.1f} s = tune start --wait from a cold cache {cold.wall_s:.1f} s "
        f"(snapshot, converting the base, {STEPS} steps in {cold.train_s:.1f} s, the GGUF LoRA, "
        f"registration) → chosen in a channel and first answer {served_s:.1f} s"
    )
    console.print(
        f"peak memory: {peak:.0f} MiB (largest process it started: the CLI, the conversion, "
        f"the training or llama.cpp), {own:.0f} MiB (this process)"
    )
    console.print(f"loop-only throughput ratio: {ours_loop / bare_loop:.2f}")
    console.print(f"{FACT_QUESTION!r}\n  base:      {plain!r}\n  fine-tune: {tuned!r}")
    return ours / bare


def main() -> int:
    ratio = run()
    print(f"tune: ratio {ratio:.2f} (goal >= {GOAL})")
    return 0
