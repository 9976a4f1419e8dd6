"""What this worker offers: GPUs, CPU cores, RAM, load, versions.

GPUs are probed once in a short-lived subprocess (:mod:`worker_kernel.probe`) so
the service itself never initialises CUDA: CUDA does not survive ``fork``, and a
service holding a context would pin GPU memory for nothing. Live numbers (free
memory, utilization) come from NVML (``nvidia-ml-py``), which reads the driver
without creating a CUDA context; without a driver it is simply absent.

Indices are in PCI bus order (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, set for the
probe and every executor) so they agree with ``nvidia-smi`` and NVML.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
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
    uuid: str = ""
    utilization: float | None = None  # percent, from NVML when available


@dataclass(frozen=True)
class Capabilities:
    hostname: str
    cpu_count: int
    memory_total: int
    memory_available: int
    simulator: bool
    gpus: tuple[GpuInfo, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    load_average: float = 0.0  # 1-minute load average of the host
    nvml: bool = False  # live GPU numbers available

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


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def gpu_env(env: Mapping[str, str], gpus: list[int] | None) -> dict[str, str]:
    """``env`` with the GPUs a process may see pinned (``[]``: none; None: all).

    GPU numbers are those the worker sees: if its operator limited it with
    ``CUDA_VISIBLE_DEVICES=2,3``, GPU 0 here is the operator's device 2.
    """
    out = dict(env)
    out["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if gpus is not None:
        inherited = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if inherited:
            out["CUDA_VISIBLE_DEVICES"] = ",".join(inherited[g] for g in gpus if g < len(inherited))
        else:
            out["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return out


def probe_gpus(timeout: float = 120.0) -> list[GpuInfo]:
    """GPUs numba can see, probed in a subprocess; [] when there are none."""
    env = gpu_env(os.environ, None)
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
            uuid=str(g.get("uuid", "")),
        )
        for g in data.get("gpus", [])
    ]


def detect(simulate: str, only: list[int] | None = None, simulated_gpus: int = 1) -> Capabilities:
    """Capabilities for ``--simulate on|off|auto``, restricted to ``--gpus`` if given."""
    total, available = host_memory()
    gpus: list[GpuInfo] = [] if simulate == "on" else probe_gpus()
    simulator = simulate == "on" or (simulate == "auto" and not gpus)
    if simulator:
        gpus = [
            GpuInfo(i, SIMULATOR_NAME, SIMULATOR_CC, total, available, simulated=True)
            for i in range(simulated_gpus)
        ]
    elif not gpus:
        raise ConfigurationError(
            "no CUDA GPU found on this machine (see the log above); start the worker "
            "with --simulate to serve Numba's CUDA simulator instead (tests, demos)"
        )
    if only is not None:
        missing = sorted(set(only) - {g.index for g in gpus})
        if missing:
            have = ", ".join(f"{g.index} ({g.name})" for g in gpus)
            raise ConfigurationError(f"--gpus asks for GPU {missing}, but this machine has: {have}")
        gpus = [g for g in gpus if g.index in only]
    return Capabilities(
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count() or 1,
        memory_total=total,
        memory_available=available,
        simulator=simulator,
        gpus=tuple(gpus),
        versions=local_versions(),
        load_average=_load_average(),
    )


class GpuMonitor:
    """Refreshes live numbers: NVML for real GPUs, /proc for the host.

    NVML is optional: without ``nvidia-ml-py`` or without a driver
    (``NVMLError_LibraryNotFound``) GPU numbers stay as probed.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except ImportError:
            log.info("nvidia-ml-py not installed; GPU utilization will not be reported")
        except Exception as exc:  # NVMLError_LibraryNotFound and friends: degrade
            log.info("NVML unavailable (%s); GPU utilization will not be reported", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def refresh(self, caps: Capabilities) -> Capabilities:
        available = host_memory()[1]
        gpus = tuple(
            self._refresh_gpu(g, available) if g.simulated or self._nvml else g for g in caps.gpus
        )
        return replace(
            caps,
            memory_available=available,
            load_average=_load_average(),
            gpus=gpus,
            nvml=self.available,
        )

    def _refresh_gpu(self, gpu: GpuInfo, host_available: int) -> GpuInfo:
        if gpu.simulated:  # the simulator's "device memory" is host memory
            return replace(gpu, memory_free=host_available)
        nvml = self._nvml
        try:
            handle = (
                nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                if gpu.uuid
                else nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            )
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception as exc:  # a GPU fell off the bus, a driver hiccup
            log.debug("NVML query for GPU %d failed: %s", gpu.index, exc)
            return gpu
        return replace(gpu, memory_free=int(memory.free), utilization=float(rates.gpu))

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down: nothing useful to do with an error
                log.debug("nvmlShutdown failed", exc_info=True)
            self._nvml = None
