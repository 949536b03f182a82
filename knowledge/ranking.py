"""Hybrid ranking: fuse a vector ranking and a keyword ranking into the passages to cite.

Reciprocal-rank fusion orders the passages (it needs no common scale between the two
rankings); the relevance shown to people and compared with the cut-off is the better of
the passage's cosine similarity and its keyword coverage, weighted onto the same scale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.messages import Source

SearchMode = Literal["hybrid", "vector", "keyword"]

RRF_K = 60  # the usual reciprocal-rank-fusion constant
# Keyword coverage is on a different scale from cosine similarity: a passage holding every
# query word (coverage 1) is about as sure a match as a similarity of 0.7.
COVERAGE_WEIGHT = 0.7


@dataclass(slots=True)
class Hit:
    """A passage one ranking found: its similarity (vector search) or coverage (keyword search)."""

    chunk_id: str
    text: str
    metadata: dict[str, Any]
    similarity: float | None = None
    coverage: float | None = None


def fuse(
    vector: Sequence[Hit], keyword: Sequence[Hit], *, k: int, cutoff: float | None
) -> list[Source]:
    """The top `k` passages of both rankings by reciprocal rank, without those under `cutoff` relevance."""
    fused: dict[str, float] = defaultdict(float)
    hits: dict[str, Hit] = {}
    similarity: dict[str, float] = {}
    coverage: dict[str, float] = {}
    for rank, hit in enumerate(vector, start=1):
        fused[hit.chunk_id] += 1.0 / (RRF_K + rank)
        hits[hit.chunk_id] = hit
        similarity[hit.chunk_id] = hit.similarity or 0.0
    for rank, hit in enumerate(keyword, start=1):
        fused[hit.chunk_id] += 1.0 / (RRF_K + rank)
        hits.setdefault(hit.chunk_id, hit)
        coverage[hit.chunk_id] = hit.coverage or 0.0
    sources: list[Source] = []
    for chunk_id in sorted(fused, key=lambda c: fused[c], reverse=True):
        relevance = max(
            similarity.get(chunk_id, 0.0), coverage.get(chunk_id, 0.0) * COVERAGE_WEIGHT
        )
        if cutoff is not None and relevance < cutoff:
            continue
        hit = hits[chunk_id]
        sources.append(
            Source(
                chunk_id,
                str(hit.metadata.get("name", "?")),
                hit.metadata.get("location"),
                round(relevance, 4),
                hit.text,
            )
        )
        if len(sources) == k:
            break
    return sources
