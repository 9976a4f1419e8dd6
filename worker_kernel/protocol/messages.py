"""Message kinds and the in-memory message both sides build and read.

A message on the wire is::

    [routing ids...] b"L2G" version kind header signature *buffers

``header`` is JSON with the message id, kind, session, parent id, recipient, the
time it was sent, a small JSON ``content`` and the length and BLAKE3 digest of
every buffer. ``wire.py`` turns a :class:`Message` into frames and back.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

MAGIC: Final = b"L2G"
# 2: headers whose content would be large spill it into an extension (wire.py).
# 3: a cell done within moments is told no "started"; heartbeats list the results a
#    client has not acknowledged ("done"), so a lost one is still noticed.
PROTOCOL_VERSION: Final = 3

# Client -> worker.
HELLO: Final = "hello"
EXECUTE: Final = "execute"
CANCEL: Final = "cancel"
PING: Final = "ping"
CLOSE_SESSION: Final = "close_session"
STATUS: Final = "status"
FETCH: Final = "fetch"  # resend a result that did not arrive
START_KERNEL: Final = "start_kernel"  # a whole Jupyter kernel, for an IDE
STOP_KERNEL: Final = "stop_kernel"
# Worker -> client.
WELCOME: Final = "welcome"
PONG: Final = "pong"
QUEUED: Final = "queued"
STARTED: Final = "started"
STREAM: Final = "stream"
DISPLAY: Final = "display"
TRANSFER: Final = "transfer"
RESULT: Final = "result"
STATUS_REPLY: Final = "status_reply"
KERNEL_STARTED: Final = "kernel_started"
KERNEL_EVENT: Final = "kernel_event"  # a kernel died
# Both directions: one Jupyter message of a hosted kernel's channel, as buffers.
KERNEL_FRAMES: Final = "kernel_frames"
ERROR: Final = "error"
# Unsigned rejection notice: the only kind accepted without a signature, and only
# ever shown as text (it carries no buffers and is never unpickled).
REJECT: Final = "reject"
# Both directions.
HEARTBEAT: Final = "heartbeat"

KINDS: Final = frozenset(
    {
        HELLO,
        EXECUTE,
        CANCEL,
        PING,
        CLOSE_SESSION,
        STATUS,
        FETCH,
        START_KERNEL,
        STOP_KERNEL,
        KERNEL_STARTED,
        KERNEL_EVENT,
        KERNEL_FRAMES,
        WELCOME,
        PONG,
        QUEUED,
        STARTED,
        STREAM,
        DISPLAY,
        TRANSFER,
        RESULT,
        STATUS_REPLY,
        ERROR,
        REJECT,
        HEARTBEAT,
    }
)

Buffer = bytes | bytearray | memoryview


def new_id() -> str:
    """A fresh, unguessable message id."""
    return uuid.uuid4().hex


@dataclass
class Message:
    """One protocol message.

    ``buffers`` are raw frames (pickles and out-of-band array data);
    ``authenticated`` is False only for unsigned ``reject`` notices.
    """

    kind: str
    content: dict[str, Any] = field(default_factory=dict)
    buffers: list[Buffer] = field(default_factory=list)
    session: str = ""
    parent: str = ""
    to: str = ""
    id: str = field(default_factory=new_id)
    sent: float = field(default_factory=time.time)
    authenticated: bool = True
    digests: list[str] = field(default_factory=list)  # of the buffers, as signed
    declared_bytes: int = 0  # the buffers' total, as signed (also when not assembled)
    codecs: list[str] = field(default_factory=list)  # per buffer, "" or "lz4" (sending)
    # The buffers travel on a direct data connection, not the socket (datapath.py).
    direct: bool = False
    # Received direct: the wire.Incoming that takes its buffers from the connection.
    arriving: Any = None

    @property
    def request(self) -> str:
        """The cell an ``execute`` asks for: its request id (kept by a retry), or its id."""
        return str(self.content.get("request") or self.id)

    @property
    def nbytes(self) -> int:
        """Total size of the buffers."""
        return sum(memoryview(b).nbytes for b in self.buffers) or self.declared_bytes
