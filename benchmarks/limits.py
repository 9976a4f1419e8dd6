"""What this machine can do at all: the ceilings the transfer figures run into.

Copying memory (into a reused buffer, into fresh memory that page-faults),
hashing (BLAKE3 on one thread, as the wire's integrity digest; HMAC-SHA256), a
loopback TCP stream from another process (``python -m benchmarks.limits PORT
BYTES TIMES``) received into a reused buffer, and the ciphers: ZeroMQ over
loopback in plain text and with CurveZMQ (what lan2gpu encrypts with by default;
two contexts, so encryption and decryption each get an I/O thread), and AES-256-GCM
and ChaCha20-Poly1305 on one thread (the ``cryptography`` package, where installed).
One-way GB/s over the buffer's size: a round trip moves every byte at least
twice through some of these.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .measure import Stats, payload, rate, repeat, size_label
from .procs import spawn
from .report import Table, short_error, spread


class _TcpSink:
    """Receives one stream per call from a sender process, into a reused buffer."""

    def __init__(self, nbytes: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.view = memoryview(bytearray(nbytes))

    def receive(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            got = 0
            while got < len(self.view):
                n = conn.recv_into(self.view[got:])
                if not n:
                    raise ConnectionError("the sender closed early")
                got += n
            conn.sendall(b"k")

    def close(self) -> None:
        self.server.close()


def send(port: int, nbytes: int, times: int) -> None:
    """The sender process: ``times`` streams of ``nbytes``, each on a new connection."""
    buf = payload(nbytes, "random", seed=3).data.cast("B")
    for _ in range(times):
        with socket.create_connection(("127.0.0.1", port)) as out:
            out.sendall(buf)
            out.recv(1)


def _tcp_stats(work: Path, nbytes: int, times: int) -> Stats:
    sink = _TcpSink(nbytes)
    argv = [sys.executable, "-m", "benchmarks.limits", str(sink.port), str(nbytes), str(times + 1)]
    try:
        with spawn("tcp-sender", argv, work):
            return repeat(sink.receive, times)
    finally:
        sink.close()


_FRAME = 1 << 20  # as the wire's chunks


class _ZmqStream:
    """A PUSH thread streams the buffer in 1 MiB frames to a PULL socket, which
    receives each into a reused buffer; CurveZMQ on both or on neither."""

    def __init__(self, data: memoryview, *, curve: bool) -> None:
        self._contexts = (zmq.Context(), zmq.Context())  # one I/O thread per side
        self._pull = self._contexts[0].socket(zmq.PULL)
        self._push = self._contexts[1].socket(zmq.PUSH)
        if curve:
            server_public, server_secret = zmq.curve_keypair()
            client_public, client_secret = zmq.curve_keypair()
            self._pull.curve_server = True
            self._pull.curve_secretkey = server_secret
            self._push.curve_serverkey = server_public
            self._push.curve_publickey = client_public
            self._push.curve_secretkey = client_secret
        port = self._pull.bind_to_random_port("tcp://127.0.0.1")
        self._push.connect(f"tcp://127.0.0.1:{port}")
        self._frames = [data[k : k + _FRAME] for k in range(0, data.nbytes, _FRAME)]
        self._into = bytearray(_FRAME)
        self._go = threading.Semaphore(0)
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._sender.start()

    def _send(self) -> None:
        while self._go.acquire() and self._frames:
            for frame in self._frames:
                self._push.send(frame, copy=False)

    def receive(self) -> None:
        self._go.release()
        for _ in self._frames:
            self._pull.recv_into(self._into)

    def close(self) -> None:
        self._frames = []
        self._go.release()
        self._sender.join(10)
        for sock in (self._push, self._pull):
            sock.close(linger=0)
        for ctx in self._contexts:
            ctx.term()


def _zmq_stats(data: memoryview, times: int, *, curve: bool) -> Stats:
    stream = _ZmqStream(data, curve=curve)
    try:
        stream.receive()  # the handshake and first frames, not timed
        return repeat(stream.receive, times)
    finally:
        stream.close()


def _aead_cases(octets: memoryview) -> list[tuple[str, Callable[[], object]]]:
    """Seal every 1 MiB chunk into a reused buffer, then open one back, per cipher."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    except ImportError:
        return []
    cases: list[tuple[str, Callable[[], object]]] = []
    chunks = [octets[k : k + _FRAME] for k in range(0, octets.nbytes, _FRAME)]
    for name, cipher in (
        ("AES-256-GCM", AESGCM(bytes(range(32)))),
        ("ChaCha20-Poly1305", ChaCha20Poly1305(bytes(range(32)))),
    ):
        nonce, sealed = bytes(12), bytearray(_FRAME + 16)
        opened = bytearray(_FRAME)

        one = cipher.encrypt(nonce, chunks[0], None)  # what unseal opens, every time

        def seal(cipher: Any = cipher, nonce: bytes = nonce, out: bytearray = sealed) -> None:
            view = memoryview(out)  # slices of a view: no copy of the buffer
            for chunk in chunks:
                cipher.encrypt_into(nonce, chunk, None, view[: chunk.nbytes + 16])

        def unseal(
            cipher: Any = cipher, nonce: bytes = nonce, one: bytes = one, out: bytearray = opened
        ) -> None:
            view = memoryview(out)[: len(one) - 16]
            for _ in chunks:
                cipher.decrypt_into(nonce, one, None, view)

        cases += [(f"{name} seal, one thread", seal), (f"{name} open, one thread", unseal)]
    return cases


def measure_limits(work: Path, nbytes: int, times: int) -> Table:
    import blake3

    src = payload(nbytes, "random", seed=3)
    dst = np.empty_like(src)
    key = bytes(32)
    octets = src.data.cast("B")
    cases: list[tuple[str, Callable[[], object]]] = [
        ("numpy copy into a reused buffer", partial(np.copyto, dst, src)),
        ("numpy copy into fresh memory", src.copy),
        ("BLAKE3, one thread", lambda: blake3.blake3(octets).digest()),
        ("HMAC-SHA256", lambda: hmac.new(key, octets, hashlib.sha256).digest()),
        *_aead_cases(octets),
    ]
    table = Table(
        f"Limits of this machine ({size_label(nbytes)} buffer, one way)",
        ["operation", "GB/s", "s: median [min-max]"],
    )
    for label, call in cases:
        try:
            stats: Stats = repeat(call, times)
        except Exception as exc:  # a missing module or a socket error becomes the row
            table.add(label, f"error ({short_error(exc)})", None)
            continue
        table.add(label, f"{rate(nbytes, stats.median):.2f}", spread(stats))
    try:
        tcp = _tcp_stats(work, nbytes, times)
        table.add(
            "TCP over loopback, process to process", f"{rate(nbytes, tcp.median):.2f}", spread(tcp)
        )
    except Exception as exc:  # shown as the row
        table.add("TCP over loopback", f"error ({short_error(exc)})", None)
    for label, curve in (("plain text", False), ("CurveZMQ", True)):
        try:
            stream = _zmq_stats(octets, times, curve=curve)
            table.add(
                f"ZeroMQ over loopback, 1 MiB frames, {label}",
                f"{rate(nbytes, stream.median):.2f}",
                spread(stream),
            )
        except Exception as exc:  # shown as the row
            table.add(f"ZeroMQ, {label}", f"error ({short_error(exc)})", None)
    return table


def main() -> None:
    port, nbytes, times = (int(arg) for arg in sys.argv[1:4])
    send(port, nbytes, times)


if __name__ == "__main__":
    main()
