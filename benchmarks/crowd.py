"""Many clients on one worker: cell latency and executor evictions.

Each client is a notebook of its own (its own connection and session) that runs
small cells back to back; all of them at once, against one fresh worker that keeps
at most ``--max-executors`` session executors. Past that many sessions, a cell
waits for an executor instead of evicting one that is in use (which would make
every cell start an executor: a thrash). The table gives the latency of a cell as
its notebook sees it (p50, p99, max, first cells included: they start the
session's executor) and how many executors the worker stopped to make room.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import keygen, start_worker
from .report import Table, short_error

CELL = "y = x + 1"


@dataclass(frozen=True)
class Crowd:
    clients: int
    cells: int
    latencies: tuple[float, ...]
    evictions: int
    wrong: int  # results that were not what the cell computes, or missing
    wall: float


def _percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_one(
    work: Path, clients: int, cells: int, max_executors: int, client_kwargs: dict[str, Any]
) -> Crowd:
    from lan2gpu_magic import connect

    key = keygen(work)
    name = f"crowd{clients}"
    worker = start_worker(
        work, key, name, extra=["--max-executors", str(max_executors), "--log-level", "INFO"]
    )
    latencies: list[float] = []
    wrong = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def notebook(i: int) -> None:
        nonlocal wrong
        try:
            with connect(worker.ready["address"], key_file=key, **client_kwargs) as c:
                for k in range(cells):
                    ns = {"x": i * 1000 + k}
                    t0 = time.perf_counter()
                    c.run(CELL, ns, timeout=600)
                    seconds = time.perf_counter() - t0
                    with lock:
                        latencies.append(seconds)
                        wrong += ns.get("y") != i * 1000 + k + 1
        except BaseException as exc:  # reported below, after the others finished
            errors.append(exc)

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=notebook, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
    finally:
        worker.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {short_error(errors[0])}")
    evictions = worker.log_path.read_text(errors="replace").count("at --max-executors")
    wrong += clients * cells - len(latencies)
    return Crowd(clients, cells, tuple(latencies), evictions, wrong, wall)


def measure_crowd(
    work: Path,
    sizes: Sequence[int],
    cells: int,
    max_executors: int,
    client_kwargs: dict[str, Any],
) -> list[Crowd | str]:
    out: list[Crowd | str] = []
    for clients in sizes:
        try:
            out.append(measure_one(work, clients, cells, max_executors, client_kwargs))
        except Exception as exc:  # one row says what failed; the others still run
            out.append(f"{clients} clients: {short_error(exc)}")
    return out


def table_crowd(results: Sequence[Crowd | str], cells: int, max_executors: int) -> Table:
    table = Table(
        f"Many clients on one worker (--max-executors {max_executors}, {cells} cells each)",
        ["clients", "cell p50 (s)", "p99 (s)", "max (s)", "executors stopped", "wrong or lost",
         "wall (s)"],
    )  # fmt: skip
    for r in results:
        if isinstance(r, str):
            table.notes.append(f"failed: {r}")
            continue
        table.add(
            r.clients,
            f"{statistics.median(r.latencies):.3f}",
            f"{_percentile(r.latencies, 0.99):.3f}",
            f"{max(r.latencies):.3f}",
            r.evictions,
            r.wrong,
            f"{r.wall:.1f}",
        )
    table.notes.append(
        f"Each client: its own connection and session, `{CELL}` back to back. Past "
        f"{max_executors} sessions a cell waits for an executor (one busy, used in the last "
        "5 s or with cells waiting is never stopped; after 30 s any idle one may go), so the "
        "later sessions' first cells wait for the earlier ones: that is the p99 and max."
    )
    return table
