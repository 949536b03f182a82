"""The trainable copy of a GGUF model: converted once, cached by the GGUF's hash.

transformers loads a GGUF (dequantizing it) but cannot train or save the model as
loaded; `prepare_base` has the worker copy its weights into a plain model and save it,
with the GGUF's tokenizer and a training chat template (`tune.template`), in
`cache_dir/<hash>/`. Later calls find it there at once: the file's hash is remembered by
path, size and modification time, so even a large GGUF is not read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from chains.gguf import mem_available_bytes, read_gguf_info, read_gguf_tensors
from tune.errors import NotEnoughDisk, TuneError
from tune.process import default_training_threads, run_worker
from tune.worker import MANIFEST

HASHES = "gguf-hashes.json"
_CHUNK = 8 * 1024 * 1024
# Dequantized to float32; plus the tokenizer and some slack for the filesystem.
_BYTES_PER_WEIGHT = 4
_SLACK_BYTES = 64 * 1024 * 1024
# While converting, the loaded GGUF model and its plain copy are both in memory.
_MEMORY_COPIES = 2.5


class NotEnoughMemory(TuneError):
    """The machine lacks the memory to convert or train this base."""


@dataclass(frozen=True, slots=True)
class PrepareProgress:
    """How far the conversion is: `phase` is loading, copying or saving."""

    phase: str
    step: int
    total: int


def gguf_sha256(path: Path, cache_dir: Path) -> str:
    """The SHA-256 of a GGUF file, remembered in `cache_dir` by path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    index_path = Path(cache_dir) / HASHES
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        index = json.loads(index_path.read_text(encoding="utf-8"))
    known = index.get(str(path))
    if (
        isinstance(known, dict)
        and known.get("size") == stat.st_size
        and known.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(known.get("sha256"), str)
    ):
        return str(known["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    partial = index_path.with_name(f".{HASHES}.{os.getpid()}")
    with contextlib.suppress(OSError):  # only a cache: losing it costs one more read
        partial.write_text(json.dumps(index, indent=1), encoding="utf-8")
        os.replace(partial, index_path)
    return sha


def weight_count(path: Path) -> int:
    """How many weights the GGUF holds (from its tensor table; nothing is loaded)."""
    return sum(t.elements for t in read_gguf_tensors(path))


def is_prepared(base_dir: Path) -> bool:
    """Whether `base_dir` holds a base that `prepare_base` finished."""
    return (Path(base_dir) / MANIFEST).is_file()


def _check_room(gguf_path: Path, cache_dir: Path) -> None:
    """Refuse early when the converted copy cannot fit on disk or in memory."""
    weights = weight_count(gguf_path)
    needed = weights * _BYTES_PER_WEIGHT + _SLACK_BYTES
    free = shutil.disk_usage(cache_dir).free
    gib = 1024**3
    if needed > free:
        raise NotEnoughDisk(
            f"Preparing {gguf_path.name} for training needs about {needed / gib:.1f} GiB in "
            f"{cache_dir}, which has {free / gib:.1f} GiB free. Free some space or move the data folder."
        )
    memory = mem_available_bytes()
    wanted = int(weights * _BYTES_PER_WEIGHT * _MEMORY_COPIES)
    if memory is not None and wanted > memory:
        raise NotEnoughMemory(
            f"Preparing {gguf_path.name} for training needs about {wanted / gib:.1f} GiB of memory "
            f"and {memory / gib:.1f} GiB is available; choose a smaller base model."
        )


def prepare_base(
    gguf_path: Path,
    cache_dir: Path,
    *,
    threads: int | None = None,
    progress: Callable[[PrepareProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """The folder of the plain trainable model made from `gguf_path`, converting it once.

    Blocking (about a minute for the bundled model on 2 cores; instant once cached).
    Processes preparing the same GGUF take turns: the second finds the first's result.
    """
    gguf_path = Path(gguf_path).expanduser()
    info = read_gguf_info(gguf_path)  # a missing or foreign file is one line here
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sha = gguf_sha256(info.path, cache_dir)
    target = cache_dir / f"{info.architecture or 'gguf'}-{sha[:16]}"
    if is_prepared(target):
        return target
    with FileLock(str(cache_dir / f".{target.name}.lock")):
        if is_prepared(target):
            return target
        _check_room(info.path, cache_dir)
        for stale in cache_dir.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a process that died holding the lock
        partial = cache_dir / f".{target.name}.partial-{os.getpid()}"
        partial.mkdir()
        try:
            run_worker(
                ["prepare", "--gguf", str(info.path), "--out", str(partial)],
                what=f"Preparing {info.path.name} for training",
                threads=threads or default_training_threads(),
                on_progress=(
                    None
                    if progress is None
                    else lambda m: progress(
                        PrepareProgress(str(m.get("phase")), int(m["step"]), int(m["total"]))
                    )
                ),
                cancel=cancel,
            )
            shutil.rmtree(target, ignore_errors=True)  # a copy without its manifest: unfinished
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target
