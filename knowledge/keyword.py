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
        self._weights = (self._idf[term_of] * tf * (_K1 + 1) / (tf + norm[self._rows])).astype(np.float32)
        # A query word no passage contains counts as the rarest possible term.
        self._unseen_idf = math.log(1 + (self.size + 0.5) / 0.5)

    def search(self, query: str, n: int) -> list[KeywordHit]:
        """The best `n` passages for the query's words, best first."""
        terms = set(tokenize(query))
        if not terms or not self.size or n <= 0:
            return []
        scores = np.zeros(self.size, dtype=np.float32)
        covered = np.zeros(self.size, dtype=np.float32)
        total_idf = 0.0
        for term in terms:
            tid = self._vocab.get(term)
            if tid is None:
                total_idf += self._unseen_idf
                continue
            idf = float(self._idf[tid])
            total_idf += idf
            lo, hi = self._starts[tid], self._starts[tid + 1]
            rows = self._rows[lo:hi]
            scores[rows] += self._weights[lo:hi]
            covered[rows] += idf
        candidates = np.flatnonzero(scores)
        if not len(candidates):
            return []
        if len(candidates) > n:
            top = candidates[np.argpartition(-scores[candidates], n - 1)[:n]]
        else:
            top = candidates
        top = top[np.argsort(-scores[top], kind="stable")]
        return [KeywordHit(int(r), float(scores[r]), float(covered[r] / total_idf)) for r in top]
