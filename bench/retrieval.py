"""retrieval: p50 latency of `KnowledgeBase.retrieve` vs. a bare Chroma query plus one encode.

Two servers' collections are filled with 10,000 and 100,000 English-like passages (common
words plus a Zipf-distributed long tail of rarer ones, as real text has) in the
knowledge base's own format (stored vectors are random unit vectors: embedding 100k
passages here would take hours, and HNSW search costs the same). The service side is the
whole of `retrieve` as the chat service calls it from the event loop: encoding the
question, the vector query, the BM25 keyword search, reciprocal-rank fusion and the
relevance cut-off. The baseline is what any retrieval must do at least: one
`SentenceTransformer.encode` of the question plus one `collection.query` with a
precomputed embedding (top-k, documents and metadata included), timed inside a worker
thread so that no thread hop is counted against it. The two alternate question by
question; the keyword index is built before timing starts.

Last line: `retrieval: ratio X (goal <= 1.3)`, X = the worse of the two sizes' p50 ratios.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench._corpus import WORDS, passages, rare_words
from bot.app import knowledge_config
from core.settings import Settings
from knowledge.base import KnowledgeBase
from knowledge.embeddings import LocalEmbedder

SIZES = (10_000, 100_000)
QUERIES = 150
WARMUP = 15
GOAL = 1.3
BATCH = 5000


def fill(kb: KnowledgeBase, guild_id: int, size: int, seed: int) -> None:
    """Store `size` passages straight into the server's collection, as uploads would have."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).standard_normal((size, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    collection = kb._open(guild_id, create=True)  # the bench fills the real collection directly
    for start in range(0, size, BATCH):
        stop = min(start + BATCH, size)
        texts = passages(rng, stop - start)
        metadatas = []
        for n in range(start, stop):
            doc, position = divmod(n, 20)
            metadatas.append(
                {
                    "doc_id": f"doc{doc}",
                    "name": f"doc-{doc}.md",
                    "position": position,
                    "uploader": "bench",
                    "added_at": 0.0,
                    "hash": f"{n:016x}",
                    "doc_hash": f"{doc:064x}",
                    "doc_bytes": 12000,
                    "doc_chunks": 20,
                    "location": f"## Section {position}",
                }
            )
        collection.add(
            ids=[f"doc{n // 20}-{n % 20}" for n in range(start, stop)],
            embeddings=vectors[start:stop],
            documents=texts,
            metadatas=metadatas,
        )
    kb._bump_revision(guild_id, collection)


def questions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    starts = ("How do I", "What is the", "Why does the", "When should I", "Where can I find the")
    out = []
    for _ in range(count):
        words = " ".join(
            [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            + rare_words(rng, rng.randint(1, 2))
        )
        code = f" {rng.choice('ABCDEFGH')}-{rng.randint(100, 9999)}" if rng.random() < 0.3 else ""
        out.append(f"{rng.choice(starts)} {words}{code}?")
    return out


async def measure(
    kb: KnowledgeBase, model: object, guild_id: int, top_k: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    collection = kb._open(guild_id, create=False)
    service: list[float] = []
    encode: list[float] = []
    query: list[float] = []
    for n, question in enumerate(questions(WARMUP + QUERIES, seed=guild_id)):

        def bare(question: str = question) -> tuple[float, float]:
            start = time.perf_counter()
            vector = model.encode(
                [question],
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )[0]  # type: ignore[attr-defined]
            encoded = time.perf_counter()
            collection.query(
                query_embeddings=[vector],
                n_results=top_k,
                include=["documents", "metadatas", "distances"],
            )
            return encoded - start, time.perf_counter() - encoded

        async def ours(question: str = question) -> float:
            start = time.perf_counter()
            await kb.retrieve(guild_id, question)
            return time.perf_counter() - start

        # Alternate which side goes first, so neither always meets a warmer cache.
        # The baseline is timed inside a worker thread (no hop counted), where encoding runs as in the service.
        if n % 2:
            s = await ours()
            e, q = await asyncio.to_thread(bare)
        else:
            e, q = await asyncio.to_thread(bare)
            s = await ours()
        if n >= WARMUP:
            service.append(s)
            encode.append(e)
            query.append(q)
    baseline = [e + q for e, q in zip(encode, query, strict=True)]
    return service, baseline, encode, query


async def run() -> float:
    console = Console()
    worst = 0.0
    table = Table(title="retrieval latency, p50 (ms)")
    for column in ("passages", "retrieve()", "encode + query", "encode", "query", "ratio"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-retrieval-") as tmp:
        settings = Settings().model_copy(
            update={
                "data_dir": Path(tmp),
                "chroma_host": None,
                "knowledge_collection_prefix": "bench-",
                "embedding_provider": "local",
                "embedding_model": None,
            }
        )
        embedder = LocalEmbedder()
        kb = KnowledgeBase(knowledge_config(settings), embedder=embedder)
        with console.status("loading the model…"):
            model = embedder.load()
        for guild_id, size in enumerate(SIZES, start=1):
            with console.status(f"storing {size:,} passages…"):
                fill(kb, guild_id, size, seed=guild_id)
            with console.status("building the keyword index…"):
                start = time.perf_counter()
                await kb.retrieve(guild_id, "warm up the keyword index")
                console.print(
                    f"{size:,} passages: keyword index built in {time.perf_counter() - start:.1f} s"
                )
            with console.status(f"timing {QUERIES} questions at {size:,} passages…"):
                service, baseline, encode, query = await measure(
                    kb, model, guild_id, settings.knowledge_top_k
                )
            ratio = statistics.median(service) / statistics.median(baseline)
            worst = max(worst, ratio)
            table.add_row(
                f"{size:,}",
                f"{statistics.median(service) * 1000:.2f}",
                f"{statistics.median(baseline) * 1000:.2f}",
                f"{statistics.median(encode) * 1000:.2f}",
                f"{statistics.median(query) * 1000:.2f}",
                f"{ratio:.3f}",
            )
        await kb.aclose()
    console.print(table)
    return worst


def main() -> int:
    ratio = asyncio.run(run())
    print(f"retrieval: ratio {ratio:.3f} (goal <= {GOAL})")
    return 0
