"""KnowledgeBase: per-server document collections in Chroma, hybrid retrieval, safe uploads.

One Chroma collection per server (guild), named `<prefix>guild-<id>`, so no server can ever
retrieve another's passages and queries never pay for a `where` filter. The collection's
metadata records the embedding model (a mismatch is a clear error naming
`switchboard knowledge reindex`) and a `revision` token that changes on every write, which
other processes sharing a Chroma server use to notice that their keyword index is stale.

Documents are not kept anywhere else: every chunk carries its document's id, name, size,
chunk count, uploader (name and id), time and content hash in its metadata, and the
document list is read from the first chunk of each document.

Every blocking step (parsing, embedding, Chroma calls) runs in worker threads, never on
the event loop. Uploads are `knowledge.ingest.Upload`; ranking is `knowledge.ranking.fuse`
over a vector search and the keyword index kept here.

Two locks per server, so that retrieval never waits for an upload:
- the *write lock* lets one change at a time (an upload, a removal, a reindex) read the
  document list, write, bump the revision and rebuild the keyword index; searches never
  take it;
- the *index lock* lets one thread at a time build the server's keyword index (a search
  that finds none, or finds it stale, or a change that just finished), and the others
  use what it built. It is taken inside the write lock, never the other way round.
A search during an upload sees what Chroma holds at that moment: the files stored so far,
none of those still being embedded (only while a file is being written can a search catch
it part-way: one of more than a write's worth of passages, or next to the version it
replaces). A keyword index built then carries the revision from before the upload, so the
upload's new revision replaces it when the upload ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import ConfigError, NotFound, UserError
from core.messages import Source
from knowledge.config import KnowledgeConfig
from knowledge.embeddings import Embedder, create_embedder
from knowledge.ingest import (
    Item,
    Limits,
    Progress,
    Upload,
    checked_item,
    items_from_bytes,
)
from knowledge.keyword import BM25Index
from knowledge.paths import items_from_paths
from knowledge.ranking import Hit, SearchMode, fuse
from knowledge.types import (
    DocumentInfo,
    IngestReport,
    ProgressCallback,
    ProgressUpdate,
    RemoteFile,
    parse_uploader,
)

log = logging.getLogger(__name__)

_INDEX_RECHECK_S = 1.0  # how stale another process's writes may look to this one's keyword index
_PAGE = 5000  # passages per read or write of a collection (capped by Chroma's own batch limit)
_BACKGROUND_REBUILD_AT = 20_000  # passages; smaller keyword indexes rebuild in well under a second
# Who added a document, once that person asked to be forgotten.
FORGOTTEN_UPLOADER = "(forgotten)"


@dataclass(slots=True)
class _IndexEntry:
    index: BM25Index
    ids: list[str]
    texts: list[str]
    metadatas: list[dict[str, Any]]
    revision: str
    checked_at: float


def _new_revision() -> str:
    return uuid.uuid4().hex


class KnowledgeBase:
    """The per-server knowledge bases; cheap to construct, opens Chroma and the embedder on first use."""

    def __init__(
        self,
        config: KnowledgeConfig,
        *,
        embedder: Embedder | None = None,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        """`on_loaded` is called after each heavy part (Chroma's client, a local embedding
        model) has loaded on first use: what it brought lives until the process exits."""
        self._config = config
        self._embedder = embedder
        self._on_loaded = on_loaded
        self._client: Any = None
        self._lock = threading.Lock()
        self._collections: dict[int, Any] = {}
        self._write_locks: dict[int, threading.Lock] = defaultdict(threading.Lock)
        self._index_locks: dict[int, threading.Lock] = defaultdict(threading.Lock)
        self._indexes: dict[int, _IndexEntry] = {}
        self._rebuilding: set[int] = set()
        # How stale another process's writes may look here; tests set 0.
        self.index_recheck_s = _INDEX_RECHECK_S

    # -- set-up -----------------------------------------------------------------------

    @property
    def config(self) -> KnowledgeConfig:
        """Where the collections live, the upload limits and the retrieval cut-offs in use."""
        return self._config

    @property
    def embedder(self) -> Embedder:
        """The embedder in use (created on first use; the model itself loads on first encode)."""
        with self._lock:
            if self._embedder is None:
                self._embedder = create_embedder(self._config.embedding, on_load=self._on_loaded)
            return self._embedder

    def collection_name(self, guild_id: int) -> str:
        """The Chroma collection that holds this server's passages."""
        return f"{self._config.collection_prefix}guild-{guild_id}"

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import chromadb
                from chromadb.config import Settings as ChromaSettings

                chroma_settings = ChromaSettings(anonymized_telemetry=False)
                host, port = self._config.chroma_host, self._config.chroma_port
                if host:
                    try:
                        self._client = chromadb.HttpClient(
                            host=host, port=port, settings=chroma_settings
                        )
                    except Exception as exc:  # chromadb raises plain ValueError/ConnectError here
                        raise ConfigError(
                            f"Cannot reach the Chroma server at {host}:{port} ({exc}). Start it, or unset CHROMA_HOST to use the embedded store."
                        ) from exc
                else:
                    path = self._config.chroma_path
                    path.mkdir(parents=True, exist_ok=True)
                    self._client = chromadb.PersistentClient(
                        path=str(path), settings=chroma_settings
                    )
                if self._on_loaded is not None:
                    self._on_loaded()
            return self._client

    def _open(self, guild_id: int, *, create: bool, check_model: bool = True) -> Any | None:
        """The server's collection (None if it has none and `create` is false)."""
        from chromadb.errors import NotFoundError

        with self._lock:
            cached = self._collections.get(guild_id)
        if cached is not None:
            return cached
        client = self._get_client()
        name = self.collection_name(guild_id)
        try:
            collection = client.get_collection(name, embedding_function=None)
        except NotFoundError:
            collection = self._recover_reindex(client, name)
            if collection is None:
                if not create:
                    return None
                collection = self._create(client, name, guild_id)
        model = (collection.metadata or {}).get("embedding_model")
        if check_model and model != self.embedder.name:
            if collection.count() == 0:
                # Nothing to re-embed: start the empty collection afresh for the new model.
                client.delete_collection(name)
                collection = self._create(client, name, guild_id)
            else:
                raise ConfigError(
                    f"This server's knowledge base was embedded with {model}, but the bot is configured for {self.embedder.name}. "
                    f"Run `switchboard knowledge reindex --guild {guild_id}` to re-embed it with the new model, or change the embedding settings back."
                )
        if check_model:
            with self._lock:
                self._collections[guild_id] = collection
        return collection

    def _create(self, client: Any, name: str, guild_id: int) -> Any:
        metadata = {
            "embedding_model": self.embedder.name,
            "revision": _new_revision(),
            "guild_id": str(guild_id),
        }
        return client.get_or_create_collection(
            name,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine"}},
            metadata=metadata,
        )

    def _recover_reindex(self, client: Any, name: str) -> Any | None:
        """Finish a reindex that stopped between dropping the old collection and renaming the new one."""
        from chromadb.errors import NotFoundError

        try:
            pending = client.get_collection(f"{name}-reindex", embedding_function=None)
        except NotFoundError:
            return None
        pending.modify(name=name)
        return client.get_collection(name, embedding_function=None)

    def _bump_revision(self, guild_id: int, collection: Any) -> None:
        metadata = dict(collection.metadata or {})
        metadata["revision"] = _new_revision()
        metadata.pop("hnsw:space", None)
        collection.modify(metadata=metadata)

    # -- documents --------------------------------------------------------------------

    def _documents_sync(self, collection: Any) -> list[DocumentInfo]:
        result = collection.get(where={"position": 0}, include=["metadatas"])
        docs = [_document_info(m) for m in result["metadatas"] or []]
        return sorted(docs, key=lambda d: (d.name.casefold(), d.added_at))

    async def list_documents(self, guild_id: int) -> list[DocumentInfo]:
        """The server's documents, by name."""

        def work() -> list[DocumentInfo]:
            collection = self._open(guild_id, create=False)
            return [] if collection is None else self._documents_sync(collection)

        return await asyncio.to_thread(work)

    async def remove(self, guild_id: int, document: str) -> DocumentInfo:
        """Remove a document (by name or id) and all its passages; NotFound if there is none."""
        return await asyncio.to_thread(self._remove_sync, guild_id, document)

    def _remove_sync(self, guild_id: int, document: str) -> DocumentInfo:
        with self._write_locks[guild_id]:
            collection = self._open(guild_id, create=False)
            docs = [] if collection is None else self._documents_sync(collection)
            doc = _find_document(docs, document)
            if doc is None or collection is None:
                raise NotFound(
                    f"There is no document called {document!r} in this server's knowledge base. `/knowledge list` shows what is there."
                )
            collection.delete(where={"doc_id": doc.id})
            self._bump_revision(guild_id, collection)
            with self._index_locks[guild_id]:
                self._rebuild_index(guild_id, collection)
            return doc

    async def forget_uploader(self, uploader_id: int | None, name: str | None = None) -> int:
        """Take a person off the documents they added, in every server; how many documents.

        A document keeps its passages; its uploader becomes FORGOTTEN_UPLOADER with no id.
        It matches on `uploader_id`, and, given a `name`, also on documents added under
        that name without an id (the terminal knows people by a name alone).
        """
        if uploader_id is None and not name:
            return 0
        return await asyncio.to_thread(self._forget_uploader_sync, uploader_id, name)

    def _forget_uploader_sync(self, uploader_id: int | None, name: str | None) -> int:
        client = self._get_client()
        prefix = self.collection_name(0)[:-1]  # "<prefix>guild-"
        guilds = []
        for item in client.list_collections():
            suffix = str(getattr(item, "name", item)).removeprefix(prefix)
            if suffix != str(getattr(item, "name", item)) and suffix.isdigit():
                guilds.append(int(suffix))
        forgotten = 0
        for guild_id in sorted(guilds):
            with self._write_locks[guild_id]:
                collection = self._open(guild_id, create=False, check_model=False)
                if collection is None:
                    continue
                theirs = [
                    doc
                    for doc in self._documents_sync(collection)
                    if (uploader_id is not None and doc.uploader_id == uploader_id)
                    or (name and doc.uploader_id is None and doc.uploader_name == name)
                ]
                for doc in theirs:
                    ids = collection.get(where={"doc_id": doc.id}, include=[])["ids"]
                    for start in range(0, len(ids), _PAGE):
                        page = ids[start : start + _PAGE]
                        # None removes a metadata key (Chroma merges what update is given).
                        anonymous = {
                            "uploader_name": FORGOTTEN_UPLOADER,
                            "uploader": FORGOTTEN_UPLOADER,
                            "uploader_id": None,
                        }
                        collection.update(ids=page, metadatas=[anonymous] * len(page))
                if theirs:
                    self._bump_revision(guild_id, collection)
                    with self._index_locks[guild_id]:
                        self._rebuild_index(guild_id, collection)
                forgotten += len(theirs)
        return forgotten

    # -- uploads ----------------------------------------------------------------------

    # Who added the files: `uploader` is their name, `uploader_id` their Discord user id
    # (None from the terminal, which knows only a name).

    async def add_files(
        self,
        guild_id: int,
        paths: Sequence[Path],
        *,
        uploader: str,
        uploader_id: int | None = None,
        progress: ProgressCallback | None = None,
        follow_symlinks: bool = False,
    ) -> IngestReport:
        """Add files and folders (recursively); one result per file, never raising for one bad file.

        Links inside folders are never followed (each is reported as skipped, with where it
        points); a path given here that is itself a link is read only with `follow_symlinks`.
        """
        items = await asyncio.to_thread(
            items_from_paths,
            paths,
            self._config.max_file_bytes,
            follow_symlinks=follow_symlinks,
        )
        return await self._ingest(guild_id, items, _Uploader(uploader, uploader_id), progress)

    async def add_bytes(
        self,
        guild_id: int,
        files: Sequence[tuple[str, bytes]],
        *,
        uploader: str,
        uploader_id: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> IngestReport:
        """Add files given as (name, content) pairs."""
        items = items_from_bytes(files, self._config.max_file_bytes)
        return await self._ingest(guild_id, items, _Uploader(uploader, uploader_id), progress)

    async def add_remote(
        self,
        guild_id: int,
        files: Sequence[RemoteFile],
        *,
        uploader: str,
        uploader_id: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> IngestReport:
        """Add files that must be fetched first (Discord attachments); one report, in the order given.

        Each file's name and size are checked once, before it is fetched: what is too big or
        of the wrong type is never downloaded. A fetch that raises UserError refuses that file.
        """
        items = [
            await self._fetch(file) for file in files
        ]  # one at a time, as the files are read later
        return await self._ingest(guild_id, items, _Uploader(uploader, uploader_id), progress)

    async def _fetch(self, file: RemoteFile) -> Item:
        item = checked_item(file.name, file.size, bytes, self._config.max_file_bytes)
        if item.refused is not None:
            return item
        try:
            data = await file.read()
        except UserError as exc:
            item.refused = exc.message
            return item
        item.size, item.read = len(data), lambda: data
        return item

    async def _ingest(
        self,
        guild_id: int,
        items: list[Item],
        uploader: _Uploader,
        progress: ProgressCallback | None,
    ) -> IngestReport:
        emit = _threadsafe(progress) if progress is not None else None
        return await asyncio.to_thread(self._ingest_sync, guild_id, items, uploader, emit)

    def _ingest_sync(
        self, guild_id: int, items: list[Item], uploader: _Uploader, emit: ProgressCallback | None
    ) -> IngestReport:
        """Run the upload under the server's write lock; a new revision and keyword index if anything went in.

        Searches go on meanwhile: they never take the write lock (see the module's docstring).
        """
        config = self._config
        limits = Limits(config.max_file_bytes, config.max_guild_bytes, config.chunk_chars)
        with self._write_locks[guild_id]:
            collection = self._open(guild_id, create=True)
            docs = {d.name: d for d in self._documents_sync(collection)}
            upload = Upload(
                collection,
                self.embedder,
                limits,
                uploader_name=uploader.name,
                uploader_id=uploader.id,
                store_page=min(_PAGE, self._max_batch()),
                emit=emit,
            )
            results = upload.run(items, docs)
            if any(r.status in ("added", "replaced") for r in results):
                self._bump_revision(guild_id, collection)
                with self._index_locks[guild_id]:
                    self._rebuild_index(guild_id, collection)
        return IngestReport(results)

    def _max_batch(self) -> int:
        try:
            return int(self._get_client().get_max_batch_size())
        except Exception:
            return 1000

    # -- retrieval --------------------------------------------------------------------

    async def search(
        self, guild_id: int, query: str, k: int = 5, *, mode: SearchMode = "hybrid"
    ) -> list[Source]:
        """The top `k` passages for a query with their scores, without the relevance cut-off."""
        return await self._hybrid(guild_id, query, k, cutoff=None, mode=mode)

    async def retrieve(self, guild_id: int, query: str) -> list[Source]:
        """The passages to put into a prompt: hybrid search, top-k, relevance cut-off."""
        return await self._hybrid(
            guild_id, query, self._config.top_k, cutoff=self._config.min_relevance, mode="hybrid"
        )

    async def _hybrid(
        self, guild_id: int, query: str, k: int, *, cutoff: float | None, mode: SearchMode
    ) -> list[Source]:
        if not query.strip() or k <= 0:
            return []
        with self._lock:
            collection = self._collections.get(guild_id)
        if collection is None:
            collection = await asyncio.to_thread(self._open, guild_id, create=False)
            if collection is None:
                return []
        candidates = max(4 * k, 20)
        vector_task = (
            asyncio.to_thread(self._vector_hits, collection, query, candidates)
            if mode != "keyword"
            else _none()
        )
        keyword_task = (
            asyncio.to_thread(self._keyword_hits, guild_id, collection, query, candidates)
            if mode != "vector"
            else _none()
        )
        vector, keyword = await asyncio.gather(vector_task, keyword_task)
        return fuse(vector or [], keyword or [], k=k, cutoff=cutoff)

    def _vector_hits(self, collection: Any, query: str, n: int) -> list[Hit]:
        vector = self.embedder.embed_query(query)
        result = collection.query(
            query_embeddings=[vector], n_results=n, include=["documents", "metadatas", "distances"]
        )
        hits = []
        for chunk_id, text, meta, distance in zip(
            result["ids"][0],
            result["documents"][0],
            result["metadatas"][0],
            result["distances"][0],
            strict=True,
        ):
            hits.append(Hit(chunk_id, text or "", meta or {}, similarity=1.0 - float(distance)))
        return hits

    def _keyword_hits(self, guild_id: int, collection: Any, query: str, n: int) -> list[Hit]:
        entry = self._index_for(guild_id, collection)
        return [
            Hit(entry.ids[h.row], entry.texts[h.row], entry.metadatas[h.row], coverage=h.coverage)
            for h in entry.index.search(query, n)
        ]

    def _index_for(self, guild_id: int, collection: Any) -> _IndexEntry:
        """The server's keyword index, rebuilt when this or another process changed the collection."""
        with self._lock:
            entry = self._indexes.get(guild_id)
        now = time.monotonic()
        if entry is not None and now - entry.checked_at < self.index_recheck_s:
            return entry
        if entry is not None:
            revision = self._current_revision(guild_id)
            entry.checked_at = now
            if revision == entry.revision:
                return entry
            if entry.index.size >= _BACKGROUND_REBUILD_AT:
                # Another process changed a big collection: answer from the old index while a new one is built.
                self._rebuild_in_background(guild_id, collection, entry)
                return entry
        return self._fresh_index(guild_id, collection, stale=entry)

    def _fresh_index(
        self, guild_id: int, collection: Any, *, stale: _IndexEntry | None
    ) -> _IndexEntry:
        """Build the server's keyword index, or use the one another thread built while this one waited."""
        with self._index_locks[guild_id]:
            with self._lock:
                entry = self._indexes.get(guild_id)
            if entry is not None and entry is not stale:
                return entry
            return self._rebuild_index(guild_id, collection)

    def _rebuild_in_background(self, guild_id: int, collection: Any, stale: _IndexEntry) -> None:
        with self._lock:
            if guild_id in self._rebuilding:
                return
            self._rebuilding.add(guild_id)

        def work() -> None:
            try:
                self._fresh_index(guild_id, collection, stale=stale)
            except Exception:
                log.exception("rebuilding the keyword index of guild %s failed", guild_id)
            finally:
                with self._lock:
                    self._rebuilding.discard(guild_id)

        threading.Thread(target=work, name=f"knowledge-index-{guild_id}", daemon=True).start()

    def _current_revision(self, guild_id: int) -> str | None:
        from chromadb.errors import NotFoundError

        try:
            return (
                self._get_client()
                .get_collection(self.collection_name(guild_id), embedding_function=None)
                .metadata
                or {}
            ).get("revision")
        except NotFoundError:
            return None

    def _rebuild_index(self, guild_id: int, collection: Any) -> _IndexEntry:
        """Read the collection into a new keyword index; the caller holds the server's index lock.

        The revision is read first: a write that lands while the passages are read leaves
        the index marked with the revision before it, so the next check rebuilds it.
        """
        revision = self._current_revision(guild_id) or ""
        ids: list[str] = []
        texts: list[str] = []
        metadatas: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = collection.get(include=["documents", "metadatas"], limit=_PAGE, offset=offset)
            ids.extend(page["ids"])
            texts.extend(t or "" for t in page["documents"])
            metadatas.extend(m or {} for m in page["metadatas"])
            if len(page["ids"]) < _PAGE:
                break
            offset += _PAGE
        entry = _IndexEntry(BM25Index(texts), ids, texts, metadatas, revision, time.monotonic())
        with self._lock:
            self._indexes[guild_id] = entry
        return entry

    # -- maintenance ------------------------------------------------------------------

    async def reindex(self, guild_id: int, progress: ProgressCallback | None = None) -> int:
        """Re-embed every passage of a server with the configured model; the number of passages."""
        emit = _threadsafe(progress) if progress is not None else None
        return await asyncio.to_thread(self._reindex_sync, guild_id, emit)

    def _reindex_sync(self, guild_id: int, emit: ProgressCallback | None) -> int:
        with self._write_locks[guild_id]:
            with self._lock:
                self._collections.pop(guild_id, None)
                self._indexes.pop(guild_id, None)
            old = self._open(guild_id, create=False, check_model=False)
            if old is None:
                return 0
            client = self._get_client()
            name = self.collection_name(guild_id)
            rows: list[tuple[str, str, dict[str, Any]]] = []
            offset = 0
            while True:
                page = old.get(include=["documents", "metadatas"], limit=_PAGE, offset=offset)
                rows.extend(
                    zip(
                        page["ids"],
                        (t or "" for t in page["documents"]),
                        (m or {} for m in page["metadatas"]),
                        strict=True,
                    )
                )
                if len(page["ids"]) < _PAGE:
                    break
                offset += _PAGE
            docs = {m.get("doc_id") for _, _, m in rows}
            state = Progress(files_total=len(docs), emit=emit, chunks_total=len(rows))
            staging_name = f"{name}-reindex"
            try:
                client.delete_collection(staging_name)
            except Exception:
                pass  # nothing left over from an earlier attempt
            staging = self._create(client, staging_name, guild_id)
            step = min(_PAGE, self._max_batch(), 256)
            for start in range(0, len(rows), step):
                batch = rows[start : start + step]
                vectors = self.embedder.embed_documents([text for _, text, _ in batch])
                staging.add(
                    ids=[i for i, _, _ in batch],
                    embeddings=list(vectors),
                    documents=[t for _, t, _ in batch],
                    metadatas=[m for _, _, m in batch],
                )
                state.update(chunks_done=len(batch))
            # No search may build an index, or keep a handle, from the collection being replaced.
            with self._index_locks[guild_id]:
                client.delete_collection(name)
                staging.modify(name=name)
                with self._lock:
                    self._collections.pop(guild_id, None)
                    self._indexes.pop(guild_id, None)
                collection = self._open(guild_id, create=False)
                self._rebuild_index(guild_id, collection)
            return len(rows)

    async def aclose(self) -> None:
        """Forget the open collections and indexes (the Chroma client holds no sockets to close)."""
        with self._lock:
            self._collections.clear()
            self._indexes.clear()
            self._client = None


async def _none() -> None:
    return None


@dataclass(frozen=True, slots=True)
class _Uploader:
    name: str
    id: int | None


def _document_info(meta: dict[str, Any]) -> DocumentInfo:
    if "uploader_name" in meta:
        uploader_id = meta.get("uploader_id")
        name, person = (
            str(meta["uploader_name"]),
            int(uploader_id) if uploader_id is not None else None,
        )
    else:
        name, person = parse_uploader(
            str(meta.get("uploader", ""))
        )  # stored before the two were separate
    return DocumentInfo(
        id=str(meta.get("doc_id", "")),
        name=str(meta.get("name", "")),
        chunks=int(meta.get("doc_chunks", 0)),
        bytes=int(meta.get("doc_bytes", 0)),
        uploader_name=name,
        uploader_id=person,
        added_at=datetime.fromtimestamp(float(meta.get("added_at", 0.0)), UTC),
        content_hash=str(meta.get("doc_hash", "")),
    )


def _find_document(docs: list[DocumentInfo], wanted: str) -> DocumentInfo | None:
    """Match by exact name, then id, then a unique case-insensitive name."""
    for doc in docs:
        if doc.name == wanted:
            return doc
    for doc in docs:
        if doc.id == wanted:
            return doc
    folded = [d for d in docs if d.name.casefold() == wanted.strip().casefold()]
    return folded[0] if len(folded) == 1 else None


def _threadsafe(callback: ProgressCallback) -> ProgressCallback:
    """Wrap a progress callback so worker threads call it on the event loop's thread."""
    loop = asyncio.get_running_loop()

    def emit(update: ProgressUpdate) -> None:
        loop.call_soon_threadsafe(callback, update)

    return emit
