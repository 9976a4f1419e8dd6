"""What this worker offers: GPUs, CPU cores, RAM, versions.

GPUs are probed in a short-lived subprocess (:mod:`worker_kernel.probe`) so the
service itself never initialises CUDA: CUDA does not survive ``fork``, and a
service holding a context would pin GPU memory for nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .protocol.errors import ConfigurationError
from .protocol.versions import local_versions

log = logging.getLogger(__name__)

# What numba's simulator reports for its one device (numba.cuda.simulator.api.detect).
SIMULATOR_NAME = "CUDA simulator"
SIMULATOR_CC = (5, 0)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_total: int
    memory_free: int
    simulated: bool = False


@dataclass(frozen=True)
class Capabilities:
    hostname: str
    cpu_count: int
    memory_total: int
    memory_available: int
    simulator: bool
    gpus: tuple[GpuInfo, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM, from sysconf / /proc/meminfo."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0, 0
    available = total
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return total, available


def probe_gpus(timeout: float = 120.0) -> list[GpuInfo]:
    """GPUs numba can see, probed in a subprocess; [] when there are none."""
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "worker_kernel.probe"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=True,
        ).stdout
        data = json.loads(out)
    except (subprocess.SubprocessError, ValueError) as exc:
        log.warning("GPU probe failed (%s); serving without GPUs", exc)
        return []
    if data.get("error"):
        log.info("no usable GPU: %s", data["error"])
    return [
        GpuInfo(
            index=int(g["index"]),
            name=str(g["name"]),
            compute_capability=(int(g["cc"][0]), int(g["cc"][1])),
            memory_total=int(g["memory_total"]),
            memory_free=int(g["memory_free"]),
        )
        for g in data.get("gpus", [])
    ]


def detect(simulate: str) -> Capabilities:
    """Capabilities for ``--simulate on|off|auto``."""
    total, available = host_memory()
    gpus: list[GpuInfo] = [] if simulate == "on" else probe_gpus()
    simulator = simulate == "on" or (simulate == "auto" and not gpus)
    if simulator:
        gpus = [GpuInfo(0, SIMULATOR_NAME, SIMULATOR_CC, total, available, simulated=True)]
    elif not gpus:
        raise ConfigurationError(
            "no CUDA GPU found on this machine (see the log above); start the worker "
            "with --simulate to serve Numba's CUDA simulator instead (tests, demos)"
        )
    return Capabilities(
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count() or 1,
        memory_total=total,
        memory_available=available,
        simulator=simulator,
        gpus=tuple(gpus),
        versions=local_versions(),
    )
