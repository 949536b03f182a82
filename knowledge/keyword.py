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
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+(?:[-./:_]\w+)*")
_K1 = 1.2
_B = 0.75


def tokenize(text: str) -> list[str]:
    """Lower-cased, accent-folded tokens; compound codes are kept whole and split."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    tokens: list[str] = []
    for match in _WORD.finditer(folded):
        word = match.group(0)
        if any(sep in word for sep in "-./:_"):
            tokens.append(word)
            tokens.extend(p for p in re.split(r"[-./:_]", word) if p)
        else:
            tokens.append(word)
    return tokens


@dataclass(frozen=True, slots=True)
class KeywordHit:
    """One passage the keywords matched: its row, BM25 score, and the share of the query it covers."""

    row: int
    score: float
    coverage: float  # 0..1: idf-weighted share of the query's terms found in the passage


class BM25Index:
    """BM25 over a fixed list of passages; rows are positions in the list it was built from."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.size = len(texts)
        postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        lengths = np.zeros(self.size, dtype=np.float32)
        for row, text in enumerate(texts):
            counts = Counter(tokenize(text))
            lengths[row] = sum(counts.values())
            for term, tf in counts.items():
                postings[term].append((row, tf))
        avg = float(lengths.mean()) if self.size else 1.0
        norm = _K1 * (1 - _B + _B * lengths / max(avg, 1e-9))
        self._rows: dict[str, np.ndarray] = {}
        self._weights: dict[str, np.ndarray] = {}
        self._idf: dict[str, float] = {}
        for term, items in postings.items():
            rows = np.fromiter((r for r, _ in items), dtype=np.int64, count=len(items))
            tf = np.fromiter((t for _, t in items), dtype=np.float32, count=len(items))
            idf = self._idf_for(len(items))
            self._idf[term] = idf
            self._rows[term] = rows
            self._weights[term] = (idf * tf * (_K1 + 1) / (tf + norm[rows])).astype(np.float32)
        # A query word no passage contains counts as the rarest possible term.
        self._unseen_idf = self._idf_for(0)

    def _idf_for(self, df: int) -> float:
        return math.log(1 + (self.size - df + 0.5) / (df + 0.5))

    def search(self, query: str, n: int) -> list[KeywordHit]:
        """The best `n` passages for the query's words, best first."""
        terms = set(tokenize(query))
        if not terms or not self.size:
            return []
        scores = np.zeros(self.size, dtype=np.float32)
        covered = np.zeros(self.size, dtype=np.float32)
        total_idf = 0.0
        for term in terms:
            idf = self._idf.get(term)
            if idf is None:
                total_idf += self._unseen_idf
                continue
            total_idf += idf
            rows = self._rows[term]
            scores[rows] += self._weights[term]
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
