"""Timings, their statistics, and the arrays that are sent.

A payload is float32 random data (incompressible) or a zeros-heavy array
(compressible). Before every timed repetition :func:`refresh` changes every
element, so a content cache or deduplication cannot turn a "first run" into a
cached one; the section that measures the cache runs the cell twice instead.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

MiB = 1 << 20
GB = 1e9

Kind = Literal["random", "sparse"]
SPARSE_STRIDE = 8  # the compressible payload: 7 of every 8 values are zero


@dataclass(frozen=True)
class Stats:
    """Seconds over repetitions (warm-up runs excluded)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def n(self) -> int:
        return len(self.samples)


def timed(call: Callable[[], object]) -> tuple[float, object]:
    """Seconds one call took, and what it returned."""
    t0 = time.perf_counter()
    value = call()
    return time.perf_counter() - t0, value


def repeat(
    call: Callable[[], object],
    times: int,
    *,
    warmup: int = 1,
    before: Callable[[int], None] | None = None,
    check: Callable[[object], None] | None = None,
) -> Stats:
    """Time ``call`` ``times`` times after ``warmup`` untimed runs.

    ``before(i)`` runs untimed ahead of each run (warm-ups included), ``check``
    untimed after each on what it returned; garbage is collected between runs.
    """
    samples: list[float] = []
    for i in range(warmup + times):
        if before is not None:
            before(i)
        gc.collect()
        seconds, value = timed(call)
        if check is not None:
            check(value)
        if i >= warmup:
            samples.append(seconds)
    return Stats(tuple(samples))


def payload(nbytes: int, kind: Kind = "random", seed: int = 0) -> np.ndarray:
    """A float32 array of ``nbytes`` (rounded down to whole elements)."""
    rng = np.random.default_rng(seed)
    n = nbytes // 4
    if kind == "random":
        return rng.random(n, dtype=np.float32)
    a = np.zeros(n, dtype=np.float32)
    a[::SPARSE_STRIDE] = rng.random(len(a[::SPARSE_STRIDE]), dtype=np.float32)
    return a


def refresh(a: np.ndarray, i: int, kind: Kind = "random") -> None:
    """Give every value of ``a`` (every nonzero one if sparse) new contents, in place."""
    view = a if kind == "random" else a[::SPARSE_STRIDE]
    np.add(view, np.float32(1.0), out=view)
    view[0] = np.float32(-i)  # distinct from every earlier repetition's first value


def check_negated(a: np.ndarray) -> Callable[[object], None]:
    """A ``check`` for ``repeat`` that the result is exactly ``-a``."""

    def check(value: object) -> None:
        if not isinstance(value, np.ndarray) or value.shape != a.shape:
            raise AssertionError(f"expected an array of shape {a.shape}, got {type(value)}")
        if not np.array_equal(np.negative(value), a):
            raise AssertionError("the result is not -a (stale or corrupted data)")

    return check


def rate(nbytes: float, seconds: float) -> float:
    """GB/s (10^9 bytes per second)."""
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def parse_size(text: str) -> int:
    """``1M``, ``64MiB``, ``512m``, ``2G``, ``4096`` (bytes) -> bytes; binary units."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def size_label(nbytes: int) -> str:
    if nbytes >= 1 << 30 and nbytes % (1 << 30) == 0:
        return f"{nbytes >> 30} GiB"
    if nbytes >= MiB:
        return f"{nbytes / MiB:g} MiB"
    return f"{nbytes / 1024:g} KiB"
