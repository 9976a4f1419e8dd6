"""The worker service: one asyncio loop, one ROUTER socket facing clients.

It verifies every message before anything else looks at it, answers the
handshake and heartbeats, queues cells per GPU, hands them to executor
subprocesses and relays what they send back. It never runs user code, so a
busy or stuck cell never stops it from answering heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from .capabilities import Capabilities
from .config import WorkerConfig
from .executors import ExecutorHandle, ExecutorPool, ExecutorStartError
from .protocol import messages as m
from .protocol.errors import ProtocolError, VersionMismatch
from .protocol.messages import Message
from .protocol.versions import check_compatible, local_versions
from .protocol.wire import Limits, Wire
from .scheduler import Cell, FairQueue

log = logging.getLogger(__name__)

_THREAD_DECODE_BYTES = 4 << 20  # hash big messages off the event loop
_CLIENT_LIVENESS = 5  # heartbeat intervals before a silent client's cells are cancelled
_ATTACH_SECONDS = 10.0  # keep heartbeating a client this long after it spoke
_MIN_BANDWIDTH = 10e6  # bytes/s assumed when a client announces a large upload
_FORGET_CLIENT = 3600.0


@dataclass(eq=False)
class ClientState:
    rid: bytes
    client: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    attached_until: float = 0.0
    cells: set[str] = field(default_factory=set)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class WorkerService:
    """Serve cells to clients until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, config: WorkerConfig, key: bytes, capabilities: Capabilities) -> None:
        self.config = config
        self.capabilities = capabilities
        self.instance = m.new_id()
        self.wire = Wire(
            key,
            limits=Limits(max_bytes=config.max_message_bytes),
            window=config.replay_window,
        )
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        self.address = ""
        self.pool = ExecutorPool(
            self.ctx,
            worker=config.name,
            key=key,
            simulate=capabilities.simulator,
            start_timeout=config.executor_start_timeout,
            on_exit=self._on_executor_exit,
        )
        self.clients: dict[bytes, ClientState] = {}
        self.cells: dict[str, Cell] = {}
        gpus = [g.index for g in capabilities.gpus] or [0]
        self.queues: dict[int, FairQueue] = {g: FairQueue() for g in gpus}
        self.running: dict[int, Cell | None] = dict.fromkeys(gpus)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        self.sock.bind(self.config.bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        self._write_ready_file()
        gpus = ", ".join(f"GPU{g.index} {g.name}" for g in self.capabilities.gpus)
        log.info(
            "worker %s listening on %s (%s%s)",
            self.config.name,
            self.address,
            "simulator: " if self.capabilities.simulator else "",
            gpus,
        )
        workers = [
            self._spawn(self._client_loop()),
            self._spawn(self._executor_loop()),
            self._spawn(self._tick_loop()),
        ]
        try:
            await self._stop.wait()
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await self.pool.close()
            self.sock.close()
            self.ctx.term()
            if self.config.ready_file:
                with contextlib.suppress(OSError):
                    self.config.ready_file.unlink()
            log.info("worker %s stopped", self.config.name)

    def stop(self) -> None:
        self._stop.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed; stopping", exc_info=task.exception())
            self.stop()

    def _write_ready_file(self) -> None:
        path = self.config.ready_file
        if path is None:
            return
        info = {
            "address": self.address,
            "pid": os.getpid(),
            "name": self.config.name,
            "instance": self.instance,
        }
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)

    # -- sending --------------------------------------------------------------

    async def _send(self, rid: bytes, msg: Message) -> None:
        try:
            await self.sock.send_multipart([rid, *self.wire.encode(msg)], copy=False)
        except zmq.ZMQError as exc:  # the client went away (ROUTER_MANDATORY)
            log.debug("cannot send %s to client %s: %s", msg.kind, rid.hex()[:8], exc)

    async def _reply(self, req: Message, rid: bytes, kind: str, content: dict[str, Any]) -> None:
        client = self.clients.get(rid)
        to = client.client if client else ""
        msg = Message(kind=kind, content=content, session=req.session, parent=req.id, to=to)
        await self._send(rid, msg)

    async def _reject(self, rid: bytes, exc: ProtocolError) -> None:
        reason = f"worker {self.config.name} rejected the message: {exc}"
        notice = Wire.encode_notice(reason, code=type(exc).__name__)
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send_multipart([rid, *notice])

    # -- client messages ------------------------------------------------------

    async def _client_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            rid, body = frames[0].bytes, [f.buffer for f in frames[1:]]
            try:
                if sum(b.nbytes for b in body) > _THREAD_DECODE_BYTES:
                    msg = await asyncio.to_thread(self.wire.decode, body)
                else:
                    msg = self.wire.decode(body)
            except ProtocolError as exc:
                log.warning("rejected a message from %s: %s", rid.hex()[:8], exc)
                await self._reject(rid, exc)
                continue
            await self._on_message(rid, msg, frames[1:])

    async def _on_message(self, rid: bytes, msg: Message, frames: list[Any]) -> None:
        now = time.monotonic()
        client = self.clients.get(rid)
        if client is None:
            client = self.clients[rid] = ClientState(rid)
        client.last_seen = now
        expect = float(msg.content.get("expect_bytes", 0)) if msg.kind == m.PING else 0.0
        client.attached_until = max(
            client.attached_until, now + _ATTACH_SECONDS + expect / _MIN_BANDWIDTH
        )
        if msg.kind == m.HELLO:
            await self._on_hello(rid, client, msg)
            return
        if msg.to != self.instance:
            # Meant for another worker holding the same key, or for this address
            # before a restart: refuse, and tell the client to shake hands again.
            log.warning("rejected %s from %s: addressed to another worker", msg.kind, rid.hex()[:8])
            await self._reply(
                msg,
                rid,
                m.ERROR,
                {
                    "code": "wrong-recipient",
                    "reason": f"message was addressed to another worker instance; worker "
                    f"{self.config.name} restarted or is not the intended recipient",
                },
            )
            return
        if msg.kind == m.EXECUTE:
            await self._on_execute(rid, client, msg, frames)
        elif msg.kind == m.CANCEL:
            await self._on_cancel(rid, msg)
        elif msg.kind == m.PING:
            await self._reply(msg, rid, m.PONG, {"time": time.time()})
        elif msg.kind == m.STATUS:
            await self._reply(msg, rid, m.STATUS_REPLY, self.status())
        elif msg.kind == m.CLOSE_SESSION:
            closed = await self._close_session(str(msg.content.get("session", msg.session)))
            await self._reply(msg, rid, m.STATUS_REPLY, {"closed": closed})
        elif msg.kind != m.HEARTBEAT:
            log.warning("ignored unexpected %s from %s", msg.kind, rid.hex()[:8])

    async def _on_hello(self, rid: bytes, client: ClientState, msg: Message) -> None:
        client.client = str(msg.content.get("client", ""))
        peer = f"client {msg.content.get('host', '?')} ({rid.hex()[:8]})"
        mine = local_versions()
        try:
            warnings = check_compatible(mine, dict(msg.content.get("versions", {})), peer)
        except VersionMismatch as exc:
            log.warning("refused handshake: %s", exc)
            await self._reply(msg, rid, m.ERROR, {"code": "version", "reason": str(exc)})
            return
        for warning in warnings:
            log.info("handshake with %s: %s", peer, warning)
        await self._reply(
            msg,
            rid,
            m.WELCOME,
            {
                "worker": self.config.name,
                "instance": self.instance,
                "address": self.address,
                "versions": mine,
                "capabilities": self.capabilities.to_json(),
                "heartbeat": self.config.heartbeat,
                "warnings": warnings,
            },
        )

    async def _on_execute(
        self, rid: bytes, client: ClientState, msg: Message, frames: list[Any]
    ) -> None:
        timeout = msg.content.get("timeout")
        gpu = int(msg.content.get("gpu", next(iter(self.queues))))
        if gpu not in self.queues:
            await self._reply(
                msg,
                rid,
                m.RESULT,
                {"status": "error", "error": {"ename": "ValueError", "evalue": f"no GPU {gpu}"}},
            )
            return
        cell = Cell(
            id=msg.id,
            client_rid=rid,
            client=client.client,
            session=msg.session,
            gpu=gpu,
            frames=frames,
            nbytes=msg.nbytes,
            timeout=float(timeout) if timeout else None,
            received=time.monotonic(),
        )
        self.cells[cell.id] = cell
        client.cells.add(cell.id)
        position = self.queues[gpu].push(cell)
        busy = self.running[gpu] is not None
        await self._reply(msg, rid, m.QUEUED, {"position": position + busy, "gpu": gpu})
        self._pump(gpu)

    async def _on_cancel(self, rid: bytes, msg: Message) -> None:
        cell = self.cells.get(str(msg.content.get("cell", "")))
        if cell is not None and cell.client_rid == rid:
            await self._stop_cell(cell, "cancelled")

    # -- running cells --------------------------------------------------------

    def _pump(self, gpu: int) -> None:
        if self.running[gpu] is not None:
            return
        cell = self.queues[gpu].pop()
        if cell is not None:
            self.running[gpu] = cell
            self._spawn(self._start(cell))

    async def _start(self, cell: Cell) -> None:
        try:
            await self._start_on_executor(cell)
        except Exception:  # a bug here must answer the cell, not stop the worker
            log.exception("internal error starting cell %s", cell.id[:8])
            await self._finish(cell, "died", "internal worker error (see the worker log)")

    async def _start_on_executor(self, cell: Cell) -> None:
        try:
            handle = await self.pool.acquire(cell.session, cell.gpu)
        except ExecutorStartError as exc:
            await self._finish(cell, "died", f"could not start an executor: {exc}")
            return
        if cell.stop_reason is not None:  # cancelled while the executor started
            await self._finish(cell, cell.stop_reason, "")
            return
        handle.cell = cell
        cell.started = time.monotonic()
        await self._send(
            cell.client_rid,
            Message(
                kind=m.STARTED,
                content={"gpu": cell.gpu, "pid": handle.pid},
                session=cell.session,
                parent=cell.id,
                to=cell.client,
            ),
        )
        try:
            await self.pool.send_exec(handle, cell.client, cell.frames)
        except zmq.ZMQError as exc:  # executor vanished between start and send
            handle.cell = None
            self.pool.kill(handle)
            await self._finish(cell, "died", f"executor unreachable: {exc}", session_lost=True)
            return
        if cell.timeout:
            loop = asyncio.get_running_loop()
            cell.timers.append(
                loop.call_later(cell.timeout, lambda: self._spawn(self._stop_cell(cell, "timeout")))
            )

    async def _stop_cell(self, cell: Cell, reason: str) -> None:
        """Cancel or time out a cell: dequeue it, or interrupt (then kill) its executor."""
        if cell.id not in self.cells or cell.stop_reason is not None:
            return
        cell.stop_reason = reason
        if self.queues[cell.gpu].remove(cell.id) is not None:
            await self._finish(cell, reason, "")
            return
        handle = next((h for h in self.pool.handles() if h.cell is cell), None)
        if handle is None:
            return  # still starting; _start sees stop_reason
        log.info("%s cell %s: interrupting executor pid %d", reason, cell.id[:8], handle.pid)
        self.pool.signal(handle, signal.SIGUSR1 if reason == "timeout" else signal.SIGINT)
        loop = asyncio.get_running_loop()
        cell.timers.append(loop.call_later(self.config.cancel_grace, self._kill_if_running, cell))

    def _kill_if_running(self, cell: Cell) -> None:
        for handle in self.pool.handles():
            if handle.cell is cell:
                log.warning(
                    "cell %s did not stop within %.1f s; killing executor pid %d",
                    cell.id[:8],
                    self.config.cancel_grace,
                    handle.pid,
                )
                self.pool.kill(handle)

    def _on_executor_exit(self, handle: ExecutorHandle, returncode: int) -> None:
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
            status, why = "died", f"the executor process died ({how}) while running the cell"
        self._spawn(self._finish(cell, status, why, session_lost=True))

    async def _finish(
        self, cell: Cell, status: str, why: str, *, session_lost: bool = False
    ) -> None:
        """Answer a cell the executor could not answer itself."""
        content: dict[str, Any] = {
            "status": status,
            "worker": self.config.name,
            "reason": why,
            "session_lost": session_lost,
        }
        await self._send(
            cell.client_rid,
            Message(
                kind=m.RESULT,
                content=content,
                session=cell.session,
                parent=cell.id,
                to=cell.client,
            ),
        )
        self._done(cell, status, {})

    def _done(self, cell: Cell, status: str, stats: dict[str, Any]) -> None:
        for timer in cell.timers:
            timer.cancel()
        self.cells.pop(cell.id, None)
        client = self.clients.get(cell.client_rid)
        if client is not None:
            client.cells.discard(cell.id)
        log.info(
            "cell %s session %s client %s: %s, %s in, %s out, %.2f s",
            cell.id[:8],
            cell.session[:16],
            cell.client[:8],
            status,
            _fmt_bytes(cell.nbytes),
            _fmt_bytes(float(stats.get("bytes_out", 0))),
            time.monotonic() - (cell.started or cell.received),
        )
        if self.running.get(cell.gpu) is cell:
            self.running[cell.gpu] = None
            self._pump(cell.gpu)

    # -- executor messages ----------------------------------------------------

    async def _executor_loop(self) -> None:
        while True:
            frames = await self.pool.sock.recv_multipart(copy=False)
            executor_id, tag = frames[0].bytes.decode(), frames[1].bytes
            if tag == b"ready":
                self.pool.on_ready(executor_id, frames[2].bytes)
                continue
            handle = self.pool.get(executor_id)
            cell = handle.cell if handle else None
            if tag != b"fwd" or handle is None or cell is None:
                continue
            body = frames[2:]
            await self._forward(cell.client_rid, body)
            if body[2].bytes == m.RESULT.encode():
                handle.cell = None
                handle.last_used = time.monotonic()
                header = json.loads(body[3].bytes)
                content = header.get("content", {})
                self._done(cell, str(content.get("status")), dict(content.get("stats", {})))

    async def _forward(self, rid: bytes, frames: list[Any]) -> None:
        try:
            await self.sock.send_multipart([rid, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("cannot forward to client %s: %s", rid.hex()[:8], exc)

    # -- periodic work --------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = self.config.heartbeat
        while True:
            await asyncio.sleep(interval)
            await self._tick(time.monotonic())

    async def _tick(self, now: float) -> None:
        liveness = _CLIENT_LIVENESS * self.config.heartbeat
        for client in list(self.clients.values()):
            if client.cells and now - client.last_seen > liveness:
                log.warning(
                    "client %s silent for %.0f s; cancelling its %d cell(s)",
                    client.client[:8],
                    now - client.last_seen,
                    len(client.cells),
                )
                for cell_id in list(client.cells):
                    cell = self.cells.get(cell_id)
                    if cell is not None:
                        await self._stop_cell(cell, "cancelled")
            elif client.cells or client.attached_until > now:
                await self._send(client.rid, Message(kind=m.HEARTBEAT, to=client.client))
            elif now - client.last_seen > _FORGET_CLIENT:
                del self.clients[client.rid]
        for handle in self.pool.handles():
            idle = now - handle.last_used
            if handle.cell is None and not handle.stopping and idle > self.config.session_idle:
                log.info("session %s idle for %.0f s; stopping its executor", handle.session, idle)
                self._spawn(self.pool.stop(handle))
        parent = self.config.parent_pid
        if parent is not None and not _alive(parent):
            log.info("parent process %d is gone; stopping", parent)
            self.stop()

    async def _close_session(self, session: str) -> int:
        handles = [h for h in self.pool.for_session(session) if h.cell is None]
        await asyncio.gather(*(self.pool.stop(h) for h in handles))
        return len(handles)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()

        def cell_info(cell: Cell) -> dict[str, Any]:
            return {
                "id": cell.id,
                "session": cell.session,
                "client": cell.client,
                "bytes": cell.nbytes,
                "waiting": now - cell.received if cell.started is None else 0.0,
                "running": now - cell.started if cell.started is not None else 0.0,
            }

        return {
            "worker": self.config.name,
            "instance": self.instance,
            "capabilities": self.capabilities.to_json(),
            "gpus": {
                str(gpu): {
                    "running": cell_info(c) if (c := self.running[gpu]) is not None else None,
                    "queued": [cell_info(q) for q in self.queues[gpu].order()],
                }
                for gpu in self.queues
            },
            "sessions": sorted({h.session for h in self.pool.handles()}),
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
