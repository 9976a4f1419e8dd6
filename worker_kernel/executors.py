"""Executor subprocesses: one per (session, GPU), started, watched and stopped here.

The pool owns the service's private ROUTER socket (``ipc://`` in a 0700
directory, so only this user can reach it) that executors connect to, and every
executor process. When one exits, ``on_exit(handle, returncode)`` tells the
service, which answers the cell it was running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from . import child_output, reaper
from .budget import MemoryBudget
from .capabilities import gpu_env
from .protocol.messages import new_id
from .scheduler import Cell

log = logging.getLogger(__name__)

Slot = tuple[str, tuple[str, ...]]  # (session, resources): one executor's place

RECENT = 5.0  # an executor used this recently is not stopped for another session's cell
STARVED = 30.0  # ...unless that cell has waited this long for one (bounded waiting)


@dataclass(eq=False)
class ExecutorHandle:
    id: str
    session: str
    resources: tuple[str, ...]
    process: asyncio.subprocess.Process
    ready: asyncio.Future[dict[str, Any]]
    cell: Cell | None = None
    last_used: float = field(default_factory=time.monotonic)
    stopping: bool = False
    output: child_output.ChildOutput | None = None  # its stdout/stderr, into the log
    data: str = ""  # where it takes direct data connections (datapath.py), if it does

    @property
    def pid(self) -> int:
        return self.process.pid


ExitCallback = Callable[[ExecutorHandle, int], None]


class ExecutorStartError(Exception):
    """An executor did not come up; the message says why."""


class ExecutorPool:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        worker: str,
        key: bytes,
        simulate: bool,
        start_timeout: float,
        on_exit: ExitCallback,
        memory_limit: int = 0,
        session_memory: int = 0,
        faults: tuple[str, ...] = (),
        cache_memory: int = 0,
        pool_memory: int = 0,
        pool_prefault: bool = False,
        max_executors: int = 0,
    ) -> None:
        self.max_executors = max_executors  # 0: no limit
        self._dir = tempfile.mkdtemp(prefix="lan2gpu-")  # mode 0700
        self.endpoint = f"ipc://{self._dir}/executors"
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(self.endpoint)
        self._worker = worker
        self._key = key
        self._simulate = simulate
        self._start_timeout = start_timeout
        self._on_exit = on_exit
        self.budget = MemoryBudget(memory_limit, session_memory)
        self.headroom: dict[int, int] = {}  # pid -> what it may add, as of the last rebudget
        self._extra = [
            # Its first cap, until the service moves it (budget.py).
            f"--memory-limit={session_memory or memory_limit}",
            f"--memory-budget={memory_limit}",
            f"--session-memory={session_memory}",
            f"--cache-memory={cache_memory}",
            f"--pool-memory={pool_memory}",
            *(["--pool-prefault"] if pool_prefault else []),
            *(f"--fault={f}" for f in faults),
        ]
        self._by_id: dict[str, ExecutorHandle] = {}
        self._spawning = 0  # executors being started, not registered yet
        self._by_slot: dict[tuple[str, tuple[str, ...]], ExecutorHandle] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        # Where executors listen for direct data: "tcp://host:0" (the service's
        # interface), "ipc" (a socket in the private directory), or "" (they do not).
        self.data_bind = ""

    def get(self, executor_id: str) -> ExecutorHandle | None:
        return self._by_id.get(executor_id)

    def handles(self) -> list[ExecutorHandle]:
        return list(self._by_id.values())

    def for_session(self, session: str) -> list[ExecutorHandle]:
        return [h for h in self._by_id.values() if h.session == session]

    async def acquire(
        self,
        session: str,
        resources: tuple[str, ...],
        keep: Iterable[Slot] = (),
        starved: bool = False,
    ) -> ExecutorHandle:
        """The session's executor for ``resources``, started (and waited for) if needed;
        ``keep`` and ``starved`` say which one may be stopped to make room (:meth:`evictable`)."""
        while True:
            handle = self._by_slot.get((session, resources))
            if handle is not None and _started(handle):  # the hot path: no wait, no task
                handle.last_used = time.monotonic()
                return handle
            if handle is None or handle.stopping:
                handle = await self._spawn(session, resources, keep, starved)
            try:
                await asyncio.wait_for(asyncio.shield(handle.ready), self._start_timeout)
            except TimeoutError:
                self.kill(handle)
                raise ExecutorStartError(
                    f"executor did not start within {self._start_timeout:.0f} s "
                    "(raise --executor-start-timeout if imports are slow on this host)"
                ) from None
            if not handle.stopping:
                handle.last_used = time.monotonic()
                return handle
            # It was told to stop while we waited (its session closed, or it sat
            # idle too long): a cell handed to it now would die with it.

    def rebudget(self) -> dict[int, int]:
        """Move every executor's memory cap (:mod:`.budget`); pid -> what it may add,
        also kept in :attr:`headroom` until the next call."""
        alive = [h for h in self._by_id.values() if h.process.returncode is None]
        # One starting keeps its first cap (its imports need room), one stopping its
        # last: both still hold memory, so both count.
        moved = [h.pid for h in alive if h.ready.done() and not h.stopping]
        held = [h.pid for h in alive if h.pid not in moved]
        self.headroom = self.budget.apply(moved, also=held)
        return self.headroom

    def has(self, session: str, resources: tuple[str, ...]) -> bool:
        handle = self._by_slot.get((session, resources))
        return handle is not None and not handle.stopping

    def evictable(
        self, keep: Iterable[Slot], now: float, starved: bool = False
    ) -> list[ExecutorHandle]:
        """Executors that may be stopped to start another, the one to go first first.

        Never a busy one. Not one used in the last :data:`RECENT` seconds, nor one
        that cells are waiting for or running on (``keep``: (session, resources) slots;
        it would be started again at once: that is the thrash), nor one still
        starting. A cell ``starved`` of an executor (it waited :data:`STARVED`
        seconds) may take any other idle one, so waiting is bounded.
        """
        kept = set(keep)
        idle = [
            h for h in self._by_id.values() if h.cell is None and not h.stopping and h.ready.done()
        ]
        if not starved:
            idle = [
                h
                for h in idle
                if (h.session, h.resources) not in kept and now - h.last_used >= RECENT
            ]
        return sorted(idle, key=lambda h: h.last_used)

    def free_slots(self) -> int:
        """How many executors can start without stopping one (a large number: no cap)."""
        if not self.max_executors:
            return 1 << 30
        live = sum(not h.stopping for h in self._by_id.values()) + self._spawning
        return max(0, self.max_executors - live)

    def _make_room(self, keep: Iterable[Slot], starved: bool) -> None:
        """Stop an executor if starting one more would pass ``--max-executors``.

        Each executor holds a session's namespace, arrays and GPU memory, and has
        its own memory limit: without a cap, many sessions add up past the host's
        RAM. Which one may go: :meth:`evictable`. The dispatcher starts a cell only
        when there is room, so finding none here is rare (the fleet changed in
        between); one more is started then, as when every executor is busy.
        """
        if self.free_slots() > 0:
            return
        candidates = self.evictable(keep, time.monotonic(), starved)
        if not candidates:
            log.warning("no executor can be stopped for another; starting one more")
            return
        oldest = candidates[0]
        log.info(
            "at --max-executors %d: stopping session %s's executor (idle longest)",
            self.max_executors,
            oldest.session,
        )
        task = asyncio.create_task(self.stop(oldest))
        self._watchers.add(task)  # kept until done, like the exit watchers
        task.add_done_callback(self._watchers.discard)

    async def _spawn(
        self, session: str, resources: tuple[str, ...], keep: Iterable[Slot], starved: bool
    ) -> ExecutorHandle:
        self._make_room(keep, starved)
        self._spawning += 1  # counted against --max-executors until it is registered
        try:
            return await self._start_process(session, resources)
        finally:
            self._spawning -= 1

    async def _start_process(self, session: str, resources: tuple[str, ...]) -> ExecutorHandle:
        gpus = [int(r[3:]) for r in resources if r.startswith("gpu")]
        if self._simulate:
            # Simulated GPUs are labels; the simulator itself has one device.
            env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        else:
            env = gpu_env(os.environ, gpus)  # [] (a CPU cell) hides every GPU
            env.pop("NUMBA_ENABLE_CUDASIM", None)
        # The cell's GPUs in the host's (nvidia-smi) numbering, for the curious cell.
        env["LAN2GPU_CELL_GPUS"] = ",".join(map(str, gpus))
        executor_id = new_id()
        data = self.data_bind
        if data == "ipc":
            data = f"ipc://{self._dir}/{executor_id[:12]}.data"
        process, output = await child_output.spawn(
            "executor",
            sys.executable,
            "-m",
            "worker_kernel.executor",
            "--connect",
            self.endpoint,
            "--identity",
            executor_id,
            "--worker",
            self._worker,
            "--parent-pid",
            str(os.getpid()),
            *self._extra,
            *([f"--data-bind={data}"] if data else []),
            stdin=asyncio.subprocess.PIPE,
            env=env,
            # Own process group: a Ctrl-C meant for the service must not hit cells.
            start_new_session=True,
        )
        if process.stdin is None:  # cannot happen with stdin=PIPE; keeps mypy honest
            raise ExecutorStartError("executor has no stdin")
        process.stdin.write(self._key.hex().encode() + b"\n")
        await process.stdin.drain()
        process.stdin.close()
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        handle = ExecutorHandle(executor_id, session, resources, process, ready)
        handle.output = output
        self._by_id[executor_id] = handle
        self._by_slot[(session, resources)] = handle
        watcher = asyncio.create_task(self._watch(handle))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        log.debug("started executor %s (pid %d), session %s", executor_id[:8], process.pid, session)
        return handle

    async def _watch(self, handle: ExecutorHandle) -> None:
        returncode = await handle.process.wait()
        # What its cells started and left running goes with it (same process group).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.pid, signal.SIGKILL)
        if handle.output is not None:
            await handle.output.close()
        reaper.reap_after_exit()  # what its cells started outside the group (setsid)

        self._by_id.pop(handle.id, None)
        if self._by_slot.get((handle.session, handle.resources)) is handle:
            del self._by_slot[(handle.session, handle.resources)]
        if not handle.ready.done():
            handle.ready.set_exception(
                ExecutorStartError(f"executor exited with code {returncode} while starting")
            )
            handle.ready.exception()  # mark retrieved; acquire() re-raises it
        if not handle.stopping:
            log.warning("executor pid %d exited with code %d", handle.pid, returncode)
        self._on_exit(handle, returncode)

    def on_ready(self, executor_id: str, info: bytes) -> None:
        handle = self._by_id.get(executor_id)
        if handle is not None and not handle.ready.done():
            ready = json.loads(info)
            handle.data = str(ready.get("data") or "")
            handle.ready.set_result(ready)

    async def send_exec(
        self, handle: ExecutorHandle, client: str, frames: list[Any], ticket: str = ""
    ) -> None:
        """Hand a cell to ``handle``; ``ticket`` (hex) admits its direct data connection."""
        control = json.dumps({"client": client, "ticket": ticket}).encode()
        await self.sock.send_multipart([handle.id.encode(), b"exec", control, *frames], copy=False)

    def signal(self, handle: ExecutorHandle, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            handle.process.send_signal(signum)

    def kill(self, handle: ExecutorHandle) -> None:
        handle.stopping = True  # never hand a dying executor another cell
        # The whole process group: processes a cell started (a server, a `sleep`
        # it shelled out to) would otherwise outlive it, holding GPU memory.
        try:
            os.killpg(handle.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.signal(handle, signal.SIGKILL)

    def stop(self, handle: ExecutorHandle, grace: float = 2.0) -> Coroutine[Any, Any, None]:
        """Ask an executor to exit; kill it if it does not within ``grace``.

        It takes no other cell from the moment of this call, not only once the
        returned coroutine runs: a cell given to it in between would die with it.
        """
        handle.stopping = True
        return self._stop(handle, grace)

    async def _stop(self, handle: ExecutorHandle, grace: float) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send_multipart([handle.id.encode(), b"stop"])
        try:
            await asyncio.wait_for(handle.process.wait(), grace)
        except TimeoutError:
            self.kill(handle)
            await handle.process.wait()

    async def close(self) -> None:
        """Stop every executor and release the socket and directory."""
        await asyncio.gather(*(self.stop(h) for h in self.handles()))
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _started(handle: ExecutorHandle) -> bool:
    """Started and serving: a cell can be handed to it without waiting."""
    ready = handle.ready
    return not handle.stopping and ready.done() and not ready.cancelled() and not ready.exception()
