"""The training file: TRL's conversational SFT JSONL, checked before any process starts.

One JSON object per line, `{"messages": [{"role": ..., "content": ...}, ...]}`: roles
`system`, `user` and `assistant`, at least one assistant message, text content. Blank
lines are skipped. Every problem is one line naming the file and the line number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tune.errors import DatasetError, TooFewRows

ROLES = frozenset({"system", "user", "assistant"})
# OpenAI's fine-tuning asks for at least 10 examples too; fewer teach nothing reliably.
MIN_ROWS = 10
_MAX_PROBLEMS_SHOWN = 1


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """What a checked training file holds."""

    path: Path
    rows: int
    sha256: str
    characters: int  # of message content, a rough size for estimates


def check_dataset(path: Path, *, min_rows: int = MIN_ROWS) -> DatasetSummary:
    """Read and check the whole file; raise DatasetError (or TooFewRows) with one line."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"No training file at {path}.") from None
    except OSError as exc:
        raise DatasetError(f"Cannot read the training file {path} ({exc.strerror}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path} is not UTF-8 text (byte {exc.start}); write the file as UTF-8 JSONL."
        ) from None
    rows = 0
    characters = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        characters += _check_row(line, f"{path}, line {number}")
        rows += 1
    if rows < min_rows:
        raise TooFewRows(
            f"{path} has {rows} conversation{'s' if rows != 1 else ''}; training needs at least "
            f"{min_rows}. Collect more examples (or loosen the export's filters) and try again."
        )
    return DatasetSummary(
        path=path.resolve(),
        rows=rows,
        sha256=hashlib.sha256(raw).hexdigest(),
        characters=characters,
    )


def _check_row(line: str, where: str) -> int:
    """One line: a conversation with an assistant turn; returns its characters of content."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg}).") from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise DatasetError(
            f'{where}: expected an object with a "messages" list, '
            'like {"messages": [{"role": "user", "content": "..."}, ...]}.'
        )
    messages = row["messages"]
    characters = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: message {index + 1} is not an object.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(
                f"{where}: message {index + 1} has role {role!r}; use system, user or assistant."
            )
        if not isinstance(content, str):
            raise DatasetError(f"{where}: message {index + 1} has no text content.")
        characters += len(content)
    if not any(m.get("role") == "assistant" and m.get("content", "").strip() for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant answer to learn from.")
    return characters
