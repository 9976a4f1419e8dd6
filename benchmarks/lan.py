"""An emulated 1 Gbit/s LAN: two network namespaces joined by a shaped veth pair.

::

    netns l2gb-w-PID                         netns l2gb-c-PID
    python -m worker_kernel  10.231.0.1 ──veth── 10.231.0.2  python -m benchmarks.lan client
    + TCP sink (raw bandwidth)      tbf 1gbit on each end      (lan2gpu Client, raw TCP)

Both ends get ``tc qdisc add dev IF root tbf rate 1gbit burst 256kb latency 50ms``.
The client process measures the link with a raw TCP transfer in each direction
(the wire floor is bytes / that bandwidth), then times lan2gpu cells on a
compressible (zeros-heavy) and an incompressible (random) input and prints JSON.
Needs root and ``ip netns``; :class:`LanUnavailable` says why not. The namespaces
(and with them the veth pair) are deleted however the section ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .measure import Kind, Stats, check_negated, payload, rate, refresh, repeat, size_label
from .procs import keygen, run_client, spawn, start_worker
from .report import Table, ratio, short_error, spread
from .systems.lan2gpu import open_client

RATE = "1gbit"
SHAPE = ["root", "tbf", "rate", RATE, "burst", "256kb", "latency", "50ms"]
WORKER_IP, CLIENT_IP = "10.231.0.1", "10.231.0.2"
_CHILD_DEADLINE = 900.0
_CHUNK = 4 << 20


class LanUnavailable(Exception):
    """The LAN section cannot run here (not root, no ``ip netns``, ...)."""


@dataclass(frozen=True)
class Link:
    worker_ns: str
    client_ns: str

    def exec_prefix(self, ns: str) -> list[str]:
        return [_tool("ip"), "netns", "exec", ns]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LanUnavailable(f"`{name}` (iproute2) is not installed")
    return path


def _ip(*args: str) -> None:
    done = subprocess.run([_tool("ip"), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LanUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    argv = [_tool("tc"), "-n", ns, *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LanUnavailable(f"`tc -n {ns} {' '.join(args)}` failed: {done.stderr.strip()}")


@contextmanager
def shaped_link() -> Iterator[Link]:
    """Create the two namespaces and the shaped veth pair; delete them on exit."""
    if os.geteuid() != 0:
        raise LanUnavailable("network namespaces need root (this run is not root)")
    tag = str(os.getpid())
    link = Link(f"l2gb-w-{tag}", f"l2gb-c-{tag}")
    veth_w, veth_c = f"l2gbw{tag}"[:15], f"l2gbc{tag}"[:15]
    made: list[str] = []
    try:
        for ns in (link.worker_ns, link.client_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip(
            "link",
            "add",
            veth_w,
            "netns",
            link.worker_ns,
            "type",
            "veth",
            "peer",
            "name",
            veth_c,
            "netns",
            link.client_ns,
        )
        for ns, dev, addr in (
            (link.worker_ns, veth_w, WORKER_IP),
            (link.client_ns, veth_c, CLIENT_IP),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _tc(ns, "qdisc", "add", "dev", dev, *SHAPE)
        yield link
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair
            subprocess.run([_tool("ip"), "netns", "delete", ns], capture_output=True, check=False)


@dataclass(frozen=True)
class LanResult:
    bandwidth_up: float  # bytes/s, client -> worker, raw TCP
    bandwidth_down: float  # bytes/s, worker -> client
    nbytes: int
    cells: dict[str, Stats | str]  # "random upload" -> seconds, or the error
    options: str  # the lan2gpu client options used


CELLS = {"upload": "n = a.size", "round trip": "b = -a"}


def measure_lan(
    work: Path, nbytes: int, times: int, probe_bytes: int, client_kwargs: dict[str, Any]
) -> LanResult:
    key_file = keygen(work)
    with shaped_link() as link:
        worker_prefix = link.exec_prefix(link.worker_ns)
        sink_ready = work / "lan-sink.ready"
        sink_argv = [
            sys.executable,
            "-m",
            "benchmarks.lan",
            "sink",
            "--ready-file",
            str(sink_ready),
        ]
        with (
            spawn("lan-sink", sink_argv, work, prefix=worker_prefix, ready_file=sink_ready) as sink,
            start_worker(
                work, key_file, "bench-lan", bind=f"tcp://{WORKER_IP}:*", prefix=worker_prefix
            ) as worker,
        ):
            argv = [
                *link.exec_prefix(link.client_ns),
                sys.executable,
                "-m",
                "benchmarks.lan",
                "client",
                "--address",
                worker.ready["address"],
                "--sink",
                f"{WORKER_IP}:{sink.ready['port']}",
                "--key-file",
                str(key_file),
                "--bytes",
                str(nbytes),
                "--probe-bytes",
                str(probe_bytes),
                "--repeat",
                str(times),
                "--client-options",
                json.dumps(client_kwargs),
            ]
            out = run_client("LAN", argv, worker, _CHILD_DEADLINE)
    cells = {
        k: (Stats(tuple(v)) if isinstance(v, list) else str(v)) for k, v in out["cells"].items()
    }
    return LanResult(out["up"], out["down"], nbytes, cells, out["options"])


def table_lan(result: LanResult | BaseException | str, nbytes: int) -> Table:
    table = Table(
        f"Emulated 1 Gbit/s LAN (netns + veth + tc tbf), lan2gpu with a {size_label(nbytes)} input",
        ["data", "cell", "wire floor s", "median s [min-max]", "x floor", "effective MB/s"],
    )
    if isinstance(result, str):
        table.notes.append(f"skipped: {result}")
        return table
    if isinstance(result, BaseException):
        table.notes.append(f"error: {short_error(result)}")
        return table
    up, down, n = result.bandwidth_up, result.bandwidth_down, result.nbytes
    floors = {"upload": n / up, "round trip": n / up + n / down}
    for key, stats in result.cells.items():
        kind, cell = key.split(" ", 1)
        floor = floors[cell]
        moved = n if cell == "upload" else 2 * n
        label = f"{kind} ({'incompressible' if kind == 'random' else 'compressible, 7/8 zeros'})"
        code = f"`{CELLS[cell]}`"
        if isinstance(stats, str):
            table.add(label, code, f"{floor:.2f}", f"error ({stats})", None, None)
        else:
            table.add(
                label,
                code,
                f"{floor:.2f}",
                spread(stats),
                ratio(stats.median / floor),
                f"{rate(moved, stats.median) * 1000:.0f}",
            )
    table.notes += [
        f"raw TCP on this link: {up / 1e6:.0f} MB/s client→worker, {down / 1e6:.0f} MB/s "
        "worker→client (median of 3 transfers); wire floor = bytes / that bandwidth",
        "x floor below 1 means the data crossed the link in fewer bytes than the array "
        f"(compression); lan2gpu client options: {result.options}",
    ]
    return table


# -- processes inside the namespaces ---------------------------------------------------


def sink(ready_file: Path) -> None:
    """A TCP server: ``U n`` + n bytes -> 1-byte ack; ``D n`` -> n bytes back."""
    server = socket.create_server((WORKER_IP, 0))
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": server.getsockname()[1], "pid": os.getpid()}))
    tmp.replace(ready_file)
    block = bytes(_CHUNK)
    while True:
        conn, _ = server.accept()
        with conn:
            mode, n = struct.unpack("!cQ", _recv_exactly(conn, 9))
            if mode == b"U":
                _drain(conn, n)
                conn.sendall(b"k")
            else:
                for start in range(0, n, _CHUNK):
                    conn.sendall(block[: min(_CHUNK, n - start)])


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed early")
        data += chunk
    return data


def _drain(conn: socket.socket, n: int) -> None:
    buf = bytearray(_CHUNK)
    left = n
    while left:
        got = conn.recv_into(buf, min(left, _CHUNK))
        if not got:
            raise ConnectionError("peer closed early")
        left -= got


def _tcp_seconds(address: tuple[str, int], mode: bytes, n: int) -> float:
    with socket.create_connection(address) as conn:
        t0 = time.perf_counter()
        conn.sendall(struct.pack("!cQ", mode, n))
        if mode == b"U":
            block = bytes(_CHUNK)
            for start in range(0, n, _CHUNK):
                conn.sendall(block[: min(_CHUNK, n - start)])
            _recv_exactly(conn, 1)
        else:
            _drain(conn, n)
        return time.perf_counter() - t0


def client(args: argparse.Namespace) -> None:
    host, port = args.sink.rsplit(":", 1)
    bw = {}
    for mode in (b"U", b"D"):
        seconds = sorted(_tcp_seconds((host, int(port)), mode, args.probe_bytes) for _ in range(3))
        bw[mode] = args.probe_bytes / seconds[1]
    options = json.loads(args.client_options)  # already limited to what the client takes
    used = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
    cells: dict[str, list[float] | str] = {}
    with open_client(args.address, args.key_file, options) as worker:
        kinds: tuple[Kind, ...] = ("random", "sparse")
        for kind in kinds:
            a = payload(args.bytes, kind, seed=7)
            for cell, code in CELLS.items():
                try:
                    stats = repeat(
                        partial(_run, worker, code, a),
                        args.repeat,
                        before=partial(refresh, a, kind=kind),
                        check=_checker(a, code),
                    )
                    cells[f"{kind} {cell}"] = list(stats.samples)
                except Exception as exc:  # reported in the table, the other rows still run
                    cells[f"{kind} {cell}"] = short_error(exc)
    print(json.dumps({"up": bw[b"U"], "down": bw[b"D"], "cells": cells, "options": used}))


def _run(worker: Any, code: str, a: np.ndarray) -> object:
    ns: dict[str, Any] = {"a": a}
    worker.run(code, ns)
    return ns.get("b", ns.get("n"))


def _checker(a: np.ndarray, code: str) -> Callable[[object], None]:
    if code == CELLS["round trip"]:
        return check_negated(a)

    def check(value: object) -> None:
        if value != a.size:
            raise AssertionError(f"expected n == {a.size}, got {value!r}")

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description="processes of the LAN section")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--ready-file", type=Path, required=True)
    c = sub.add_parser("client")
    c.add_argument("--address", required=True)
    c.add_argument("--sink", required=True)
    c.add_argument("--key-file", required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--probe-bytes", type=int, required=True)
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--client-options", default="{}")
    args = parser.parse_args()
    if args.command == "sink":
        sink(args.ready_file)
    else:
        client(args)


if __name__ == "__main__":
    main()
