"""One upload into one server's collection: read, split, embed and store, a file at a time.

Every file goes in whole or not at all, and one bad file never sinks the rest of its
batch. The upload runs as a small pipeline of threads: a reader checks, reads and
splits files; the calling thread encodes passages in length-sorted batches that span
file boundaries; a writer stores each file as soon as all its passages are encoded, so
storing overlaps with encoding. Progress goes out through a callback from whichever
thread made it.

`KnowledgeBase` (knowledge/base.py) opens the collection, holds the server's lock around
an upload and refreshes its search indexes afterwards; everything here is synchronous
and runs in worker threads.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.errors import UserError
from knowledge.embeddings import Embedder
from knowledge.loaders import RefusedFile, check_size, is_supported, parse
from knowledge.splitter import Chunk, split_sections
from knowledge.types import (
    DocumentInfo,
    FileResult,
    FileStatus,
    ProgressCallback,
    ProgressUpdate,
    uploader_text,
)

log = logging.getLogger(__name__)

_EMBED_BATCH = (
    64  # passages per encode call: big enough to batch well, small enough for steady progress
)
# Passages are sorted by length within a window before batching (as sentence-transformers does
# within one call), so a batch pads little; the window spans files.
_EMBED_WINDOW = 1024


@dataclass(slots=True)
class Item:
    """One file to ingest: its name, size and how to read it.

    Made by `checked_item` (or refused or skipped outright), so the name and size have
    been checked once, before anything is read.
    """

    name: str
    size: int
    read: Callable[[], bytes]
    refused: str | None = None
    skipped: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """What an upload may bring: per file, per server, and how long a passage may be."""

    max_file_bytes: int
    max_guild_bytes: int
    chunk_chars: int


@dataclass(slots=True)
class Progress:
    """Counters shared by the pipeline's threads; every change is reported through `emit`."""

    files_total: int
    emit: ProgressCallback | None
    files_done: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    current: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(
        self,
        *,
        finished: FileResult | None = None,
        chunks_done: int = 0,
        chunks_total: int = 0,
        current: str | None = None,
    ) -> None:
        with self.lock:
            self.files_done += finished is not None
            self.chunks_done += chunks_done
            self.chunks_total += chunks_total
            self.current = current or self.current
            snapshot = ProgressUpdate(
                self.files_done,
                self.files_total,
                self.chunks_done,
                self.chunks_total,
                self.current,
                finished,
            )
        if self.emit is not None:
            self.emit(snapshot)


@dataclass(slots=True)
class _Prepared:
    """A file read, checked and split, waiting for its vectors."""

    index: int
    name: str
    data_hash: str
    size: int
    chunks: list[Chunk]
    replaces: DocumentInfo | None
    doc_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    vectors: list[Any] = field(default_factory=list)
    done: int = 0
    refused: bool = False

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.chunks)

    @property
    def embedded(self) -> bool:
        return self.done == len(self.chunks)


def precheck(name: str, size: int, max_file_bytes: int) -> str | None:
    """Why a file of this name and size would be refused, known before reading it (None if it may go ahead)."""
    try:
        check_size(name, size, max_file_bytes)
        if not is_supported(name):
            parse(
                name, b"", max_bytes=max_file_bytes
            )  # raises the refusal that lists the supported types
    except RefusedFile as exc:
        return exc.message
    return None


def checked_item(name: str, size: int, read: Callable[[], bytes], max_file_bytes: int) -> Item:
    """A file to ingest, refused at once if its name or size rules it out."""
    return Item(name, size, read, refused=precheck(name, size, max_file_bytes))


def items_from_bytes(files: Sequence[tuple[str, bytes]], max_file_bytes: int) -> list[Item]:
    """The files to ingest from (name, content) pairs."""
    return [checked_item(name, len(data), _reader(data), max_file_bytes) for name, data in files]


def _reader(data: bytes) -> Callable[[], bytes]:
    """A reader for bytes already in memory."""
    return lambda: data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Upload:
    """One upload of `items` into `collection`; `run()` once, from a worker thread."""

    def __init__(
        self,
        collection: Any,
        embedder: Embedder,
        limits: Limits,
        *,
        uploader_name: str,
        uploader_id: int | None,
        store_page: int,
        emit: ProgressCallback | None,
    ) -> None:
        """`store_page`: passages per write to the collection (Chroma caps a batch)."""
        self.collection = collection
        self.embedder = embedder
        self.limits = limits
        self.uploader_name = uploader_name
        self.uploader_id = uploader_id
        self.store_page = store_page
        self.emit = emit

    def run(self, items: list[Item], docs: dict[str, DocumentInfo]) -> list[FileResult]:
        """Ingest the files; one result per item, in order. `docs`: the collection's documents by name."""
        state = Progress(files_total=len(items), emit=self.emit)
        results: list[FileResult | None] = [None] * len(items)

        def finish(index: int, result: FileResult) -> None:
            results[index] = result
            state.update(finished=result)

        prepared_q: queue.Queue[_Prepared | None] = queue.Queue(maxsize=64)
        abort = threading.Event()
        reader = threading.Thread(
            target=self._read_files,
            args=(items, docs, prepared_q, finish, state, abort),
            name="knowledge-reader",
            daemon=True,
        )
        reader.start()
        try:
            self._embed_and_store(prepared_q, docs, finish, state)
        finally:
            abort.set()  # an unexpected error above must not leave the reader blocked on a full queue
            reader.join()
        return [
            r if r is not None else FileResult(items[i].name, "refused", "was not processed")
            for i, r in enumerate(results)
        ]

    def _embed_and_store(
        self,
        prepared_q: queue.Queue[_Prepared | None],
        docs: dict[str, DocumentInfo],
        finish: Callable[[int, FileResult], None],
        state: Progress,
    ) -> None:
        """Encode passages in length-sorted windows across files; hand each finished file to the writer."""
        writes: list[Future[None]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowledge-writer") as writer:
            pending: deque[_Prepared] = deque()
            waiting: list[tuple[_Prepared, int]] = []  # (file, chunk number) not yet embedded
            done_reading = False
            while True:
                # Fill a window across files, but start on a good share of one rather than wait for a slow reader.
                while not done_reading and len(waiting) < _EMBED_WINDOW:
                    try:
                        item = prepared_q.get(block=len(waiting) < _EMBED_WINDOW // 4)
                    except queue.Empty:
                        break
                    if item is None:
                        done_reading = True
                    else:
                        pending.append(item)
                        waiting.extend((item, n) for n in range(len(item.chunks)))
                if not waiting:
                    if done_reading:
                        break
                    continue
                window, waiting = waiting[:_EMBED_WINDOW], waiting[_EMBED_WINDOW:]
                window.sort(key=lambda pn: len(pn[0].chunks[pn[1]].text), reverse=True)
                for start in range(0, len(window), _EMBED_BATCH):
                    batch = [
                        (p, n) for p, n in window[start : start + _EMBED_BATCH] if not p.refused
                    ]
                    if batch:
                        self._embed_batch(batch, finish, state)
                while pending and (pending[0].embedded or pending[0].refused):
                    ready = pending.popleft()
                    if not ready.refused:
                        writes.append(writer.submit(self._commit, ready, docs, finish))
                waiting = [(p, n) for p, n in waiting if not p.refused]
            for write in writes:
                write.result()

    def _read_files(
        self,
        items: list[Item],
        docs: dict[str, DocumentInfo],
        out: queue.Queue[_Prepared | None],
        finish: Callable[[int, FileResult], None],
        state: Progress,
        abort: threading.Event,
    ) -> None:
        """Reader thread: read and split each file; decide add, replace, skip or refuse.

        Names and sizes were checked when the items were made (`checked_item`); what is
        read is checked again by `parse`, as a file may not be the size it claimed.
        """

        def put(item: _Prepared | None) -> bool:
            while not abort.is_set():
                try:
                    out.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        limits = self.limits
        try:
            by_hash = {d.content_hash: d for d in docs.values()}
            total = sum(d.bytes for d in docs.values())
            for index, item in enumerate(items):
                state.update(current=item.name)
                if item.refused or item.skipped:
                    status: FileStatus = "refused" if item.refused else "skipped"
                    finish(index, FileResult(item.name, status, item.refused or item.skipped))
                    continue
                try:
                    data = item.read()
                    digest = sha256(data)
                    same = by_hash.get(digest)
                    if same is not None:
                        why = (
                            "unchanged since it was added"
                            if same.name == item.name
                            else f"same content as {same.name}, which is already in the knowledge base"
                        )
                        finish(index, FileResult(item.name, "skipped", why, document_id=same.id))
                        continue
                    replaces = docs.get(item.name)
                    after = total - (replaces.bytes if replaces else 0) + len(data)
                    if after > limits.max_guild_bytes:
                        raise RefusedFile(
                            f"{item.name} would bring this server's knowledge base to {after / 1048576:.1f} MB, over its {limits.max_guild_bytes / 1048576:.0f} MB limit. Remove some documents first."
                        )
                    chunks = split_sections(
                        parse(item.name, data, max_bytes=limits.max_file_bytes), limits.chunk_chars
                    )
                    if not chunks:
                        raise RefusedFile(f"{item.name} has no readable text.")
                except RefusedFile as exc:
                    finish(index, FileResult(item.name, "refused", exc.message))
                    continue
                except OSError as exc:
                    finish(
                        index,
                        FileResult(
                            item.name,
                            "refused",
                            f"{item.name} could not be read ({exc.strerror or exc}).",
                        ),
                    )
                    continue
                except Exception as exc:  # a parser bug must not sink the batch
                    log.exception("reading %s failed", item.name)
                    finish(
                        index,
                        FileResult(
                            item.name,
                            "refused",
                            f"{item.name} could not be read ({type(exc).__name__}).",
                        ),
                    )
                    continue
                total = after
                prepared = _Prepared(index, item.name, digest, len(data), chunks, replaces)
                # Later files of the batch see this one (same name twice, or duplicate content).
                placeholder = DocumentInfo(
                    id=prepared.doc_id,
                    name=item.name,
                    chunks=len(chunks),
                    bytes=len(data),
                    uploader_name="",
                    uploader_id=None,
                    added_at=datetime.now(UTC),
                    content_hash=digest,
                )
                by_hash[digest] = placeholder
                docs[item.name] = placeholder
                state.update(chunks_total=len(chunks), current=item.name)
                if not put(prepared):
                    return
        finally:
            put(None)

    def _embed_batch(
        self,
        batch: list[tuple[_Prepared, int]],
        finish: Callable[[int, FileResult], None],
        state: Progress,
    ) -> None:
        """Encode one batch of passages; a failure refuses only the files that fail on their own."""
        try:
            parts = [(batch, self.embedder.embed_documents([p.chunks[n].text for p, n in batch]))]
        except Exception:
            # Retry file by file so one bad file does not sink the others in its batch.
            groups: dict[int, list[tuple[_Prepared, int]]] = {}
            for prepared, n in batch:
                groups.setdefault(id(prepared), []).append((prepared, n))
            parts = []
            for group in groups.values():
                try:
                    parts.append(
                        (group, self.embedder.embed_documents([p.chunks[n].text for p, n in group]))
                    )
                except Exception as exc:
                    prepared = group[0][0]
                    if isinstance(exc, UserError):
                        reason = exc.message
                    else:
                        log.exception("embedding %s failed", prepared.name)
                        reason = f"embedding failed ({type(exc).__name__}: {exc})"
                    prepared.refused = True
                    finish(prepared.index, FileResult(prepared.name, "refused", reason))
        for part, vectors in parts:
            for (prepared, n), vector in zip(part, vectors, strict=True):
                prepared.vectors[n] = vector
                prepared.done += 1
        state.update(chunks_done=sum(len(part) for part, _ in parts))

    def _commit(
        self,
        prepared: _Prepared,
        docs: dict[str, DocumentInfo],
        finish: Callable[[int, FileResult], None],
    ) -> None:
        """Writer thread: store one file's passages, then drop the version it replaces."""
        collection = self.collection
        now = time.time()
        ids = [f"{prepared.doc_id}-{n}" for n in range(len(prepared.chunks))]
        metadatas: list[dict[str, Any]] = []
        uploader: dict[str, Any] = {
            "uploader_name": self.uploader_name,
            # The one-text form older versions read; a process still running one may share this Chroma server.
            "uploader": uploader_text(self.uploader_name, self.uploader_id),
        }
        if self.uploader_id is not None:
            uploader["uploader_id"] = self.uploader_id  # Chroma metadata holds no None
        for n, chunk in enumerate(prepared.chunks):
            meta: dict[str, Any] = {
                "doc_id": prepared.doc_id,
                "name": prepared.name,
                "position": n,
                **uploader,
                "added_at": now,
                "hash": sha256(chunk.text.encode())[:16],
                "doc_hash": prepared.data_hash,
                "doc_bytes": prepared.size,
                "doc_chunks": len(prepared.chunks),
            }
            if chunk.location:
                meta["location"] = chunk.location
            metadatas.append(meta)
        step = self.store_page
        try:
            for start in range(0, len(ids), step):
                stop = start + step
                collection.add(
                    ids=ids[start:stop],
                    embeddings=[v for v in prepared.vectors[start:stop]],
                    documents=[c.text for c in prepared.chunks[start:stop]],
                    metadatas=metadatas[start:stop],
                )
        except Exception as exc:
            log.exception("storing %s failed", prepared.name)
            self._undo(
                prepared,
                docs,
                finish,
                f"{prepared.name} could not be stored ({type(exc).__name__})",
            )
            return
        if prepared.replaces is not None:
            try:
                collection.delete(where={"doc_id": prepared.replaces.id})
            except Exception as exc:
                # Keep the old version rather than two: undo the new one.
                log.exception("dropping the old version of %s failed", prepared.name)
                self._undo(
                    prepared,
                    docs,
                    finish,
                    f"{prepared.name} could not replace the stored version ({type(exc).__name__})",
                )
                return
        status: FileStatus = "replaced" if prepared.replaces is not None else "added"
        finish(
            prepared.index,
            FileResult(
                prepared.name, status, None, len(prepared.chunks), prepared.size, prepared.doc_id
            ),
        )

    def _undo(
        self,
        prepared: _Prepared,
        docs: dict[str, DocumentInfo],
        finish: Callable[[int, FileResult], None],
        refusal: str,
    ) -> None:
        """Remove what was stored of this file, keep the version it was to replace, and refuse it."""
        try:
            self.collection.delete(where={"doc_id": prepared.doc_id})
        except Exception:
            log.exception("could not remove the new version of %s", prepared.name)
        if prepared.replaces is not None:
            docs[prepared.name] = prepared.replaces
        finish(
            prepared.index,
            FileResult(prepared.name, "refused", f"{refusal}; the knowledge base is unchanged."),
        )
