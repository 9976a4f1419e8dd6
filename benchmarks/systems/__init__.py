"""The systems compared, one module each, behind one small interface.

A system is started with the benchmark's work directory and options and gives
back an object with ``trivial()`` (the cheapest remote call it has: an empty cell,
a no-op function) and ``roundtrip(a)`` (send ``a``, compute ``-a`` remotely,
return it here), and ``close()``, which stops everything it started.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Options:
    """What every system's ``start`` gets."""

    work: Path
    client: dict[str, Any] = field(default_factory=dict)  # lan2gpu Client keyword arguments
    cell_flags: str = ""  # the same options as %%lan2gpu flags


class System(Protocol):
    label: str  # the row in the tables
    trivial_call: str  # what trivial() times, as a reader would write it ("" if none)

    def trivial(self) -> None: ...

    def roundtrip(self, a: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


Starter = Callable[[Options], System]


def starters() -> dict[str, Starter]:
    """``--only`` names, in the order they run and appear in the tables."""
    from . import dask_distributed, ipp, lan2gpu, lan2gpu_dask, raw_zmq

    return {
        "raw-zmq": raw_zmq.start,
        "lan2gpu": lan2gpu.start_api,
        "lan2gpu-plaintext": lan2gpu.start_plaintext,
        "lan2gpu-magic": lan2gpu.start_magic,
        "ipyparallel": ipp.start,
        "dask": dask_distributed.start_submit,
        "dask-scatter": dask_distributed.start_scatter,
        "lan2gpu-dask": lan2gpu_dask.start,
    }


NAMES = (
    "raw-zmq",
    "lan2gpu",
    "lan2gpu-plaintext",
    "lan2gpu-magic",
    "ipyparallel",
    "dask",
    "dask-scatter",
    "lan2gpu-dask",
)
