"""Retrieval quality over a labelled question set: recall@k and MRR per search mode."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knowledge.base import KnowledgeBase
from knowledge.ranking import SearchMode


@dataclass(frozen=True, slots=True)
class Quality:
    """Recall@k and mean reciprocal rank (documents as the unit of relevance)."""

    mode: str
    k: int
    recall: float
    mrr: float
    questions: int

    def describe(self) -> str:
        """One line for a report."""
        return f"{self.mode}: recall@{self.k} {self.recall:.3f}, MRR {self.mrr:.3f} over {self.questions} questions"


def load_questions(path: Path) -> list[dict[str, Any]]:
    """The labelled questions of a JSON file with a "questions" list of {q, relevant}."""
    questions: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))["questions"]
    return questions


async def evaluate(
    kb: KnowledgeBase, guild_id: int, questions: list[dict[str, Any]], *, k: int, mode: SearchMode
) -> Quality:
    """Run every question through `search` and score the ranking of relevant documents."""
    hits = 0
    reciprocal = 0.0
    for question in questions:
        relevant = set(question["relevant"])
        sources = await kb.search(guild_id, question["q"], k=k, mode=mode)
        ranks = [n for n, s in enumerate(sources, start=1) if s.document in relevant]
        if ranks:
            hits += 1
            reciprocal += 1.0 / ranks[0]
    count = max(len(questions), 1)
    return Quality(mode, k, hits / count, reciprocal / count, len(questions))
