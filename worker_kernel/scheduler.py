"""Cells waiting for a GPU: one queue per GPU, round-robin across sessions.

Pure bookkeeping (no sockets, no clock): the service pushes cells as they
arrive and pops the next one when the GPU frees up. Within a session cells run
in the order they were sent; across sessions, each takes a turn, so one user's
batch of fifty cells does not starve a colleague's single cell.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Cell:
    """One execute request on its way through the worker."""

    id: str
    client_rid: bytes  # ZeroMQ routing id of the client's socket
    client: str  # the client's id from its hello
    session: str
    gpu: int
    frames: list[Any]  # the verified message frames, forwarded as they are
    nbytes: int
    timeout: float | None
    received: float
    started: float | None = None
    stop_reason: str | None = None  # "cancelled" or "timeout" once asked to stop
    timers: list[Any] = field(default_factory=list)


class FairQueue:
    """Round-robin over sessions, FIFO within a session."""

    def __init__(self) -> None:
        self._cells: dict[str, deque[Cell]] = {}
        self._turns: deque[str] = deque()  # sessions with waiting cells, next first

    def __len__(self) -> int:
        return sum(len(q) for q in self._cells.values())

    def push(self, cell: Cell) -> int:
        """Queue ``cell``; return its 0-based position in the run order."""
        queue = self._cells.get(cell.session)
        if queue is None:
            queue = self._cells[cell.session] = deque()
            self._turns.append(cell.session)
        queue.append(cell)
        return self.position(cell.id)

    def pop(self) -> Cell | None:
        if not self._turns:
            return None
        session = self._turns.popleft()
        queue = self._cells[session]
        cell = queue.popleft()
        if queue:
            self._turns.append(session)
        else:
            del self._cells[session]
        return cell

    def remove(self, cell_id: str) -> Cell | None:
        for session, queue in self._cells.items():
            for cell in queue:
                if cell.id == cell_id:
                    queue.remove(cell)
                    if not queue:
                        del self._cells[session]
                        self._turns.remove(session)
                    return cell
        return None

    def order(self) -> list[Cell]:
        """Every waiting cell in the order they will run."""
        queues = {s: list(q) for s, q in self._cells.items()}
        turns = deque(self._turns)
        out: list[Cell] = []
        while turns:
            session = turns.popleft()
            out.append(queues[session].pop(0))
            if queues[session]:
                turns.append(session)
        return out

    def position(self, cell_id: str) -> int:
        for i, cell in enumerate(self.order()):
            if cell.id == cell_id:
                return i
        raise KeyError(cell_id)

    def cells(self) -> list[Cell]:
        return [c for q in self._cells.values() for c in q]
