"""Emulated LANs (1 and 10 Gbit/s): two network namespaces joined by a shaped veth pair.

::

    netns l2gb-w-PID                         netns l2gb-c-PID
    python -m worker_kernel (x2)  10.231.0.1 ──veth── 10.231.0.2  python -m benchmarks.lan client
    + TCP sink (raw bandwidth)      tbf RATE on each end      (lan2gpu Client, raw TCP)

Both ends get ``tc qdisc add dev IF root tbf rate RATE burst ... latency 50ms``.
The client process measures the link with a raw TCP transfer in each direction
(the wire floor is bytes / that bandwidth), then times lan2gpu cells on a
compressible (zeros-heavy) and an incompressible (random) input against two
workers on the same link: one encrypted (the default, CurveZMQ) and one run
with ``--insecure-plaintext``, alternating sample by sample so both see the
same moment of this noisy machine. For every sample it also counts the page
faults (``minflt`` of ``/proc/PID/stat``) of the client, the worker's service
and the executor that ran the cell: on this VM a first touch of fresh memory
costs more than copying into memory already touched. Prints JSON.
Needs root and ``ip netns``; :class:`LanUnavailable` says why not. The namespaces
(and with them the veth pair) are deleted however the section ends.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
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

from .faults import usage
from .measure import Kind, Stats, check_negated, payload, rate, refresh, size_label, timed
from .procs import keygen, run_client, spawn, start_worker
from .report import Table, ratio, short_error, spread
from .systems.lan2gpu import open_client

RATES = ("1gbit", "10gbit")
SECURITY = ("encrypted", "plaintext")
PAGE = os.sysconf("SC_PAGE_SIZE")


def shape(rate: str) -> list[str]:
    """The ``tc`` token bucket of a link of ``rate``; the burst grows with the rate
    (a 10 Gbit/s bucket of 256 kB refills 40,000 times a second: the kernel's
    timer cannot keep up, and the link runs far below its rate)."""
    burst = "256kb" if rate == "1gbit" else "2mb"
    return ["root", "tbf", "rate", rate, "burst", burst, "latency", "50ms"]


WORKER_IP, CLIENT_IP = "10.231.0.1", "10.231.0.2"
_CHILD_DEADLINE = 900.0
_CHUNK = 4 << 20
MiB = 1 << 20


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
def shaped_link(rate: str) -> Iterator[Link]:
    """Create the two namespaces and the veth pair shaped to ``rate``; delete them on exit."""
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
            _tc(ns, "qdisc", "add", "dev", dev, *shape(rate))
        yield link
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair
            subprocess.run([_tool("ip"), "netns", "delete", ns], capture_output=True, check=False)


@dataclass(frozen=True)
class LanResult:
    rate: str  # the link's tc rate, e.g. "1gbit"
    bandwidth_up: float  # bytes/s, client -> worker, raw TCP
    bandwidth_down: float  # bytes/s, worker -> client
    nbytes: int
    # "random upload encrypted" -> seconds, or the error
    cells: dict[str, Stats | str]
    # the same keys -> median MiB of fresh pages touched per cell: client, service, executor
    faults: dict[str, tuple[float, float, float]]
    options: str  # the lan2gpu client options used


CELLS = {"upload": "n = a.size", "round trip": "b = -a"}


def measure_lan(
    work: Path,
    nbytes: int,
    times: int,
    probe_bytes: int,
    client_kwargs: dict[str, Any],
    *,
    rates: tuple[str, ...] = RATES,
) -> list[LanResult]:
    """One result per link rate, each with both workers (encrypted, plain text)."""
    return [
        _measure_link(
            work,
            rate,
            nbytes=nbytes,
            times=times,
            probe_bytes=probe_bytes,
            client_kwargs=client_kwargs,
        )
        for rate in rates
    ]


def _measure_link(
    work: Path,
    rate: str,
    *,
    nbytes: int,
    times: int,
    probe_bytes: int,
    client_kwargs: dict[str, Any],
) -> LanResult:
    key_file = keygen(work / f"lan-{rate}")
    with shaped_link(rate) as link:
        worker_prefix = link.exec_prefix(link.worker_ns)
        sink_ready = work / f"lan-sink-{rate}.ready"
        sink_argv = [
            sys.executable,
            "-m",
            "benchmarks.lan",
            "sink",
            "--ready-file",
            str(sink_ready),
        ]
        bind = f"tcp://{WORKER_IP}:*"
        with (
            spawn(
                f"lan-sink-{rate}", sink_argv, work, prefix=worker_prefix, ready_file=sink_ready
            ) as sink,
            start_worker(work, key_file, f"lan-enc-{rate}", bind=bind, prefix=worker_prefix) as enc,
            start_worker(
                work,
                key_file,
                f"lan-plain-{rate}",
                bind=bind,
                prefix=worker_prefix,
                extra=["--insecure-plaintext"],
            ) as plain,
        ):
            argv = [
                *link.exec_prefix(link.client_ns),
                sys.executable,
                "-m",
                "benchmarks.lan",
                "client",
                "--address",
                enc.ready["address"],
                "--worker-pid",
                str(enc.ready["pid"]),
                "--plain-address",
                plain.ready["address"],
                "--plain-worker-pid",
                str(plain.ready["pid"]),
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
            out = run_client(f"LAN {rate}", argv, enc, _CHILD_DEADLINE)
    cells = {
        k: (Stats(tuple(v)) if isinstance(v, list) else str(v)) for k, v in out["cells"].items()
    }
    faults = {k: (v[0], v[1], v[2]) for k, v in out["faults"].items()}
    return LanResult(rate, out["up"], out["down"], nbytes, cells, faults, out["options"])


def table_lan(results: list[LanResult] | BaseException | str, nbytes: int) -> Table:
    table = Table(
        f"Emulated LANs (netns + veth + tc tbf), lan2gpu with a {size_label(nbytes)} input, "
        "encrypted (default) and --insecure-plaintext, interleaved",
        [
            "link",
            "data",
            "cell",
            "security",
            "wire floor s",
            "median s [min-max]",
            "x floor",
            "effective MB/s",
            "fresh MiB client/service/executor",
        ],
    )
    if isinstance(results, str):
        table.notes.append(f"skipped: {results}")
        return table
    if isinstance(results, BaseException):
        table.notes.append(f"error: {short_error(results)}")
        return table
    for result in results:
        up, down, n = result.bandwidth_up, result.bandwidth_down, result.nbytes
        floors = {"upload": n / up, "round trip": n / up + n / down}
        for key, stats in result.cells.items():
            kind, rest = key.split(" ", 1)
            cell, security = rest.rsplit(" ", 1)
            floor = floors[cell]
            moved = n if cell == "upload" else 2 * n
            label = "incompressible" if kind == "random" else "compressible, 7/8 zeros"
            code = f"`{CELLS[cell]}`"
            faults = result.faults.get(key)
            fresh = "/".join(f"{f:.0f}" for f in faults) if faults else None
            if isinstance(stats, str):
                table.add(
                    result.rate, label, code, security, f"{floor:.2f}", f"error ({stats})",
                    "", "", "",
                )  # fmt: skip
                continue
            table.add(
                result.rate,
                label,
                code,
                security,
                f"{floor:.2f}",
                spread(stats),
                ratio(stats.median / floor),
                f"{rate(moved, stats.median) * 1000:.0f}",
                fresh,
            )
        table.notes.append(
            f"{result.rate}: raw TCP {up / 1e6:.0f} MB/s client→worker, {down / 1e6:.0f} MB/s "
            "worker→client (median of 3 transfers); wire floor = bytes / that bandwidth"
        )
    table.notes += [
        "x floor below 1 means the data crossed the link in fewer bytes than the array "
        "(compression); fresh MiB = pages touched for the first time during the cell "
        "(minflt x page size), median per cell",
        f"lan2gpu client options: {results[0].options if results else 'defaults'}",
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


def minflt(pid: int) -> int:
    """Minor page faults of a process so far (first touches of fresh pages)."""
    used = usage(pid)
    if used is None:
        raise ProcessLookupError(f"process {pid} is gone")
    return used.faults


def _executor_pid(worker: Any) -> int | None:
    executors = worker.status().get("executors", [])
    return int(executors[0]["pid"]) if executors else None


def client(args: argparse.Namespace) -> None:
    host, port = args.sink.rsplit(":", 1)
    bw = {}
    for mode in (b"U", b"D"):
        seconds = sorted(_tcp_seconds((host, int(port)), mode, args.probe_bytes) for _ in range(3))
        bw[mode] = args.probe_bytes / seconds[1]
    options = json.loads(args.client_options)  # already limited to what the client takes
    used = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
    samples: dict[str, list[float]] = {}
    faults: dict[str, list[tuple[int, int, int]]] = {}
    failed: dict[str, str] = {}
    with (
        open_client(args.address, args.key_file, options) as enc,
        open_client(args.plain_address, args.key_file, {**options, "plaintext": True}) as plain,
    ):
        workers = {"encrypted": (enc, args.worker_pid), "plaintext": (plain, args.plain_worker_pid)}
        kinds: tuple[Kind, ...] = ("random", "sparse")
        for kind in kinds:
            a = payload(args.bytes, kind, seed=7)
            for cell, code in CELLS.items():
                check = _checker(a, code)
                for i in range(1 + args.repeat):  # the first round warms up, untimed
                    for security, (worker, service_pid) in workers.items():
                        key = f"{kind} {cell} {security}"
                        if key in failed:
                            continue
                        refresh(a, i, kind=kind)
                        gc.collect()
                        try:
                            executor = _executor_pid(worker) if i else None
                            pids = ["self", service_pid, executor]
                            before = [minflt(p) if p else 0 for p in pids]
                            seconds, value = timed(partial(_run, worker, code, a))
                            after = [minflt(p) if p else 0 for p in pids]
                            check(value)
                        except Exception as exc:  # reported in the table; the rest still runs
                            failed[key] = short_error(exc)
                            continue
                        if i:
                            samples.setdefault(key, []).append(seconds)
                            moved = [(y - x) * PAGE for x, y in zip(before, after, strict=True)]
                            faults.setdefault(key, []).append((moved[0], moved[1], moved[2]))
    cells: dict[str, list[float] | str] = {**samples, **failed}
    fresh = {
        key: [statistics.median(f[j] for f in found) / MiB for j in range(3)]
        for key, found in faults.items()
    }
    print(
        json.dumps(
            {"up": bw[b"U"], "down": bw[b"D"], "cells": cells, "faults": fresh, "options": used}
        )
    )


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
    c.add_argument("--worker-pid", type=int, required=True)
    c.add_argument("--plain-address", required=True)
    c.add_argument("--plain-worker-pid", type=int, required=True)
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
