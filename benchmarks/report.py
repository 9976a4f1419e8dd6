"""Markdown tables, number formats, and what machine the figures come from."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata

from .measure import Stats

Cell = str | float | int | None


@dataclass
class Table:
    """One section's table; ``notes`` are printed under it (errors, how to read it)."""

    title: str
    header: Sequence[str]
    rows: list[Sequence[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Cell) -> None:
        self.rows.append(cells)

    def markdown(self) -> str:
        text = [[_cell(c) for c in row] for row in [self.header, *self.rows]]
        widths = [max(len(row[i]) for row in text) for i in range(len(self.header))]
        right = [i > 0 and all(_numeric(row[i]) for row in text[1:]) for i in range(len(widths))]

        def line(row: Sequence[str]) -> str:
            cells = [
                c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)
            ]
            return "| " + " | ".join(cells) + " |"

        rule = (
            "|"
            + "|".join(
                "-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right, strict=True)
            )
            + "|"
        )
        parts = [f"## {self.title}", ""]
        if self.rows:  # a skipped section is its title and the note saying why
            parts += [line(text[0]), rule, *(line(r) for r in text[1:])]
        if self.notes:
            parts += (
                ["", *(f"- {n}" for n in self.notes)]
                if self.rows
                else [f"- {n}" for n in self.notes]
            )
        return "\n".join(parts) + "\n"


def _numeric(text: str) -> bool:
    return text[:1].isdigit() or text in ("—", "")


def _cell(value: Cell) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def sec(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds:.4f}"
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def spread(stats: Stats, unit: str = "s") -> str:
    """``median [min-max]`` in seconds (or milliseconds with ``unit="ms"``)."""
    f = ms if unit == "ms" else sec
    return f"{f(stats.median)} [{f(stats.min)}-{f(stats.max)}]"


def ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def short_error(exc: BaseException) -> str:
    """The first line of an error, for a table cell or a note."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:160]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        return f"{total_kb / (1 << 20):.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine() -> Table:
    """CPU, memory, OS, Python and the versions of everything compared."""
    import zmq

    table = Table("Machine", ["", "value"])
    table.add("CPU", f"{os.cpu_count()} x {_cpu_model()}")
    table.add("memory", _memory())
    table.add("OS", f"{platform.system()} {platform.release()}")
    table.add("Python", f"{sys.version.split()[0]} ({sys.executable})")
    table.add("pyzmq / libzmq", f"{zmq.__version__} / {zmq.zmq_version()}")
    for dist in ("lan2gpu", "numpy", "numba", "ipython", "ipyparallel", "dask", "distributed"):
        table.add(dist, _version(dist))
    return table
