"""The direct data connection: a cell's bulk bytes between notebook and executor, once.

A large cell's ``execute`` goes to the service with its buffers *declared* only (length,
BLAKE3 digest, frame count; ``"direct": true`` in the signed header). The service still
does everything else: the handshake, the signature, the queue, the memory check, which
executor runs it. When the cell starts, the service draws a fresh 256-bit *ticket* and
hands it to the executor (over the private ``ipc://`` socket) and to the notebook (in
the signed ``started``, inside CurveZMQ unless ``--insecure-plaintext``), with where the
executor listens. The ticket itself never crosses the data connection::

    executor -> notebook   challenge: 32 random bytes, fresh for every connection
    notebook -> executor   b"L2GD" | HMAC-SHA256(ticket, "lan2gpu hello 1" | challenge)
    then, both ways        records: length (4 bytes, big-endian) | ciphertext | tag (16)

    key     = HMAC-SHA256(shared key, "lan2gpu data 1" | cell id | ticket)  (AES-256-GCM)
    nonce   = direction ("up" inputs, "down" the result) | record number (8 bytes)
    AAD     = the length field

Only who holds the ticket answers a challenge, so a peer that recorded another
connection cannot replay its way in; only who holds the shared key and the ticket
derives the key, so no record opens for anyone else, and under per-user keys
(``--encrypt``) another user's holder of the shared key cannot read a cell's arrays
either. A flipped bit, a reordered, dropped or replayed record (another cell's stream is
under another key), a stream cut short: each fails its tag or its count, and the cell is
answered with an error; nothing is unpickled. While a cell waits for its notebook the
executor takes every connection at once: each gets its challenge and
:data:`HELLO_WAIT` seconds to answer, at most :data:`PENDING` of them are kept, and each
costs 36 bytes, so a peer that connects and idles (or floods) delays nobody for long and
makes the executor hold nothing. Queued cells hold no bulk memory on the worker: it
comes once the cell runs, straight into the executor's pre-faulted receive pool.

The bytes are not hashed again on arrival: every byte is authenticated by the tag, and
the sender's BLAKE3 digests stay the cache key. (Re-hashing 64 MiB costs ~10 ms here;
opening it ~8 ms.)

Sealing and sending run on two threads (both release the GIL), as do receiving and
opening, so the cipher overlaps the socket copy.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from queue import Empty, Queue
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import AuthenticationError, MessageRejected, ProtocolError, TransportError
from .messages import Buffer
from .wire import CHUNK, Incoming

log = logging.getLogger(__name__)

# Messages whose buffers add up to this go on the data connection: it costs the wait
# for "started" and a connect (~0.3 ms here), far less than the hop it saves.
DIRECT_MIN: Final = 1 << 20
TICKET_MAGIC: Final = b"L2GD"
TICKET_BYTES: Final = 32
CHALLENGE_BYTES: Final = 32
HELLO_WAIT: Final = 5.0  # seconds a new connection has to answer its challenge
PENDING: Final = 16  # connections answering a challenge at once; the oldest goes first
_TAG: Final = 16
_LENGTH: Final = struct.Struct(">I")
# Raw chunks are CHUNK bytes; an LZ4 chunk of incompressible data is a little more.
MAX_RECORD: Final = CHUNK + CHUNK // 100 + 4096
UP: Final = b"up\x00\x00"  # notebook -> executor: the inputs
DOWN: Final = b"down"  # executor -> notebook: the result, on the same connection
IDLE: Final = 60.0  # seconds an admitted peer may send nothing before it is dropped
_SOCKET_BUFFER: Final = 4 << 20


def new_ticket() -> bytes:
    return os.urandom(TICKET_BYTES)


def cell_key(key: bytes, cell: str, ticket: bytes) -> AESGCM:
    """The AES-256-GCM key of one cell's stream (derived, never sent)."""
    return AESGCM(hmac.digest(key, b"lan2gpu data 1" + cell.encode() + ticket, "sha256"))


def hello(ticket: bytes, challenge: bytes) -> bytes:
    """The notebook's answer to a connection's challenge: it holds the ticket."""
    return TICKET_MAGIC + hmac.digest(ticket, b"lan2gpu hello 1" + challenge, "sha256")


def answer_challenge(sock: socket.socket, ticket: bytes) -> None:
    """The notebook's side of admission, on a connection just opened."""
    challenge = memoryview(bytearray(CHALLENGE_BYTES))
    _recv_exactly(sock, challenge)
    sock.sendall(hello(ticket, bytes(challenge)))


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
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Idle while its cell runs: kept alive through NAT and stateful firewalls.
            # Probes from 60 s idle, given up after 3 more minutes of silence: longer
            # than a worker's --stall-grace, as a laptop that sleeps a moment needs.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


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
    frames: Sequence[Buffer],
    *,
    direction: bytes = UP,
    stop: Callable[[], bool] = lambda: False,
) -> bool:
    """Send ``frames`` sealed, in order, on an admitted connection; whether all went.
    Sealing runs on a helper thread one record ahead of the socket. ``stop()`` is asked
    between records: true ends the stream there (the connection stays open)."""
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


def receive_frames(
    sock: socket.socket, aead: AESGCM, incoming: Incoming, direction: bytes = UP
) -> None:
    """Read sealed records into ``incoming``'s targets (its final buffers), in order;
    any that does not open raises :class:`AuthenticationError`. Opening runs on a
    helper thread one record behind the socket; only this thread touches ``incoming``."""
    # Two record buffers: one filling from the socket while the other opens.
    spare: Queue[memoryview] = Queue()
    for _ in range(2):
        spare.put(memoryview(bytearray(4 + MAX_RECORD + _TAG)))
    opened: Queue[tuple[int, memoryview, memoryview, memoryview] | None] = Queue()
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
    broke: BaseException | None = None
    try:
        opener.start()
        for n, target in enumerate(incoming.targets()):
            buf = spare.get()
            if failure:
                break
            sealed, plain = _read_record(sock, buf, target, n)
            _hand_over(incoming, plain, target is None)
            opened.put((n, buf, sealed, plain))
    except (TransportError, ProtocolError, OSError) as exc:
        broke = exc  # raised below, unless a record before the break did not open
    finally:
        opened.put(None)  # never blocks: the queue is unbounded, the buffers bound it
        if opener.is_alive():
            opener.join()
    if failure:
        raise failure[0]
    if broke is not None:
        raise broke


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


class _Candidate:
    """A connection that has its challenge and has not answered yet."""

    def __init__(self, conn: socket.socket, ticket: bytes) -> None:
        self.conn = conn
        self.deadline = time.monotonic() + HELLO_WAIT
        challenge = os.urandom(CHALLENGE_BYTES)
        self.expected = hello(ticket, challenge)
        self.got = bytearray()
        conn.setblocking(False)
        conn.send(challenge)  # 32 bytes into an empty send buffer: never short

    def read(self) -> bool | None:
        """True: it answered; False: it answered wrong or went; None: not yet."""
        try:
            chunk = self.conn.recv(len(self.expected) - len(self.got))
        except BlockingIOError:
            return None
        except OSError:
            return False
        if not chunk:
            return False
        self.got += chunk
        if len(self.got) < len(self.expected):
            return None
        return hmac.compare_digest(bytes(self.got), self.expected)


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
        """Admit the notebook that holds ``ticket`` (within ``wait`` seconds), read the
        cell's records from it into ``incoming``, and return the connection (the
        caller's to close: the result goes back on it). Raises
        :class:`TransportError` when no notebook came or its stream broke off, and
        :class:`AuthenticationError` when a record does not open."""
        conn: socket.socket | None = None
        try:
            conn = self._admit(cell, ticket, wait)
            conn.settimeout(IDLE)
            _tune(conn)
            receive_frames(conn, aead, incoming)
            admitted, conn = conn, None
            return admitted
        except TimeoutError:
            raise TransportError(
                f"the inputs of cell {cell[:8]} stopped arriving (nothing for {IDLE:g} s "
                "on the data connection)"
            ) from None
        finally:
            if conn is not None:
                conn.close()

    def _admit(self, cell: str, ticket: bytes, wait: float) -> socket.socket:
        """The first connection that answers its challenge; every other one is closed.
        All are taken as they come, so one that idles holds up nobody."""
        deadline = time.monotonic() + wait
        pending: dict[int, _Candidate] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            self.sock.setblocking(False)
            try:
                while (left := deadline - time.monotonic()) > 0:
                    soonest = min((c.deadline for c in pending.values()), default=deadline)
                    for key, _ in selector.select(max(0.0, min(left, soonest - time.monotonic()))):
                        if key.fileobj is self.sock:
                            self._take(selector, pending, ticket)
                            continue
                        candidate = pending.get(key.fd)
                        if candidate is None or candidate.conn is not key.fileobj:
                            continue  # closed by an earlier event of this same batch
                        verdict = candidate.read()
                        if verdict is None:
                            continue
                        if verdict:  # left in pending until returned: closed if not
                            candidate.conn.setblocking(True)
                            winner = pending.pop(key.fd)
                            selector.unregister(winner.conn)
                            return winner.conn
                        selector.unregister(candidate.conn)
                        del pending[key.fd]
                        candidate.conn.close()
                    now = time.monotonic()
                    for fd, candidate in list(pending.items()):
                        if candidate.deadline <= now:  # too slow to answer: not the notebook
                            selector.unregister(candidate.conn)
                            candidate.conn.close()
                            del pending[fd]
            finally:
                for candidate in pending.values():
                    candidate.conn.close()
                self.sock.setblocking(True)
        raise TransportError(
            f"the notebook did not send the inputs of cell {cell[:8]} within {wait:g} s of "
            "its start (it could not reach this worker's data port?)"
        )

    def _take(
        self, selector: selectors.BaseSelector, pending: dict[int, _Candidate], ticket: bytes
    ) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. out of file descriptors: the notebook may come next
            log.warning("data connection not accepted: %s", exc)
            time.sleep(0.1)  # the listener stays readable meanwhile: no busy loop
            return
        try:
            if len(pending) >= PENDING:  # the oldest gives way
                fd, oldest = next(iter(pending.items()))
                selector.unregister(oldest.conn)
                oldest.conn.close()
                del pending[fd]
            candidate = _Candidate(conn, ticket)
            selector.register(conn, selectors.EVENT_READ)
            pending[conn.fileno()] = candidate
        except OSError:
            conn.close()
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.sock.close()
        if self._path:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
