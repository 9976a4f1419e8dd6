"""Placing a cell on a Dask cluster of 200 GPU workers, without 200 workers.

A real scheduler (``dask scheduler``, no workers), and the status events that 200
lan2gpu plugins would publish (mixed models, queues and free memory) sent through it.
Then ``DaskCluster.choose`` is timed: the notebook-side cost of placing one cell, and
how many status requests and events that took.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .measure import repeat
from .report import Table
from .sections import Failed, attempt

GIB = 1 << 30
WORKERS = 200
MODELS = [("NVIDIA A100-SXM4-80GB", 80, (8, 0)), ("Tesla V100-SXM2-16GB", 16, (7, 0)),
          ("Tesla T4", 16, (7, 5)), ("NVIDIA GeForce RTX 4090", 24, (8, 9))]  # fmt: skip


def fake_event(i: int, queue: int | None = None) -> dict[str, Any]:
    """The status event worker ``i``'s plugin would publish (``lan2gpu-status``)."""
    name, total, cc = MODELS[i % len(MODELS)]
    free = total * GIB * (10 + (i * 37) % 90) // 100
    running = (i * 7) % 4 if queue is None else queue
    from worker_kernel.protocol.versions import local_versions

    status = {
        "worker": f"gpu-node-{i:03d}",
        "versions": local_versions(),
        "capabilities": {
            "gpus": [{"index": 0, "name": name, "compute_capability": list(cc),
                      "memory_total": total * GIB, "memory_free": free, "utilization": 50.0}],
            "cpu_count": 16, "load_average": 1.0, "simulator": False,
        },
        "load": {"queues": {"gpu0": {"running": running, "waiting": 0}}},
        "executors": [], "sessions": [], "running": [], "queued": [],
    }  # fmt: skip
    address = f"tcp://10.1.{i // 250}.{i % 250 + 1}:40000"
    return {"worker": address, "status": status, "problem": "", "resources": {"GPU": 1}}


def measure_placement(calls: int) -> dict[str, Any] | Failed:
    return attempt(lambda: _measure(calls))


def _measure(calls: int) -> dict[str, Any]:
    # The scheduler in a process of its own, as a notebook sees a cluster's.
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "scheduler.json"
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", str(file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not (file.exists() and file.stat().st_size) and time.monotonic() < deadline:
                time.sleep(0.1)
            return _place_over(str(file), calls)
        finally:
            scheduler.terminate()
            scheduler.wait(30)


def _place_over(scheduler: str, calls: int) -> dict[str, Any]:
    from lan2gpu_magic.dask_backend import DaskCluster
    from lan2gpu_magic.placement import Requirements
    from worker_kernel.protocol.dask_tasks import STATUS_TOPIC

    with DaskCluster(scheduler) as cluster:
        cluster.rows()
        for i in range(WORKERS):
            cluster.dask.log_event(STATUS_TOPIC, fake_event(i))
        deadline = time.monotonic() + 60
        while cluster.status_events < WORKERS and time.monotonic() < deadline:
            time.sleep(0.05)
        asked, heard = cluster.identity_calls, cluster.status_events
        req = Requirements(gpu="A100", min_memory=40 * GIB)
        steady = repeat(lambda: cluster.choose(req), calls, warmup=3)
        # After each change of one worker (one event), the next placement.
        changed = []
        for n in range(min(calls, 50)):
            before = cluster.status_events
            cluster.dask.log_event(STATUS_TOPIC, fake_event(n % WORKERS, queue=n % 5))
            while cluster.status_events == before and time.monotonic() < deadline + 60:
                time.sleep(0.001)
            t0 = time.perf_counter()
            cluster.choose(req)
            changed.append(time.perf_counter() - t0)
        return {
            "steady": steady,
            "changed": sorted(changed),
            "identity": cluster.identity_calls - asked,
            "events": cluster.status_events - heard,
            "calls": calls + 3 + len(changed),
        }


def table_placement(result: dict[str, Any] | Failed) -> Table:
    table = Table(
        f"Placing a cell on a Dask cluster of {WORKERS} GPU workers (notebook side)",
        ["case", "median ms", "min ms", "max ms", "placements"],
    )
    if isinstance(result, Failed):
        table.add("DaskCluster.choose", str(result), None, None, None)
        return table
    steady, changed = result["steady"], result["changed"]
    table.add("no change since the last cell", steady.median * 1e3, steady.min * 1e3,
              steady.max * 1e3, steady.n)  # fmt: skip
    if changed:
        mid = changed[len(changed) // 2]
        table.add("after one worker's status event", mid * 1e3, changed[0] * 1e3,
                  changed[-1] * 1e3, len(changed))  # fmt: skip
    table.notes.append(
        f"status requests to the scheduler during {result['calls']} placements: "
        f"{result['identity']}; status events: {result['events']} (one per worker change, "
        "none per cell)"
    )
    return table
