"""Peak resident memory of a lan2gpu round trip, in fresh processes.

A new worker and a new client process (``python -m benchmarks.memory ...``) run
one ``b = -a`` cell, so no earlier section's peak is counted. The client reads
``VmHWM`` (the peak of ``VmRSS``) from ``/proc`` for itself, the worker's service
and each executor, while the session is still open, and prints it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .measure import MiB, check_negated, payload
from .procs import children, keygen, proc_status, run_client, start_worker
from .report import Table, short_error
from .systems.lan2gpu import open_client

_CHILD_DEADLINE = 600.0


@dataclass(frozen=True)
class Peak:
    process: str
    baseline: int  # VmRSS before the array cell, bytes
    peak: int  # VmHWM after it, bytes


def measure_memory(work: Path, nbytes: int, client_kwargs: dict[str, Any]) -> list[Peak]:
    key_file = keygen(work)
    with start_worker(work, key_file, "bench-memory") as worker:
        argv = [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "--address",
            worker.ready["address"],
            "--key-file",
            str(key_file),
            "--bytes",
            str(nbytes),
            "--worker-pid",
            str(worker.pid),
            "--client-options",
            json.dumps(client_kwargs),
        ]
        rows = run_client("memory", argv, worker, _CHILD_DEADLINE)
    return [Peak(r["process"], r["baseline"], r["peak"]) for r in rows]


def table_memory(result: list[Peak] | BaseException, nbytes: int) -> Table:
    table = Table(
        f"Peak resident memory, lan2gpu `b = -a`, {nbytes // MiB} MiB input (fresh processes)",
        [
            "process",
            "RSS before MiB",
            "peak (VmHWM) MiB",
            "peak / payload",
            "(peak - before) / payload",
        ],
    )
    if isinstance(result, BaseException):
        table.add("all", f"error ({short_error(result)})", None, None, None)
        return table
    for p in result:
        table.add(
            p.process,
            f"{p.baseline / MiB:.0f}",
            f"{p.peak / MiB:.0f}",
            f"{p.peak / nbytes:.2f}x",
            f"{(p.peak - p.baseline) / nbytes:.2f}x",
        )
    table.notes += [
        "payload = the input's size; the output `b` is as large, so a process that ends "
        "up holding both `a` and `b` (the client, the executor) cannot go below 2x above "
        "its baseline",
        "'before': after connecting and one empty cell (imports done, executor started)",
    ]
    return table


# -- the client process -------------------------------------------------------------


def _labels(pids: list[int]) -> dict[str, int]:
    """``worker executor``, ``worker executor 2``, ... for the worker's children."""
    labels: dict[str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                executor = b"worker_kernel.executor" in f.read()
        except OSError:
            continue
        kind = "worker executor" if executor else "worker child"
        same = sum(1 for label in labels if label.startswith(kind))
        labels[f"{kind} {same + 1}" if same else kind] = pid
    return labels


def client(
    address: str, key_file: str, nbytes: int, worker_pid: int, options: dict[str, Any]
) -> None:
    with open_client(address, key_file, options) as worker:
        worker.run("pass", {})
        pids = {"client": os.getpid(), "worker service": worker_pid}
        pids.update(_labels(children(worker_pid)))
        before = {name: proc_status(pid)["VmRSS"] for name, pid in pids.items()}
        a = payload(nbytes, "random", seed=1)
        ns: dict[str, Any] = {"a": a}
        worker.run("b = -a", ns)
        rows = []
        for name, pid in pids.items():
            try:
                peak = proc_status(pid)["VmHWM"]
            except OSError:  # an executor that ended meanwhile
                continue
            rows.append({"process": name, "baseline": before[name], "peak": peak})
        check_negated(a)(ns["b"])  # after reading the peaks: checking allocates
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description="the client side of the memory section")
    parser.add_argument("--address", required=True)
    parser.add_argument("--key-file", required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--worker-pid", type=int, required=True)
    parser.add_argument("--client-options", default="{}")
    args = parser.parse_args()
    client(
        args.address, args.key_file, args.bytes, args.worker_pid, json.loads(args.client_options)
    )


if __name__ == "__main__":
    main()
