"""The small data model of the knowledge base: documents, files to add, ingest results, progress."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

FileStatus = Literal["added", "replaced", "skipped", "refused"]

# How chunks stored before uploader_id/uploader_name existed name their uploader: "name (id)".
_LEGACY_UPLOADER = re.compile(r"(?P<name>.*) \((?P<id>\d+)\)")


def uploader_text(name: str, uploader_id: int | None) -> str:
    """Who added a document, as the lists show it: "name (id)", or the name alone (the terminal has no id)."""
    return f"{name} ({uploader_id})" if uploader_id is not None else name


def parse_uploader(text: str) -> tuple[str, int | None]:
    """The name and id in an uploader written as one text, "name (id)" or just a name."""
    match = _LEGACY_UPLOADER.fullmatch(text)
    if match is None:
        return text, None
    return match["name"], int(match["id"])


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    """One document in a server's knowledge base."""

    id: str
    name: str
    chunks: int
    bytes: int
    uploader_name: str
    uploader_id: int | None  # the Discord user id; None when added from the terminal
    added_at: datetime
    content_hash: str

    @property
    def uploader(self) -> str:
        """Who added it, as `/knowledge list` and `switchboard knowledge list` show it."""
        return uploader_text(self.uploader_name, self.uploader_id)


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file still to be fetched (a Discord attachment): its name, its announced size, how to read it.

    `read` raises a UserError whose message says why the file could not be fetched; that
    file is then refused with that message and the rest of the upload goes ahead.
    """

    name: str
    size: int
    read: Callable[[], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class FileResult:
    """What happened to one file of an upload."""

    name: str
    status: FileStatus
    reason: str | None = None  # why it was refused or skipped, in words a person can act on
    chunks: int = 0
    bytes: int = 0
    document_id: str | None = None

    def describe(self) -> str:
        """One line for a person: `name: added (12 passages)`."""
        if self.status in ("added", "replaced"):
            return f"{self.name}: {self.status} ({self.chunks} passage{'s' if self.chunks != 1 else ''})"
        return (
            f"{self.name}: {self.status} — {self.reason}"
            if self.reason
            else f"{self.name}: {self.status}"
        )


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


ProgressCallback = Callable[[ProgressUpdate], None]
