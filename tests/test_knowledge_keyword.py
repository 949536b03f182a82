"""The keyword index: tokens that keep codes whole, and BM25 ranking."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from knowledge.keyword import BM25Index, tokenize


def test_codes_are_kept_whole_and_split() -> None:
    assert tokenize("Error E-4711 in v2.3.1") == [
        "error",
        "e-4711",
        "e",
        "4711",
        "in",
        "v2.3.1",
        "v2",
        "3",
        "1",
    ]


def test_accents_and_case_are_folded() -> None:
    assert tokenize("Détartrage ÜBER Straße") == tokenize("detartrage uber strasse")


def test_exact_code_ranks_its_passage_first() -> None:
    texts = [
        "Error E-4711 means the lid is open.",
        "Error E-4712 means the motor overheated.",
        "The lid of the blender is open.",
    ]
    hits = BM25Index(texts).search("what is E-4712", 3)
    assert hits[0].row == 1
    assert hits[0].coverage > hits[-1].coverage


def test_words_nobody_used_match_nothing() -> None:
    index = BM25Index(["alpha beta", "gamma delta"])
    assert index.search("zeta", 5) == []
    assert BM25Index([]).search("alpha", 5) == []


def test_coverage_is_one_when_every_query_word_is_present() -> None:
    index = BM25Index(["refund within thirty days", "shipping takes three days"])
    hit = index.search("refund days", 1)[0]
    assert hit.row == 0 and abs(hit.coverage - 1.0) < 1e-6


@given(
    st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=30),
    st.text(max_size=30),
    st.integers(1, 10),
)
def test_search_returns_sorted_rows_that_share_a_token(
    texts: list[str], query: str, n: int
) -> None:
    index = BM25Index(texts)
    hits = index.search(query, n)
    assert len(hits) <= n
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    terms = set(tokenize(query))
    for hit in hits:
        assert terms & set(tokenize(texts[hit.row]))
        assert 0 < hit.coverage <= 1 + 1e-6


def test_big_indexes_score_common_words_only_for_leading_candidates() -> None:
    # 6,000 passages share the common words; each has one word of its own.
    texts = [f"the blender manual says how to clean the jar item{i} carefully" for i in range(6000)]
    texts[4321] += " descale"
    index = BM25Index(texts)
    hits = index.search("how do I descale the jar of item4321", 5)
    assert (
        hits[0].row == 4321 and 0.2 < hits[0].coverage < 0.5
    )  # "do", "i", "of" are in no passage: they count fully
    # Passages sharing only common words with a query that has specific ones are not candidates.
    assert [h.row for h in hits] == [4321]
    exact = sorted(
        range(6000), key=lambda r: -len(set(tokenize(texts[r])) & {"item17", "the", "jar"})
    )[0]
    assert index.search("the jar item17", 1)[0].row == exact == 17
    # A query of common words only still finds passages.
    assert len(index.search("the jar", 3)) == 3
