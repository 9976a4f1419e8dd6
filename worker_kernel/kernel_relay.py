"""The worker's end of a hosted kernel's five Jupyter channels.

Hosted kernels listen on 127.0.0.1 only: nobody on the LAN can reach their
ports. Their traffic crosses the network inside the lan2gpu connection of the
forwarder that asked for the kernel, as ``kernel_frames`` messages, signed and
(by default) encrypted like every other message:

    forwarder ──kernel_frames {channel, identity}──▶ service ──DEALER per frontend──▶ kernel
    forwarder ◀──────────── kernel_frames ────────── service ◀──── SUB (iopub), hb ─── kernel

The Jupyter frames travel unchanged (the kernel verifies them with its own key,
which the forwarder chose and sent inside the encrypted ``start_kernel``). One
relay per kernel, owned by :class:`~worker_kernel.kernels.KernelHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

ROUTED = ("shell", "control", "stdin")
CHANNELS = (*ROUTED, "iopub", "hb")
MAX_IDENTITY = 255  # bytes of a ZeroMQ routing id
_MAX_ROUTES = 64  # frontends of one kernel (each has a route per routed channel)

# (channel, frontend identity, frames) -> the forwarder
Send = Callable[[str, bytes, list[Any]], Awaitable[None]]


class KernelRelay:
    """Sockets to one local kernel, and the tasks that pump its output back."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoints: dict[str, str], send: Send) -> None:
        self.ctx = ctx
        self.endpoints = endpoints  # channel -> the kernel's ZeroMQ address
        self._send = send
        self.iopub = self._socket(zmq.SUB, "iopub")
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.hb = self._socket(zmq.DEALER, "hb")
        self.routes: dict[tuple[str, bytes], zmq.asyncio.Socket] = {}
        self.dropped = 0  # messages for a kernel that was not reading
        self._tasks: set[asyncio.Task[None]] = set()

    def _socket(self, kind: int, channel: str, identity: bytes = b"") -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(self.endpoints[channel])
        return sock

    async def start(self, timeout: float = 15.0) -> None:
        """Wait until the kernel's iopub has our subscription (its welcome message,
        JEP 65: output published before that would be lost), then pump."""
        if await self.iopub.poll(int(timeout * 1000)):
            first = await self.iopub.recv_multipart()
            if b"iopub_welcome" not in b"".join(first[:4]):
                await self._send("iopub", b"", list(first))
        else:
            log.warning("no iopub welcome from a hosted kernel (an older ipykernel?); going on")
        self._pump(self.iopub, "iopub", b"")
        self._pump(self.hb, "hb", b"")

    def _pump(self, sock: zmq.asyncio.Socket, channel: str, identity: bytes) -> None:
        async def run() -> None:
            with contextlib.suppress(zmq.ZMQError, asyncio.CancelledError):
                while True:
                    frames = await sock.recv_multipart(copy=False)
                    await self._send(channel, identity, [f.buffer for f in frames])

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _route(self, channel: str, identity: bytes) -> zmq.asyncio.Socket:
        """The socket that speaks to the kernel for one frontend, with its identity,
        so the kernel's replies (and stdin requests) find their way back."""
        key = (channel, identity)
        sock = self.routes.get(key)
        if sock is None:
            if len(self.routes) >= _MAX_ROUTES * len(ROUTED):
                raise ValueError("too many frontends on one kernel")
            sock = self._socket(zmq.DEALER, channel, identity)
            self.routes[key] = sock
            self._pump(sock, channel, identity)
        return sock

    async def to_kernel(self, channel: str, identity: bytes, frames: Sequence[Any]) -> None:
        """Relay one message of a frontend to the kernel. Never waits: a kernel that
        does not read (stopped, wedged) loses messages rather than stalling the
        worker's loop, as a full ZeroMQ queue drops them for PUB/SUB."""
        if not frames:
            raise ValueError("kernel frames without frames cannot be relayed")
        if channel == "hb":
            sock = self.hb
        elif channel in ROUTED and 0 < len(identity) <= MAX_IDENTITY:
            if channel == "shell":
                # The kernel asks for input on stdin, addressed to this frontend's
                # identity: its stdin route must exist before the request does.
                self._route("stdin", identity)
            sock = self._route(channel, identity)
        else:
            raise ValueError(f"kernel frames for channel {channel!r} cannot be relayed")
        try:
            await sock.send_multipart(list(frames), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in (self.iopub, self.hb, *self.routes.values()):
            sock.close(linger=0)
        self.routes.clear()
