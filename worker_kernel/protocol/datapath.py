"""The direct data connection: a cell's bulk bytes between notebook and executor, once.

A large cell's ``execute`` goes to the service with its buffers *declared* only (length,
BLAKE3 digest, frame count; ``"direct": true`` in the signed header). The service still
does everything else: the handshake, the signature, the queue, the memory check, which
executor runs it. When the cell starts, the service draws a fresh 256-bit *ticket* and
hands it to the executor (over the private ``ipc://`` socket) and to the notebook (in
the signed ``started``, inside CurveZMQ unless ``--insecure-plaintext``), with where the
executor listens. The notebook connects there, sends the ticket, then the buffer frames,
each sealed with AES-256-GCM::

    key     = HMAC-SHA256(shared key, "lan2gpu data 1" | cell id | ticket)
    ticket  = b"L2GD" | 32 random bytes                  (first, in clear)
    record  = length (4 bytes, big-endian) | ciphertext | tag (16 bytes)
    nonce   = direction (4 bytes) | record number (8 bytes, big-endian)
    AAD     = the length field

The key never travels: it is derived on both ends from the shared key, so a peer that
sniffs the ticket still cannot make a record that opens. A flipped bit, a reordered,
dropped or replayed record (another cell's stream is under another key), a stream cut
short: each fails its tag or its count, and the cell is answered with an error; nothing
is unpickled. A peer that connects without the ticket is closed after reading its
36 bytes; one with the ticket but not the key, after its first record (into a reused
buffer of at most :data:`MAX_RECORD` bytes), and the listener goes on waiting for the
real notebook. Queued cells hold no bulk memory on the worker: it comes once the cell
runs, straight into the executor's pre-faulted receive pool.

The bytes are not hashed again on arrival: every byte is authenticated by the tag, under
a key only holders of the shared key can derive, and the sender's BLAKE3 digests stay
the cache key. (Re-hashing 64 MiB costs ~10 ms here; opening it ~8 ms.)

Sealing and sending run on two threads (both release the GIL), as do receiving and
opening, so the cipher overlaps the socket copy.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from queue import Empty, Queue
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import AuthenticationError, MessageRejected, TransportError
from .messages import Buffer
from .wire import CHUNK, Incoming

# Messages whose buffers add up to this go on the data connection: it costs the wait
# for "started" and a connect (~0.3 ms here), far less than the hop it saves.
DIRECT_MIN: Final = 1 << 20
TICKET_MAGIC: Final = b"L2GD"
TICKET_BYTES: Final = 32
_TAG: Final = 16
_LENGTH: Final = struct.Struct(">I")
# Raw chunks are CHUNK bytes; an LZ4 chunk of incompressible data is a little more.
MAX_RECORD: Final = CHUNK + CHUNK // 100 + 4096
UP: Final = b"up\x00\x00"  # notebook -> executor: the inputs
DOWN: Final = b"down"  # executor -> notebook: the result, on the same connection
IDLE: Final = 60.0  # seconds a connected peer may send nothing before it is dropped
TICKET_WAIT: Final = 2.0  # ...before its ticket is in (the notebook sends it at once)
_SOCKET_BUFFER: Final = 4 << 20


def new_ticket() -> bytes:
    return os.urandom(TICKET_BYTES)


def cell_key(key: bytes, cell: str, ticket: bytes) -> AESGCM:
    """The AES-256-GCM key of one cell's stream (derived, never sent)."""
    return AESGCM(hmac.digest(key, b"lan2gpu data 1" + cell.encode() + ticket, "sha256"))


def _nonce(direction: bytes, n: int) -> bytes:
    return direction + n.to_bytes(8, "big")


class Endpoint:
    """Where an executor's data listener is: ``tcp://host:port`` or ``ipc:///path``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.target: str | tuple[str, int]
        if address.startswith("ipc://"):
            self.family, self.target = socket.AF_UNIX, address[len("ipc://") :]
            return
        if not address.startswith("tcp://"):
            raise ValueError(f"not a data endpoint: {address!r} (tcp://host:port or ipc://path)")
        host, _, port = address[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.target = (host, int(port or 0))

    def connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            _tune(sock)
            sock.connect(self.target)
        except BaseException:
            sock.close()
            raise
        return sock


def _tune(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    if sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise TransportError(
                f"the data connection closed after {got} of {view.nbytes} bytes of a record"
            )
        got += n


# -- sending (the notebook) --------------------------------------------------------


def send_frames(
    sock: socket.socket,
    aead: AESGCM,
    ticket: bytes,
    frames: Sequence[Buffer],
    *,
    direction: bytes = UP,
    stop: Callable[[], bool] = lambda: False,
) -> bool:
    """Send ``ticket`` (unless empty: the result, on a connection already admitted),
    then ``frames`` sealed, in order; whether all went. Sealing runs on a helper thread
    one record ahead of the socket. ``stop()`` is asked between records: true ends
    the stream short (the receiver then answers the cell with an error)."""
    if ticket:
        sock.sendall(TICKET_MAGIC + ticket)
    sealed: Queue[memoryview | BaseException | None] = Queue(maxsize=2)
    spare: Queue[bytearray] = Queue()
    for _ in range(3):
        spare.put(bytearray(4 + MAX_RECORD + _TAG))
    halt = threading.Event()

    def seal() -> None:
        try:
            for n, frame in enumerate(frames):
                data = memoryview(frame).cast("B")
                if data.nbytes > MAX_RECORD:
                    raise MessageRejected(f"a frame of {data.nbytes} bytes is over a record")
                out = spare.get()
                if halt.is_set():
                    return
                view = memoryview(out)[: 4 + data.nbytes + _TAG]
                _LENGTH.pack_into(out, 0, data.nbytes)
                aead.encrypt_into(_nonce(direction, n), data, view[:4], view[4:])
                sealed.put(view)
            sealed.put(None)
        except BaseException as exc:  # handed to the sending thread, raised there
            sealed.put(exc)

    sealer = threading.Thread(target=seal, name="lan2gpu-seal", daemon=True)
    sealer.start()
    try:
        while (item := sealed.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if stop():
                return False
            sock.sendall(item)
            spare.put(item.obj)  # type: ignore[arg-type]
        return True
    finally:
        halt.set()
        spare.put(bytearray(0))  # wakes a sealer waiting for a buffer...
        while sealer.is_alive():  # ...or for room to put one it sealed
            with contextlib.suppress(Empty):
                sealed.get(timeout=0.05)
        sealer.join()


# -- receiving (the executor) ------------------------------------------------------


_END: Final = object()


def receive_frames(
    sock: socket.socket, aead: AESGCM, incoming: Incoming, direction: bytes = UP
) -> bool:
    """Read sealed records into ``incoming``'s targets (its final buffers), in order.

    The first record is opened before anything is given to ``incoming``: a peer that
    cannot seal one (it lacks the key) leaves it untouched, and False comes back.
    The rest are opened on a helper thread one record behind the socket; any that
    fails raises :class:`AuthenticationError`."""
    targets = incoming.targets()
    first = next(targets, _END)
    if first is _END:
        return True
    scratch = memoryview(bytearray(MAX_RECORD + _TAG))
    try:
        sealed, plain = _read_record(sock, scratch, first, 0)  # type: ignore[arg-type]
    except MessageRejected:  # not even the length of what is due: not a notebook
        return False
    try:
        _open(aead, direction, 0, sealed, plain)
    except InvalidTag:
        return False
    _hand_over(incoming, plain, first is None)
    opened: Queue[tuple[int, memoryview, memoryview, memoryview] | None] = Queue(maxsize=2)
    spare: Queue[memoryview] = Queue()
    for buf in (scratch, memoryview(bytearray(MAX_RECORD + _TAG))):
        spare.put(buf)
    failure: list[BaseException] = []

    def open_records() -> None:
        while (item := opened.get()) is not None:
            n, buf, sealed, plain = item
            if not failure:
                try:
                    _open(aead, direction, n, sealed, plain)
                except InvalidTag:
                    failure.append(
                        AuthenticationError(
                            f"record {n} on the cell's data connection failed authentication "
                            "(altered, reordered or replayed in transit)"
                        )
                    )
                except BaseException as exc:  # raised on the receiving thread
                    failure.append(exc)
                if failure:  # the stream is spoiled: wake the receiving thread
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            spare.put(buf)

    opener = threading.Thread(target=open_records, name="lan2gpu-open", daemon=True)
    opener.start()
    try:
        for n, target in enumerate(targets, 1):
            buf = spare.get()
            if failure:
                break
            sealed, plain = _read_record(sock, buf, target, n)
            _hand_over(incoming, plain, target is None)
            opened.put((n, buf, sealed, plain))
    except (TransportError, OSError):
        if not failure:
            raise
    finally:
        opened.put(None)
        opener.join()
    if failure:
        raise failure[0]
    return True


def _read_record(
    sock: socket.socket, buf: memoryview, target: memoryview | None, n: int
) -> tuple[memoryview, memoryview]:
    """Record ``n`` into ``buf``: (sealed bytes, where they open to)."""
    header = buf[:4]
    _recv_exactly(sock, header)
    (length,) = _LENGTH.unpack(header)
    if length > MAX_RECORD or (target is not None and length != target.nbytes):
        declared = f"{target.nbytes} bytes" if target is not None else f"at most {MAX_RECORD}"
        raise MessageRejected(
            f"record {n} on the data connection is {length} bytes; the signed header "
            f"declares {declared}"
        )
    sealed = buf[4 : 4 + length + _TAG]
    _recv_exactly(sock, sealed)
    plain = memoryview(bytearray(length)) if target is None else target
    return sealed, plain


def _open(aead: AESGCM, direction: bytes, n: int, sealed: memoryview, plain: memoryview) -> None:
    aad = _LENGTH.pack(sealed.nbytes - _TAG)
    aead.decrypt_into(_nonce(direction, n), sealed, aad, plain)


def _hand_over(incoming: Incoming, plain: memoryview, compressed: bool) -> None:
    # On the receiving thread, in order; the bytes may still be opening.
    if compressed:
        incoming.put(plain)
    else:
        incoming.received(plain.nbytes)


def _has_ticket(conn: socket.socket, expected: bytes) -> bool:
    """Whether the peer's first bytes, in within :data:`TICKET_WAIT`, are ``expected``."""
    got = bytearray(len(expected))
    conn.settimeout(TICKET_WAIT)
    try:
        _recv_exactly(conn, memoryview(got))
    except (TimeoutError, TransportError, OSError):
        return False
    return hmac.compare_digest(bytes(got), expected)


class DataListener:
    """An executor's listening socket for direct data (it owns it: :meth:`close`)."""

    def __init__(self, bind: str) -> None:
        endpoint = Endpoint(bind)
        self.sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
        try:
            if endpoint.family == socket.AF_UNIX:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(endpoint.target))
                self.sock.bind(str(endpoint.target))
                self.address = bind
            else:
                self.sock.bind(endpoint.target)
                host, port = self.sock.getsockname()[:2]
                self.address = f"tcp://{f'[{host}]' if ':' in host else host}:{port}"
            self.sock.listen(16)
        except BaseException:
            self.sock.close()
            raise
        self._path = str(endpoint.target) if endpoint.family == socket.AF_UNIX else ""

    def receive(
        self, cell: str, ticket: bytes, aead: AESGCM, incoming: Incoming, *, wait: float
    ) -> socket.socket:
        """Accept connections until one brings ``ticket`` and a stream that opens with
        ``aead``; read it into ``incoming``; return that connection (the caller's to
        close: the result goes back on it). Raises :class:`TransportError` when no such
        peer came within ``wait`` seconds or its stream broke off."""
        deadline = time.monotonic() + wait
        expected = TICKET_MAGIC + ticket
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(
                    f"the notebook did not send the inputs of cell {cell[:8]} within "
                    f"{wait:g} s of its start (it could not reach this worker's data port?)"
                )
            self.sock.settimeout(left)
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            try:
                if _has_ticket(conn, expected):
                    conn.settimeout(IDLE)
                    _tune(conn)
                    if receive_frames(conn, aead, incoming):
                        return conn
            except TimeoutError:
                conn.close()
                raise TransportError(
                    f"the inputs of cell {cell[:8]} stopped arriving (nothing for "
                    f"{IDLE:g} s on the data connection)"
                ) from None
            except BaseException:
                conn.close()
                raise
            conn.close()  # not the notebook this cell is for: the next one may be

    def close(self) -> None:
        self.sock.close()
        if self._path:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
