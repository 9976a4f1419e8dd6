"""The life of a cell on the worker: queued, started on an executor, answered.

:class:`Dispatcher` owns the waiting queue, the set of busy resources and the
running cells. It starts cells when their GPUs (or the CPU slot) free up,
enforces timeouts, turns cancels into an interrupt and, if that is not enough
within the grace period, a kill; and it answers for an executor that died.
Messages to clients go through the ``send`` callback the service gives it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from .budget import SLACK
from .executors import STARVED, ExecutorHandle, ExecutorPool, ExecutorStartError, Slot
from .history import JobLog
from .protocol import datapath
from .protocol import messages as m
from .protocol.messages import Message
from .protocol.outcomes import CellStatus
from .protocol.units import binary_size
from .scheduler import Cell, FairQueue

log = logging.getLogger(__name__)

Send = Callable[[bytes, Message], Awaitable[None]]
_BIG = 64 << 20  # a cell this large gets its freed memory returned to the system
# A cell still running this long after it was handed over is told "started"; one
# that is done by then (an empty cell takes ~0.5 ms) never is: its result says so.
ANNOUNCE_AFTER = 0.005


class Dispatcher:
    def __init__(
        self,
        pool: ExecutorPool,
        send: Send,
        *,
        worker: str,
        cancel_grace: float,
        spawn: Callable[[Awaitable[Any]], Any],
    ) -> None:
        self.pool = pool
        self._send = send
        self.worker = worker
        self.cancel_grace = cancel_grace
        self._spawn = spawn
        self.queue = FairQueue()
        self.cells: dict[str, Cell] = {}  # every cell not yet answered
        self.running: dict[str, Cell] = {}
        self.busy: set[str] = set()
        self.journal = JobLog()  # finished cells, for dashboards
        self.relayed_big = False  # a large cell was handed over since the last trim
        self._pump_timer: asyncio.TimerHandle | None = None  # a cell waits for an executor
        self.waiting_for_executor: set[str] = set()  # passed over: no executor for them yet

    # -- queueing ----------------------------------------------------------

    async def submit(self, cell: Cell) -> None:
        self.cells[cell.id] = cell
        if cell.timeout:
            # --timeout bounds the user's wait: the time queued counts (not the
            # executor's start). A cell still queued then is answered "timeout".
            cell.queue_timer = self._time_out_in(cell, cell.timeout)
        self.queue.push(cell)
        self.pump()
        if cell.id not in self.running:
            await self.report_positions()

    def pump(self) -> None:
        """Start every cell that can start now."""
        for cell in self.queue.take(self.busy, self._room_planner()):
            if cell.queue_timer is not None:
                cell.queue_timer.cancel()
            cell.dequeued = time.monotonic()
            self.busy |= set(cell.resources)
            self.running[cell.id] = cell
            self._spawn(self._start(cell))
        if self.queue.cells():  # positions are only ever those of waiting cells
            self._spawn(self.report_positions())

    def _slots_in_use(self) -> set[Slot]:
        """(session, resources) of every waiting and running cell: their executors stay."""
        cells = [*self.queue.cells(), *self.running.values()]
        return {(c.session, c.resources) for c in cells}

    def _room_planner(self) -> Callable[[Cell], bool]:
        """For one pass of the queue: whether a cell has an executor to run on, counting
        the executors this pass already promised (free slots, then stoppable ones)."""
        now = time.monotonic()
        free = self.pool.free_slots()
        self.waiting_for_executor = set()
        promised: set[str] = set()  # executor ids this pass will stop
        keep: set[Slot] | None = None  # worked out only when the cap is reached
        passed_over = False

        def room(cell: Cell) -> bool:
            nonlocal free, passed_over, keep
            if self.pool.has(cell.session, cell.resources):
                return True
            if free > 0:
                free -= 1
                return True
            keep = self._slots_in_use() if keep is None else keep
            starved = now - cell.received >= STARVED
            for handle in self.pool.evictable(keep, now, starved):
                if handle.id not in promised:
                    promised.add(handle.id)
                    return True
            self.waiting_for_executor.add(cell.id)
            if not passed_over:  # look again when time may have made room
                passed_over = True
                self._pump_later()
            return False

        return room

    def _pump_later(self, delay: float = 1.0) -> None:
        if self._pump_timer is None:
            loop = asyncio.get_running_loop()
            self._pump_timer = loop.call_later(delay, self._pump_again)

    def _pump_again(self) -> None:
        self._pump_timer = None
        self.pump()

    async def report_positions(self) -> None:
        for cell_id, ahead in self.queue.positions(self.running.values()).items():
            cell = self.cells.get(cell_id)
            # Passed over for want of an executor: it is not next in line, whatever is ahead.
            position = max(ahead, 1) if cell_id in self.waiting_for_executor else ahead
            if cell is not None and cell.position != position:
                cell.position = position
                content: dict[str, Any] = {"position": position, "gpus": cell.gpus}
                if cell_id in self.waiting_for_executor:
                    content["waiting_for"] = "executor"
                await self._tell(cell, m.QUEUED, content)

    async def _tell(self, cell: Cell, kind: str, content: dict[str, Any]) -> None:
        msg = Message(
            kind=kind, content=content, session=cell.session, parent=cell.id, to=cell.client
        )
        await self._send(cell.client_rid, msg)

    # -- running -------------------------------------------------------------

    async def _start(self, cell: Cell) -> None:
        try:
            await self._start_on_executor(cell)
        except Exception:  # a bug here must answer the cell, not stop the worker
            log.exception("internal error starting cell %s", cell.id[:8])
            await self.finish(cell, CellStatus.DIED, "internal worker error (see the worker log)")

    async def _start_on_executor(self, cell: Cell) -> None:
        starved = time.monotonic() - cell.received >= STARVED
        keep = self._slots_in_use() | {(cell.session, cell.resources)}
        try:
            handle = await self.pool.acquire(cell.session, cell.resources, keep, starved)
        except ExecutorStartError as exc:
            await self.finish(cell, CellStatus.DIED, f"could not start an executor: {exc}")
            return
        if cell.stop_reason is not None:  # cancelled while the executor started
            await self.finish(cell, cell.stop_reason, "")
            return
        # The caps move when a cell ends and every heartbeat, not on this hot path; only
        # an executor that never had its cap moved (a new one) is measured now.
        room = self.pool.headroom.get(handle.pid)
        if room is None:
            room = self.pool.rebudget().get(handle.pid)
        # Its cap is what it holds + max(room, SLACK): the inputs must fit in that with
        # a margin (an executor that hits its cap while receiving cannot answer).
        if room is not None and cell.nbytes + SLACK // 2 > max(room, SLACK):
            need, left = binary_size(cell.nbytes), binary_size(room)
            await self.finish(
                cell,
                CellStatus.MEMORY,
                f"the cell's inputs ({need}) do not fit {self.pool.budget.describe()}: "
                f"{left} is left for this session. Send less, free memory in the session "
                "(del, %lan2gpu close-session), or use another worker",
            )
            return
        if cell.direct and not handle.data:
            why = "the executor takes no direct data connection (see the worker log)"
            await self.finish(cell, CellStatus.DIED, why)
            return
        handle.cell = cell
        cell.started = time.monotonic()
        # Armed before the send: output may be relayed while it is under way.
        timer = asyncio.get_running_loop().call_later(
            ANNOUNCE_AFTER, lambda: self._spawn(self.announce(cell))
        )
        started: dict[str, Any] = {"gpus": cell.gpus, "pid": handle.pid}
        if cell.direct:
            # Its notebook is told where to send the inputs, and with what ticket.
            data = {"endpoint": handle.data, "ticket": datapath.new_ticket().hex()}
            cell.data = started["data"] = data
        cell.announce = (started, timer)
        try:
            ticket = cell.data["ticket"] if cell.data else ""
            await self.pool.send_exec(handle, cell.client, cell.frames, ticket)
            cell.frames = []  # libzmq holds them until sent; the cell no longer needs them
            self.relayed_big |= not cell.direct and cell.nbytes >= _BIG
        except zmq.ZMQError as exc:  # executor vanished between start and send
            handle.cell = None
            self.pool.kill(handle)
            why = f"executor unreachable: {exc}"
            await self.finish(cell, CellStatus.DIED, why, session_lost=True)
            return
        if cell.timeout:
            queued = (cell.dequeued or cell.received) - cell.received
            cell.timers.append(self._time_out_in(cell, max(0.0, cell.timeout - queued)))
        if cell.data:
            await self.announce(cell)  # at once: the inputs come when it is told

    async def announce(self, cell: Cell) -> None:
        """Tell the client its cell started, unless it was told or needs not be: called
        when the moment passed, and before each message of the cell's own."""
        if cell.announce is None:
            return
        started, timer = cell.announce
        cell.announce = None
        timer.cancel()
        if cell.id in self.cells:
            await self._tell(cell, m.STARTED, started)

    def no_announce(self, cell: Cell) -> None:
        """The cell's result is on its way: it says the cell ran."""
        if cell.announce is not None:
            cell.announce[1].cancel()
            cell.announce = None

    def _time_out_in(self, cell: Cell, seconds: float) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        return loop.call_later(seconds, lambda: self._spawn(self.stop(cell, CellStatus.TIMEOUT)))

    async def stop(self, cell: Cell, reason: str) -> None:
        """Cancel or time out a cell: dequeue it, or interrupt (then kill) its executor."""
        if cell.id not in self.cells or cell.stop_reason is not None:
            return
        cell.stop_reason = reason
        if self.queue.remove(cell.id) is not None:
            waited = time.monotonic() - cell.received
            why = (
                f"it waited {waited:.1f} s in the queue and never started"
                if reason == CellStatus.TIMEOUT
                else ""
            )
            await self.finish(cell, reason, why)
            return
        handle = self._handle_of(cell)
        if handle is None:
            return  # still starting; _start_on_executor sees stop_reason
        log.info("%s cell %s: interrupting executor pid %d", reason, cell.id[:8], handle.pid)
        self.pool.signal(handle, signal.SIGUSR1 if reason == CellStatus.TIMEOUT else signal.SIGINT)
        loop = asyncio.get_running_loop()
        cell.timers.append(loop.call_later(self.cancel_grace, self._kill_if_running, cell))

    def _handle_of(self, cell: Cell) -> ExecutorHandle | None:
        return next((h for h in self.pool.handles() if h.cell is cell), None)

    def _kill_if_running(self, cell: Cell) -> None:
        handle = self._handle_of(cell)
        if handle is not None:
            log.warning(
                "cell %s did not stop within %.1f s; killing executor pid %d",
                cell.id[:8],
                self.cancel_grace,
                handle.pid,
            )
            self.pool.kill(handle)

    def executor_exited(self, handle: ExecutorHandle, returncode: int) -> None:
        """The pool saw an executor exit: answer the cell it was running, if any."""
        cell = handle.cell
        handle.cell = None
        if cell is None or cell.id not in self.cells:
            return
        if cell.stop_reason is not None:
            status, why = cell.stop_reason, "its executor had to be killed to stop it"
        else:
            how = (
                f"killed by signal {signal.Signals(-returncode).name}"
                if returncode < 0 and -returncode in signal.valid_signals()
                else f"exit code {returncode}"
            )
            status = CellStatus.DIED
            why = f"the executor process died ({how}) while running the cell"
        self._spawn(self.finish(cell, status, why, session_lost=True))

    async def finish(
        self, cell: Cell, status: str, why: str, *, session_lost: bool = False
    ) -> None:
        """Answer a cell the executor could not answer itself."""
        self.no_announce(cell)
        content: dict[str, Any] = {
            "status": status,
            "worker": self.worker,
            "reason": why,
            "session_lost": session_lost,
        }
        await self._tell(cell, m.RESULT, content)
        self.done(cell, status, {})

    def done(self, cell: Cell, status: str, stats: dict[str, Any]) -> None:
        """Forget an answered cell and free its resources."""
        if cell.queue_timer is not None:
            cell.queue_timer.cancel()
        self.no_announce(cell)
        for timer in cell.timers:
            timer.cancel()
        self.cells.pop(cell.id, None)
        self.journal.record(cell, status, stats)
        if log.isEnabledFor(logging.INFO):  # its arguments cost more than the rest of done()
            log.info(
                "cell %s session %s client %s on %s: %s, %s in, %s out, %.2f s",
                cell.id[:8],
                cell.session[:24],
                cell.client[:8],
                "+".join(cell.resources),
                status,
                binary_size(cell.nbytes),
                binary_size(float(stats.get("bytes_out", 0))),
                time.monotonic() - (cell.started or cell.received),
            )
        if self.running.pop(cell.id, None) is not None:
            self.busy -= set(cell.resources)
        self.pool.rebudget()  # what the cell left behind moves every cap (budget.py)
        # Always: a cancelled waiting cell may have held a reservation others wait on.
        self.pump()

    # -- views -----------------------------------------------------------------

    def load(self) -> dict[str, dict[str, int]]:
        """Running and waiting cells per resource."""
        out: dict[str, dict[str, int]] = {}
        for cell in self.running.values():
            for r in cell.resources:
                out.setdefault(r, {"running": 0, "waiting": 0})["running"] += 1
        for cell in self.queue.cells():
            for r in cell.resources:
                out.setdefault(r, {"running": 0, "waiting": 0})["waiting"] += 1
        return out
