"""Run notebook cells on the GPUs of your LAN: ``%load_ext lan2gpu_magic``.

A ``%%lan2gpu`` cell takes this trip (one module per step)::

    capture      which names the cell reads and binds            capture.py
    serialize    cloudpickle p5, arrays out of band, kernels     worker_kernel.protocol
                 as (py_func, options)
    place        choose a worker that fits                       placement.py, pool.py
    submit       signed ZeroMQ to the worker, live output back   client.py, transport.py
                 (or a Dask task on a cluster's worker)          dask_backend.py
    apply        outputs into the notebook namespace             results.py

The plain Python API is the same pipeline without IPython::

    import lan2gpu_magic
    with lan2gpu_magic.connect("tcp://10.0.0.7:7340") as worker:
        ns = {"a": a}
        worker.run("b = a * 2", ns)       # ns["b"] is now the result

Importing this package imports neither IPython nor numba.
"""

from __future__ import annotations

from typing import Any

from worker_kernel.protocol.versions import __version__ as __version__

from .client import Client, ExecuteRequest, OutputHandlers, WorkerInfo, connect
from .embedded import EmbeddedWorker
from .errors import (
    ConfigurationError,
    ExecutionCancelled,
    ExecutionTimeout,
    ExecutorDied,
    Lan2GPUError,
    MemoryBudgetExceeded,
    NoWorkerAvailable,
    RemoteExecutionError,
    SerializationError,
    WorkerError,
    WorkerLost,
    WorkerUnreachable,
)
from .results import RunResult


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext lan2gpu_magic``: register ``%lan2gpu`` / ``%%lan2gpu``."""
    from .magic import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext lan2gpu_magic``: close connections, stop the embedded worker."""
    from .magic import unregister

    unregister(ipython)


__all__ = [
    "Client",
    "ConfigurationError",
    "EmbeddedWorker",
    "ExecuteRequest",
    "ExecutionCancelled",
    "ExecutionTimeout",
    "ExecutorDied",
    "Lan2GPUError",
    "MemoryBudgetExceeded",
    "NoWorkerAvailable",
    "OutputHandlers",
    "RemoteExecutionError",
    "RunResult",
    "SerializationError",
    "WorkerError",
    "WorkerInfo",
    "WorkerLost",
    "WorkerUnreachable",
    "connect",
]
