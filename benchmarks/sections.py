"""The loopback sections: trivial call, array round trip, second run, unchanged kernel.

Each ``measure_*`` runs against one started system and returns plain results
(or a :class:`Failed`, so one broken system leaves the others' rows intact); each
``table_*`` turns the results of all systems into one markdown table.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from .measure import MiB, Stats, check_negated, payload, rate, refresh, repeat, size_label, timed
from .report import Table, ms, ratio, sec, short_error, spread
from .systems.lan2gpu import NEGATE, Lan2GPUApi

T = TypeVar("T")


@dataclass(frozen=True)
class Failed:
    """A measurement that raised; the table shows the error instead of figures."""

    error: str

    def __str__(self) -> str:
        return f"error ({self.error})"


def attempt(measure: Callable[[], T]) -> T | Failed:
    try:
        return measure()
    except Exception as exc:  # any failure of one system becomes its table cell
        return Failed(short_error(exc))


# -- trivial call -----------------------------------------------------------------


def measure_trivial(call: Callable[[], object], times: int) -> Stats | Failed:
    return attempt(lambda: repeat(call, times, warmup=3))


def table_trivial(rows: Sequence[tuple[str, str, Stats | Failed]]) -> Table:
    table = Table(
        "Trivial call / empty cell round trip (loopback)",
        ["system", "call", "median ms", "min ms", "max ms", "calls"],
    )
    for full_label, call, stats in rows:
        label = full_label.split(",")[0]  # "lan2gpu, Python API" -> "lan2gpu"; the call says how
        if isinstance(stats, Failed):
            table.add(label, call, str(stats), None, None, None)
        else:
            table.add(label, call, ms(stats.median), ms(stats.min), ms(stats.max), stats.n)
    table.notes.append("one call = request out, reply back; warm connections, 3 warm-up calls")
    return table


# -- array round trip -------------------------------------------------------------

Arrays = Mapping[int, np.ndarray]


def arrays(sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """One random float32 payload per size, made once and refreshed per repetition."""
    return {n: payload(n, "random", seed=n) for n in sizes}


SMALL = 4 * MiB  # arrays this small are timed SMALL_FACTOR times as often (they are noisy)
SMALL_FACTOR = 4


def repetitions(nbytes: int, times: int) -> int:
    return times * SMALL_FACTOR if nbytes <= SMALL else times


def measure_roundtrip(
    roundtrip: Callable[[np.ndarray], np.ndarray], data: Arrays, times: int
) -> dict[int, Stats | Failed]:

    def measure(a: np.ndarray) -> Stats:
        return repeat(
            partial(roundtrip, a),
            repetitions(a.nbytes, times),
            before=partial(refresh, a),
            check=check_negated(a),
        )

    return {n: attempt(partial(measure, a)) for n, a in data.items()}


def table_roundtrip(
    results: Mapping[str, Mapping[int, Stats | Failed]], sizes: Sequence[int]
) -> Table:
    labels = [size_label(n) for n in sizes]
    table = Table(
        "Array round trip, float32, `b = -a` remotely (loopback)",
        ["system", *(f"{s} GB/s" for s in labels), *(f"{s} s: median [min-max]" for s in labels)],
    )
    for system, per_size in results.items():
        rates: list[str | None] = []
        times: list[str | None] = []
        for n in sizes:
            stats = per_size.get(n)
            if isinstance(stats, Stats):
                rates.append(f"{rate(2 * n, stats.median):.2f}")
                times.append(spread(stats))
            else:
                rates.append(str(stats) if stats else None)
                times.append(None)
        table.add(system, *rates, *times)
    table.notes.append(
        "GB/s = (bytes in + bytes out) / median seconds, 10^9 bytes; every repetition sends "
        "new contents (no cache can help) and checks that the result is exactly -a"
    )
    return table


# -- the same cell twice ----------------------------------------------------------


@dataclass(frozen=True)
class SecondRun:
    first: Stats
    second: Stats


def measure_second_run(
    system: Lan2GPUApi, data: Arrays, times: int
) -> dict[int, SecondRun | Failed]:
    """Per size: run ``b = -a`` with new contents of ``a``, then again with ``a`` unchanged."""

    def pairs(a: np.ndarray) -> SecondRun:
        check = check_negated(a)
        first: list[float] = []
        second: list[float] = []
        for i in range(1 + repetitions(a.nbytes, times)):  # the first pair warms up
            refresh(a, 1000 + i)
            ns: dict[str, Any] = {"a": a}
            t1, _ = timed(partial(system.run, NEGATE, ns))
            check(ns["b"])
            t2, _ = timed(partial(system.run, NEGATE, ns))  # as a notebook would: `b` still bound
            check(ns["b"])
            if i:
                first.append(t1)
                second.append(t2)
        return SecondRun(Stats(tuple(first)), Stats(tuple(second)))

    return {n: attempt(partial(pairs, a)) for n, a in data.items()}


def table_second_run(results: Mapping[int, SecondRun | Failed]) -> Table:
    table = Table(
        "Same lan2gpu cell run twice, inputs unchanged (loopback)",
        [
            "size",
            "run 1 s: median [min-max]",
            "run 2 s: median [min-max]",
            "run 1 / run 2",
            "run 2 GB/s equiv.",
        ],
    )
    for n, r in results.items():
        if isinstance(r, Failed):
            table.add(size_label(n), str(r), None, None, None)
        else:
            table.add(
                size_label(n),
                spread(r.first),
                spread(r.second),
                ratio(r.first.median / r.second.median),
                f"{rate(2 * n, r.second.median):.2f}",
            )
    table.notes.append(
        "run 1: `a` has new contents; run 2: the same call right after, `a` untouched "
        "(a content cache on the worker can skip resending it)"
    )
    return table


# -- an unchanged @njit kernel ----------------------------------------------------

KERNEL = """
import numba

@numba.njit
def energy(x, k):
    s = 0.0
    for i in range(x.size):
        s += k * x[i] * x[i]
    return s
"""

# Counts compilations in the executor: numba fires "numba:compile" for each one.
COUNT_COMPILES = """
import numba.core.event as _ev
_bench_compiles = _ev.RecordingListener()
_ev.register("numba:compile", _bench_compiles)
ready = True
"""

CALL_KERNEL = """
s = energy(x, 2.0)
probe = (id(energy), len(energy.overloads), len(_bench_compiles.buffer) // 2)
"""


@dataclass(frozen=True)
class KernelRuns:
    first: Stats  # the first call in a fresh session: rebuilds and compiles
    later: Stats  # the same cell again, kernel unchanged
    local_compile: float  # compiling the same kernel in this process, for reference
    dispatcher_ids: int  # distinct id(energy) seen by later runs of one session (want 1)
    max_overloads: int  # len(energy.overloads) (want 1)
    recompiles: int  # numba:compile events after the first run (want 0)


def notebook_namespace() -> dict[str, Any]:
    """The kernel defined as in a notebook: in ``__main__``, not importable."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(KERNEL, "<notebook cell>", "exec"), ns)  # noqa: S102 - our own constant source
    ns["x"] = np.linspace(0.0, 1.0, 1 << 16)
    return ns


def _local_compile_seconds() -> float:
    ns = notebook_namespace()
    x = ns["x"]
    first, _ = timed(lambda: ns["energy"](x, 2.0))
    again, _ = timed(lambda: ns["energy"](x, 2.0))
    return first - again


def measure_kernel(system: Lan2GPUApi, sessions: int, later: int) -> KernelRuns | Failed:
    """``sessions`` fresh sessions, each: one first run, then ``later`` runs of the same cell."""

    def run() -> KernelRuns:
        first: list[float] = []
        again: list[float] = []
        ids: set[int] = set()
        overloads = recompiles = 0
        for _ in range(sessions):
            session = f"bench-kernel-{uuid.uuid4().hex[:8]}"
            ns = notebook_namespace()
            try:
                system.run(COUNT_COMPILES, ns, outputs=["ready"], session=session)
                call = partial(system.run, CALL_KERNEL, ns, session=session)
                seconds, _ = timed(call)
                first.append(seconds)
                compiled_first = ns["probe"][2]
                session_ids: set[int] = set()
                for _ in range(later):
                    seconds, _ = timed(call)
                    again.append(seconds)
                    dispatcher, n_overloads, compiles = ns["probe"]
                    session_ids.add(dispatcher)
                    overloads = max(overloads, n_overloads)
                    recompiles = max(recompiles, compiles - compiled_first)
                ids.add(len(session_ids))
            finally:
                system.client.close_session(session)
        return KernelRuns(
            Stats(tuple(first)),
            Stats(tuple(again)),
            _local_compile_seconds(),
            max(ids),
            overloads,
            recompiles,
        )

    return attempt(run)


def table_kernel(result: KernelRuns | Failed) -> Table:
    table = Table(
        "lan2gpu cell re-running an unchanged @numba.njit kernel (loopback)",
        ["run", "median s", "min s", "max s", "runs"],
    )
    if isinstance(result, Failed):
        table.add("all", str(result), None, None, None)
        return table
    for label, stats in (
        ("first run in a fresh session (compiles)", result.first),
        ("later runs", result.later),
    ):
        table.add(label, sec(stats.median), sec(stats.min), sec(stats.max), stats.n)
    table.notes += [
        f"compiling the same kernel in this process takes {sec(result.local_compile)} s",
        f"checked on the worker over the later runs: distinct dispatchers per session "
        f"{result.dispatcher_ids} (id(energy)), overloads {result.max_overloads} "
        f"(len(energy.overloads)), recompiles {result.recompiles} (numba:compile events)",
    ]
    return table


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
