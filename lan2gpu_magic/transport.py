"""Step 4: the socket to one worker; ZeroMQ errors become lan2gpu errors here, once.

A blocking DEALER socket with polls against deadlines, so it works inside a
running Jupyter kernel without an event loop of its own. Who talks to a worker
goes through :class:`~.connection.Connection`, which owns one of these.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from worker_kernel.protocol.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosed,
    ProtocolError,
    TransportError,
)
from worker_kernel.protocol.messages import Buffer, Message
from worker_kernel.protocol.receive import recv_start
from worker_kernel.protocol.wire import Incoming, Limits, Wire

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Curve:
    """CurveZMQ keys for an encrypted connection (z85-encoded)."""

    server_public: bytes
    public: bytes
    secret: bytes
    shared: bool = False  # derived from the shared key (not an --encrypt worker's own)


SEND_TIMEOUT = 30.0  # seconds a send may wait for room in the socket's queue
# A connection whose bytes go unacknowledged this long is dropped by the kernel's TCP
# (TCP_USER_TIMEOUT on Linux, TCP_MAXRT on Windows; macOS has neither, so there a dead
# host or a cut network looks like a stall): a dead host or a cut network. A stopped or
# swapping worker's kernel still acknowledges, so its connection stays up (see
# Transport.link_up), unless we send it more than its socket buffers take meanwhile.
LINK_TIMEOUT = 6.0
_CONNECT_TIMEOUT_MS = 2000
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Link(Protocol):
    """What a :class:`~.connection.Connection` needs of its transport: verified
    messages in and out, and whether the connection is up. :class:`Transport` is the
    one over ZeroMQ; the tests have one in memory (``tests/memory_link.py``)."""

    refused: bool  # the worker refused our handshake (other keys)

    @property
    def closed(self) -> bool: ...

    def send(self, msg: Message, timeout: float = SEND_TIMEOUT) -> list[Buffer]: ...

    def recv(self, timeout: float) -> Message | None: ...

    def link_up(self) -> bool: ...

    def handshake_error(self) -> AuthenticationError: ...

    def close(self) -> None: ...


class Transport:
    """Owns one DEALER socket (and its context, unless one is given), and a monitor
    of its handshakes: a worker that refuses ours fails the call at once."""

    def __init__(
        self,
        address: str,
        key: bytes,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        limits: Limits | None = None,
        replay_window: float = 120.0,
        curve: Curve | None = None,
    ) -> None:
        self.address = address
        self.curve = curve
        self.owns_context = context is None
        self.context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self.wire = Wire(key, limits=limits, window=replay_window)
        self.sock: zmq.Socket[bytes] | None = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.wire.limits.max_frame_bytes)
        self.sock.setsockopt(zmq.TCP_MAXRT, int(LINK_TIMEOUT * 1000))
        # A reconnect attempt made while the network was down must not hang in the
        # kernel's SYN retries (minutes): give up on it, and ZeroMQ tries again.
        self.sock.setsockopt(zmq.CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
        self.monitor: zmq.Socket[bytes] | None = self.sock.get_monitor_socket(
            _HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self.refused = False  # the last handshake failed (until one succeeds)
        self.linked = False  # handshake done and not disconnected since
        if curve is not None:
            # CurveZMQ: the worker's public key is pinned; ours must be on its allow-list.
            self.sock.curve_serverkey = curve.server_public
            self.sock.curve_publickey = curve.public
            self.sock.curve_secretkey = curve.secret
        try:
            self.sock.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigurationError(
                f"cannot connect to {address!r}: {exc}. Worker addresses look like "
                "tcp://10.0.0.7:7340"
            ) from None

    @property
    def closed(self) -> bool:
        return self.sock is None

    def _socket(self) -> zmq.Socket[bytes]:
        if self.sock is None:
            raise ConnectionClosed(f"the connection to {self.address} was closed")
        return self.sock

    def send(self, msg: Message, timeout: float = SEND_TIMEOUT) -> list[Buffer]:
        """Queue ``msg``; raise :class:`TransportError` if the worker takes none of our
        messages for ``timeout`` seconds (a full queue: it stopped reading). Returns
        the frames that go on the cell's data connection instead (``msg.direct``)."""
        frames, data = self.wire.encode_parts(msg)
        sock = self._socket()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    # The first frame decides; the rest of a message is queued with it.
                    sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                    return data
                except zmq.Again:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransportError(
                            f"cannot send to {self.address}: the worker took none of our "
                            f"messages for {timeout:g} s (is it stuck, or gone?)"
                        ) from None
                    sock.poll(int(min(left, 1.0) * 1000), zmq.POLLOUT)
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send to {self.address}: {exc}") from None

    def recv(self, timeout: float) -> Message | None:
        """The next verified message, or None after ``timeout`` seconds.

        An unsigned rejection notice comes back as a message with
        ``authenticated=False`` (see :func:`.replies.error_of`); a message that fails
        verification raises :class:`ProtocolError`.
        """
        sock = self._socket()
        try:
            ready = self._poll(sock, max(0, int(timeout * 1000)))
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot receive from {self.address}: {exc}") from None
        if not ready:
            return None
        try:
            # Frame by frame into each buffer's final memory (no reassembly copy).
            got = recv_start(sock, self.wire)
            if isinstance(got, Incoming):  # its buffers follow on the cell's data connection
                msg = got.skeleton()
                msg.arriving = got
                return msg
            return got
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot receive from {self.address}: {exc}") from None
        except ProtocolError as exc:
            raise type(exc)(
                f"a message from {self.address} was dropped: {exc}. If this repeats, the "
                "worker uses a different key file than this notebook."
            ) from None

    def _poll(self, sock: zmq.Socket[bytes], ms: int) -> bool:
        """Wait for a message; raise if the worker refuses our handshake meanwhile."""
        if self.monitor is None:
            return bool(sock.poll(ms))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        ready = dict(poller.poll(ms))
        if self.monitor in ready:
            self._read_monitor()
        if self.refused:  # also when link_up() read the event
            raise self.handshake_error()
        return sock in ready or bool(sock.poll(0))

    def _read_monitor(self) -> None:
        assert self.monitor is not None  # noqa: S101 - narrowing for mypy
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.linked = False
            else:
                self.linked = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                self.refused = not self.linked

    def link_up(self) -> bool:
        """Whether the connection to the worker is up now (handshake done, no drop
        since). It tells a worker that is silent but still there (stopped, swapping,
        overloaded: its kernel keeps acknowledging) from one that is gone (killed: the
        connection drops at once; host down or network cut: after LINK_TIMEOUT)."""
        if self.monitor is not None:
            self._read_monitor()
        return self.linked

    def handshake_error(self) -> AuthenticationError:
        if self.curve is None:
            return AuthenticationError(
                f"the worker at {self.address} refused our handshake: this notebook connects "
                "without encryption (--insecure-plaintext) and the worker encrypts. Leave "
                "--insecure-plaintext (LAN2GPU_INSECURE_PLAINTEXT) out."
            )
        if not self.curve.shared:
            return AuthenticationError(
                f"the worker at {self.address} refused the encrypted handshake: is this "
                "machine's client.key in its authorized_keys directory, and is --server-key "
                "that worker's worker.key?"
            )
        return AuthenticationError(
            f"the worker at {self.address} refused the encrypted handshake: this notebook's "
            "key file differs from the worker's, or the worker runs with --insecure-plaintext "
            "or with --encrypt (per-user keys). Use the worker's key file (--key-file or "
            "LAN2GPU_KEY_FILE); for a --insecure-plaintext worker connect with "
            "--insecure-plaintext, for an --encrypt worker with --server-key."
        )

    def close(self, term: bool = True) -> None:
        """Close the socket (and the context if this transport made it). Idempotent."""
        if self.monitor is not None and self.sock is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if term and self.owns_context and not self.context.closed:
            self.context.term()
