"""Typed in-memory caches: a least-recently-used map, and a marker for a known miss."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from enum import Enum
from typing import Final, Generic, Literal, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class _Miss(Enum):
    MISS = "known miss"


Miss = Literal[_Miss.MISS]
# Cached when a lookup found nothing, so the next lookup of that key need not ask again.
MISS: Final = _Miss.MISS


class LRU(Generic[K, V]):
    """A map that keeps at most `size` entries, forgetting the least recently used first."""

    __slots__ = ("_data", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("an LRU holds at least one entry")
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value for `key` (now the most recently used), or None."""
        data = self._data
        if key in data:
            data.move_to_end(key)
            return data[key]
        return None

    def put(self, key: K, value: V) -> None:
        """Store `value` under `key`, forgetting the oldest entries beyond `size`."""
        data = self._data
        data[key] = value
        data.move_to_end(key)
        while len(data) > self.size:
            data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        """Forget `key`; its value, or None."""
        return self._data.pop(key, None)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries, least recently used first (their order is left as it is)."""
        return list(self._data.items())

    def clear(self) -> None:
        """Forget everything."""
        self._data.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)
