"""The worker's periodic work, once a heartbeat interval, job by job.

:class:`Housekeeping` runs its ``jobs`` in order, each under its name (a job
that fails is logged with it, and the others still run): refresh the GPUs'
numbers, move the executors' memory caps, reap orphaned processes, give freed
memory back, sample the GPU history, flush held output, report dropped output,
stop kernels whose notebook went silent, judge the clients (heartbeat them, or
cancel the cells of silent ones), stop idle sessions, and stop the worker when
its parent process is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import reaper
from .protocol import heap
from .protocol import messages as m
from .protocol.messages import Message
from .protocol.outcomes import CellStatus
from .protocol.pids import alive

if TYPE_CHECKING:
    from .service import WorkerService

log = logging.getLogger(__name__)

_TRIM_EVERY = 5.0  # seconds between returns of freed heap pages to the system

Job = Callable[[float], Awaitable[None] | None]


class Housekeeping:
    """The periodic jobs of one service, by name (see the module docstring)."""

    def __init__(self, service: WorkerService) -> None:
        self.s = service
        self._next_trim = 0.0
        self._failing: set[str] = set()
        self.jobs: dict[str, Job] = {
            "refresh GPUs": self.refresh_gpus,
            "rebudget memory": self.rebudget,
            "reap orphans": self.reap,
            "give memory back": self.trim,
            "sample GPU history": lambda now: service.history.sample(
                service.capabilities, service.dispatcher.busy
            ),
            "flush held output": lambda now: service.outbox.flush_all(),
            "report dropped output": lambda now: service.relay.dropped_output(),
            "stop orphaned kernels": self.stop_orphaned_kernels,
            "judge clients": self.judge_clients,
            "stop idle sessions": self.stop_idle_sessions,
            "watch the parent": self.watch_parent,
        }

    async def run(self, now: float) -> None:
        for name, job in self.jobs.items():
            try:
                done = job(now)
                if done is not None:
                    await done
            except Exception:  # one failing job must not stop the others, or the worker
                if name not in self._failing:  # once, not every interval
                    log.exception("periodic job %r failed (logged once until it works)", name)
                self._failing.add(name)
            else:
                self._failing.discard(name)

    def forgive_stall(self, now: float, stalled: float) -> None:
        """Do not count a stall of this process (stopped, swapping, starved of CPU)
        against its clients: their heartbeats of that time are still unread in the
        socket, and cancelling their cells now would lose results they wait for."""
        if stalled < self.s.config.heartbeat:
            return
        log.warning(
            "this worker did not run for %.1f s (overloaded, swapping or stopped?); "
            "clients are not judged on that time",
            stalled,
        )
        self.s.clients.forgive(now, stalled)

    def rebudget(self, now: float) -> None:
        self.s.pool.rebudget()  # caps follow what the executors hold (budget.py)

    def reap(self, now: float) -> None:
        reaper.reap()  # orphans that were re-parented to us after the last pass

    def refresh_gpus(self, now: float) -> None:
        self.s.capabilities = self.s.monitor.refresh(self.s.capabilities)

    def trim(self, now: float) -> None:
        if self.s.dispatcher.relayed_big or now >= self._next_trim:
            # Freed frames of large cells, and buffers libzmq filled for handshakes
            # that never finished (keyless peers): back to the system, past what is
            # kept for the next large cell (heap.py).
            self.s.dispatcher.relayed_big = False
            self._next_trim = now + _TRIM_EVERY
            heap.release_above(self.s.config.pool_memory)

    def stop_orphaned_kernels(self, now: float) -> None:
        seen = self.s.clients.silent_for(now)
        for kernel in self.s.kernels.orphans(lambda owner: seen.get(owner, float("inf"))):
            log.warning("kernel %s: its notebook machine went silent; shutting it down", kernel.id)
            self.s.spawn(self.s.kernels.stop(kernel))

    async def judge_clients(self, now: float) -> None:
        s = self.s
        owners = {k.owner for k in s.kernels.kernels.values()}
        sweep = s.clients.sweep(now, s.cells_of, owners)
        for client, cells in sweep.cancel:
            log.warning(
                "client %s silent for %.0f s; cancelling its %d cell(s)",
                client.client[:8],
                now - client.last_seen,
                len(cells),
            )
            for cell in cells:
                await s.dispatcher.stop(cell, CellStatus.CANCELLED)
        if sweep.beat:
            load = s.load()
            for client, cells in sweep.beat:
                # "done": answered cells whose results it has not acknowledged; a quick
                # cell's result is the first it hears of it, so that one lost is
                # noticed here, not by "cells" alone.
                done = s.results.held_for(client.client)
                beat = {"load": load, "cells": [c.id for c in cells], "done": done}
                await s.send(client.rid, Message(kind=m.HEARTBEAT, content=beat, to=client.client))

    def stop_idle_sessions(self, now: float) -> None:
        for handle in self.s.pool.handles():
            idle = now - handle.last_used
            if handle.cell is None and not handle.stopping and idle > self.s.config.session_idle:
                log.info("session %s idle for %.0f s; stopping its executor", handle.session, idle)
                self.s.spawn(self.s.pool.stop(handle))

    def watch_parent(self, now: float) -> None:
        parent = self.s.config.parent_pid
        if parent is not None and not alive(parent):
            log.info("parent process %d is gone; stopping", parent)
            self.s.stop()


__all__ = ["Housekeeping"]
