"""The training process: `python -m tune.worker prepare|train ...`, started by `tune.process`.

torch, transformers, TRL and peft are imported here only, never in the bot's process:
their memory and threads go away with this process, and a crash cannot take the bot down.

The protocol is JSON lines on stdout, one object each:

- `{"event": "progress", "step": 3, "total": 30, "loss": 2.1, "elapsed": 5.2, "eta": 47.0, "tokens": 900}`
- `{"event": "done", ...what the step produced...}` as the last line on success;
- `{"event": "error", "kind": "base" | "disk" | "dataset" | "failed", "message": "..."}` and exit status 3.

Anything else the libraries print goes to stderr (fd 1 is pointed there before they load).
The process lowers its own priority, exits when the parent's pipe on stdin closes (or,
on Linux, when the parent dies), and leaves its thread counts to the parent's
environment (`OMP_NUM_THREADS`, `OMP_WAIT_POLICY=PASSIVE`) plus an explicit torch count.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from tune.errors import BaseNotLoadable, DatasetError, NotEnoughDisk, TuneError

PR_SET_PDEATHSIG = 1
MANIFEST = "switchboard-base.json"
RESULT = "switchboard-train.json"
# How many SFT steps' time one DPO step takes, for time estimates (measured here: 120 s
# for 10 DPO steps after 41 s for 10 SFT steps).
DPO_STEP_COST = 3.0

_out: IO[str] = sys.stdout


def emit(payload: dict[str, Any]) -> None:
    """One protocol line to the parent."""
    _out.write(json.dumps(payload) + "\n")
    _out.flush()


def _take_stdout() -> IO[str]:
    """Keep the real stdout for the protocol; point fd 1 (and sys.stdout) at stderr."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent goes away: the kernel's death signal, and EOF on stdin.

    Only with a parent pid: a worker started by hand (for debugging) has no pipe to watch.
    """
    if not parent_pid:
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


# -- prepare ------------------------------------------------------------------------------


def prepare(gguf: Path, out: Path) -> dict[str, Any]:
    """Load the GGUF with transformers, copy it into a plain trainable model, save it to `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from chains.gguf import read_gguf_info
    from tune.template import training_template

    info = read_gguf_info(gguf)
    arch = info.architecture or "unknown"
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise BaseNotLoadable(
            f"transformers {transformers.__version__} cannot load GGUF models of architecture "
            f"`{arch}` ({gguf.name}), so it cannot be fine-tuned locally; it loads "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES)[:12])} and a few more."
        )
    emit({"event": "progress", "phase": "loading", "step": 0, "total": 3})
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError, OSError) as exc:
        raise BaseNotLoadable(
            f"transformers could not load {gguf.name} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})."
        ) from exc
    emit({"event": "progress", "phase": "copying", "step": 1, "total": 3})
    # A model loaded from GGUF keeps a quantization config that makes it unsaveable (and
    # untrainable by peft): the same architecture built from the plain config takes its
    # weights instead.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise BaseNotLoadable(
            f"The weights of {gguf.name} do not fit the {type(plain).__name__} transformers "
            f"builds for it (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})."
        )
    plain.tie_weights()
    del loaded
    template, source = training_template(tokenizer)
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    emit({"event": "progress", "phase": "saving", "step": 2, "total": 3})
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {
        "gguf": str(gguf),
        "gguf_name": name,
        "architecture": arch,
        "model_class": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "chat_template_source": source,
        "gguf_chat_template": original,
        "transformers": transformers.__version__,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return {"architecture": arch, "chat_template_source": source}


# -- train --------------------------------------------------------------------------------


def _rows(path: Path, method: str) -> list[dict[str, Any]]:
    """The examples of a checked JSONL file (the parent checked their shape)."""
    keys = ("prompt", "chosen", "rejected") if method == "dpo" else ("messages",)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append({key: row[key] for key in keys})
    return rows


def train(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA-train the base in `args.base` on `args.dataset`; write the peft adapter to `args.out`.

    `sft`: TRL's SFTTrainer on the conversations, learning from the answers only. `dpo`:
    the same SFT on the chosen answers of the pairs first (DPO alone does not teach a
    model something new, measured), then TRL's DPOTrainer on the pairs for as many
    steps (or epochs) again, continuing the same adapter against a frozen copy of the
    SFT adapter as its reference, at a twentieth of the learning rate
    (a tenth made the answers repeat themselves, "Quellportportport...", once in two runs).
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    torch.set_num_threads(args.threads)
    base = Path(args.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise BaseNotLoadable(
            f"The prepared base in {base} cannot be loaded ({type(exc).__name__}); delete that "
            "folder and prepare the base again."
        ) from exc
    dpo = args.method == "dpo"
    rows = _rows(Path(args.dataset), args.method)
    sft_rows = [{"messages": r["prompt"] + r["chosen"]} for r in rows] if dpo else rows
    budget = args.max_seconds
    # With DPO, a DPO step costs about DPO_STEP_COST SFT steps (two answers, and the
    # reference's forward pass): the SFT stage gets its share of a time budget, DPO the rest.
    box: dict[str, Any] = {"offset": 0, "stages": 2 if dpo else 1, "stage": "sft"}
    box["stage_budget"] = budget / (1 + DPO_STEP_COST) if dpo and budget else 0.0

    class Progress(TrainerCallback):
        """Progress lines to the parent, counting both stages' steps; stops at the time budget."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            box.setdefault("start", time.monotonic())
            box["stage_start"] = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.monotonic()
            over = budget and now - box["start"] >= budget
            share = box["stage_budget"]
            if over or (share and now - box["stage_start"] >= share):
                control.should_training_stop = True
                box["stopped_by_time"] = True

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs = kwargs.get("logs")
            if not logs or "loss" not in logs:
                return
            elapsed = time.monotonic() - box["start"]
            # Both stages count as one run: DPO's steps follow SFT's (a second stage as long).
            step = box["offset"] + state.global_step
            total = box["offset"] + state.max_steps * (box["stages"] if box["offset"] == 0 else 1)
            rate = (time.monotonic() - box["stage_start"]) / max(state.global_step, 1)
            left = total - step
            if box["stage"] == "sft" and dpo:  # the DPO stage's steps are slower (see above)
                left = state.max_steps - state.global_step + DPO_STEP_COST * state.max_steps
            eta = rate * left
            if budget:
                eta = min(eta, max(0.0, budget - elapsed))
            box["loss"] = float(logs["loss"])
            for key in ("rewards/margins", "rewards/accuracies"):
                if key in logs:
                    box[key] = float(logs[key])
            emit(
                {
                    "event": "progress",
                    "phase": "training",
                    "stage": box["stage"],
                    "step": step,
                    "total": total,
                    "loss": float(logs["loss"]),
                    "elapsed": round(elapsed, 3),
                    "eta": round(eta, 3),
                    "tokens": box.get("tokens", 0) + int(state.num_input_tokens_seen),
                }
            )

    work = Path(args.out) / ".trainer"
    common: dict[str, Any] = dict(
        max_steps=args.steps or -1,
        num_train_epochs=args.epochs or 1,
        per_device_train_batch_size=args.batch,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=args.max_length,
        seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )
    config = SFTConfig(
        output_dir=str(work), learning_rate=args.lr, assistant_only_loss=True, **common
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer: Any = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(sft_rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Progress()],
    )
    output = trainer.train()
    steps, total = int(trainer.state.global_step), int(trainer.state.max_steps)
    tokens, mean_loss = int(trainer.state.num_input_tokens_seen), float(output.training_loss)
    extra: dict[str, Any] = {}
    if dpo and not (budget and time.monotonic() - box["start"] >= budget):
        box.update(offset=steps, stage="dpo", tokens=tokens, stage_budget=0.0)
        sft_seconds = time.monotonic() - box["start"]
        # Given the SFT-trained peft model, TRL adds a frozen copy of its adapter ("ref")
        # as the reference and goes on training the "default" adapter.
        dpo_trainer: Any = DPOTrainer(
            model=trainer.model,
            args=DPOConfig(output_dir=str(work), learning_rate=args.lr / 20, beta=0.1, **common),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Progress()],
        )
        dpo_output = dpo_trainer.train()
        trainer = dpo_trainer
        steps += int(dpo_trainer.state.global_step)
        total += int(dpo_trainer.state.max_steps)
        tokens += int(dpo_trainer.state.num_input_tokens_seen)
        extra = {
            "sft_steps": box["offset"],
            "sft_seconds": round(sft_seconds, 3),
            "dpo_steps": int(dpo_trainer.state.global_step),
            "dpo_loss": float(dpo_output.training_loss),
            "reward_margin": box.get("rewards/margins"),
            "reward_accuracy": box.get("rewards/accuracies"),
        }
    elapsed = time.monotonic() - box["start"]
    trained: Any = trainer.model  # the peft model: saving it writes the adapter only
    trained.save_pretrained(args.out, selected_adapters=["default"])
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "method": args.method,
        "steps": steps,
        "total": total,
        "loss": box.get("loss", mean_loss),
        "mean_loss": mean_loss,
        "tokens": tokens,
        "train_seconds": round(elapsed, 3),
        "stopped_by": ("time" if "stopped_by_time" in box else "steps" if args.steps else "epochs"),
        "rows": len(rows),
        **extra,
    }
    (Path(args.out) / RESULT).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


# -- entry point --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune.worker")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    t = sub.add_parser("train")
    t.add_argument("--base", required=True)
    t.add_argument("--dataset", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--method", choices=("sft", "dpo"), default="sft")
    t.add_argument("--steps", type=int, default=0)
    t.add_argument("--epochs", type=float, default=0)
    t.add_argument("--max-seconds", type=float, default=0)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=int, default=32)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--max-length", type=int, default=1024)
    t.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one step; report its outcome as the last protocol line."""
    global _out
    args = _parser().parse_args(argv)
    _out = _take_stdout()
    _die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent
    with contextlib.suppress(OSError):
        os.nice(args.nice)
    try:
        if args.command == "prepare":
            done = prepare(Path(args.gguf), Path(args.out))
        else:
            done = train(args)
    except TuneError as exc:
        kind = (
            "base"
            if isinstance(exc, BaseNotLoadable)
            else "disk"
            if isinstance(exc, NotEnoughDisk)
            else "dataset"
            if isinstance(exc, DatasetError)
            else "failed"
        )
        emit({"event": "error", "kind": kind, "message": exc.message})
        return 3
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC: the disk filled up while writing
            emit({"event": "error", "kind": "disk", "message": f"The disk filled up ({exc})."})
            return 3
        raise
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    emit({"event": "done", **done, "peak_rss_bytes": peak})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
