"""Cells waiting for GPUs: round-robin across users, first fit with reservation.

Pure bookkeeping (no sockets, no clock). Each cell needs a set of resources:
one GPU (the usual case), several GPUs of this host (``--gpus 2``), or the CPU
slot (``--cpu``). Policy:

- Owners take turns (round-robin: the owner served least recently goes next,
  so one that just ran waits behind one that arrived meanwhile); an owner's
  cells run in the order they were sent. One user's fifty cells do not starve
  a colleague's one. The owner is the user when the worker knows users (per-user
  keys, ``--encrypt``: the key the handshake proved, so opening a new session for
  every cell gains nothing), else the session (every holder of the shared key
  is equal).
- Walking the waiting cells in that order, a cell starts if all its resources
  are idle and no earlier waiting cell has reserved any of them. A cell that
  cannot start reserves its resources, so later single-GPU cells cannot starve
  a two-GPU cell, and two multi-GPU cells can never deadlock.
- A cell whose resources are free but that has no executor and no room for one
  (``--max-executors``, and every executor busy or in use: see
  :meth:`ExecutorPool.room`) is passed over without reserving anything: the
  cells behind it run meanwhile, and it goes first once there is room.

For a single-GPU cell this is exactly "one queue per GPU".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

CPU = "cpu"


def gpu_slot(index: int) -> str:
    return f"gpu{index}"


@dataclass(eq=False)
class Cell:
    """One execute request on its way through the worker."""

    id: str
    client_rid: bytes  # ZeroMQ routing id of the client's socket
    client: str  # the client's id from its hello
    session: str
    resources: tuple[str, ...]  # e.g. ("gpu0",), ("gpu0", "gpu1"), ("cpu",)
    frames: list[Any]  # the verified message frames, forwarded as they are
    nbytes: int
    timeout: float | None
    received: float
    direct: bool = False  # its buffers come on a data connection once it starts
    data: dict[str, str] | None = None  # that connection's endpoint and ticket, once started
    started: float | None = None
    dequeued: float | None = None  # when it left the queue (its resources were free)
    queue_timer: Any = None  # its --timeout while it waits in the queue
    stop_reason: str | None = None  # "cancelled" or "timeout" once asked to stop
    timers: list[Any] = field(default_factory=list)
    position: int = -1  # last queue position reported to the client
    user: str = ""  # with per-user keys, whose key sent it
    # "started" is told only if the cell is still running after a moment, or before
    # its first output: a quick cell's result says it all, one message fewer.
    announce: tuple[dict[str, Any], Any] | None = None  # "started" still to send; its timer

    @property
    def owner(self) -> str:
        """Whose turn this cell is in the fair queue: its user, or its session."""
        return f"user:{self.user}" if self.user else f"session:{self.session}"

    @property
    def gpus(self) -> list[int]:
        return [int(r[3:]) for r in self.resources if r.startswith("gpu")]


class FairQueue:
    """Waiting cells: owners take turns, least recently served first; FIFO within one."""

    def __init__(self) -> None:
        self._cells: dict[str, deque[Cell]] = {}
        self._served: dict[str, int] = {}  # owner -> tick of its last turn (0: never)
        self._arrived: dict[str, int] = {}  # owner -> order of arrival, for ties
        self._tick = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._cells.values())

    def push(self, cell: Cell) -> None:
        if cell.owner not in self._cells:
            self._cells[cell.owner] = deque()
            self._tick += 1
            self._arrived[cell.owner] = self._tick
        self._cells[cell.owner].append(cell)

    def remove(self, cell_id: str) -> Cell | None:
        for owner, queue in self._cells.items():
            for cell in queue:
                if cell.id == cell_id:
                    queue.remove(cell)
                    if not queue:
                        del self._cells[owner]
                    return cell
        return None

    def order(self) -> list[Cell]:
        """Every waiting cell in the order they get their turn."""
        queues = {s: list(q) for s, q in self._cells.items()}
        served = dict(self._served)
        tick = self._tick
        out: list[Cell] = []
        while queues:
            owner = min(queues, key=lambda s: (served.get(s, 0), self._arrived[s]))
            out.append(queues[owner].pop(0))
            if not queues[owner]:
                del queues[owner]
            tick += 1
            served[owner] = tick
        return out

    def take(
        self, busy: Iterable[str], room: Callable[[Cell], bool] = lambda _: True
    ) -> list[Cell]:
        """Remove and return the cells that can start now (policy above); ``room``
        says whether a cell whose resources are free has an executor to run on."""
        taken = set(busy)  # busy, reserved, or given to a cell started in this pass
        started: list[Cell] = []
        for cell in self.order():
            need = set(cell.resources)
            if not need & taken:
                if not room(cell):
                    continue  # no executor for it yet: reserve nothing, others go on
                started.append(cell)
                self.remove(cell.id)
                self._tick += 1
                self._served[cell.owner] = self._tick
            taken |= need
        self._forget_idle_sessions()
        return started

    def _forget_idle_sessions(self) -> None:
        # Keep the bookkeeping small: an owner with nothing queued that has not
        # been served recently starts over as a newcomer.
        if len(self._served) > 1024:
            recent = sorted(self._served.values())[-512]
            for owner in [s for s, t in self._served.items() if t < recent]:
                if owner not in self._cells:
                    del self._served[owner]
                    self._arrived.pop(owner, None)

    def positions(self, running: Iterable[Cell]) -> dict[str, int]:
        """For each waiting cell, how many cells (running or waiting) are ahead of it
        on any resource it needs."""
        ahead: list[set[str]] = [set(c.resources) for c in running]
        out: dict[str, int] = {}
        for cell in self.order():
            need = set(cell.resources)
            out[cell.id] = sum(1 for other in ahead if other & need)
            ahead.append(need)
        return out

    def cells(self) -> list[Cell]:
        return [c for q in self._cells.values() for c in q]
