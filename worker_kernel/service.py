"""The worker service: one asyncio loop, one ROUTER socket facing clients.

This module is the wiring and the lifecycle; each part is a module of its own:

- :mod:`.ingress` verifies every message before anything else looks at it;
- :mod:`.handlers` answers each kind (handshake, cells, pings, status, kernels);
- :mod:`.clients` knows who is connected and whom to heartbeat;
- :mod:`.dispatch` queues cells fairly and hands them to executors (:mod:`.executors`);
- :mod:`.relay` brings what executors and kernels send back to their clients;
- :mod:`.housekeeping` does the periodic work, job by job.

It never runs user code, so a busy or stuck cell never stops it from answering
heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from . import reaper, views
from .advertise import Advertiser
from .capabilities import Capabilities, GpuMonitor
from .clients import ClientRegistry
from .config import WorkerConfig
from .dispatch import Dispatcher
from .executors import ExecutorPool
from .gate import (
    AllowList,
    RejectionLog,
    encrypt,
    encrypt_shared,
    raise_open_files_limit,
)
from .handlers import Handlers
from .history import GpuHistory
from .housekeeping import Housekeeping
from .ingress import Ingress
from .kernels import KernelHost
from .outbox import Outbox
from .protocol import heap
from .protocol import messages as m
from .protocol.contents import Load, StatusDocument
from .protocol.curve import PER_USER, PLAINTEXT, SHARED_KEY
from .protocol.messages import Message
from .protocol.wire import Limits, Wire
from .relay import Relay
from .result_cache import ResultCache
from .scheduler import Cell

log = logging.getLogger(__name__)

_SLOW_KINDS = frozenset({m.START_KERNEL, m.STOP_KERNEL, m.CLOSE_SESSION})  # run as tasks
_CLIENT_LIVENESS = 5  # heartbeat intervals before a silent client's cells are cancelled


def executor_pool(config: WorkerConfig) -> int:
    """Each executor's pool: ``--pool-memory``, at most a quarter of what its session
    may hold, and no more than the memory budget's share per executor, so that all
    pools together stay within the budget."""
    pool = config.pool_memory
    cap = config.session_memory or config.memory_limit  # an executor's first cap
    if cap:
        pool = min(pool, cap // 4)
    if config.memory_limit:
        pool = min(pool, config.memory_limit // max(1, config.max_executors))
    return pool


class WorkerService:
    """Serve cells to clients until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, config: WorkerConfig, key: bytes, capabilities: Capabilities) -> None:
        self.config = config
        # Frames of large cells: the heap keeps them for the next one (heap.py).
        heap.keep_freed(config.pool_memory, one_arena=True)
        self.capabilities = capabilities
        self.monitor = GpuMonitor()
        self.history = GpuHistory()  # recent GPU samples, for dashboards
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
        # A client that reconnects (its TCP gave up on a cut network) keeps its routing
        # id; the new connection must take over from the half-open old one.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # No valid frame is bigger than a chunk or a header: libzmq drops a peer
        # that announces a bigger one before allocating it.
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.wire.limits.max_frame_bytes)
        # Peers that never finish the handshake (idle, slow, keyless) are dropped.
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, int(config.handshake_timeout * 1000))
        self._key = key
        self.address = ""
        self.pool = ExecutorPool(
            self.ctx,
            worker=config.name,
            key=key,
            simulate=capabilities.simulator,
            start_timeout=config.executor_start_timeout,
            # The dispatcher is made after the pool: looked up when an executor exits.
            on_exit=lambda handle, code: self.dispatcher.executor_exited(handle, code),  # noqa: PLW0108
            memory_limit=config.memory_limit,
            session_memory=config.session_memory,
            faults=config.faults,
            cache_memory=config.cache_memory,
            pool_memory=executor_pool(config),
            pool_prefault=config.pool_prefault,
            max_executors=config.max_executors,
        )
        self.dispatcher = Dispatcher(
            self.pool,
            self.send,
            worker=config.name,
            cancel_grace=config.cancel_grace,
            spawn=self.spawn,
        )
        self.clients = ClientRegistry(liveness=_CLIENT_LIVENESS * config.heartbeat)
        self.handlers = Handlers(self)
        self.relay = Relay(self)
        self.housekeeping = Housekeeping(self)
        self.kernels = KernelHost(
            ctx=self.ctx,
            simulate=capabilities.simulator,
            max_kernels=config.max_kernels,
            grace=config.kernel_grace,
            on_death=self.relay.kernel_died,
            on_frames=self.relay.kernel_frames,
        )
        self.advertiser: Advertiser | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failed = False  # an internal error stopped the service (exit non-zero)
        self.results = ResultCache()
        self.sock.setsockopt(zmq.SNDHWM, 10_000)  # messages per client before the outbox holds
        self.outbox = Outbox(self.sock)
        self.outbox.gone = self._client_gone
        self.auth: AsyncioAuthenticator | None = None
        self.users: AllowList | None = None  # per-user keys (--encrypt): who each client is
        self.rejections = RejectionLog(log)
        self.ingress = Ingress(self.sock, self.wire, self.rejections, self.outbox, config.name)

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        raise_open_files_limit()
        reaper.become_subreaper()  # orphans of ended executors and kernels come here
        if self.config.encrypt:
            self.auth, self.users = encrypt(
                self.ctx, self.sock, self.config.key_file, self.config.authorized_keys
            )
        elif not self.config.plaintext:
            self.auth = encrypt_shared(self.ctx, self.sock, self._key)
        self.sock.bind(self.config.bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.direct_data:
            self.pool.data_bind = data_bind(self.address)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        if self.config.advertise:
            self.advertiser = Advertiser(
                self.config.name, self.address, self.instance, security=self.security
            )
            try:
                await self.advertiser.start()
            except Exception as exc:  # mDNS is a convenience; the worker serves without it
                log.warning("could not announce on the LAN (%s); clients need the address", exc)
        self._write_ready_file()
        gpus = ", ".join(f"GPU{g.index} {g.name}" for g in self.capabilities.gpus)
        log.info(
            "worker %s listening on %s (%s%s)",
            self.config.name,
            self.address,
            "simulator: " if self.capabilities.simulator else "",
            gpus,
        )
        if self.config.plaintext and not _loopback(self.address):
            log.warning(
                "listening on %s with --insecure-plaintext: anyone who can reach it can read "
                "the traffic, and can make this worker hold data in memory before any "
                "signature is checked (ZeroMQ hands over a message only once all of it has "
                "arrived); leave the flag out to encrypt with the shared key",
                self.address,
            )
        workers = [
            self.spawn(self._client_loop()),
            self.spawn(self.relay.executors()),
            self.spawn(self._tick_loop()),
        ]
        try:
            await self._stop.wait()
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self.advertiser is not None:
                await self.advertiser.close()
            if self.auth is not None:
                self.auth.stop()
            await self.kernels.close()
            await self.pool.close()
            reaper.reap()  # the last orphans of the executors and kernels just stopped
            self.monitor.close()
            self.sock.close()
            self.ctx.term()
            if self.config.ready_file:
                with contextlib.suppress(OSError):
                    self.config.ready_file.unlink()
            log.info("worker %s stopped", self.config.name)

    def stop(self) -> None:
        self._stop.set()

    @property
    def security(self) -> str:
        """How connections are protected: ``shared-key``, ``per-user`` or ``plaintext``."""
        if self.config.encrypt:
            return PER_USER
        return PLAINTEXT if self.config.plaintext else SHARED_KEY

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the service: one that fails stops the worker."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed; stopping", exc_info=task.exception())
            self.failed = True
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

    def _client_gone(self, rid: bytes) -> None:
        if not self.cells_of(rid):
            self.clients.drop(rid)  # disconnected: stop heartbeating it

    async def send(self, rid: bytes, msg: Message) -> None:
        """Sign ``msg`` and send it to the connection ``rid`` (held if it reads slowly)."""
        frames = self.wire.encode(msg)
        if msg.kind == m.RESULT:
            self.results.put(msg.parent, frames, msg.to)
        await self.outbox.deliver(rid, frames, msg.kind, msg.parent, msg.to)

    async def reply(self, req: Message, rid: bytes, kind: str, content: dict[str, Any]) -> None:
        """Answer ``req`` (from ``rid``) with a ``kind`` message."""
        to = self.clients.to(rid)
        msg = Message(kind=kind, content=content, session=req.session, parent=req.id, to=to)
        await self.send(rid, msg)

    # -- the loops --------------------------------------------------------------

    async def _client_loop(self) -> None:
        while True:
            rid, msg, frames = await self.ingress.next()
            if msg.kind in _SLOW_KINDS:
                # Starting a kernel takes seconds: meanwhile every other client's
                # heartbeats and cells must still be read.
                self.spawn(self.handlers.handle(rid, msg, frames))
            else:
                await self.handlers.handle(rid, msg, frames)
            del frames  # the cell holds its frames only until they are relayed

    async def _tick_loop(self) -> None:
        interval = self.config.heartbeat
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.housekeeping.forgive_stall(now, now - last - interval)
            await self.housekeeping.run(now)
            last = time.monotonic()  # a slow pass awaited others' work: no stall

    def cells_of(self, rid: bytes) -> list[Cell]:
        """The cells the connection ``rid`` has here, queued or running."""
        return [c for c in self.dispatcher.cells.values() if c.client_rid == rid]

    # -- views ------------------------------------------------------------------

    def load(self) -> Load:
        return views.load(self.capabilities, self.dispatcher, self.kernels)

    def status(self, detail: bool = False) -> StatusDocument:
        return views.status(self, detail)


def data_bind(address: str) -> str:
    """Where executors listen for direct data, given where the service listens: the
    same interface on a port the system picks, or, for an ``ipc://`` service (this user
    on this host only), a socket in the executors' private directory."""
    if address.startswith("ipc://"):
        return "ipc"
    host = address.removeprefix("tcp://").rpartition(":")[0]
    return f"tcp://{host}:0" if address.startswith("tcp://") and host else ""


def _loopback(address: str) -> bool:
    if address.startswith("ipc://"):  # a socket file: this host only
        return True
    host = urlsplit(address).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"
