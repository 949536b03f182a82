"""Taking lines out of an export after it was made: those built on messages deleted since.

An export written with `sources` has, beside each data file, a sidecar line-aligned with
it (`run.sources_path`): the ids of the logged messages each example was built from.
When forgetting a person or retention deletes messages, `prune` rewrites every data file
of the export without the lines whose sources name any of them, with its sidecar, and
brings the manifest up to date (each file's examples, tokens, bytes and sha256, the
counts, KTO's weights) with a `removed_later` entry: when, why ("forget", "retention",
"deleted", or "catch-up" for deletions found later), how many lines; never whose.

Each file is rewritten to a temporary file beside it, flushed to disk and renamed over
it, so a reader sees the old file or the new one, never a part; a failure before the
renames leaves every file as it was (`PruneError`). An export whose provenance is
unknown (a data file without a sidecar, made before sidecars existed, or a sidecar that
does not line up with its file) cannot be pruned line by line: its data files are
deleted and the manifest says why. Prunes of one export take turns across processes (a
file lock beside the manifest). Blocking: call it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from store.export.manifest import kto_weights
from store.export.run import sources_path

LOCK_TIMEOUT_S = 60.0
# Why lines went, as the manifest records it.
# "catch-up": deletions found missing later (a failed rewrite, another process).
CAUSES = frozenset({"forget", "retention", "deleted", "catch-up"})


class PruneError(Exception):
    """The export could not be rewritten; its files are as they were. One line."""


@dataclass(frozen=True, slots=True)
class PrunedFile:
    """A data file after a prune."""

    name: str
    split: str
    examples: int
    sha256: str
    deleted: bool = False  # deleted whole (its provenance unknown)


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune did to one export."""

    lines: int = 0  # lines taken out of the data files (those deleted whole included)
    deleted: bool = False  # the data files were deleted: their provenance is unknown
    files: tuple[PrunedFile, ...] = ()  # the files changed


@dataclass
class _Rewrite:
    """One data file and its sidecar being rewritten without some lines."""

    entry: dict[str, Any]
    data: Path
    sidecar: Path
    temps: list[Path] = field(default_factory=list)
    removed: int = 0
    kept: int = 0
    tokens: int = 0
    size: int = 0
    sha256: str = ""
    sidecar_size: int = 0
    sidecar_sha256: str = ""
    labels: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})

    def discard(self) -> None:
        for temp in self.temps:
            with contextlib.suppress(OSError):  # one left behind must not hide why it failed
                temp.unlink(missing_ok=True)


class _Unaligned(Exception):
    """A sidecar that does not line up with its data file."""


def export_sources(manifest: Path) -> set[str] | None:
    """Every message id the export's present lines were built from; None when a data file
    has no sidecar (its provenance is unknown). An empty set when nothing is left."""
    data = _read_manifest(manifest)
    if data is None:
        return set()
    found: set[str] = set()
    for entry in data.get("files", []):
        path = manifest.with_name(entry["name"])
        if not path.exists():
            continue
        sidecar = _sidecar(manifest, entry)
        if sidecar is None or not sidecar.exists():
            return None
        with open(sidecar, "rb") as file:
            for line in file:
                found.update(json.loads(line)["sources"])
    return found


def prune(
    manifest: Path, message_ids: Collection[str], cause: str, *, now: datetime
) -> PruneResult:
    """Rewrite the export of `manifest` without the lines built on `message_ids`."""
    if cause not in CAUSES:
        raise ValueError(f"unknown cause {cause!r}")
    if not message_ids:
        return PruneResult()
    try:
        with FileLock(manifest.with_name(f".{manifest.name}.lock"), timeout=LOCK_TIMEOUT_S):
            return _prune(manifest, set(message_ids), cause, now)
    except Timeout:
        raise PruneError(
            f"{manifest.parent} is being rewritten by another process; try again later"
        ) from None
    except OSError as exc:
        raise PruneError(f"cannot rewrite {manifest.parent} ({_reason(exc)})") from None


def _prune(manifest: Path, ids: set[str], cause: str, now: datetime) -> PruneResult:
    data = _read_manifest(manifest)
    if data is None:
        return PruneResult()
    entries = [e for e in data.get("files", []) if manifest.with_name(e["name"]).exists()]
    if not entries:
        return PruneResult()
    kto = "kto" in data
    rewrites: list[_Rewrite] = []
    try:
        for entry in entries:
            sidecar = _sidecar(manifest, entry)
            if sidecar is None or not sidecar.exists():
                raise _Unaligned
            rewrite = _Rewrite(entry, manifest.with_name(entry["name"]), sidecar)
            rewrites.append(rewrite)
            _filter(rewrite, ids, kto=kto)
    except _Unaligned:
        for rewrite in rewrites:
            rewrite.discard()
        return _delete_all(manifest, data, entries, cause, now)
    except BaseException:
        for rewrite in rewrites:
            rewrite.discard()
        raise
    changed = [r for r in rewrites if r.removed]
    for rewrite in rewrites:
        if not rewrite.removed:
            rewrite.discard()
    # A file renamed by a prune whose manifest write then failed: the manifest catches up.
    stale = [r for r in rewrites if not r.removed and r.sha256 != r.entry["sha256"]]
    if not changed:
        if stale:
            _update_entries(stale)
            _recount(data)
            _write_manifest(manifest, data)
        return PruneResult()
    # Both files of each rewrite are on disk before any rename; the data first, so the
    # removed text is gone as early as can be.
    try:
        for rewrite in changed:
            temp_data, temp_sidecar = rewrite.temps
            os.replace(temp_data, rewrite.data)
            os.replace(temp_sidecar, rewrite.sidecar)
    except BaseException:
        for rewrite in changed:
            rewrite.discard()
        raise
    _fsync_folder(manifest.parent)
    _update_entries([*changed, *stale])
    if kto:  # every file was read through: its kept lines' labels are counted
        data["kto"] = kto_weights(
            sum(r.labels[True] for r in rewrites), sum(r.labels[False] for r in rewrites)
        )
    lines = sum(r.removed for r in changed)
    _recount(data)
    data.setdefault("removed_later", []).append(
        {
            "at": now.isoformat(),
            "cause": cause,
            "lines": lines,
            "files": {r.entry["split"]: r.removed for r in changed},
        }
    )
    _write_manifest(manifest, data)
    return PruneResult(
        lines=lines,
        files=tuple(
            PrunedFile(r.entry["name"], r.entry["split"], r.kept, r.sha256) for r in changed
        ),
    )


def _update_entries(rewrites: list[_Rewrite]) -> None:
    """The manifest's entries of these files as they are now on disk."""
    for rewrite in rewrites:
        rewrite.entry.update(
            examples=rewrite.kept, tokens=rewrite.tokens, bytes=rewrite.size, sha256=rewrite.sha256
        )
        rewrite.entry["sources"].update(bytes=rewrite.sidecar_size, sha256=rewrite.sidecar_sha256)


def _filter(rewrite: _Rewrite, ids: set[str], *, kto: bool) -> None:
    """Write the lines of `rewrite.data` not built on `ids` to temporary files."""
    data_temp = temp_path(rewrite.data)
    sidecar_temp = temp_path(rewrite.sidecar)
    rewrite.temps = [data_temp, sidecar_temp]
    data_hash, sidecar_hash = hashlib.sha256(), hashlib.sha256()
    with (
        open(rewrite.data, "rb") as data_in,
        open(rewrite.sidecar, "rb") as sidecar_in,
        open(data_temp, "wb") as data_out,
        open(sidecar_temp, "wb") as sidecar_out,
    ):
        for line, source in _aligned(data_in, sidecar_in):
            try:
                entry = json.loads(source)
                built_on = entry["sources"]
                tokens = int(entry["tokens"])
                label = bool(json.loads(line).get("label")) if kto else None
            except (ValueError, KeyError, TypeError, AttributeError):
                raise _Unaligned from None
            if not ids.isdisjoint(built_on):
                rewrite.removed += 1
                continue
            data_out.write(line)
            sidecar_out.write(source)
            data_hash.update(line)
            sidecar_hash.update(source)
            rewrite.kept += 1
            rewrite.tokens += tokens
            rewrite.size += len(line)
            rewrite.sidecar_size += len(source)
            if label is not None:
                rewrite.labels[label] += 1
        for out in (data_out, sidecar_out):
            out.flush()
            os.fsync(out.fileno())
    rewrite.sha256 = data_hash.hexdigest()
    rewrite.sidecar_sha256 = sidecar_hash.hexdigest()


def _aligned(data: IO[bytes], sidecar: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The data file's lines with their sidecar lines; _Unaligned when the counts differ."""
    for line in data:
        source = sidecar.readline()
        if not source:
            raise _Unaligned
        yield line, source
    if sidecar.readline():
        raise _Unaligned


def _delete_all(
    manifest: Path,
    data: dict[str, Any],
    entries: list[dict[str, Any]],
    cause: str,
    now: datetime,
) -> PruneResult:
    """Delete the data files of an export whose lines cannot be traced (the cautious way:
    they may hold what was deleted), keeping the manifest, which says why."""
    lines = 0
    files: list[PrunedFile] = []
    for entry in entries:
        path = manifest.with_name(entry["name"])
        path.unlink(missing_ok=True)
        sidecar = _sidecar(manifest, entry)
        if sidecar is not None:
            sidecar.unlink(missing_ok=True)
        lines += int(entry.get("examples", 0))
        files.append(PrunedFile(entry["name"], entry["split"], 0, entry["sha256"], deleted=True))
        entry["deleted"] = True  # its examples and sha256 stay: the record of what it was
    _fsync_folder(manifest.parent)
    data.setdefault("removed_later", []).append(
        {
            "at": now.isoformat(),
            "cause": cause,
            "lines": lines,
            "files": {entry["split"]: int(entry.get("examples", 0)) for entry in entries},
            "deleted": True,
            "why": "the data files recorded no sources, so the lines built on deleted "
            "messages could not be told apart: every line went",
        }
    )
    _recount(data)
    _write_manifest(manifest, data)
    return PruneResult(lines=lines, deleted=True, files=tuple(files))


def _recount(data: dict[str, Any]) -> None:
    """The manifest's counts from its files' (a deleted file counts nothing)."""
    counts = data.setdefault("counts", {})
    present = [e for e in data.get("files", []) if not e.get("deleted")]
    counts["examples"] = sum(int(e["examples"]) for e in present)
    counts["tokens"] = sum(int(e["tokens"]) for e in present)
    for entry in data.get("files", []):
        if entry["split"] in ("train", "validation"):
            counts[entry["split"]] = 0 if entry.get("deleted") else int(entry["examples"])


def _sidecar(manifest: Path, entry: dict[str, Any]) -> Path | None:
    sources = entry.get("sources")
    if not isinstance(sources, dict):
        return None
    path = manifest.with_name(str(sources["name"]))
    # Only ever the sidecar of this very file (a manifest edited by hand is not trusted).
    return path if path == sources_path(manifest.with_name(entry["name"])) else None


def _read_manifest(manifest: Path) -> dict[str, Any] | None:
    try:
        with open(manifest, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise PruneError(f"{manifest} is not a manifest ({exc})") from None
    return data if isinstance(data, dict) else None


def _write_manifest(manifest: Path, data: dict[str, Any]) -> None:
    temp = temp_path(manifest)
    try:
        with open(temp, "w", encoding="utf-8") as file:
            file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, manifest)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_folder(manifest.parent)


def temp_path(path: Path) -> Path:
    """Where `path` is rewritten before it is renamed over it."""
    return path.with_name(f".{path.name}.{os.getpid()}.prune.tmp")


def _fsync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
