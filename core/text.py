"""Text that every database can store, made so once where it enters.

A person's message, a system prompt or a model's answer can carry characters that
PostgreSQL or the drivers refuse: NUL bytes (PostgreSQL's text type has no place for
them) and lone surrogates (what undecodable terminal input becomes; no UTF-8 encoder
takes them). The service cleans text at the edge, before the model sees it, so that the
stored row is exactly what was sent, and records that it did.
"""

from __future__ import annotations

import re
from typing import Any

# NUL, and UTF-16 surrogates that are not part of a pair (in a Python str every one is lone).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def clean(text: str) -> tuple[str, bool]:
    """`text` with NUL bytes dropped and lone surrogates replaced by U+FFFD; and whether it changed."""
    if _UNSTORABLE.search(text) is None:  # the common case: one scan, no copy
        return text, False
    return _UNSTORABLE.sub(_replacement, text), True


def clean_deep(value: Any) -> Any:
    """`value` (strings, lists, tuples and dicts of them) with every string cleaned."""
    if isinstance(value, str):
        return clean(value)[0]
    if isinstance(value, dict):
        return {clean_deep(key): clean_deep(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(clean_deep(item) for item in value)
    return value


def _replacement(match: re.Match[str]) -> str:
    return "" if match.group() == "\x00" else REPLACEMENT
