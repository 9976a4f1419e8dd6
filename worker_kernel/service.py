"""The worker service: one asyncio loop, one ROUTER socket facing clients.

It verifies every message before anything else looks at it, answers the
handshake, pings, status requests and heartbeats, and hands cells to the
:class:`Dispatcher`, relaying what executors send back. It never runs user
code, so a busy or stuck cell never stops it from answering heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from . import reaper, views
from .advertise import Advertiser
from .capabilities import Capabilities, GpuMonitor
from .config import WorkerConfig
from .dispatch import Dispatcher
from .executors import ExecutorHandle, ExecutorPool
from .gate import (
    AllowList,
    BadRequest,
    RejectionLog,
    claimed_id,
    encrypt,
    encrypt_shared,
    number,
    peer_address,
    raise_open_files_limit,
    zap_user,
)
from .history import GpuHistory
from .kernels import KernelError, KernelHost, RemoteKernel
from .outbox import Outbox
from .protocol import messages as m
from .protocol.curve import PER_USER, PLAINTEXT, SHARED_KEY
from .protocol.errors import ProtocolError, VersionMismatch
from .protocol.messages import Message
from .protocol.pids import alive
from .protocol.receive import release_memory
from .protocol.versions import check_compatible, local_versions
from .protocol.wire import Limits, Wire
from .result_cache import ResultCache
from .scheduler import CPU, Cell, gpu_slot

log = logging.getLogger(__name__)

_THREAD_DECODE_FRAMES = 8  # hash messages with several 1 MiB frames off the event loop
_TRIM_EVERY = 5.0  # seconds between returns of freed heap pages to the system
_SLOW_KINDS = frozenset({m.START_KERNEL, m.STOP_KERNEL, m.CLOSE_SESSION})  # run as tasks
_TRIM_AFTER = 64 << 20
_CLIENT_LIVENESS = 5  # heartbeat intervals before a silent client's cells are cancelled
_ATTACH_SECONDS = 10.0  # keep heartbeating a client this long after it spoke
_MIN_BANDWIDTH = 10e6  # bytes/s assumed when a client announces a large upload
_FORGET_CLIENT = 3600.0


@dataclass(eq=False)
class ClientState:
    rid: bytes
    client: str = ""
    user: str = ""  # with per-user keys: whose key the connection proved
    last_seen: float = field(default_factory=time.monotonic)
    attached_until: float = 0.0


class WorkerService:
    """Serve cells to clients until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, config: WorkerConfig, key: bytes, capabilities: Capabilities) -> None:
        self.config = config
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
        self._next_trim = 0.0
        self.address = ""
        self.pool = ExecutorPool(
            self.ctx,
            worker=config.name,
            key=key,
            simulate=capabilities.simulator,
            start_timeout=config.executor_start_timeout,
            on_exit=self._on_executor_exit,
            memory_limit=config.memory_limit,
            session_memory=config.session_memory,
            faults=config.faults,
            cache_memory=config.cache_memory,
            max_executors=config.max_executors,
        )
        self.dispatcher = Dispatcher(
            self.pool,
            self._send,
            worker=config.name,
            cancel_grace=config.cancel_grace,
            spawn=self._spawn,
        )
        self.clients: dict[bytes, ClientState] = {}
        self.kernels = KernelHost(
            ctx=self.ctx,
            simulate=capabilities.simulator,
            max_kernels=config.max_kernels,
            grace=config.kernel_grace,
            on_death=self._kernel_died,
            on_frames=self._kernel_frames,
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
        self._dropped = False  # the drop-first-result fault was applied

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

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
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
        if not self._client_cells(rid):
            self.clients.pop(rid, None)  # disconnected: stop heartbeating it

    async def _send(self, rid: bytes, msg: Message) -> None:
        frames = self.wire.encode(msg)
        if msg.kind == m.RESULT:
            self.results.put(msg.parent, frames)
        await self.outbox.deliver(rid, frames, msg.kind, msg.parent, msg.to)

    async def _reply(self, req: Message, rid: bytes, kind: str, content: dict[str, Any]) -> None:
        client = self.clients.get(rid)
        to = client.client if client else ""
        msg = Message(kind=kind, content=content, session=req.session, parent=req.id, to=to)
        await self._send(rid, msg)

    async def _reject(self, rid: bytes, exc: ProtocolError, body: list[Any]) -> None:
        reason = f"worker {self.config.name} rejected the message: {exc}"
        # Echo the message id if it can be read, so the client knows which request
        # failed (the notice is unsigned and only ever shown as text).
        notice = Wire.encode_notice(reason, code=type(exc).__name__, parent=claimed_id(body))
        await self.outbox.deliver(rid, notice, m.REJECT, "", "")

    # -- client messages ------------------------------------------------------

    async def _client_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            rid, body = frames[0].bytes, [f.buffer for f in frames[1:]]
            # Verify only: the buffers are relayed to the executor as they came.
            if len(body) > _THREAD_DECODE_FRAMES:
                verified = await asyncio.to_thread(_verify, self.wire, body)
            else:
                verified = _verify(self.wire, body)
            # Fair to the other tasks (heartbeats, timers, executors) even when a
            # flood keeps this socket always readable.
            await asyncio.sleep(0)
            if isinstance(verified, ProtocolError):
                peer = f"{peer_address(frames[0])} ({rid.hex()[:8]})"
                if self.rejections.note(peer, str(verified)):
                    await self._reject(rid, verified, body)
                big = sum(b.nbytes for b in body) > _TRIM_AFTER
                del frames, body, verified
                if big:
                    # A reference cycle of asyncio's thread hand-off can still hold
                    # them until the collector runs (measured: often until the next
                    # message): collect now, then give the pages back.
                    gc.collect()
                    release_memory()
                continue
            msg = verified
            if not msg.authenticated:
                continue  # an unsigned notice is only ever shown, and clients send none
            relayed, body = frames[1:], []
            del frames  # the cell holds its frames only until they are relayed
            if msg.kind in _SLOW_KINDS:
                # Starting a kernel takes seconds: meanwhile every other client's
                # heartbeats and cells must still be read.
                self._spawn(self._handle(rid, msg, relayed))
            else:
                await self._handle(rid, msg, relayed)
            del relayed

    async def _handle(self, rid: bytes, msg: Message, frames: list[Any]) -> None:
        """Act on a verified message; any failure is answered, never raised."""
        try:
            await self._on_message(rid, msg, frames)
        except BadRequest as exc:
            self.rejections.note(f"{rid.hex()[:8]} (key holder)", f"bad {msg.kind}: {exc}")
            await self._reply(msg, rid, m.ERROR, {"code": "bad-request", "reason": str(exc)})
        except Exception:  # a bug here must not take the worker down
            log.exception("error handling %s from %s", msg.kind, rid.hex()[:8])
            await self._reply(
                msg,
                rid,
                m.ERROR,
                {"code": "internal", "reason": "internal worker error (see its log)"},
            )

    async def _on_message(self, rid: bytes, msg: Message, frames: list[Any]) -> None:
        now = time.monotonic()
        client = self.clients.get(rid)
        if client is None:
            client = self.clients[rid] = ClientState(rid)
        client.last_seen = now
        expect = number(msg.content, "expect_bytes") if msg.kind == m.PING else 0.0
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
        elif msg.kind == m.FETCH:
            if not await self._resume(rid, client, msg, str(msg.content.get("cell", ""))):
                await self._reply(
                    msg,
                    rid,
                    m.ERROR,
                    {"code": "unknown-cell", "reason": "no such cell, running or recent"},
                )
        elif msg.kind == m.CANCEL:
            cell = self.dispatcher.cells.get(str(msg.content.get("cell", "")))
            if cell is not None and cell.client_rid == rid:
                await self.dispatcher.stop(cell, "cancelled")
        elif msg.kind == m.PING:
            await self._reply(msg, rid, m.PONG, {"time": time.time()})
        elif msg.kind == m.STATUS:
            detail = bool(msg.content.get("detail"))
            await self._reply(msg, rid, m.STATUS_REPLY, self.status(detail))
        elif msg.kind == m.CLOSE_SESSION:
            closed = await self._close_session(str(msg.content.get("session", msg.session)))
            await self._reply(msg, rid, m.STATUS_REPLY, {"closed": closed})
        elif msg.kind == m.START_KERNEL:
            await self._start_kernel(rid, client, msg)
        elif msg.kind == m.STOP_KERNEL:
            kernel = self.kernels.kernels.get(str(msg.content.get("kernel", "")))
            if kernel is not None and kernel.owner_rid == rid:
                await self.kernels.stop(kernel)
            await self._reply(msg, rid, m.STATUS_REPLY, {"stopped": kernel is not None})
        elif msg.kind == m.KERNEL_FRAMES:
            kernel = self.kernels.kernels.get(str(msg.content.get("kernel", "")))
            if kernel is None or kernel.owner_rid != rid or kernel.relay is None:
                return  # a kernel that just stopped, or someone else's: dropped
            try:
                identity = bytes.fromhex(str(msg.content.get("identity", "")))
                await kernel.relay.to_kernel(str(msg.content.get("channel")), identity, msg.buffers)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            kernel.last_activity = now
        elif msg.kind == m.HEARTBEAT:
            kernel = self.kernels.kernels.get(str(msg.content.get("kernel", "")))
            if kernel is not None and kernel.owner_rid == rid:
                # Its forwarder relays the kernel's traffic and says when it last did.
                idle = min(number(msg.content, "idle"), now - kernel.started_mono)
                kernel.last_activity = now - idle
        else:
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
                "stall_grace": self.config.stall_grace,
                "warnings": warnings,
            },
        )

    async def _start_kernel(self, rid: bytes, client: ClientState, msg: Message) -> None:
        c = msg.content
        resources = self._resources(c)
        key, scheme = c.get("key"), c.get("signature_scheme", "hmac-sha256")
        if isinstance(resources, str):
            raise BadRequest(resources)
        if not isinstance(key, str) or not 0 < len(key) <= 256 or scheme != "hmac-sha256":
            raise BadRequest("a kernel needs a Jupyter key (at most 256 characters), hmac-sha256")
        gpus = [int(r[3:]) for r in resources if r.startswith("gpu")]
        try:
            kernel = await self.kernels.start(client.client, rid, gpus, key, scheme)
        except KernelError as exc:
            await self._reply(msg, rid, m.ERROR, {"code": "kernel", "reason": str(exc)})
            return
        await self._reply(msg, rid, m.KERNEL_STARTED, {"kernel": kernel.id})

    async def _kernel_frames(
        self, kernel: RemoteKernel, channel: str, identity: bytes, frames: list[Any]
    ) -> None:
        owner = self.clients.get(kernel.owner_rid)
        content = {"kernel": kernel.id, "channel": channel, "identity": identity.hex()}
        msg = Message(
            kind=m.KERNEL_FRAMES, content=content, buffers=frames, to=owner.client if owner else ""
        )
        with contextlib.suppress(zmq.ZMQError):  # the forwarder went away
            await self._send(kernel.owner_rid, msg)

    async def _kernel_died(self, kernel: RemoteKernel, returncode: int) -> None:
        event = {"kernel": kernel.id, "event": "died", "returncode": returncode}
        owner = self.clients.get(kernel.owner_rid)
        await self._send(
            kernel.owner_rid,
            Message(kind=m.KERNEL_EVENT, content=event, to=owner.client if owner else ""),
        )

    def _resources(self, content: dict[str, Any]) -> tuple[str, ...] | str:
        """The resources an execute asks for, or why they cannot be had."""
        if content.get("cpu"):
            return (CPU,)
        have = {g.index for g in self.capabilities.gpus}
        asked = content.get("gpus")
        if not asked:
            # No choice made by the client: the GPU with the least work.
            load = self.dispatcher.load()
            best = min(
                sorted(have),
                key=lambda g: sum(load.get(gpu_slot(g), {}).values()),
            )
            return (gpu_slot(best),)
        if not isinstance(asked, list) or not all(
            isinstance(g, int) and not isinstance(g, bool) for g in asked
        ):
            return f"gpus={asked!r} is not a list of GPU numbers"
        gpus = sorted(set(asked))
        if not set(gpus) <= have:
            return f"this worker serves GPUs {sorted(have)}, not {gpus}"
        return tuple(gpu_slot(g) for g in gpus)

    async def _resume(self, rid: bytes, client: ClientState, msg: Message, cell_id: str) -> bool:
        """Answer a repeated request for a cell without running it again: resend its
        result if it is recent, or route its output here if it is still going."""
        cached = self.results.get(cell_id)
        if cached is not None:
            await self.outbox.deliver(rid, cached, m.RESULT, cell_id, client.client)
            return True
        cell = self.dispatcher.cells.get(cell_id)
        if cell is None:
            return False
        if cell.client != client.client:
            raise BadRequest(f"request id {cell_id[:8]} belongs to another client")
        cell.client_rid = rid  # the client may have reconnected with a new socket
        if cell.started is not None:
            started = Message(
                kind=m.STARTED,
                content={"gpus": cell.gpus},
                session=cell.session,
                parent=cell.id,  # the request's id, not this retry's
                to=cell.client,
            )
            await self._send(rid, started)
        cell.position = -1  # report the position again
        await self.dispatcher.report_positions()
        return True

    async def _on_execute(
        self, rid: bytes, client: ClientState, msg: Message, frames: list[Any]
    ) -> None:
        request = msg.content.get("request") or msg.id
        if not isinstance(request, str) or not 8 <= len(request) <= 64:
            raise BadRequest("request id must be a string of 8 to 64 characters")
        if await self._resume(rid, client, msg, request):
            return  # a retry of a request already seen: exactly once
        resources = self._resources(msg.content)
        if isinstance(resources, str):
            error = {"ename": "ValueError", "evalue": f"worker {self.config.name}: {resources}"}
            content = {"status": "error", "error": error, "worker": self.config.name}
            reply = Message(kind=m.RESULT, content=content, session=msg.session, parent=request)
            reply.to = client.client
            await self._send(rid, reply)
            return
        timeout = number(msg.content, "timeout")
        if not isinstance(msg.content.get("code"), str):
            raise BadRequest("execute without code")
        user = ""
        if self.users is not None:  # per-user keys: the user the handshake proved
            user = self.users.user(zap_user(frames[0])) if frames else ""
        cell = Cell(
            id=request,
            client_rid=rid,
            client=client.client,
            user=user,
            session=msg.session,
            resources=resources,
            frames=frames,
            nbytes=msg.nbytes,
            timeout=timeout or None,
            received=time.monotonic(),
        )
        await self.dispatcher.submit(cell)

    # -- executor messages ----------------------------------------------------

    def _on_executor_exit(self, handle: ExecutorHandle, returncode: int) -> None:
        self.dispatcher.executor_exited(handle, returncode)

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
            is_result = body[2].bytes == m.RESULT.encode()
            if is_result:
                self.results.put(cell.id, body)
            if is_result and "drop-first-result" in self.config.faults and not self._dropped:
                self._dropped = True  # test hook: pretend the network lost it
                log.warning("fault injection: dropped the result of cell %s", cell.id[:8])
            else:
                kind = body[2].bytes.decode()
                await self.outbox.deliver(cell.client_rid, body, kind, cell.id, cell.client)
            if is_result:
                handle.cell = None
                handle.last_used = time.monotonic()
                # Its own executor's message: signed, but nothing re-hashed.
                verified = self.wire.decode(
                    [f.buffer for f in body], trusted_hop=True, assemble=False
                )
                content = verified.content
                if content.get("poisoned"):
                    log.warning(
                        "cell %s left its GPU context unusable; replacing the executor", cell.id[:8]
                    )
                    self._spawn(self.pool.stop(handle))
                self.dispatcher.done(
                    cell, str(content.get("status")), dict(content.get("stats", {}))
                )

    # -- periodic work --------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = self.config.heartbeat
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._forgive_stall(now, now - last - interval)
            await self._tick(now)
            last = time.monotonic()  # a slow pass awaited others' work: no stall

    def _forgive_stall(self, now: float, stalled: float) -> None:
        """Do not count a stall of this process (stopped, swapping, starved of CPU)
        against its clients: their heartbeats of that time are still unread in the
        socket, and cancelling their cells now would lose results they wait for."""
        if stalled < self.config.heartbeat:
            return
        log.warning(
            "this worker did not run for %.1f s (overloaded, swapping or stopped?); "
            "clients are not judged on that time",
            stalled,
        )
        for client in self.clients.values():
            client.last_seen = min(now, client.last_seen + stalled)

    def _client_cells(self, rid: bytes) -> list[Cell]:
        return [c for c in self.dispatcher.cells.values() if c.client_rid == rid]

    async def _tick(self, now: float) -> None:
        self.capabilities = self.monitor.refresh(self.capabilities)
        self.pool.rebudget()  # caps follow what the executors hold (budget.py)
        reaper.reap()  # orphans that were re-parented to us after the last pass
        if self.dispatcher.relayed_big or now >= self._next_trim:
            # Freed frames of large cells, and buffers libzmq filled for handshakes
            # that never finished (keyless peers): back to the system.
            self.dispatcher.relayed_big = False
            self._next_trim = now + _TRIM_EVERY
            release_memory()
        self.history.sample(self.capabilities, self.dispatcher.busy)
        await self.outbox.flush_all()
        for rid in list(self.clients):
            for cell_id, to, count in self.outbox.take_dropped(rid):
                text = (
                    f"[lan2gpu: {count} message(s) of this cell's output were dropped: this "
                    "notebook was not reading them fast enough]\n"
                )
                note = {"name": "stderr", "text": text}
                await self._send(rid, Message(kind=m.STREAM, content=note, parent=cell_id, to=to))
        load = self.load()
        owners = {k.owner for k in self.kernels.kernels.values()}
        seen = {c.client: now - c.last_seen for c in self.clients.values()}
        for kernel in self.kernels.orphans(lambda owner: seen.get(owner, float("inf"))):
            log.warning("kernel %s: its notebook machine went silent; shutting it down", kernel.id)
            self._spawn(self.kernels.stop(kernel))
        liveness = _CLIENT_LIVENESS * self.config.heartbeat
        for client in list(self.clients.values()):
            cells = self._client_cells(client.rid)
            if cells and now - client.last_seen > liveness:
                log.warning(
                    "client %s silent for %.0f s; cancelling its %d cell(s)",
                    client.client[:8],
                    now - client.last_seen,
                    len(cells),
                )
                for cell in cells:
                    await self.dispatcher.stop(cell, "cancelled")
            elif cells or client.attached_until > now or client.client in owners:
                # Listing the client's unanswered cells lets it notice a lost result.
                beat = {"load": load, "cells": [c.id for c in cells]}
                await self._send(
                    client.rid, Message(kind=m.HEARTBEAT, content=beat, to=client.client)
                )
            elif now - client.last_seen > _FORGET_CLIENT:
                del self.clients[client.rid]
        for handle in self.pool.handles():
            idle = now - handle.last_used
            if handle.cell is None and not handle.stopping and idle > self.config.session_idle:
                log.info("session %s idle for %.0f s; stopping its executor", handle.session, idle)
                self._spawn(self.pool.stop(handle))
        parent = self.config.parent_pid
        if parent is not None and not alive(parent):
            log.info("parent process %d is gone; stopping", parent)
            self.stop()

    async def _close_session(self, session: str) -> int:
        handles = [h for h in self.pool.for_session(session) if h.cell is None]
        await asyncio.gather(*(self.pool.stop(h) for h in handles))
        return len(handles)

    # -- views ------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        return views.load(self.capabilities, self.dispatcher, self.kernels)

    def status(self, detail: bool = False) -> dict[str, Any]:
        return views.status(self, detail)


def _verify(wire: Wire, body: list[Any]) -> Message | ProtocolError:
    """The verified message, or why not: returned, not raised, and without a
    traceback. A traceback's frames hold the buffers, and one raised across
    ``asyncio.to_thread`` is also kept in a reference cycle (the future keeps it),
    so a big rejected message stayed in memory until the garbage collector ran."""
    try:
        # Kernel frames are used here (relayed to a kernel), not relayed to an executor.
        kernel_frames = len(body) > 2 and bytes(body[2]) == m.KERNEL_FRAMES.encode()
        return wire.decode(body, assemble=kernel_frames)
    except ProtocolError as exc:
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        return exc


def _loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"
