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

LISTED = 64  # answered cells remembered per client, the newest (all a heartbeat lists)


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
        # owner -> cell id -> expires, for results sent and not acknowledged, kept (frames
        # or not) so a client learns its quick cell was answered, and that a result it
        # did not get is gone, rather than wait for it. Per owner: a heartbeat reads one.
        self._answered: dict[str, OrderedDict[str, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, cell_id: str, frames: list[Any], owner: str) -> None:
        """Keep the result of ``cell_id`` for the client ``owner``."""
        answered = self._answered.setdefault(owner, OrderedDict())
        answered.pop(cell_id, None)
        answered[cell_id] = self._clock() + self.ttl
        if len(answered) > LISTED:
            answered.popitem(last=False)
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

    def held_for(self, owner: str) -> list[str]:
        """The cells answered to ``owner`` that it has not said it got (the newest
        :data:`LISTED`), whether their results are still kept or not."""
        self._expire()
        return list(self._answered.get(owner, ()))

    def forget(self, cell_ids: Iterable[str], owner: str) -> None:
        """The client ``owner`` has these results: their memory can go."""
        for cell_id in cell_ids:
            entry = self._entries.get(cell_id)
            if entry is not None and entry[3] == owner:
                self._drop(cell_id)
            answered = self._answered.get(owner)
            if answered is not None:
                answered.pop(cell_id, None)

    def _drop(self, cell_id: str) -> None:
        entry = self._entries.pop(cell_id, None)
        if entry is not None:
            self._bytes -= entry[1]

    def _expire(self) -> None:
        now = self._clock()
        for owner, answered in list(self._answered.items()):
            while answered and next(iter(answered.values())) <= now:
                answered.popitem(last=False)
            if not answered:
                del self._answered[owner]
        while self._entries:
            cell_id, (expires, *_) = next(iter(self._entries.items()))
            if expires > now:
                break
            self._drop(cell_id)
