"""Recently sent results, kept briefly so a client that missed one can fetch it.

A result can be lost on the way (the client's connection dropped, its queue was
full); the client notices (the worker's heartbeats stop listing the cell) and
asks again. Answering from here gives an exactly-once effect: the cell is not
run a second time. Entries expire after ``ttl`` seconds, and the oldest go first
when the cache holds more than ``max_bytes``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

_ANSWERED_MAX = 10_000  # ids of answered cells remembered, all clients together


class ResultCache:
    def __init__(
        self,
        ttl: float = 120.0,
        max_bytes: int = 512 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._clock = clock
        # cell id -> (expires, bytes, frames, owner)
        self._entries: OrderedDict[str, tuple[float, int, list[Any], str]] = OrderedDict()
        self._bytes = 0
        # cell id -> (expires, owner) of every result sent and not acknowledged, kept
        # (frames or not) so a client can learn its quick cell was answered and that a
        # result it did not get is gone, rather than wait for it.
        self._answered: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, cell_id: str, frames: list[Any], owner: str) -> None:
        """Keep the result of ``cell_id`` for the client ``owner``."""
        self._answered.pop(cell_id, None)
        self._answered[cell_id] = (self._clock() + self.ttl, owner)
        while len(self._answered) > _ANSWERED_MAX:
            self._answered.popitem(last=False)
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.max_bytes:
            return
        self._drop(cell_id)
        self._entries[cell_id] = (self._clock() + self.ttl, size, frames, owner)
        self._bytes += size
        self._expire()
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, cell_id: str, owner: str) -> list[Any] | None:
        """The result of ``cell_id`` if it is ``owner``'s."""
        self._expire()
        entry = self._entries.get(cell_id)
        return entry[2] if entry is not None and entry[3] == owner else None

    def held_for(self, owner: str, limit: int = 64) -> list[str]:
        """The cells answered to ``owner`` that it has not said it got (the newest
        ``limit``), whether their results are still kept or not."""
        self._expire()
        held = [cell_id for cell_id, entry in self._answered.items() if entry[1] == owner]
        return held[-limit:]

    def forget(self, cell_ids: Iterable[str], owner: str) -> None:
        """The client ``owner`` has these results: their memory can go."""
        for cell_id in cell_ids:
            entry = self._entries.get(cell_id)
            if entry is not None and entry[3] == owner:
                self._drop(cell_id)
            answered = self._answered.get(cell_id)
            if answered is not None and answered[1] == owner:
                del self._answered[cell_id]

    def _drop(self, cell_id: str) -> None:
        entry = self._entries.pop(cell_id, None)
        if entry is not None:
            self._bytes -= entry[1]

    def _expire(self) -> None:
        now = self._clock()
        while self._answered and next(iter(self._answered.values()))[0] <= now:
            self._answered.popitem(last=False)
        while self._entries:
            cell_id, (expires, *_) = next(iter(self._entries.items()))
            if expires > now:
                break
            self._drop(cell_id)
