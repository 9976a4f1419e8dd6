"""Where a round trip's time goes, per process: minor page faults and CPU seconds.

In a VM the first touch of fresh memory costs more than the copy into it, so the
number of pages each process faults in explains most of a transfer's figure. Read
from ``/proc/PID/stat`` (``minflt``, ``utime``, ``stime``) before and after a few
round trips of one size, for every process of a system: the benchmark's own (the
client; Dask's scheduler runs in it too) and the ones the system started.

A minor fault maps one page: 4 KiB, or 2 MiB where the kernel gave a huge page, so
counts are comparable between runs of one system, and a count near zero means no
fresh memory was touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .measure import check_negated, refresh, size_label
from .report import Table

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    faults: int
    cpu: float  # seconds, user + system


def usage(pid: int) -> Usage | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after "(comm)", which may hold spaces
    # fields[0] is the state (field 3 of proc(5)): minflt is field 10, utime 14, stime 15
    return Usage(int(fields[7]), (int(fields[11]) + int(fields[12])) / _TICK)


@dataclass(frozen=True)
class PerProcess:
    """Faults and CPU seconds per round trip, by process role."""

    size: int
    repetitions: int
    roles: dict[str, Usage]


def measure_faults(
    roundtrip: Callable[[np.ndarray], np.ndarray],
    processes: Callable[[], Mapping[str, int]],
    a: np.ndarray,
    repetitions: int,
) -> PerProcess:
    """Faults and CPU of each process in ``processes()`` (role -> pid) over
    ``repetitions`` round trips of ``a`` (fresh contents each), after one warm-up."""
    check = check_negated(a)
    refresh(a, 0)
    check(roundtrip(a))  # warm-up: starts the executor, fills pools
    pids = dict(processes())
    before = {role: usage(pid) for role, pid in pids.items()}
    for i in range(repetitions):
        refresh(a, i + 1)
        check(roundtrip(a))
    after = {role: usage(pid) for role, pid in pids.items()}
    roles = {}
    for role in pids:
        b, e = before[role], after[role]
        if b is not None and e is not None:
            roles[role] = Usage((e.faults - b.faults) // repetitions, (e.cpu - b.cpu) / repetitions)
    return PerProcess(a.nbytes, repetitions, roles)


def table_faults(results: Mapping[str, PerProcess | str]) -> Table:
    sizes = {r.size for r in results.values() if isinstance(r, PerProcess)}
    label = size_label(max(sizes)) if sizes else "?"
    table = Table(
        f"Page faults and CPU per process, one {label} round trip (fresh contents)",
        ["system", "process", "minor faults per round trip", "CPU s per round trip"],
    )
    for system, r in results.items():
        if isinstance(r, str):
            table.rows.append([system, "", r, ""])
            continue
        total = Usage(sum(u.faults for u in r.roles.values()), sum(u.cpu for u in r.roles.values()))
        for role, u in [*r.roles.items(), ("all", total)]:
            table.rows.append([system, role, f"{u.faults}", f"{u.cpu:.3f}"])
    table.notes.append(
        "minflt and utime+stime from /proc/PID/stat over the timed repetitions after a "
        "warm-up; a fault maps a 4 KiB page, or a 2 MiB one where the kernel gave a huge page"
    )
    return table
