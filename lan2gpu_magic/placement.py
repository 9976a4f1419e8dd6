"""Step 3: choose a worker (and its GPUs) for a cell. Pure: data in, a choice out.

Policy, in order:

1. Hard requirements filter. A requested worker (name or address) must match.
   For a GPU cell, a GPU qualifies if its name matches ``--gpu`` (a regular
   expression, case-insensitive), it has ``--min-memory`` bytes *free* and at
   least ``--min-cc`` compute capability; a worker qualifies if it has
   ``--gpus`` qualifying GPUs. A CPU cell (``--cpu``) has no GPU requirements.
2. Simulators only by consent: a worker running the CUDA simulator is eligible
   for a GPU cell when the user allows it (``--simulate``), or when no worker
   with a real GPU is known at all (a laptop demo, CI). A lab with real GPUs
   never sends work to a simulator by accident.
3. Rank, best first: real GPUs before simulators; then GPUs where the cell's
   session already has an executor (its variables and compiled kernels are
   there, and a second executor would hold a second CUDA context); then the
   shortest queue (cells running or waiting on the chosen GPUs, and hosted
   kernels), because waiting dominates; then the most free memory; then the
   lowest utilization; then the lowest round-trip latency. CPU cells rank by
   their session's home, queue, load per core, then latency.
4. Name, then address: a stable tie-break, so the same cell lands on the same
   worker (and finds its session there) run after run.

Within a worker the best qualifying GPUs by the same ranking are chosen. No
match raises :class:`NoWorkerAvailable` listing what was asked and what each
known worker offers.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

from worker_kernel.protocol.units import binary_size

from .errors import ConfigurationError, NoWorkerAvailable


@dataclass(frozen=True)
class Requirements:
    worker: str | None = None  # a worker name or address
    gpu: str | None = None  # regular expression on the GPU name
    min_memory: int = 0  # bytes free, on each chosen GPU
    min_cc: tuple[int, int] = (0, 0)
    gpus: int = 1  # GPUs of one host
    cpu: bool = False
    allow_simulator: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, allow_simulator: bool = False) -> Requirements:
        """From the parsed options the magic and the kernel forwarder share
        (``--worker --gpu --min-memory --min-cc --gpus --cpu --simulate``)."""
        return cls(
            worker=args.worker,
            gpu=args.gpu,
            min_memory=args.min_memory,
            min_cc=args.min_cc,
            gpus=args.gpus,
            cpu=args.cpu,
            allow_simulator=args.simulate or allow_simulator,
        )

    def describe(self) -> str:
        parts = [f"worker {self.worker!r}"] if self.worker else []
        if self.cpu:
            parts.append("a CPU slot")
        else:
            parts.append(f"{self.gpus} GPU" + ("s" if self.gpus > 1 else ""))
            if self.gpu:
                parts.append(f"named like {self.gpu!r}")
            if self.min_memory:
                parts.append(f"with {binary_size(self.min_memory)} free")
            if self.min_cc > (0, 0):
                parts.append(f"compute capability >= {self.min_cc[0]}.{self.min_cc[1]}")
            if self.allow_simulator:
                parts.append("simulator allowed")
        return ", ".join(parts)


@dataclass(frozen=True)
class GpuView:
    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_total: int
    memory_free: int
    utilization: float | None = None
    queue: int = 0  # cells running or waiting on this GPU
    simulated: bool = False
    sticky: bool = False  # the cell's session already has an executor here

    def describe(self) -> str:
        return f"GPU{self.index} ({self.name}, {binary_size(self.memory_free)} free)"


@dataclass(frozen=True)
class WorkerView:
    """What placement needs to know about one reachable worker."""

    name: str
    address: str
    simulator: bool
    gpus: tuple[GpuView, ...] = ()
    cpu_count: int = 1
    load_average: float = 0.0
    cpu_queue: int = 0
    latency: float = 0.0
    cpu_sticky: bool = False

    def describe(self) -> str:
        if self.simulator:
            offer = f"CUDA simulator x{len(self.gpus)}"
        else:
            offer = ", ".join(
                f"{g.name} cc {g.compute_capability[0]}.{g.compute_capability[1]} "
                f"{binary_size(g.memory_free)} free, queue {g.queue}"
                for g in self.gpus
            )
        return f"{self.name} ({self.address}: {offer or 'no GPU'})"


@dataclass(frozen=True)
class Placement:
    worker: WorkerView
    gpus: tuple[GpuView, ...] = ()  # empty for a CPU cell

    @property
    def cpu(self) -> bool:
        return not self.gpus

    @property
    def queue(self) -> int:
        return max((g.queue for g in self.gpus), default=self.worker.cpu_queue)

    def describe(self) -> str:
        w = self.worker
        if self.cpu:
            where = f"{w.name} CPU ({w.cpu_count} cores, load {w.load_average:.1f})"
        else:
            where = f"{w.name} " + ", ".join(g.describe() for g in self.gpus)
            if w.simulator:
                where += " [simulator]"
        return f"{where}, queue {self.queue}"


def parse_cc(text: str) -> tuple[int, int]:
    """``"8.0"`` -> ``(8, 0)``."""
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*", text)
    if not match:
        raise ConfigurationError(f"--min-cc {text!r}: write a compute capability like 8.0")
    return int(match.group(1)), int(match.group(2) or 0)


def _gpu_fits(req: Requirements, gpu: GpuView, pattern: re.Pattern[str] | None) -> bool:
    return (
        (pattern is None or pattern.search(gpu.name) is not None)
        and gpu.memory_free >= req.min_memory
        and gpu.compute_capability >= req.min_cc
    )


def _gpu_rank(g: GpuView) -> tuple[bool, int, int, float, int]:
    return (not g.sticky, g.queue, -g.memory_free, g.utilization or 0.0, g.index)


def choose_worker(
    req: Requirements, workers: Sequence[WorkerView], *, real_gpus_known: bool = False
) -> Placement:
    """The best placement for ``req`` (policy above).

    ``real_gpus_known``: a real GPU worker was seen before, even if it is not among
    ``workers`` now (it missed this status round); simulators still need consent.
    """
    try:
        pattern = re.compile(req.gpu, re.IGNORECASE) if req.gpu else None
    except re.error as exc:
        raise ConfigurationError(f"--gpu {req.gpu!r} is not a valid pattern: {exc}") from None
    named = [w for w in workers if req.worker is None or req.worker in (w.name, w.address)]
    options: list[tuple[tuple[object, ...], Placement]] = []
    rank: tuple[object, ...]
    simulators_ok = True
    if req.cpu:
        for w in named:
            rank = (not w.cpu_sticky, w.cpu_queue, w.load_average / max(1, w.cpu_count), w.latency)
            options.append(((*rank, w.name, w.address), Placement(w)))
    else:
        real_known = real_gpus_known or any(not w.simulator and w.gpus for w in workers)
        simulators_ok = req.allow_simulator or not real_known or req.worker is not None
        for w in named:
            if w.simulator and not simulators_ok:
                continue
            fitting = sorted((g for g in w.gpus if _gpu_fits(req, g, pattern)), key=_gpu_rank)
            if len(fitting) < req.gpus:
                continue
            chosen = tuple(fitting[: req.gpus])
            worst = max(chosen, key=_gpu_rank)
            rank = (w.simulator, *_gpu_rank(worst)[:4], w.latency)
            options.append(((*rank, w.name, w.address), Placement(w, chosen)))
    if not options:
        known = "; ".join(w.describe() for w in workers) or "none"
        hint = ""
        sims_fit = any(
            sum(_gpu_fits(req, g, pattern) for g in w.gpus) >= req.gpus
            for w in named
            if w.simulator
        )
        if not req.cpu and not simulators_ok and sims_fit:
            hint = " Simulator workers fit but were left out: add --simulate to allow them."
        raise NoWorkerAvailable(
            f"no worker matches: asked for {req.describe()}; known workers: {known}.{hint} "
            "Connect one with `%lan2gpu connect ADDRESS`, or see `%lan2gpu workers`."
        )
    return min(options, key=lambda option: option[0])[1]


def choose_slots(
    req: Requirements,
    workers: Sequence[WorkerView],
    count: int | None,
    *,
    real_gpus_known: bool = False,
) -> list[Placement]:
    """Up to ``count`` slots (all that fit, for ``None``) for the chunks of a split cell.

    A slot is ``req.gpus`` GPUs of one worker (several GPUs of a host make several
    slots), or one worker's CPU for ``--cpu``. Same filters and ranking as
    :func:`choose_worker`; the best slot of every worker comes before the second
    best of any, so chunks spread over hosts first.
    """
    # Raises NoWorkerAvailable, with the full explanation, when nothing fits.
    choose_worker(req, workers, real_gpus_known=real_gpus_known)
    pattern = re.compile(req.gpu, re.IGNORECASE) if req.gpu else None
    real_known = real_gpus_known or any(not w.simulator and w.gpus for w in workers)
    simulators_ok = req.cpu or req.allow_simulator or not real_known or req.worker is not None
    per_worker: list[list[tuple[tuple[object, ...], Placement]]] = []
    rank: tuple[object, ...]
    for w in workers:
        if req.worker is not None and req.worker not in (w.name, w.address):
            continue
        if req.cpu:
            rank = (w.cpu_queue, w.load_average / max(1, w.cpu_count), w.latency)
            per_worker.append([((*rank, w.name, w.address), Placement(w))])
            continue
        if w.simulator and not simulators_ok:
            continue
        fitting = sorted((g for g in w.gpus if _gpu_fits(req, g, pattern)), key=_gpu_rank)
        groups = [
            tuple(fitting[i : i + req.gpus])
            for i in range(0, len(fitting) - req.gpus + 1, req.gpus)
        ]
        slots = []
        for group in groups:
            worst = max(group, key=_gpu_rank)
            rank = (w.simulator, *_gpu_rank(worst)[1:4], w.latency)
            slots.append(((*rank, w.name, w.address), Placement(w, group)))
        if slots:
            per_worker.append(sorted(slots, key=lambda s: s[0]))
    rounds: list[tuple[tuple[object, ...], Placement]] = []
    depth = max((len(slots) for slots in per_worker), default=0)
    for level in range(depth):  # every worker's best, then every worker's second best...
        rounds += sorted(
            (slots[level] for slots in per_worker if len(slots) > level), key=lambda s: s[0]
        )
    chosen = [placement for _, placement in rounds]
    return chosen if count is None else chosen[:count]
