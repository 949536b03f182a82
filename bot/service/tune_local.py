"""The local fine-tuning backend: LoRA on the CPU for a `llama.cpp` base, through `tune/`.

`start` runs, in a worker thread of this process, `tune.prepare_base` (the base's
trainable copy, cached in `cache_dir` by the GGUF's hash), `tune.train_lora` (a
`tune.worker` subprocess at a lower priority with passive OpenMP and an explicit thread
count) and `tune.export_gguf_lora`; `poll` reads how far it got; `cancel` terminates the
worker's process group and waits for the thread. A run lives in the process that
started it: it cannot be resumed elsewhere (`resumable` is False), so a job whose
process died is marked failed (`TuneService.recover`).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from bot.service.tune import BackendPoll, JobTicket
from chains.gguf import resolve_gguf
from chains.registry import ModelSpec
from core.errors import UserError
from tune import (
    PrepareProgress,
    TrainingCancelled,
    TrainProgress,
    TrainResult,
    TuneError,
    export_gguf_lora,
    lora_model_spec,
    prepare_base,
    train_lora,
)

ADAPTER_FILE = "adapter.gguf"


@dataclass
class _Run:
    """One job's training, as its thread reports it."""

    ticket: JobTicket
    base: ModelSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    poll: BackendPoll = field(default_factory=lambda: BackendPoll(phase="preparing"))
    task: asyncio.Task[None] | None = None


class LocalLoraBackend:
    """LoRA fine-tuning of local GGUF models, in this process's worker threads."""

    kind = "local"
    resumable = False
    poll_interval_s = 0.5
    export_formats = {"sft": "sft", "dpo": "dpo"}  # TRL's conversational formats

    def __init__(self, cache_dir: Path, *, threads: int | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.threads = threads
        self._runs: dict[str, _Run] = {}

    def resume(self, ticket: JobTicket, base: ModelSpec, external_id: str) -> None:
        """A local run dies with its process: it cannot be picked up elsewhere."""
        raise UserError("A local training run cannot be resumed by another process.")

    def check(self, base: ModelSpec, method: str) -> None:
        """Refuse a base or method this backend cannot train, in one line."""
        if not base.is_local:
            raise UserError(
                f"`{base.name}` runs at {base.provider}, not locally: local fine-tuning needs a "
                "llama.cpp model (for example the bundled smollm2)."
            )
        if base.lora or base.candidate:
            raise UserError(
                f"`{base.name}` is itself a fine-tune; fine-tune its base "
                f"`{base.lineage.base_model if base.lineage else '?'}` instead."
            )
        if method not in self.export_formats:
            raise UserError(f"Unknown method `{method}`: use sft or dpo.")
        resolve_gguf(base)  # a missing file is one line now, not after the export

    async def start(self, ticket: JobTicket, base: ModelSpec) -> str:
        """Begin training in a worker thread; the job's id is this backend's id for it."""
        run = _Run(ticket, base)
        self._runs[ticket.job_id] = run
        run.task = asyncio.create_task(
            asyncio.to_thread(self._train, run), name=f"tune-{ticket.job_id}"
        )
        return ticket.job_id

    async def poll(self, external_id: str) -> BackendPoll:
        """How far the job is; `done` once it succeeded, failed or was cancelled."""
        run = self._runs.get(external_id)
        if run is None:
            return BackendPoll(
                phase="failed",
                done=True,
                error="interrupted: the process that was training it stopped",
            )
        if run.task is not None and run.task.done():
            self._runs.pop(external_id, None)
            exc = run.task.exception()
            if isinstance(exc, TrainingCancelled):
                return BackendPoll(phase="cancelled", done=True, cancelled=True)
            if exc is not None:
                message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                return BackendPoll(phase="failed", done=True, error=message)
        return run.poll

    async def cancel(self, external_id: str) -> None:
        """Stop the job's worker process group and wait until its thread has cleaned up."""
        run = self._runs.get(external_id)
        if run is None:
            return
        run.cancel.set()
        if run.task is not None:
            await asyncio.wait({run.task})

    def _train(self, run: _Run) -> None:
        """prepare → train → export, reporting into `run.poll`; the spec in it on success."""
        ticket = run.ticket
        folder = ticket.folder
        adapter_dir, lora = folder / "adapter", folder / ADAPTER_FILE
        try:
            gguf = resolve_gguf(run.base)

            def prepared(p: PrepareProgress) -> None:
                run.poll = BackendPoll(phase="preparing", step=p.step, total=p.total)

            base_dir = prepare_base(
                gguf, self.cache_dir, threads=self.threads, progress=prepared, cancel=run.cancel
            )
            run.poll = BackendPoll(phase="training", step=0, total=ticket.steps)

            def trained(p: TrainProgress) -> None:
                run.poll = BackendPoll(
                    phase="preference training" if p.stage == "dpo" else "training",
                    step=p.step,
                    total=p.total,
                    loss=p.loss,
                    eta_s=p.eta_s,
                )

            result = train_lora(
                base_dir,
                ticket.dataset,
                adapter_dir,
                method=ticket.method,
                steps=ticket.steps,
                epochs=ticket.epochs,
                threads=self.threads,
                progress=trained,
                cancel=run.cancel,
            )
            if run.cancel.is_set():
                raise TrainingCancelled("Cancelled.")
            run.poll = BackendPoll(
                phase="exporting", step=result.steps, total=result.total_steps, loss=result.loss
            )
            export_gguf_lora(result.adapter_dir, gguf, lora)
            spec = lora_model_spec(
                run.base,
                ticket.name,
                lora,
                dataset_hash=ticket.dataset_sha256,
                created_by=ticket.started_by,
                description=_description(run.base.name, ticket, result),
            )
            run.poll = BackendPoll(
                phase="trained",
                step=result.steps,
                total=result.total_steps,
                loss=result.loss,
                done=True,
                spec=spec,
            )
        except BaseException:
            # Nothing the job made stays but its snapshot (the record of what it saw).
            shutil.rmtree(adapter_dir, ignore_errors=True)
            lora.unlink(missing_ok=True)
            raise


def _description(base: str, ticket: JobTicket, result: TrainResult) -> str:
    """The candidate's one-line description: what it was trained on, and how."""
    if result.method == "dpo":
        sft = result.steps - result.dpo_steps
        margin = (
            f", reward margin {result.reward_margin:.2f}"
            if result.reward_margin is not None
            else ""
        )
        how = f"{sft} SFT and {result.dpo_steps} DPO LoRA steps{margin}"
        what = "preference pairs"
    else:
        how, what = f"{result.steps} LoRA steps", "examples"
    return (
        f"{base} fine-tuned locally on {result.rows} logged {what} "
        f"({how}, job {ticket.job_id[:8]})."
    )


__all__ = ["ADAPTER_FILE", "LocalLoraBackend", "TuneError"]
