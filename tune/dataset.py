"""The training file: TRL's conversational JSONL, checked before any process starts.

For supervised training (`sft`), one JSON object per line,
`{"messages": [{"role": ..., "content": ...}, ...]}`: roles `system`, `user` and
`assistant`, at least one assistant message, text content. For preference training
(`dpo`), `{"prompt": [...messages], "chosen": [{"role": "assistant", ...}], "rejected":
[{"role": "assistant", ...}]}`, the prompt ending with the person's turn and the two
answers different. Blank lines are skipped. Every problem is one line naming the file
and the line number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tune.errors import DatasetError, TooFewRows

ROLES = frozenset({"system", "user", "assistant"})
# OpenAI's fine-tuning asks for at least 10 examples too; fewer teach nothing reliably.
MIN_ROWS = 10
_MAX_PROBLEMS_SHOWN = 1

Method = Literal["sft", "dpo"]


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """What a checked training file holds."""

    path: Path
    rows: int
    sha256: str
    characters: int  # of message content, a rough size for estimates


def check_dataset(
    path: Path, *, min_rows: int = MIN_ROWS, method: Method = "sft"
) -> DatasetSummary:
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
        where = f"{path}, line {number}"
        characters += _check_pair(line, where) if method == "dpo" else _check_row(line, where)
        rows += 1
    if rows < min_rows:
        what = "pair" if method == "dpo" else "conversation"
        raise TooFewRows(
            f"{path} has {rows} {what}{'s' if rows != 1 else ''}; training needs at least "
            f"{min_rows}. Collect more examples (or loosen the export's filters) and try again."
        )
    return DatasetSummary(
        path=path.resolve(),
        rows=rows,
        sha256=hashlib.sha256(raw).hexdigest(),
        characters=characters,
    )


def _json(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg}).") from None


def _check_row(line: str, where: str) -> int:
    """One line: a conversation with an assistant turn; returns its characters of content."""
    row = _json(line, where)
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise DatasetError(
            f'{where}: expected an object with a "messages" list, '
            'like {"messages": [{"role": "user", "content": "..."}, ...]}.'
        )
    messages = row["messages"]
    characters = _check_messages(messages, where)
    if not any(m.get("role") == "assistant" and m.get("content", "").strip() for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant answer to learn from.")
    return characters


def _check_pair(line: str, where: str) -> int:
    """One line: a prompt and a chosen and a rejected answer; returns its characters of content."""
    row = _json(line, where)
    if not isinstance(row, dict) or not all(
        isinstance(row.get(key), list) for key in ("prompt", "chosen", "rejected")
    ):
        raise DatasetError(
            f'{where}: expected an object with "prompt", "chosen" and "rejected" message lists '
            "(the export's dpo format)."
        )
    prompt = row["prompt"]
    characters = _check_messages(prompt, where)
    if not prompt or prompt[-1].get("role") != "user":
        raise DatasetError(f"{where}: the prompt must end with the person's (user) message.")
    answers = []
    for side in ("chosen", "rejected"):
        messages = row[side]
        characters += _check_messages(messages, f"{where}, {side}")
        if len(messages) != 1 or messages[0].get("role") != "assistant":
            raise DatasetError(f"{where}: {side} must be exactly one assistant message.")
        answers.append(messages[0]["content"])
    if answers[0].strip() == answers[1].strip():
        raise DatasetError(f"{where}: the chosen and the rejected answer are the same.")
    return characters


def _check_messages(messages: list[Any], where: str) -> int:
    """Each message an object with a known role and text content; their characters."""
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
    return characters
