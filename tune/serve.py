"""The registry entry of a local fine-tune: its base's GGUF plus the GGUF LoRA adapter.

Such an entry is served like any local model (`chains.local.LocalServers`): its own
llama.cpp server, started on first use, with the adapter applied to every request.
"""

from __future__ import annotations

from pathlib import Path

from chains.gguf import check_lora, read_gguf_info, resolve_gguf
from chains.registry import Lineage, ModelSpec
from tune.errors import TuneError


def lora_model_spec(
    base: ModelSpec,
    name: str,
    lora: Path,
    *,
    dataset_hash: str | None = None,
    created_by: str | None = None,
    description: str | None = None,
) -> ModelSpec:
    """A ModelSpec named `name` that serves `base` with the adapter `lora` (checked against the base)."""
    if not base.is_local:
        raise TuneError(
            f"`{base.name}` is not a local model (provider {base.provider}); a LoRA adapter "
            "needs a llama.cpp base."
        )
    if base.lora:
        raise TuneError(
            f"`{base.name}` is itself a fine-tune; train on its base `{base.lineage.base_model if base.lineage else '?'}` instead."
        )
    lora = Path(lora).expanduser().resolve()
    base_info = read_gguf_info(resolve_gguf(base))
    check_lora(lora, base_info, name)
    fields = base.model_dump(
        exclude={"name", "model", "lora", "description", "lineage", "origin", "fallback"}
    )
    return ModelSpec(
        **fields,
        name=name,
        model=name,
        lora=str(lora),
        description=description or f"{base.name} fine-tuned locally (LoRA {lora.name}).",
        lineage=Lineage(
            base_model=base.name, source="lora", dataset_hash=dataset_hash, created_by=created_by
        ),
        origin="database",
    )
