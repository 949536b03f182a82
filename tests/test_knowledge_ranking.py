"""Fusing the vector and keyword rankings: order, size, cut-off and relevance."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from knowledge.ranking import COVERAGE_WEIGHT, RRF_K, Hit, fuse


def vector_hit(chunk_id: str, similarity: float) -> Hit:
    return Hit(chunk_id, f"text of {chunk_id}", {"name": f"{chunk_id}.md"}, similarity=similarity)


def keyword_hit(chunk_id: str, coverage: float) -> Hit:
    return Hit(
        chunk_id,
        f"text of {chunk_id}",
        {"name": f"{chunk_id}.md", "location": "§1"},
        coverage=coverage,
    )


def test_a_passage_both_rankings_found_comes_first() -> None:
    vector = [vector_hit("a", 0.9), vector_hit("b", 0.8)]
    keyword = [keyword_hit("b", 1.0), keyword_hit("c", 0.5)]
    sources = fuse(vector, keyword, k=3, cutoff=None)
    assert [s.chunk_id for s in sources] == ["b", "a", "c"]
    # Relevance is the better of similarity and weighted coverage.
    assert [s.score for s in sources] == [0.8, 0.9, round(0.5 * COVERAGE_WEIGHT, 4)]
    assert sources[0].document == "b.md" and sources[2].location == "§1"


def test_the_cutoff_drops_weak_passages_and_k_limits_the_rest() -> None:
    vector = [vector_hit(c, s) for c, s in [("a", 0.9), ("b", 0.2), ("c", 0.7), ("d", 0.6)]]
    assert [s.chunk_id for s in fuse(vector, [], k=2, cutoff=0.5)] == ["a", "c"]
    assert [s.chunk_id for s in fuse(vector, [], k=10, cutoff=0.5)] == ["a", "c", "d"]
    assert fuse([], [], k=5, cutoff=None) == []


ids = st.sampled_from([f"p{i}" for i in range(12)])
scores = st.floats(min_value=0.0, max_value=1.0)
rankings = st.lists(st.tuples(ids, scores), unique_by=lambda pair: pair[0], max_size=10)


@given(rankings, rankings, st.integers(min_value=1, max_value=8), st.none() | scores)
def test_fused_results_are_ranked_bounded_and_above_the_cutoff(
    vector_pairs: list[tuple[str, float]],
    keyword_pairs: list[tuple[str, float]],
    k: int,
    cutoff: float | None,
) -> None:
    vector = [vector_hit(c, s) for c, s in vector_pairs]
    keyword = [keyword_hit(c, s) for c, s in keyword_pairs]
    sources = fuse(vector, keyword, k=k, cutoff=cutoff)

    found = [s.chunk_id for s in sources]
    assert len(found) == len(set(found)) <= k
    assert set(found) <= {c for c, _ in vector_pairs} | {c for c, _ in keyword_pairs}

    def fused(chunk_id: str) -> float:
        ranks = [r for r, (c, _) in enumerate(vector_pairs, 1) if c == chunk_id]
        ranks += [r for r, (c, _) in enumerate(keyword_pairs, 1) if c == chunk_id]
        return sum(1.0 / (RRF_K + r) for r in ranks)

    assert [fused(c) for c in found] == sorted((fused(c) for c in found), reverse=True)
    if cutoff is not None:
        assert all(s.score >= round(cutoff, 4) - 1e-4 for s in sources)
    else:
        # Without a cut-off, nothing is left out but for k.
        assert len(found) == min(k, len({c for c, _ in vector_pairs + keyword_pairs}))
