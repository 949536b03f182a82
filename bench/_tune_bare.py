"""The baseline of `bench tune`: TRL's SFTTrainer with a peft LoRA, written plainly, as a script.

    python -m bench._tune_bare --base DIR --dataset FILE --out DIR --steps N ...

The settings are those `tune.train_lora` passes to its worker (TRL's defaults otherwise);
nothing of Switchboard's is imported. Prints one JSON line: tokens trained, the training
loop's seconds, the process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer


class Clock(TrainerCallback):
    """When the training loop starts and ends."""

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.start = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.end = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--base", "--dataset", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    with open(args.dataset, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    clock = Clock()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=f"{args.out}/.trainer",
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            assistant_only_loss=True,
            max_length=1024,
            seed=0,
            use_cpu=True,
            include_num_input_tokens_seen="non_padding",
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[clock],
    )
    trainer.train()
    trainer.model.save_pretrained(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "tokens": int(trainer.state.num_input_tokens_seen),
                "train_seconds": clock.end - clock.start,
                "peak_rss_bytes": peak,
            }
        )
    )


if __name__ == "__main__":
    main()
