"""LoRA training of a prepared base on a conversational JSONL file, in a worker process.

`train_lora` checks everything it can cheaply first (the base is prepared, the file is
valid and large enough, the output folder is free, the disk has room), then runs
`python -m tune.worker train`: TRL's `SFTTrainer` with a peft LoRA on every linear layer,
learning from the assistant turns only; for `method="dpo"`, that SFT on the chosen
answers of the preference pairs and then TRL's `DPOTrainer` on the pairs, continuing
the same adapter. Progress arrives as `TrainProgress` while it
runs; the result is a peft adapter folder (`adapter_config.json`,
`adapter_model.safetensors`, and `switchboard-train.json` with the numbers).
A failure or a cancel leaves no output folder behind.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tune.base import is_prepared
from tune.dataset import MIN_ROWS, Method, check_dataset
from tune.errors import BaseNotLoadable, DatasetError, NotEnoughDisk
from tune.process import DEFAULT_NICE, default_training_threads, run_worker
from tune.worker import MANIFEST, RESULT

DEFAULT_EPOCHS = 3.0
# Loading the libraries and the model, and saving the adapter, on top of a time budget.
STARTUP_ALLOWANCE_S = 300.0
# An adapter of rank r holds r * (in + out) weights per layer: about 0.25% of the base
# per unit of rank for Llama-shaped models (rank 16 on SmolLM2-135M: 20 MB of float32).
_ADAPTER_SHARE_PER_RANK = 0.0025
_SLACK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TrainProgress:
    """One training step done: `loss` is that step's, `eta_s` the estimated time left.

    `stage` is "sft", or "dpo" for the preference stage of a dpo run, whose steps follow
    the SFT stage's in `step` and `total`.
    """

    step: int
    total: int
    loss: float | None
    elapsed_s: float
    eta_s: float | None
    tokens: int
    stage: str = "sft"


@dataclass(frozen=True, slots=True)
class TrainResult:
    """A finished training run."""

    adapter_dir: Path
    steps: int
    total_steps: int
    loss: float  # the last step's
    mean_loss: float
    tokens: int  # non-padding tokens trained on
    train_s: float  # the training loop alone
    wall_s: float  # the whole call: start-up, loading, training, saving
    rows: int
    dataset_sha256: str
    stopped_by: str  # "steps" | "epochs" | "time": which limit ended it
    peak_rss_bytes: int  # of the worker process
    method: Method = "sft"
    dpo_steps: int = 0  # of `steps`, those of the preference stage
    # DPO's last logged reward margin (chosen over rejected, in beta-scaled log-prob
    # ratios to the reference) and the share of pairs with a positive one.
    reward_margin: float | None = None
    reward_accuracy: float | None = None

    @property
    def tokens_per_s(self) -> float:
        """Training throughput over the training loop."""
        return self.tokens / self.train_s if self.train_s > 0 else 0.0


def _float_or_none(value: object) -> float | None:
    return None if value is None else float(str(value))


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(
            f"{out_dir} already exists and is not an empty folder; choose a new folder for the adapter."
        )


def _check_disk(base_dir: Path, out_dir: Path, rank: int) -> None:
    base_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    needed = int(base_bytes * _ADAPTER_SHARE_PER_RANK * rank) + _SLACK_BYTES
    free = shutil.disk_usage(out_dir.parent if not out_dir.exists() else out_dir).free
    if needed > free:
        raise NotEnoughDisk(
            f"The adapter needs about {needed / 1024**2:.0f} MiB in {out_dir.parent}, which has "
            f"{free / 1024**2:.0f} MiB free. Free some space and try again."
        )


def train_lora(
    base_dir: Path,
    dataset_jsonl: Path,
    out_dir: Path,
    *,
    method: Method = "sft",
    steps: int | None = None,
    epochs: float | None = None,
    max_seconds: float | None = None,
    lr: float = 1e-3,
    rank: int = 16,
    alpha: int | None = None,
    batch: int = 4,
    max_length: int = 1024,
    threads: int | None = None,
    seed: int = 0,
    nice: int = DEFAULT_NICE,
    min_rows: int = MIN_ROWS,
    progress: Callable[[TrainProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `dataset_jsonl` into `out_dir`; blocking (use a thread in async code).

    Stops after `steps` optimizer steps, or `epochs` passes over the data (default 3
    epochs), or `max_seconds` of training, whichever comes first; `alpha` defaults to
    twice the rank. `method="dpo"` takes the export's dpo pairs and runs that budget
    twice: SFT on the chosen answers, then DPO on the pairs (a quarter of a time budget
    for SFT). `cancel` set from another thread stops the worker at once
    (TrainingCancelled).
    """
    started = time.monotonic()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if steps is not None and epochs is not None:
        raise DatasetError("Give a number of steps or of epochs, not both.")
    if (steps is not None and steps < 1) or (epochs is not None and epochs <= 0):
        raise DatasetError("The number of steps or epochs must be positive.")
    if min(rank, batch, max_length) < 1 or lr <= 0:
        raise DatasetError("rank, batch, max_length and the learning rate must be positive.")
    if not is_prepared(base_dir):
        raise BaseNotLoadable(
            f"{base_dir} is not a prepared base model (it has no {MANIFEST}); prepare it with "
            "tune.prepare_base from the GGUF first."
        )
    if method not in ("sft", "dpo"):
        raise DatasetError(f"Unknown training method {method!r}; use sft or dpo.")
    summary = check_dataset(Path(dataset_jsonl), min_rows=min_rows, method=method)
    _check_out_dir(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or default_training_threads()
    args = [
        "train",
        "--method",
        method,
        "--base",
        str(base_dir),
        "--dataset",
        str(summary.path),
        "--out",
        str(out_dir),
        "--lr",
        repr(lr),
        "--rank",
        str(rank),
        "--alpha",
        str(alpha if alpha is not None else 2 * rank),
        "--batch",
        str(batch),
        "--max-length",
        str(max_length),
        "--seed",
        str(seed),
    ]
    if steps is not None:
        args += ["--steps", str(steps)]
    else:
        args += ["--epochs", repr(epochs if epochs is not None else DEFAULT_EPOCHS)]
    if max_seconds:
        args += ["--max-seconds", repr(float(max_seconds))]

    def report(message: dict[str, object]) -> None:
        if progress is None or message.get("phase") != "training":
            return
        loss, eta = message.get("loss"), message.get("eta")
        progress(
            TrainProgress(
                step=int(str(message["step"])),
                total=int(str(message["total"])),
                loss=float(str(loss)) if loss is not None else None,
                elapsed_s=float(str(message.get("elapsed", 0.0))),
                eta_s=float(str(eta)) if eta is not None else None,
                tokens=int(str(message.get("tokens", 0))),
                stage=str(message.get("stage", "sft")),
            )
        )

    try:
        _check_disk(base_dir, out_dir, rank)
        done = run_worker(
            args,
            what="Training",
            threads=threads,
            nice=nice,
            on_progress=report,
            cancel=cancel,
            timeout_s=(max_seconds + STARTUP_ALLOWANCE_S) if max_seconds else None,
        )
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for child in out_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    result = TrainResult(
        adapter_dir=out_dir,
        steps=int(done["steps"]),
        total_steps=int(done["total"]),
        loss=float(done["loss"]),
        mean_loss=float(done["mean_loss"]),
        tokens=int(done["tokens"]),
        train_s=float(done["train_seconds"]),
        wall_s=time.monotonic() - started,
        rows=summary.rows,
        dataset_sha256=summary.sha256,
        stopped_by=str(done["stopped_by"]),
        peak_rss_bytes=int(done.get("peak_rss_bytes", 0)),
        method=method,
        dpo_steps=int(done.get("dpo_steps", 0)),
        reward_margin=_float_or_none(done.get("reward_margin")),
        reward_accuracy=_float_or_none(done.get("reward_accuracy")),
    )
    record = out_dir / RESULT
    record.write_text(
        json.dumps(
            {
                **json.loads(record.read_text(encoding="utf-8")),
                "dataset_sha256": summary.sha256,
                "base_dir": str(base_dir),
                "wall_seconds": round(result.wall_s, 3),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    return result
