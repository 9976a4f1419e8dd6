"""What one run measured, and the project's targets for the data path next to it.

The verdicts are information for the reader; nothing here (or anywhere in the
benchmark) asserts on a timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .crowd import Crowd
from .faults import PerProcess
from .lan import LanResult
from .measure import MiB, Stats, rate, size_label
from .memory import Peak
from .report import Table, ratio
from .sections import Failed, KernelRuns, SecondRun
from .systems.lan2gpu import Lan2GPUApi, Lan2GPUMagic


@dataclass
class Results:
    """Everything one run measured; a section that did not run stays None."""

    trivial: list[tuple[str, str, Stats | Failed]] = field(default_factory=list)
    roundtrip: dict[str, dict[int, Stats | Failed]] = field(default_factory=dict)
    second: dict[int, SecondRun | Failed] | None = None
    kernel: KernelRuns | Failed | None = None
    memory: list[Peak] | BaseException | None = None
    lan: list[LanResult] | BaseException | str | None = None  # str: why it was skipped
    crowd: list[Crowd | str] | None = None  # str: a row that failed
    faults: dict[str, PerProcess | str] = field(default_factory=dict)  # str: why not
    placement: dict[str, Any] | Failed | None = None  # the Dask backend's, over 200 views


def _median(stats: object) -> float | None:
    return stats.median if isinstance(stats, Stats) else None


def targets(r: Results, sizes: Sequence[int], memory_bytes: int) -> Table:
    table = Table("Targets against this run", ["target", "measured", "met"])

    def add(goal: str, measured: str | None, ok: bool | None) -> None:
        verdict = "—" if ok is None else ("yes" if ok else "no")
        table.add(goal, measured or "not measured", verdict)

    def trivial(label: str) -> float | None:
        return _median(next((s for name, _, s in r.trivial if name == label), None))

    api, magic = trivial(Lan2GPUApi.label), trivial(Lan2GPUMagic.label)
    ipp = next((_median(s) for name, _, s in r.trivial if name.startswith("ipyparallel")), None)
    for goal, ours, limit in (
        ('Client.run("pass") ≤ 1 ms median', api, 1e-3),
        ("empty %%lan2gpu cell ≤ 1.5 ms median", magic, 1.5e-3),
    ):
        add(goal, f"{ours * 1e3:.2f} ms" if ours else None, ours <= limit if ours else None)
    goal = "empty %%lan2gpu cell ≥ 4x faster than ipyparallel apply_sync"
    if magic and ipp:
        text = f"{magic * 1e3:.2f} vs {ipp * 1e3:.2f} ms: {ratio(ipp / magic)}"
        add(goal, text, ipp / magic >= 4)
    else:
        add(goal, None, None)

    # Against Dask's fastest way (scatter/gather straight to the worker) where it ran.
    direct = [label for label in r.roundtrip if label.startswith("Dask, scatter")]
    others = direct or [label for label in r.roundtrip if label.startswith(("ipyparallel", "Dask"))]
    anchor = "Dask scatter/gather direct" if direct else "the fastest of ipyparallel/Dask"
    for n in (64 * MiB, 512 * MiB):
        goal = f"{size_label(n)} round trip ≥ 1.5x {anchor}"
        ours = _median(r.roundtrip.get(Lan2GPUApi.label, {}).get(n))
        theirs = [t for t in (_median(r.roundtrip[o].get(n)) for o in others) if t]
        if ours is None or not theirs:
            add(goal, None, None)
            continue
        x = min(theirs) / ours
        text = f"{rate(2 * n, ours):.2f} vs {rate(2 * n, min(theirs)):.2f} GB/s: {ratio(x)}"
        add(goal, text, x >= 1.5)

    largest = max(sizes)
    second = r.second.get(largest) if r.second else None
    goal = f"second run, unchanged {size_label(largest)} input, ≥ 10x faster"
    if isinstance(second, SecondRun):
        x = second.first.median / second.second.median
        add(goal, ratio(x), x >= 10)
    else:
        add(goal, None, None)

    links = r.lan if isinstance(r.lan, list) else []
    for link_rate, name, limit in (("1gbit", "1 Gbit/s", 1.05), ("10gbit", "10 Gbit/s", 1.3)):
        lan = next((link for link in links if link.rate == link_rate), None)
        goal = f"{name} LAN upload, incompressible, encrypted ≤ {limit}x wire floor"
        up = _median(lan.cells.get("random upload encrypted")) if lan else None
        if lan is None or up is None:
            add(goal, None, None)
            continue
        x = up / (lan.nbytes / lan.bandwidth_up)
        add(goal, ratio(x), x <= limit)
    lan = next((link for link in links if link.rate == "1gbit"), None)
    up = _median(lan.cells.get("sparse upload encrypted")) if lan else None
    goal = "1 Gbit/s LAN upload, compressible < 1x wire floor"
    if lan is None or up is None:
        add(goal, None, None)
    else:
        x = up / (lan.nbytes / lan.bandwidth_up)
        add(goal, ratio(x), x < 1.0)

    for side in ("client", "worker"):
        goal = f"peak memory ≤ 2x payload, {side} (above its baseline)"
        peaks = (
            [p for p in r.memory if p.process.startswith(side)]
            if isinstance(r.memory, list)
            else []
        )
        if not peaks:
            add(goal, None, None)
            continue
        worst = max((p.peak - p.baseline) / memory_bytes for p in peaks)
        add(goal, f"{worst:.2f}x ({size_label(memory_bytes)})", worst <= 2.0)

    k = r.kernel if isinstance(r.kernel, KernelRuns) else None
    add(
        "zero recompiles of an unchanged kernel",
        f"{k.recompiles} recompiles, {k.dispatcher_ids} dispatcher, {k.max_overloads} overload"
        if k
        else None,
        k.recompiles == 0 and k.dispatcher_ids == 1 and k.max_overloads == 1 if k else None,
    )
    return table
