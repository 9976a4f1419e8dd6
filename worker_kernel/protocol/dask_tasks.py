"""The Dask tasks a notebook submits to workers that run ``worker_kernel.dask_plugin``.

They are the contract between the notebook's Dask backend
(:mod:`lan2gpu_magic.dask_backend`) and the plugin, so both sides import them from
here: Dask pickles them by reference, and each runs on the worker with what the
plugin set up there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The Dask event topic where every worker's plugin publishes its lan2gpu status when
# something placement looks at changes (a cell started or ended, a session came or went,
# free GPU memory moved by 1%): a cell costs O(1) events, however many workers there are.
STATUS_TOPIC = "lan2gpu-status"

if TYPE_CHECKING:
    from distributed import Worker


def placement_key(status: dict[str, Any], *, gpus: bool = True) -> str:
    """What of a status document placement depends on; a change is published.
    ``gpus=False``: without the GPUs' free memory and load (they change all the time)."""
    import json

    caps = status.get("capabilities", {})
    load = status.get("load", {})
    gpu_state = []
    for gpu in load.get("gpus") or caps.get("gpus", []):
        total = next(
            (
                int(g.get("memory_total", 0))
                for g in caps.get("gpus", [])
                if g.get("index") == gpu.get("index")
            ),
            0,
        )
        free = int(gpu.get("memory_free", 0))
        gpu_state.append(
            (
                gpu.get("index"),
                free * 100 // total if total else free,
                int((gpu.get("utilization") or 0) // 10),
            )
        )
    executors = sorted(
        (str(e.get("session")), tuple(e.get("resources", []))) for e in status.get("executors", [])
    )
    return json.dumps(
        [load.get("queues", {}), gpu_state if gpus else [], executors, status.get("sessions", [])],
        sort_keys=True,
        default=str,
    )


def run_cell(spec: dict[str, Any], buffers: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """One ``%%lan2gpu`` cell (:func:`worker_kernel.dask_plugin.run_cell`)."""
    from worker_kernel import dask_plugin

    return dask_plugin.run_cell(spec, buffers)


def cancel_cell(cell: str, dask_worker: Worker) -> bool:
    """``Client.run`` target: cancel ``cell`` on this worker, running or queued."""
    from worker_kernel import dask_plugin

    return dask_plugin.plugin_of(dask_worker).cancel(cell)


async def close_session(session: str, dask_worker: Worker) -> int:
    """``Client.run`` target: stop ``session``'s executors on this worker (off the
    worker's event loop: it talks to the service and waits for its answer)."""
    import asyncio

    from worker_kernel import dask_plugin

    plugin = dask_plugin.plugin_of(dask_worker)
    return await asyncio.to_thread(plugin.close_session, session)


__all__ = ["STATUS_TOPIC", "cancel_cell", "close_session", "placement_key", "run_cell"]
