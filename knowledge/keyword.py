"""The keyword half of hybrid retrieval: an in-memory BM25 index per server.

Why in memory and not SQLite FTS5: the index is derived entirely from the Chroma
collection (its documents), so it needs no file of its own to keep in step, works the same
with an embedded Chroma and a Chroma server, and keeps SQL out of this package. It is
built from the collection on first use and rebuilt after every change (see
`knowledge.base`), which takes well under a second for ordinary servers (~2 s at 100k passages).
Scoring is a handful of numpy operations over per-term posting arrays, so a query
costs about a millisecond even at 100k passages.

Tokens are lower-cased, accent-folded word runs; codes such as `E-4711` or `v2.3.1` are
kept whole as well as split, so exact names, codes and numbers match.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+(?:[-./:_]\w+)*")
_K1 = 1.2
_B = 0.75
_PRUNE_AT = 5000  # passages; smaller indexes are always scored exactly
_COMMON_SHARE = 0.05  # a word in more than this share of passages counts as common


_COMBINING = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")
_SPLIT = re.compile(r"[-./:_]")


def tokenize(text: str) -> list[str]:
    """Lower-cased, accent-folded tokens; compound codes are kept whole and split."""
    folded = text.casefold()
    if not folded.isascii():
        folded = _COMBINING.sub("", unicodedata.normalize("NFKD", folded))
    tokens: list[str] = []
    for word in _WORD.findall(folded):
        tokens.append(word)
        if not word.isalnum():
            tokens.extend(p for p in _SPLIT.split(word) if p)
    return tokens


@dataclass(frozen=True, slots=True)
class KeywordHit:
    """One passage the keywords matched: its row, BM25 score, and the share of the query it covers."""

    row: int
    score: float
    coverage: float  # 0..1: idf-weighted share of the query's terms found in the passage


class BM25Index:
    """BM25 over a fixed list of passages; rows are positions in the list it was built from.

    Postings are stored term-major (CSR): for term `t`, rows `_rows[_starts[t]:_starts[t+1]]`
    with their precomputed BM25 weights, so a query touches only its terms' postings.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self.size = len(texts)
        vocab: dict[str, int] = {}
        flat: list[int] = []
        lengths = np.zeros(self.size, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [vocab.setdefault(token, len(vocab)) for token in tokenize(text)]
            lengths[row] = len(ids)
            flat.extend(ids)
        self._vocab = vocab
        n = max(self.size, 1)
        terms = np.asarray(flat, dtype=np.int64)
        docs = np.repeat(np.arange(self.size, dtype=np.int64), lengths)
        # One (term, row) key per token; counting equal keys gives term frequencies, sorted by term.
        keys, tf = np.unique(terms * n + docs, return_counts=True)
        term_of = keys // n
        self._rows = (keys % n).astype(np.int64)
        self._starts = np.searchsorted(term_of, np.arange(len(vocab) + 1))
        df = np.diff(self._starts).astype(np.float64)
        self._idf = np.log(1 + (self.size - df + 0.5) / (df + 0.5))
        avg = float(lengths.mean()) if self.size else 1.0
        norm = _K1 * (1 - _B + _B * lengths / max(avg, 1e-9))
        tf = tf.astype(np.float64)
        self._weights = (self._idf[term_of] * tf * (_K1 + 1) / (tf + norm[self._rows])).astype(
            np.float32
        )
        # A query word no passage contains counts as the rarest possible term.
        self._unseen_idf = math.log(1 + (self.size + 0.5) / 0.5)

    def _postings(self, tid: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._starts[tid], self._starts[tid + 1]
        return self._rows[lo:hi], self._weights[lo:hi]

    def search(self, query: str, n: int) -> list[KeywordHit]:
        """The best `n` passages for the query's words, best first."""
        if not self.size or n <= 0:
            return []
        known: list[int] = []
        total_idf = 0.0
        for term in set(tokenize(query)):
            tid = self._vocab.get(term)
            if tid is None:
                total_idf += self._unseen_idf
            else:
                known.append(tid)
                total_idf += float(self._idf[tid])
        if not known:
            return []
        # In a big collection, words found in a large share of passages ("the", "how") would
        # touch most rows while adding little: score the specific words over the whole
        # collection, then add the common ones to the leading candidates only.
        common: list[int] = []
        scan = known
        if self.size >= _PRUNE_AT:
            limit = self.size * _COMMON_SHARE
            specific = [t for t in known if self._starts[t + 1] - self._starts[t] <= limit]
            if specific:
                scan = specific
                common = [t for t in known if t not in specific]
        scores = np.zeros(self.size, dtype=np.float32)
        for tid in scan:
            rows, weights = self._postings(tid)
            scores[rows] += weights
        candidates = np.flatnonzero(scores)
        if not len(candidates):
            return []
        keep = max(4 * n, 50) if common else n
        if len(candidates) > keep:
            candidates = candidates[np.argpartition(-scores[candidates], keep - 1)[:keep]]
        top_scores = scores[candidates].astype(np.float64)
        for tid in common:
            top_scores += self._lookup(tid, candidates)
        order = np.argsort(-top_scores, kind="stable")[:n]
        rows = candidates[order]
        covered = np.zeros(len(rows), dtype=np.float64)
        for tid in known:
            covered += np.where(self._lookup(tid, rows) > 0, self._idf[tid], 0.0)
        return [
            KeywordHit(int(r), float(top_scores[i]), float(c / total_idf))
            for r, i, c in zip(rows, order, covered, strict=True)
        ]

    def _lookup(self, tid: int, rows: np.ndarray) -> np.ndarray:
        """The term's BM25 weight in each of `rows` (0 where it does not occur); postings are sorted by row."""
        posting_rows, weights = self._postings(tid)
        at = np.searchsorted(posting_rows, rows)
        at_clipped = np.minimum(at, len(posting_rows) - 1)
        found = (at < len(posting_rows)) & (posting_rows[at_clipped] == rows)
        return np.where(found, weights[at_clipped], 0.0)
