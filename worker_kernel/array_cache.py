"""The executor's arrays by content digest, so an unchanged input is not sent again.

A session keeps the large buffers it received or produced, least recently used
first out, within a memory budget. A cell may change an array in place, so an
entry is checked against its digest before it is used; one that no longer
matches is dropped and the client sends the data again (a miss is never an
error).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from .protocol.buffer_pool import BufferPool
from .protocol.messages import Buffer
from .protocol.refs import MIN_BYTES
from .protocol.wire import digest


class ArrayCache:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[str, Buffer] = OrderedDict()
        self._bytes = 0
        self._names: dict[str, set[str]] = {}  # what each name was last bound to
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, checksum: str, buf: Buffer) -> None:
        size = memoryview(buf).nbytes
        if size < MIN_BYTES or size > self.budget:
            return
        if checksum in self._entries:
            self._entries.move_to_end(checksum)
            return
        self._entries[checksum] = buf
        self._bytes += size
        while self._bytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self._bytes -= memoryview(old).nbytes

    def get(self, checksum: str) -> Buffer | None:
        buf = self._entries.get(checksum)
        if buf is not None and digest(buf) == checksum:
            self._entries.move_to_end(checksum)
            self.hits += 1
            return buf
        if buf is not None:  # changed in place since: useless now
            del self._entries[checksum]
            self._bytes -= memoryview(buf).nbytes
        self.misses += 1
        return None

    def bind(self, named: Mapping[str, Iterable[str]]) -> None:
        """These names now hold these arrays (by digest): what a name held before and
        no name holds now goes. A value its name no longer has seldom comes back (the
        client sends it again if it does), and its memory is then free for the next
        cell's arrays instead of fresh pages (buffer_pool.py)."""
        before: set[str] = set()
        for name, checksums in named.items():
            before |= self._names.get(name, set())
            self._names[name] = set(checksums)
        held = set().union(*self._names.values()) if before else set()
        for checksum in before - held:
            buf = self._entries.pop(checksum, None)
            if buf is not None:
                self._bytes -= memoryview(buf).nbytes

    def shed(self, pool: BufferPool, nbytes: int) -> None:
        """Let go of the entries held in ``pool``, least recently used first, until it
        has ``nbytes`` free in one piece: a new input needs the room more than an old
        one that may never come back (the client sends it again if it does)."""
        for checksum in [c for c, buf in self._entries.items() if pool.holds(buf)]:
            if pool.largest_free() >= nbytes:
                return
            self._bytes -= memoryview(self._entries.pop(checksum)).nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._names.clear()
        self._bytes = 0
