"""Dask distributed: a ``LocalCluster`` with one single-threaded worker process.

Two ways to move an array: ``client.submit(operator.neg, a)`` (the array rides
in the task graph through the scheduler), and ``scatter(a, direct=True)`` +
``submit`` + ``gather(direct=True)`` (straight to and from the worker; the
fastest anchor in the issue). ``scatter`` gets ``hash=False``: hashing 512 MiB
would only slow Dask down, and every repetition sends new contents anyway.
Futures are released after each call so the worker's memory does not grow.
"""

from __future__ import annotations

import logging
import operator
import os
from typing import Any

import numpy as np

from . import Options


def noop() -> None:
    return None


class Dask:
    label = "Dask, client.submit(f, a)"
    trivial_call = "submit(noop).result()"

    def __init__(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        dask.config.set({"distributed.admin.large-graph-warning-threshold": "2GiB"})
        self.cluster: Any = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            self.client: Any = Client(self.cluster)  # type: ignore[no-untyped-call]
        except BaseException:
            self.cluster.close()
            raise

    def trivial(self) -> None:
        self.client.submit(noop, pure=False).result()

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        b: np.ndarray = self.client.submit(operator.neg, a, pure=False).result()
        return b

    def processes(self) -> dict[str, int]:
        pids = list(self.client.run(os.getpid).values())  # one worker
        return {"client + scheduler": os.getpid(), "worker": pids[0]}

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.cluster.close()


class DaskScatter(Dask):
    label = "Dask, scatter/gather direct=True"
    trivial_call = ""  # the same call as Dask's submit row

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        future = self.client.scatter(a, direct=True, hash=False)
        result = self.client.submit(operator.neg, future, pure=False)
        b: np.ndarray = self.client.gather(result, direct=True)
        del future, result
        return b


def start_submit(options: Options) -> Dask:
    return Dask()


def start_scatter(options: Options) -> DaskScatter:
    return DaskScatter()
