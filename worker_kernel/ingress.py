"""The way in: every message from a client is verified here before anything reads it.

:class:`Ingress` reads the client socket. A message that fails verification (no
key, a flipped bit, a replay, too large) is answered with an unsigned notice
(rate-limited per peer, see :class:`~.gate.RejectionLog`) and dropped, and the
memory a large one took is given back to the system at once. Only a verified,
signed message comes out of :meth:`Ingress.next`, with its frames as they came
(relayed to an executor without a copy).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any, cast

import zmq.asyncio

from .gate import RejectionLog, peer_address
from .outbox import Outbox
from .protocol import heap
from .protocol import messages as m
from .protocol.errors import ProtocolError
from .protocol.messages import Message
from .protocol.wire import Wire, peek

log = logging.getLogger(__name__)

_THREAD_DECODE_FRAMES = 8  # hash messages with several 1 MiB frames off the event loop
_YIELD_EVERY = 4  # messages in a row without giving the event loop's other tasks a turn
_TRIM_AFTER = 64 << 20  # a rejected message this large: give its memory back at once


class Ingress:
    """Verified messages from the service's ROUTER socket (which the service owns)."""

    def __init__(
        self,
        sock: zmq.asyncio.Socket,
        wire: Wire,
        rejections: RejectionLog,
        outbox: Outbox,
        worker: str,
    ) -> None:
        self.sock = sock
        self.outbox = outbox
        self.wire = wire
        self.rejections = rejections
        self.worker = worker
        self._unyielded = 0  # messages taken in a row without yielding to the loop

    async def next(self) -> tuple[bytes, Message, list[Any]]:
        """The next verified message: its sender's routing id, the message, its frames."""
        while True:
            pending = cast("asyncio.Future[list[zmq.Frame]]", self.sock.recv_multipart(copy=False))
            if not pending.done():
                self._unyielded = 0  # this await yields: the others get their turn
            frames = await pending
            rid, body = frames[0].bytes, [f.buffer for f in frames[1:]]
            # Verify only: the buffers are relayed to the executor as they came.
            if len(body) > _THREAD_DECODE_FRAMES:
                verified = await asyncio.to_thread(verify, self.wire, body)
            else:
                verified = verify(self.wire, body)
            # Fair to the other tasks (heartbeats, timers, executors) even when a
            # flood keeps this socket always readable: a message that was already
            # there when asked for did not yield to them, so every few such, yield.
            self._unyielded += 1
            if self._unyielded >= _YIELD_EVERY:
                self._unyielded = 0
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
                    heap.release()
                continue
            if not verified.authenticated:
                continue  # an unsigned notice is only ever shown, and clients send none
            return rid, verified, frames[1:]

    async def _reject(self, rid: bytes, exc: ProtocolError, body: list[Any]) -> None:
        reason = f"worker {self.worker} rejected the message: {exc}"
        # Echo the message id if it can be read, so the client knows which request
        # failed (the notice is unsigned and only ever shown as text).
        notice = Wire.encode_notice(reason, code=type(exc).__name__, parent=peek(body).claimed_id)
        await self.outbox.deliver(rid, notice, m.REJECT, "", "")


def verify(wire: Wire, body: list[Any]) -> Message | ProtocolError:
    """The verified message, or why not: returned, not raised, and without a
    traceback. A traceback's frames hold the buffers, and one raised across
    ``asyncio.to_thread`` is also kept in a reference cycle (the future keeps it),
    so a big rejected message stayed in memory until the garbage collector ran."""
    try:
        # Kernel frames are used here (relayed to a kernel), not relayed to an executor.
        kernel_frames = peek(body).kind == m.KERNEL_FRAMES
        return wire.decode(body, assemble=kernel_frames)
    except ProtocolError as exc:
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        return exc


__all__ = ["Ingress", "verify"]
