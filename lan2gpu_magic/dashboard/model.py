"""The dashboard's JSON, built from the pool's rows (pure: no sockets, no clock).

Three documents, one per API endpoint: workers, GPUs (with their recent
history), and jobs (running, waiting, recently finished, hosted kernels). Every
item names its worker, so a script can join them. A worker that stops
answering keeps its name, GPUs (marked ``"stale": true``) and finished cells
from its last answer; what it was running is no longer known and not shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker_kernel.protocol.contents import Queue, StatusDocument

from ..pool import WorkerRow


@dataclass(frozen=True)
class Snapshot:
    """What every endpoint serves until the next poll."""

    updated: float  # wall time of the poll
    workers: list[dict[str, Any]] = field(default_factory=list)
    gpus: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def snapshot(
    rows: Sequence[WorkerRow],
    updated: float,
    last: Mapping[str, StatusDocument] | None = None,
    recent: int = 50,
) -> Snapshot:
    """The three documents for one poll of every known worker.

    ``last``: address -> that worker's last status reply, for those that do not
    answer now. ``recent``: how many finished cells to keep, newest first.
    """
    last = last or {}
    workers = [_worker(row, last.get(row.address)) for row in rows]
    gpus: list[dict[str, Any]] = []
    jobs: dict[str, list[dict[str, Any]]] = {
        "running": [],
        "waiting": [],
        "recent": [],
        "kernels": [],
    }
    for row in rows:
        status = row.status or last.get(row.address)
        if status is None:
            continue
        who = {"worker": str(status.get("worker", "?")), "address": row.address}
        stale = {"stale": row.status is None}
        gpus += [{**who, **stale, **gpu} for gpu in _gpus(status)]
        jobs["recent"] += [{**who, **job} for job in status.get("recent", [])]
        if row.status is None:
            continue
        jobs["running"] += [{**who, **job} for job in status.get("running", [])]
        jobs["waiting"] += [{**who, **job} for job in status.get("queued", [])]
        jobs["kernels"] += [{**who, **kernel} for kernel in status.get("kernels", [])]
    jobs["running"].sort(key=lambda j: -float(j.get("running", 0.0)))
    jobs["waiting"].sort(key=lambda j: -float(j.get("waiting", 0.0)))
    jobs["recent"].sort(key=lambda j: -float(j.get("finished", 0.0)))
    del jobs["recent"][recent:]
    return Snapshot(updated, workers, gpus, jobs)


def _worker(row: WorkerRow, last: StatusDocument | None) -> dict[str, Any]:
    known = row.status or last or {}
    out: dict[str, Any] = {
        "name": str(known.get("worker", "")),
        "address": row.address,
        "origin": row.origin,
        "state": row.state if row.status is None else "up",
        "problem": row.problem,
    }
    if row.status is None:
        return out
    caps = row.status.get("capabilities", {})
    load = row.status.get("load", {})
    out.update(
        instance=row.status.get("instance", ""),
        versions=row.status.get("versions", {}),
        simulator=bool(caps.get("simulator")),
        cpu_count=caps.get("cpu_count"),
        load_average=load.get("load_average", caps.get("load_average")),
        memory_total=caps.get("memory_total"),
        memory_available=load.get("memory_available", caps.get("memory_available")),
        latency=row.view.latency if row.view is not None else None,
        gpus=len(caps.get("gpus", [])),
        running=len(row.status.get("running", [])),
        waiting=len(row.status.get("queued", [])),
        sessions=len(row.status.get("sessions", [])),
        kernels=len(row.status.get("kernels", [])),
    )
    return out


def _gpus(status: StatusDocument) -> list[dict[str, Any]]:
    caps = status.get("capabilities", {})
    live = {int(g["index"]): g for g in status.get("load", {}).get("gpus", [])}
    queues = status.get("load", {}).get("queues", {})
    history: dict[str, list[list[float | None]]] = status.get("history", {})
    out = []
    for gpu in caps.get("gpus", []):
        index = int(gpu["index"])
        now = {**gpu, **live.get(index, {})}
        total, free = int(now["memory_total"]), int(now["memory_free"])
        queue: Queue = queues.get(f"gpu{index}", {})
        out.append(
            {
                "index": index,
                "name": str(now["name"]),
                "compute_capability": now.get("compute_capability"),
                "simulated": bool(now.get("simulated")),
                "memory_total": total,
                "memory_used": max(0, total - free),
                "utilization": now.get("utilization"),
                "running": int(queue.get("running", 0)),
                "waiting": int(queue.get("waiting", 0)),
                "kernels": int(queue.get("kernels", 0)),
                # [wall time, utilization %, memory used, cells running], oldest first
                "history": history.get(str(index), []),
            }
        )
    return out
