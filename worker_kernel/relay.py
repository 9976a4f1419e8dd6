"""What goes back to clients from the worker's other side: executors and kernels.

:class:`Relay` forwards an executor's messages for a cell (live output, then the
result) to the client that sent the cell, untouched (signed by the executor with
the worker's key), keeps each result for a client that asks again, and tells the
dispatcher when a cell is done. A hosted kernel's frames and its death go to the
client that owns it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from .kernels import RemoteKernel
from .protocol import messages as m
from .protocol.messages import Message
from .protocol.wire import peek

if TYPE_CHECKING:
    from .service import WorkerService

log = logging.getLogger(__name__)


class Relay:
    """Executors and kernels to clients, for one service."""

    def __init__(self, service: WorkerService) -> None:
        self.s = service
        self._dropped = False  # the drop-first-result fault was applied

    async def executors(self) -> None:
        """Forever: relay what the executors send (run as one of the service's tasks)."""
        s = self.s
        while True:
            frames = await s.pool.sock.recv_multipart(copy=False)
            executor_id, tag = frames[0].bytes.decode(), frames[1].bytes
            if tag == b"ready":
                s.pool.on_ready(executor_id, frames[2].bytes)
                continue
            handle = s.pool.get(executor_id)
            cell = handle.cell if handle else None
            if tag != b"fwd" or handle is None or cell is None:
                continue
            body = frames[2:]
            kind = peek(body).kind
            is_result = kind == m.RESULT
            if is_result:
                s.dispatcher.no_announce(cell)
                s.results.put(cell.id, body, cell.client)
            else:  # "started" goes before the cell's first output
                await s.dispatcher.announce(cell)
            if is_result and "drop-first-result" in s.config.faults and not self._dropped:
                self._dropped = True  # test hook: pretend the network lost it
                log.warning("fault injection: dropped the result of cell %s", cell.id[:8])
            else:
                await s.outbox.deliver(cell.client_rid, body, kind, cell.id, cell.client)
            if is_result:
                handle.cell = None
                handle.last_used = time.monotonic()
                # Its own executor's message: signed, but nothing re-hashed.
                verified = s.wire.decode([f.buffer for f in body], trusted_hop=True, assemble=False)
                content = verified.content
                if content.get("poisoned"):
                    log.warning(
                        "cell %s left its GPU context unusable; replacing the executor", cell.id[:8]
                    )
                    s.spawn(s.pool.stop(handle))
                s.dispatcher.done(cell, str(content.get("status")), dict(content.get("stats", {})))

    async def kernel_frames(
        self, kernel: RemoteKernel, channel: str, identity: bytes, frames: list[Any]
    ) -> None:
        """One Jupyter message from a hosted kernel, for its owner's forwarder."""
        content = {"kernel": kernel.id, "channel": channel, "identity": identity.hex()}
        to = self.s.clients.to(kernel.owner_rid)
        msg = Message(kind=m.KERNEL_FRAMES, content=content, buffers=frames, to=to)
        with contextlib.suppress(zmq.ZMQError):  # the forwarder went away
            await self.s.send(kernel.owner_rid, msg)

    async def kernel_died(self, kernel: RemoteKernel, returncode: int) -> None:
        event = {"kernel": kernel.id, "event": "died", "returncode": returncode}
        to = self.s.clients.to(kernel.owner_rid)
        await self.s.send(kernel.owner_rid, Message(kind=m.KERNEL_EVENT, content=event, to=to))

    async def dropped_output(self) -> None:
        """Tell each client whose cell output the outbox had to drop (it read too slowly)."""
        for state in self.s.clients:
            for cell_id, to, count in self.s.outbox.take_dropped(state.rid):
                text = (
                    f"[lan2gpu: {count} message(s) of this cell's output were dropped: this "
                    "notebook was not reading them fast enough]\n"
                )
                note = {"name": "stderr", "text": text}
                await self.s.send(
                    state.rid, Message(kind=m.STREAM, content=note, parent=cell_id, to=to)
                )


__all__ = ["Relay"]
