"""Local fine-tuning: a trainable copy of a GGUF, LoRA training in a worker process, the adapter as a GGUF LoRA.

    base = prepare_base(gguf, cache_dir)                    # once per GGUF (about a minute)
    result = train_lora(base, "sft.jsonl", out, steps=30)   # TRL SFTTrainer + peft LoRA
    lora = export_gguf_lora(result.adapter_dir, gguf, out / "adapter.gguf")
    spec = lora_model_spec(base_spec, "smollm2-zorbia", lora)  # serve base + adapter

Blocking calls: from async code run them in a thread (`asyncio.to_thread`), with a
`threading.Event` as `cancel`. torch, transformers, TRL and peft load in the worker
process only (`tune.worker`), never in the caller's.
"""

from tune.base import PrepareProgress, gguf_sha256, is_prepared, prepare_base
from tune.dataset import DatasetSummary, check_dataset
from tune.errors import (
    BaseNotLoadable,
    DatasetError,
    ExportError,
    NotEnoughDisk,
    TooFewRows,
    TrainingCancelled,
    TrainingFailed,
    TuneError,
)
from tune.export import export_gguf_lora
from tune.serve import lora_model_spec
from tune.train import TrainProgress, TrainResult, train_lora

__all__ = [
    "BaseNotLoadable",
    "DatasetError",
    "DatasetSummary",
    "ExportError",
    "NotEnoughDisk",
    "PrepareProgress",
    "TooFewRows",
    "TrainProgress",
    "TrainResult",
    "TrainingCancelled",
    "TrainingFailed",
    "TuneError",
    "check_dataset",
    "export_gguf_lora",
    "gguf_sha256",
    "is_prepared",
    "lora_model_spec",
    "prepare_base",
    "train_lora",
]
