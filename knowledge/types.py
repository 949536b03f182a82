"""The small data model of the knowledge base: documents, ingest results, progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

FileStatus = Literal["added", "replaced", "skipped", "refused"]


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    """One document in a server's knowledge base."""

    id: str
    name: str
    chunks: int
    bytes: int
    uploader: str
    added_at: datetime
    content_hash: str


@dataclass(frozen=True, slots=True)
class FileResult:
    """What happened to one file of an upload."""

    name: str
    status: FileStatus
    reason: str | None = None  # why it was refused or skipped, in words a person can act on
    chunks: int = 0
    bytes: int = 0
    document_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "refused"

    def describe(self) -> str:
        """One line for a person: `name: added (12 passages)`."""
        if self.status in ("added", "replaced"):
            return f"{self.name}: {self.status} ({self.chunks} passage{'s' if self.chunks != 1 else ''})"
        return f"{self.name}: {self.status} — {self.reason}" if self.reason else f"{self.name}: {self.status}"


@dataclass(slots=True)
class IngestReport:
    """Per-file results of one upload, in the order the files were given."""

    results: list[FileResult] = field(default_factory=list)

    def by_status(self, status: FileStatus) -> list[FileResult]:
        """The results with this status."""
        return [r for r in self.results if r.status == status]

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.results if r.status in ("added", "replaced"))

    def summary(self) -> str:
        """A short multi-line summary for a person."""
        counts = {s: len(self.by_status(s)) for s in ("added", "replaced", "skipped", "refused")}
        head = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing to do"
        lines = [f"{head} — {self.chunks} passage{'s' if self.chunks != 1 else ''} stored."]
        lines += [r.describe() for r in self.results]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    """Where an upload stands; `chunks_total` grows while later files are still being read."""

    files_done: int
    files_total: int
    chunks_done: int
    chunks_total: int
    current: str | None = None
    finished: FileResult | None = None  # set when this update reports a file that just finished

    def describe(self) -> str:
        """One line for a progress message."""
        line = f"{self.files_done}/{self.files_total} files, {self.chunks_done}/{self.chunks_total} passages embedded"
        return f"{line} — {self.current}" if self.current and self.files_done < self.files_total else line


ProgressCallback = Callable[[ProgressUpdate], None]
