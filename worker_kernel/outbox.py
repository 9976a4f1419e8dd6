"""Messages for clients that are not reading right now, kept in order, within a budget.

The worker never waits for a client (a sleeping laptop must not stall it). What a
client's socket cannot take now waits here, in order, and goes out on the next
try. If a client falls further behind than ``budget`` bytes, its live output is
dropped (and it is told how much), and its results too (they stay in the result
cache, where the client fetches them).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from .protocol import messages as m

log = logging.getLogger(__name__)

_DROPPABLE = frozenset({m.STREAM, m.DISPLAY, m.RESULT, m.HEARTBEAT, m.TRANSFER})


@dataclass
class Pending:
    frames: list[Any]
    kind: str
    parent: str
    to: str
    nbytes: int


class Outbox:
    def __init__(self, sock: zmq.asyncio.Socket, budget: int = 64 << 20) -> None:
        self.sock = sock
        self.budget = budget
        self._queues: dict[bytes, deque[Pending]] = {}
        self._bytes: dict[bytes, int] = {}
        self.dropped: dict[tuple[bytes, str, str], int] = {}  # (rid, parent, to) -> count
        self.gone: Callable[[bytes], None] = lambda rid: None  # the peer disconnected

    async def deliver(self, rid: bytes, frames: list[Any], kind: str, parent: str, to: str) -> None:
        item = Pending(frames, kind, parent, to, sum(memoryview(f).nbytes for f in frames))
        queue = self._queues.get(rid)
        if queue:
            await self.flush(rid)
            queue = self._queues.get(rid)
        if queue is None and await self._try(rid, item):
            return
        self._hold(rid, item)

    def _hold(self, rid: bytes, item: Pending) -> None:
        queue = self._queues.setdefault(rid, deque())
        size = self._bytes.get(rid, 0)
        if size + item.nbytes > self.budget and item.kind in _DROPPABLE:
            key = (rid, item.parent, item.to)
            self.dropped[key] = self.dropped.get(key, 0) + 1
            log.info("client %s is not reading: dropped a %s", rid.hex()[:8], item.kind)
            return
        queue.append(item)
        self._bytes[rid] = size + item.nbytes

    async def _try(self, rid: bytes, item: Pending) -> bool:
        """Send now if the socket takes it; False if it must wait."""
        try:
            await self.sock.send_multipart([rid, *item.frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client is gone
            log.debug("client %s gone (%s); dropping what was queued for it", rid.hex()[:8], exc)
            self.forget(rid)
            self.gone(rid)
            return True
        return True

    async def flush(self, rid: bytes) -> None:
        queue = self._queues.get(rid)
        while queue:
            if not await self._try(rid, queue[0]):
                return
            if rid not in self._queues:
                return  # forgotten: it was gone
            sent = queue.popleft()
            self._bytes[rid] -= sent.nbytes
        self._queues.pop(rid, None)
        self._bytes.pop(rid, None)

    async def flush_all(self) -> None:
        for rid in list(self._queues):
            await self.flush(rid)

    def take_dropped(self, rid: bytes) -> list[tuple[str, str, int]]:
        """``(parent, to, count)`` of output dropped for ``rid``, once it reads again."""
        if self._queues.get(rid):
            return []
        found = [(p, t, n) for (r, p, t), n in self.dropped.items() if r == rid]
        for parent, to, _ in found:
            del self.dropped[(rid, parent, to)]
        return found

    def forget(self, rid: bytes) -> None:
        self._queues.pop(rid, None)
        self._bytes.pop(rid, None)
        for key in [k for k in self.dropped if k[0] == rid]:
            del self.dropped[key]
