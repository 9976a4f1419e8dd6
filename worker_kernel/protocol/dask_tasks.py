"""The Dask tasks a notebook submits to workers that run ``worker_kernel.dask_plugin``.

They are the contract between the notebook's Dask backend
(:mod:`lan2gpu_magic.dask_backend`) and the plugin, so both sides import them from
here: Dask pickles them by reference, and each runs on the worker with what the
plugin set up there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Worker


def run_cell(spec: dict[str, Any], buffers: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """One ``%%lan2gpu`` cell (:func:`worker_kernel.dask_plugin.run_cell`)."""
    from worker_kernel import dask_plugin

    return dask_plugin.run_cell(spec, buffers)


def cancel_cell(cell: str, dask_worker: Worker) -> bool:
    """``Client.run`` target: cancel ``cell`` on this worker, running or queued."""
    from worker_kernel import dask_plugin

    return dask_plugin.plugin_of(dask_worker).cancel(cell)


def close_session(session: str, dask_worker: Worker) -> int:
    """``Client.run`` target: stop ``session``'s executors on this worker."""
    from worker_kernel import dask_plugin

    return dask_plugin.plugin_of(dask_worker).close_session(session)


__all__ = ["cancel_cell", "close_session", "run_cell"]
