"""tune: local LoRA training through `tune.train_lora` vs. a bare TRL script, and the whole loop's time.

A fixed dataset (the twelve rows of tests/fixtures/tune.py that teach "the capital of
Zorbia is Quellport") and fixed settings (rank 16, batch 4, lr 1e-3, STEPS steps, every
usable core) on the bundled SmolLM2-135M:

- switchboard: `train_lora(...)`, timed from the call to its return (checks, the worker
  process, loading, training, saving the adapter);
- bare: `python -m bench._tune_bare`, the same TRL SFTTrainer + peft LoRA written plainly,
  timed from its start to its exit. It gets the same priority, thread count and OpenMP
  policy as the worker, so the ratio is what train_lora's own machinery costs.

Throughput is non-padding tokens trained over that wall time; the runs go in the order
switchboard, bare, bare, switchboard, so a drift in the machine's load hits both sides
alike, and each side's best run counts. The loop-only rate (tokens over the training
loop's own seconds) is printed as well.

The whole loop is timed once, from a cold cache: prepare the base (the conversion) →
trained (the first switchboard run) → exported (the GGUF LoRA) → served and first answer
(registered in a throwaway app, asked through ChatService.answer). Peak memory is the
largest resident size of any child process (the conversion, the training, llama.cpp)
and of this process, which never loads torch.

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
from chains.gguf import bundled_models
from core.messages import Author, ChatRequest, Place
from core.settings import Settings
from tests.fixtures.tune import FACT_QUESTION, write_zorbia_dataset
from tune import export_gguf_lora, lora_model_spec, prepare_base, train_lora
from tune.process import DEFAULT_NICE, default_training_threads, worker_environment

STEPS = 10
GOAL = 0.9
BUNDLED = "smollm2-135m-instruct"
ORDER = ("switchboard", "bare", "bare", "switchboard")


@dataclass(frozen=True, slots=True)
class Run:
    """One training run's numbers."""

    side: str
    tokens: int
    wall_s: float
    train_s: float
    peak_rss_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def loop_tokens_per_s(self) -> float:
        return self.tokens / self.train_s


def bare_run(base: Path, dataset: Path, out: Path, threads: int) -> Run:
    """The baseline script in its own process, with the worker's priority and environment."""
    command = [
        sys.executable,
        "-m",
        "bench._tune_bare",
        "--base",
        str(base),
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--threads",
        str(threads),
    ]
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
    return Run("bare", result["tokens"], wall, result["train_seconds"], result["peak_rss_bytes"])


def local_settings(folder: Path) -> Settings:
    """A throwaway data folder whose only model is the bundled SmolLM2 at temperature 0."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "switchboard.toml"
    config.write_text(
        'default_model = "smol"\n'
        "[models.smol]\n"
        'provider = "llama.cpp"\n'
        f'bundled = "{BUNDLED}"\n'
        "context_size = 1024\n"
        "temperature = 0\n"
        "max_tokens = 48\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    return Settings(config=config, data_dir=folder / "data", environ=env)


async def serve_and_ask(folder: Path, lora: Path, dataset_hash: str) -> tuple[float, str, str]:
    """Register the fine-tune in a fresh app and ask it; seconds to its first answer, both answers."""
    started = time.monotonic()
    async with open_app(local_settings(folder), knowledge=False) as app:
        base = await app.service.get_model("smol")
        spec = lora_model_spec(base, "smol-zorbia", lora, dataset_hash=dataset_hash)
        await app.service.register_model(spec, created_by="bench")
        admin = Author(1, "bench")
        await app.service.set_model(Place(1, 2), "channel", "smol-zorbia", admin)
        tuned = await app.service.answer(ChatRequest(Place(1, 2), admin, FACT_QUESTION))
        served = time.monotonic() - started
        plain = await app.service.answer(ChatRequest(Place(1, 3), admin, FACT_QUESTION))
    if tuned.error or plain.error:
        raise RuntimeError(f"no answer: {tuned.error or plain.error}")
    return served, tuned.reply, plain.reply


def run() -> float:
    console = Console()
    gguf = bundled_models()[BUNDLED]
    threads = default_training_threads()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-tune-") as tmp:
        folder = Path(tmp)
        dataset = write_zorbia_dataset(folder / "zorbia.jsonl")
        loop_started = time.monotonic()
        with console.status("preparing the base (converting the GGUF, about a minute)…"):
            base = prepare_base(gguf, folder / "cache")
        prepared_s = time.monotonic() - loop_started
        again = time.monotonic()
        prepare_base(gguf, folder / "cache")
        cached_s = time.monotonic() - again
        first: object = None
        for index, side in enumerate(ORDER):
            out = folder / f"run-{index}"
            with console.status(f"training: {side} run {index + 1} of {len(ORDER)}…"):
                if side == "bare":
                    runs.append(bare_run(base, dataset, out, threads))
                    continue
                result = train_lora(base, dataset, out, steps=STEPS, threads=threads)
            runs.append(
                Run(side, result.tokens, result.wall_s, result.train_s, result.peak_rss_bytes)
            )
            if first is None:
                first = result
                trained_s = time.monotonic() - loop_started
                started = time.monotonic()
                lora = export_gguf_lora(result.adapter_dir, gguf, folder / "zorbia.gguf")
                exported_s = time.monotonic() - started
                with console.status("serving the fine-tune and asking it…"):
                    served_s, tuned, plain = asyncio.run(
                        serve_and_ask(folder / "app", lora, result.dataset_sha256)
                    )
                loop_s = trained_s + exported_s + served_s

    table = Table(
        title=f"tune: bundled SmolLM2-135M, {STEPS} LoRA steps (rank 16, batch 4), {threads} threads"
    )
    for column in ("run", "side", "tokens", "wall s", "tokens/s", "loop tokens/s", "peak MiB"):
        table.add_column(column)
    for index, r in enumerate(runs):
        table.add_row(
            str(index + 1),
            r.side,
            str(r.tokens),
            f"{r.wall_s:.1f}",
            f"{r.tokens_per_s:.1f}",
            f"{r.loop_tokens_per_s:.1f}",
            f"{r.peak_rss_bytes / 2**20:.0f}",
        )
    console.print(table)
    ours = max(r.tokens_per_s for r in runs if r.side == "switchboard")
    bare = max(r.tokens_per_s for r in runs if r.side == "bare")
    ours_loop = max(r.loop_tokens_per_s for r in runs if r.side == "switchboard")
    bare_loop = max(r.loop_tokens_per_s for r in runs if r.side == "bare")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    console.print(
        f"whole loop: {loop_s:.1f} s = prepare {prepared_s:.1f} s (cached later: {cached_s:.3f} s) "
        f"→ trained {trained_s - prepared_s:.1f} s → exported {exported_s:.1f} s "
        f"→ served and first answer {served_s:.1f} s"
    )
    console.print(
        f"peak memory: {children:.0f} MiB (largest child: conversion, training or llama.cpp), "
        f"{own:.0f} MiB (this process)"
    )
    console.print(f"loop-only throughput ratio: {ours_loop / bare_loop:.2f}")
    console.print(f"{FACT_QUESTION!r}\n  base:      {plain!r}\n  fine-tune: {tuned!r}")
    return ours / bare


def main() -> int:
    ratio = run()
    print(f"tune: ratio {ratio:.2f} (goal >= {GOAL})")
    return 0
