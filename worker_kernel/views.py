"""What a worker tells about itself: live load (in heartbeats) and full status."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .capabilities import Capabilities
from .dispatch import Dispatcher
from .kernels import KernelHost
from .protocol.contents import CellInfo, Load, Queue, StatusDocument
from .protocol.versions import local_versions
from .scheduler import Cell, gpu_slot

if TYPE_CHECKING:
    from .service import WorkerService


def load(caps: Capabilities, dispatcher: Dispatcher, kernels: KernelHost) -> Load:
    """Live numbers: per-resource queues (kernels included) and GPU memory/utilization."""
    queues: dict[str, Queue] = {
        slot: {"running": q["running"], "waiting": q["waiting"]}
        for slot, q in dispatcher.load().items()
    }
    for kernel in kernels.kernels.values():
        for gpu in kernel.gpus:
            slot = queues.setdefault(gpu_slot(gpu), {"running": 0, "waiting": 0})
            slot["kernels"] = slot.get("kernels", 0) + 1
    return {
        "queues": queues,
        "gpus": [
            {"index": g.index, "memory_free": g.memory_free, "utilization": g.utilization}
            for g in caps.gpus
        ],
        "load_average": caps.load_average,
        "memory_available": caps.memory_available,
    }


def status(service: WorkerService, detail: bool = False) -> StatusDocument:
    """Everything: capabilities, load, running and waiting cells, sessions, kernels;
    with ``detail``, also the GPU history and the recently finished cells."""
    now = time.monotonic()

    def cell_info(cell: Cell) -> CellInfo:
        return {
            "id": cell.id,
            "session": cell.session,
            "user": cell.user,  # with per-user keys (--encrypt), else ""
            "client": cell.client,
            "resources": list(cell.resources),
            "bytes": cell.nbytes,
            "waiting": now - cell.received if cell.started is None else 0.0,
            "running": now - cell.started if cell.started is not None else 0.0,
        }

    d = service.dispatcher
    out: StatusDocument = {
        "worker": service.config.name,
        "instance": service.instance,
        "versions": local_versions(),
        "capabilities": service.capabilities.to_json(),
        "load": service.load(),
        "running": [cell_info(c) for c in d.running.values()],
        "queued": [cell_info(c) for c in d.queue.order()],
        "sessions": sorted({h.session for h in service.pool.handles()}),
        "executors": [
            {"session": h.session, "resources": list(h.resources), "pid": h.pid}
            for h in service.pool.handles()
        ],
        "kernels": [k.info() for k in service.kernels.kernels.values()],
    }
    if detail:
        out["history"] = service.history.to_json()
        out["recent"] = d.journal.to_json()
    return out
