"""lan2gpu's Dask backend: the same cell, run as a Dask task on a ``LocalCluster``.

One single-threaded worker process (as the Dask rows), declaring ``GPU=1`` and
preloading ``worker_kernel.dask_plugin``, whose lan2gpu service runs the cells in its
simulator executor (``LAN2GPU_SIMULATE=1``). The notebook side is
``lan2gpu_magic.dask_backend.DaskCluster.run``, the Python API of ``%%lan2gpu`` on a
cluster: placement, the request, a task pinned to the worker, events for live output,
results unpickled here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from . import Options


class Lan2GPUDask:
    label = "lan2gpu on Dask, DaskCluster.run"
    trivial_call = 'DaskCluster.run("pass")'

    def __init__(self) -> None:
        import dask
        from distributed import LocalCluster

        from lan2gpu_magic.dask_backend import DaskCluster

        os.environ["LAN2GPU_SIMULATE"] = "1"  # the worker process inherits it
        dask.config.set({"distributed.admin.large-graph-warning-threshold": "2GiB"})
        self.cluster: Any = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            resources={"GPU": 1},
            preload=["worker_kernel.dask_plugin"],
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            address = self.cluster.scheduler_address.replace("tcp://", "dask://")
            self.backend = DaskCluster(address)
        except BaseException:
            self.cluster.close()
            raise
        try:
            self.backend.run("pass")  # waits for the worker's lan2gpu service
        except BaseException:
            self.close()
            raise

    def trivial(self) -> None:
        self.backend.run("pass")

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        ns: dict[str, Any] = {"a": a}
        self.backend.run("b = -a", ns)
        b: np.ndarray = ns["b"]
        return b

    def processes(self) -> dict[str, int]:
        from ..procs import children

        (worker,) = self.backend.dask.run(os.getpid).values()
        service = children(worker)
        out = {"client + scheduler": os.getpid(), "Dask worker": worker}
        for pid in service:
            out["service"] = pid
            executors = children(pid)
            if executors:
                out["executor"] = executors[0]
        return out

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            self.cluster.close()


def start(options: Options) -> Lan2GPUDask:
    return Lan2GPUDask()
