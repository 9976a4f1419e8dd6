"""What the worker does with each kind of verified message from a client.

:class:`Handlers` holds the table from message kind to handler (``hello``,
``execute``, ``fetch``, ``cancel``, ``ping``, ``status``, ...); every handler
gets the connection's routing id, its :class:`~.clients.ClientState`, the
message and its raw frames (relayed to an executor as they came). A request
that makes no sense is answered with an error; a failure here is logged and
answered, never raised: the worker serves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .clients import ClientState
from .gate import BadRequest, number, zap_user
from .kernels import KernelError
from .protocol import messages as m
from .protocol.contents import RECEIVED_MAX, Welcome
from .protocol.errors import VersionMismatch
from .protocol.messages import Message
from .protocol.outcomes import UNKNOWN_CELL, UNKNOWN_CLIENT, WRONG_RECIPIENT, CellStatus
from .protocol.versions import check_compatible, local_versions
from .scheduler import CPU, Cell, gpu_slot

if TYPE_CHECKING:
    from .service import WorkerService

log = logging.getLogger(__name__)

Frames = Sequence[Any]
Handler = Callable[[bytes, ClientState, Message, Frames], Awaitable[None]]


class Handlers:
    """The service's answers to clients, by message kind."""

    def __init__(self, service: WorkerService) -> None:
        self.s = service
        self.table: dict[str, Handler] = {
            m.EXECUTE: self._on_execute,
            m.FETCH: self._on_fetch,
            m.CANCEL: self._on_cancel,
            m.PING: self._on_ping,
            m.STATUS: self._on_status,
            m.CLOSE_SESSION: self._on_close_session,
            m.START_KERNEL: self._start_kernel,
            m.STOP_KERNEL: self._on_stop_kernel,
            m.KERNEL_FRAMES: self._on_kernel_frames,
            m.HEARTBEAT: self._on_heartbeat,
        }

    async def handle(self, rid: bytes, msg: Message, frames: list[Any]) -> None:
        """Act on a verified message; any failure is answered, never raised."""
        try:
            await self._on_message(rid, msg, frames)
        except BadRequest as exc:
            self.s.rejections.note(f"{rid.hex()[:8]} (key holder)", f"bad {msg.kind}: {exc}")
            await self.s.reply(msg, rid, m.ERROR, {"code": "bad-request", "reason": str(exc)})
        except Exception:  # a bug here must not take the worker down
            log.exception("error handling %s from %s", msg.kind, rid.hex()[:8])
            await self.s.reply(
                msg,
                rid,
                m.ERROR,
                {"code": "internal", "reason": "internal worker error (see its log)"},
            )

    async def _on_message(self, rid: bytes, msg: Message, frames: list[Any]) -> None:
        now = time.monotonic()
        expect = number(msg.content, "expect_bytes") if msg.kind == m.PING else 0.0
        if msg.kind == m.HELLO:
            await self._on_hello(rid, self.s.clients.heard(rid, now, expect), msg, frames)
            return
        if msg.to != self.s.instance:
            # Meant for another worker holding the same key, or for this address
            # before a restart: refuse, and tell the client to shake hands again.
            log.warning("rejected %s from %s: addressed to another worker", msg.kind, rid.hex()[:8])
            await self.s.reply(
                msg,
                rid,
                m.ERROR,
                {
                    "code": WRONG_RECIPIENT,
                    "reason": f"message was addressed to another worker instance; worker "
                    f"{self.s.config.name} restarted or is not the intended recipient",
                },
            )
            return
        known = self.s.clients.get(rid)
        if known is None or not known.client:
            # A connection that has not said hello here: one that replaced the client's
            # old connection after the network came back, when this worker had already
            # let the old one go. Its answers would be addressed to nobody: ask it to
            # shake hands again (the client does, by itself).
            who = rid.hex()[:8]
            log.info("%s from %s before its handshake: asked to shake hands", msg.kind, who)
            unknown = {
                "code": UNKNOWN_CLIENT,
                "reason": f"worker {self.s.config.name} does not know this connection (it "
                "replaced one the worker had let go); shake hands again",
            }
            await self.s.reply(msg, rid, m.ERROR, unknown)
            return
        client = self.s.clients.heard(rid, now, expect)
        handler = self.table.get(msg.kind)
        if handler is None:
            log.warning("ignored unexpected %s from %s", msg.kind, rid.hex()[:8])
            return
        await handler(rid, client, msg, frames)

    async def _on_fetch(self, rid: bytes, client: ClientState, msg: Message, _: Frames) -> None:
        if not await self._resume(rid, client, msg, str(msg.content.get("cell", ""))):
            unknown = {"code": UNKNOWN_CELL, "reason": "no such cell, running or recent"}
            await self.s.reply(msg, rid, m.ERROR, unknown)

    async def _on_cancel(self, rid: bytes, client: ClientState, msg: Message, _: Frames) -> None:
        cell = self.s.dispatcher.cells.get(str(msg.content.get("cell", "")))
        if cell is not None and cell.client_rid == rid:
            await self.s.dispatcher.stop(cell, CellStatus.CANCELLED)

    async def _on_ping(self, rid: bytes, client: ClientState, msg: Message, _: Frames) -> None:
        await self.s.reply(msg, rid, m.PONG, {"time": time.time()})

    async def _on_status(self, rid: bytes, client: ClientState, msg: Message, _: Frames) -> None:
        detail = bool(msg.content.get("detail"))
        await self.s.reply(msg, rid, m.STATUS_REPLY, dict(self.s.status(detail)))

    async def _on_close_session(
        self, rid: bytes, client: ClientState, msg: Message, _: Frames
    ) -> None:
        closed = await self._close_session(str(msg.content.get("session", msg.session)))
        await self.s.reply(msg, rid, m.STATUS_REPLY, {"closed": closed})

    async def _on_stop_kernel(
        self, rid: bytes, client: ClientState, msg: Message, _: Frames
    ) -> None:
        kernel = self.s.kernels.kernels.get(str(msg.content.get("kernel", "")))
        if kernel is not None and kernel.owner_rid == rid:
            await self.s.kernels.stop(kernel)
        await self.s.reply(msg, rid, m.STATUS_REPLY, {"stopped": kernel is not None})

    async def _on_kernel_frames(
        self, rid: bytes, client: ClientState, msg: Message, _: Frames
    ) -> None:
        kernel = self.s.kernels.kernels.get(str(msg.content.get("kernel", "")))
        if kernel is None or kernel.owner_rid != rid or kernel.relay is None:
            return  # a kernel that just stopped, or someone else's: dropped
        try:
            identity = bytes.fromhex(str(msg.content.get("identity", "")))
            await kernel.relay.to_kernel(str(msg.content.get("channel")), identity, msg.buffers)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        kernel.last_activity = time.monotonic()

    async def _on_heartbeat(self, rid: bytes, client: ClientState, msg: Message, _: Frames) -> None:
        kernel = self.s.kernels.kernels.get(str(msg.content.get("kernel", "")))
        if kernel is not None and kernel.owner_rid == rid:
            # Its forwarder relays the kernel's traffic and says when it last did.
            now = time.monotonic()
            idle = min(number(msg.content, "idle"), now - kernel.started_mono)
            kernel.last_activity = now - idle

    async def _on_hello(
        self, rid: bytes, client: ClientState, msg: Message, _: Frames = ()
    ) -> None:
        client.client = str(msg.content.get("client", ""))
        peer = f"client {msg.content.get('host', '?')} ({rid.hex()[:8]})"
        mine = local_versions()
        try:
            warnings = check_compatible(mine, dict(msg.content.get("versions", {})), peer)
        except VersionMismatch as exc:
            log.warning("refused handshake: %s", exc)
            await self.s.reply(msg, rid, m.ERROR, {"code": "version", "reason": str(exc)})
            return
        for warning in warnings:
            log.info("handshake with %s: %s", peer, warning)
        welcome: Welcome = {
            "worker": self.s.config.name,
            "instance": self.s.instance,
            "address": self.s.address,
            "versions": mine,
            "capabilities": self.s.capabilities.to_json(),
            "heartbeat": self.s.config.heartbeat,
            "stall_grace": self.s.config.stall_grace,
            "warnings": warnings,
            "direct_data": bool(self.s.pool.data_bind),
        }
        await self.s.reply(msg, rid, m.WELCOME, dict(welcome))

    async def _start_kernel(self, rid: bytes, client: ClientState, msg: Message, _: Frames) -> None:
        c = msg.content
        resources = self._resources(c)
        key, scheme = c.get("key"), c.get("signature_scheme", "hmac-sha256")
        if isinstance(resources, str):
            raise BadRequest(resources)
        if not isinstance(key, str) or not 0 < len(key) <= 256 or scheme != "hmac-sha256":
            raise BadRequest("a kernel needs a Jupyter key (at most 256 characters), hmac-sha256")
        gpus = [int(r[3:]) for r in resources if r.startswith("gpu")]
        try:
            kernel = await self.s.kernels.start(client.client, rid, gpus, key, scheme)
        except KernelError as exc:
            await self.s.reply(msg, rid, m.ERROR, {"code": "kernel", "reason": str(exc)})
            return
        await self.s.reply(msg, rid, m.KERNEL_STARTED, {"kernel": kernel.id})

    def _resources(self, content: dict[str, Any]) -> tuple[str, ...] | str:
        """The resources an execute asks for, or why they cannot be had."""
        if content.get("cpu"):
            return (CPU,)
        have = {g.index for g in self.s.capabilities.gpus}
        asked = content.get("gpus")
        if not asked:
            # No choice made by the client: the GPU with the least work.
            load = self.s.dispatcher.load()
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
        cached = self.s.results.get(cell_id, client.client)
        if cached is not None:
            await self.s.outbox.deliver(rid, cached, m.RESULT, cell_id, client.client)
            return True
        cell = self.s.dispatcher.cells.get(cell_id)
        if cell is None:
            return False
        if cell.client != client.client:
            raise BadRequest(f"request id {cell_id[:8]} belongs to another client")
        cell.client_rid = rid  # the client may have reconnected with a new socket
        if cell.announce is not None:  # "started" was still to come: it goes now, once
            await self.s.dispatcher.announce(cell)
        elif cell.started is not None:
            content: dict[str, Any] = {"gpus": cell.gpus}
            if cell.data:  # where its inputs go, should the first word have been lost
                content["data"] = cell.data
            started = Message(
                kind=m.STARTED,
                content=content,
                session=cell.session,
                parent=cell.id,  # the request's id, not this retry's
                to=cell.client,
            )
            await self.s.send(rid, started)
        cell.position = -1  # report the position again
        await self.s.dispatcher.report_positions()
        return True

    async def _on_execute(
        self, rid: bytes, client: ClientState, msg: Message, frames: Frames
    ) -> None:
        request = msg.content.get("request") or msg.id
        if not isinstance(request, str) or not 8 <= len(request) <= 64:
            raise BadRequest("request id must be a string of 8 to 64 characters")
        if await self._resume(rid, client, msg, request):
            return  # a retry of a request already seen: exactly once
        arrived = msg.content.get("received", [])
        if isinstance(arrived, list):  # their results need no keeping for a refetch
            ids = [str(cell_id) for cell_id in arrived[:RECEIVED_MAX]]
            self.s.results.forget(ids, client.client)
        resources = self._resources(msg.content)
        if isinstance(resources, str):
            error = {"ename": "ValueError", "evalue": f"worker {self.s.config.name}: {resources}"}
            content = {"status": CellStatus.ERROR, "error": error, "worker": self.s.config.name}
            reply = Message(kind=m.RESULT, content=content, session=msg.session, parent=request)
            reply.to = client.client
            await self.s.send(rid, reply)
            return
        timeout = number(msg.content, "timeout")
        if not isinstance(msg.content.get("code"), str):
            raise BadRequest("execute without code")
        if msg.direct and not self.s.pool.data_bind:
            raise BadRequest(
                "this worker takes no direct data connections (--no-direct-data): "
                "send the cell's buffers with the request"
            )
        user = ""
        if self.s.users is not None:  # per-user keys: the user the handshake proved
            user = self.s.users.user(zap_user(frames[0])) if frames else ""
        cell = Cell(
            id=request,
            client_rid=rid,
            client=client.client,
            user=user,
            session=msg.session,
            resources=resources,
            frames=list(frames),
            nbytes=msg.nbytes,
            direct=msg.direct,
            timeout=timeout or None,
            received=time.monotonic(),
        )
        await self.s.dispatcher.submit(cell)

    async def _close_session(self, session: str) -> int:
        handles = [h for h in self.s.pool.for_session(session) if h.cell is None]
        await asyncio.gather(*(self.s.pool.stop(h) for h in handles))
        return len(handles)


__all__ = ["Handlers"]
