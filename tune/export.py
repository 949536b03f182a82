"""A peft LoRA adapter written as a GGUF LoRA that llama.cpp loads next to its base GGUF.

llama.cpp's adapter format: `general.type = "adapter"`, `adapter.type = "lora"`,
`adapter.lora.alpha`, the base's `general.architecture`, and for every adapted weight
`W` of the base (by its GGUF name, like `blk.0.attn_q.weight`) two tensors
`<W>.lora_a` (rank x in) and `<W>.lora_b` (out x rank), so that llama.cpp adds
`alpha / rank * B @ A` to `W`. The GGUF names come from the `gguf` package's own
tensor-name tables (`gguf.get_tensor_name_map`), which map Hugging Face names to GGUF ones.

transformers reorders the rows of some weights when it loads a GGUF (for `llama`: the
query and key projections, from GGUF's rotary layout back to Hugging Face's), so the
adapter was trained in that order: the same rows of B are put back in GGUF's order
here. `A` is untouched, since `P @ (B @ A) = (P @ B) @ A`.

Runs in the caller's process: numpy, safetensors and gguf only, no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from chains.gguf import GGUFError, read_gguf_info, read_gguf_tensors
from tune.errors import ExportError

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")

# transformers' GGUF loader changes weights for these architectures
# (transformers.modeling_gguf_pytorch_utils.TENSOR_PROCESSORS); a test keeps this in step.
# Only the norms or convolutions, which LoRA on linear layers never touches:
LINEAR_UNCHANGED = frozenset(
    {
        "nemotron",
        "gemma2",
        "gemma3",
        "lfm2",
        "qwen2moe",
        "qwen3moe",
        "gpt_oss",
        "minimax-m2",
        "t5",
        "t5encoder",
    }
)
# Linear layers reordered (llama: rows of the query and key projections):
ROWS_PERMUTED = frozenset({"llama"})
# Fused or transposed linear layers, not handled here:
UNSUPPORTED = frozenset({"bloom", "gpt2", "mamba"})


def llama_permute(rows: npt.NDArray[Any], n_head: int) -> npt.NDArray[Any]:
    """Hugging Face's row order of a query/key projection to GGUF's (the inverse of transformers' load).

    Within each head the rows go from [first half, second half] to interleaved pairs.
    """
    out = rows.shape[0]
    return (
        rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def _row_fix(
    arch: str, metadata: dict[str, Any]
) -> Callable[[str, npt.NDArray[Any]], npt.NDArray[Any]]:
    """How to put an adapted weight's B rows (by GGUF name) into GGUF's order for this architecture."""
    if arch in UNSUPPORTED:
        raise ExportError(
            f"Exporting a LoRA for `{arch}` models to GGUF is not supported (their attention "
            "weights are fused or transposed in GGUF); choose a Llama, Qwen, Gemma or Phi base."
        )
    if arch not in ROWS_PERMUTED:
        return lambda _name, b: b
    heads = metadata.get(f"{arch}.attention.head_count")
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads <= 0 or kv_heads <= 0:
        raise ExportError(f"The base GGUF does not say how many attention heads `{arch}` has.")

    def fix(name: str, b: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if ".attn_q." in name:
            return llama_permute(b, heads)
        if ".attn_k." in name:
            return llama_permute(b, kv_heads)
        return b

    return fix


def gguf_name_map(arch: str, blocks: int) -> Any:
    """The `gguf` package's Hugging Face -> GGUF tensor-name map for an architecture."""
    import gguf

    by_name = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ExportError(f"The gguf package does not know the architecture `{arch}`.")
    return gguf.get_tensor_name_map(by_name[arch], blocks)


def gguf_tensor_name(name_map: Any, hf_weight: str) -> str | None:
    """The GGUF name of a Hugging Face weight (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`)."""
    found = name_map.get_name(hf_weight, try_suffixes=(".weight", ".bias"))
    return str(found) if found else None


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """The peft adapter's config and tensors (as numpy), with one-line errors."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ExportError(
            f"{adapter_dir} is not a peft LoRA adapter (it needs adapter_config.json and "
            "adapter_model.safetensors); train one first."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"Cannot read the adapter in {adapter_dir} ({exc}).") from None
    return config, tensors


def _scale_alpha(config: dict[str, Any]) -> tuple[int, float]:
    """The rank and the alpha llama.cpp needs for the same scale (it always uses alpha / rank)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(
            f"Only LoRA adapters can be exported (this one is {config.get('peft_type')})."
        )
    refused = [
        what
        for what, present in (
            ("DoRA", config.get("use_dora")),
            ("modules_to_save", config.get("modules_to_save")),
            ("alpha_pattern", config.get("alpha_pattern")),
            ("rank_pattern", config.get("rank_pattern")),
            ("trained biases", config.get("bias", "none") != "none"),
            ("fan_in_fan_out", config.get("fan_in_fan_out")),
        )
        if present
    ]
    if refused:
        raise ExportError(
            f"llama.cpp's LoRA format cannot hold {', '.join(refused)}; train without it."
        )
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r)
    return rank, alpha


def export_gguf_lora(adapter_dir: Path, base_gguf: Path, out_path: Path) -> Path:
    """Write the peft adapter in `adapter_dir` as a GGUF LoRA for `base_gguf`; returns `out_path`.

    Every adapted weight must exist in the base GGUF with the adapter's shape; the file is
    written next to `out_path` and renamed into place, so a failure leaves nothing behind.
    """
    import gguf

    base_gguf, out_path = Path(base_gguf), Path(out_path)
    try:
        info = read_gguf_info(base_gguf)
        base_shapes = {t.name: t.shape for t in read_gguf_tensors(base_gguf)}
    except GGUFError as exc:
        raise ExportError(f"The base model cannot be read: {exc}") from None
    arch = info.architecture
    if not arch:
        raise ExportError(f"{base_gguf} does not name its architecture (general.architecture).")
    config, tensors = read_adapter(Path(adapter_dir))
    rank, alpha = _scale_alpha(config)
    blocks = info.metadata.get(f"{arch}.block_count")
    name_map = gguf_name_map(arch, blocks if isinstance(blocks, int) else 0)
    fix_rows = _row_fix(arch, info.metadata)

    pairs: dict[str, dict[str, npt.NDArray[Any]]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise ExportError(
                f"The adapter has a tensor llama.cpp cannot use ({key}); only LoRA on linear "
                "layers can be exported."
            )
        pairs.setdefault(match["module"], {})[match["ab"]] = value
    written: list[tuple[str, npt.NDArray[Any], npt.NDArray[Any]]] = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ExportError(f"The adapter's {module} lacks its lora_A or lora_B tensor.")
        name = gguf_tensor_name(name_map, module + ".weight")
        if name is None or name not in base_shapes:
            raise ExportError(
                f"The adapter changes {module}, which has no counterpart in {base_gguf.name}; "
                "was it trained on another base?"
            )
        a, b = pair["A"], pair["B"]
        # GGUF lists dimensions innermost first: a weight (out x in) is (in, out).
        in_features, out_features = base_shapes[name][0], base_shapes[name][1]
        if a.shape != (a.shape[0], in_features) or b.shape != (out_features, a.shape[0]):
            raise ExportError(
                f"The adapter's {module} ({tuple(b.shape)} x {tuple(a.shape)}) does not fit "
                f"{name} of {base_gguf.name} ({out_features} x {in_features}); was it trained on another base?"
            )
        written.append((name, a, fix_rows(name, b)))
    if not written:
        raise ExportError(f"The adapter in {adapter_dir} holds no LoRA weights.")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{info.name or base_gguf.stem} LoRA")
        for name, a, b in written:
            # f16 as llama.cpp's own converter writes them: half the size, no loss that matters.
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float16))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out_path
