"""Receive one lan2gpu message from a ZeroMQ socket frame by frame.

A large buffer travels as many 1 MiB frames. Receiving them all and then
joining them holds the buffer twice; here each frame is copied straight into
the buffer's final memory as it is received (``recv_into``), and freed by
libzmq at once, so a receiver holds it about once. The signature is checked
from the first five frames before anything is allocated. Both sides receive
this way; this takes a socket someone else owns and opens none.
"""

from __future__ import annotations

import contextlib
from typing import Any

import zmq

from . import buffer_pool, heap
from .errors import MessageRejected
from .messages import Message
from .wire import Incoming, Wire

_PRELUDE = 5  # magic, version, kind, header, signature
_TRIM_FROM = 64 << 20  # messages this large return freed frames to the system...
_TRIM_EVERY = 8  # ...every this many frames (8 MiB)


def recv_message(sock: zmq.Socket[Any], wire: Wire, *, trusted_hop: bool = False) -> Message:
    """The next message on ``sock``, verified (raises a ProtocolError otherwise).

    The whole multipart message is consumed either way, so the socket stays in
    step after a rejection.
    """
    got = recv_start(sock, wire, trusted_hop=trusted_hop)
    if isinstance(got, Incoming):
        raise MessageRejected("a message whose buffers come on a data connection, unasked")
    return got


def recv_start(
    sock: zmq.Socket[Any], wire: Wire, *, trusted_hop: bool = False
) -> Message | Incoming:
    """Like :func:`recv_message`, but a direct message (its buffers declared, not
    carried: datapath.py) comes back as the :class:`Incoming` that receives them."""
    try:
        prelude = [sock.recv(copy=False)]
        while len(prelude) < _PRELUDE and sock.getsockopt(zmq.RCVMORE):
            prelude.append(sock.recv(copy=False))
        if len(prelude) < _PRELUDE:
            return wire.decode([f.buffer for f in prelude])  # raises: too few frames
        incoming = wire.begin([f.buffer for f in prelude], trusted_hop=trusted_hop)
        del prelude
        if isinstance(incoming, Message):
            if sock.getsockopt(zmq.RCVMORE):
                raise MessageRejected("an unsigned notice with buffer frames")
            return incoming
        if incoming.direct:
            if sock.getsockopt(zmq.RCVMORE):
                raise MessageRejected("a direct message carries buffer frames on the socket")
            return incoming
        # Frames are given back as they are copied (see below), unless the message
        # fits the pool: then the heap keeps them for the next one (buffer_pool.py).
        fits = incoming.nbytes <= buffer_pool.current().budget
        trim = _TRIM_EVERY if incoming.nbytes >= _TRIM_FROM and not fits else 0
        for n, target in enumerate(incoming.targets(), 1):
            if not sock.getsockopt(zmq.RCVMORE):
                break  # finish() says how many were missing
            if target is None:
                incoming.put(sock.recv(copy=False).buffer)
            else:
                incoming.received(sock.recv_into(target))
            if trim and n % trim == 0:
                # libzmq's frames, freed as they are copied, may stay in the heap:
                # give them back as we go, or the receiver peaks at twice the data.
                heap.release()
        if sock.getsockopt(zmq.RCVMORE):
            raise MessageRejected("more buffer frames than the header declares")
        return incoming.finish()
    except BaseException:
        with contextlib.suppress(zmq.ZMQError):  # e.g. the socket itself failed
            drain(sock)
        raise


def drain(sock: zmq.Socket[Any]) -> None:
    """Discard the rest of a multipart message (its frames are all here already)."""
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv_into(bytearray())
