"""One bounded, thread-safe LRU cache keyed by value, used by every cache in vidsparse.

Keys hold every input the value depends on (patterns and layouts are frozen dataclasses), so
a hit is always valid; the least recently used entry is dropped past ``maxsize``. ``build`` runs
outside the lock (plans can take a while), so two threads may build the same value once each;
the second result replaces the first, which is harmless for values that are equal by construction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Bounded LRU of ``key -> value`` with ``get_or_build(key, build)``."""

    def __init__(self, maxsize: int = 64) -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"LRUCache maxsize must be a positive int, got {maxsize!r}.")
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = build()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._dropped(self._data.popitem(last=False)[0])
        return value

    def clear(self) -> None:
        with self._lock:
            for key in list(self._data):
                self._dropped(key)
            self._data.clear()

    def _dropped(self, key: Hashable) -> None:
        """Called under the lock for each entry evicted or cleared: a subclass that keeps a
        second index of the same entries (vidsparse.plan.PlanCache) drops it there too."""

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data


__all__ = ["LRUCache"]
