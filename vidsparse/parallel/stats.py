"""Communication counters: what a rank sends, so scaling can be estimated from one machine."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CommStats:
    """Bytes this rank sent to other ranks and number of calls, per operation name."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, op: str, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent[op] = self.bytes_sent.get(op, 0) + int(nbytes)
            self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total_bytes": sum(self.bytes_sent.values()),
                "bytes_sent": dict(self.bytes_sent),
                "calls": dict(self.calls),
            }

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.calls.clear()
