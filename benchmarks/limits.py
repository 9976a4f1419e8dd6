"""What this machine can do at all: the ceilings the transfer figures run into.

Copying memory (into a reused buffer, into fresh memory that page-faults),
hashing (BLAKE3 on one thread, as the wire's integrity digest; HMAC-SHA256) and a
loopback TCP stream from another process (``python -m benchmarks.limits PORT
BYTES TIMES``), received into a reused buffer.
One-way GB/s over the buffer's size: a round trip moves every byte at least
twice through some of these.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

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
    return table


def main() -> None:
    port, nbytes, times = (int(arg) for arg in sys.argv[1:4])
    send(port, nbytes, times)


if __name__ == "__main__":
    main()
