"""``%lan2gpu workers``: the fleet as a table, HTML for notebooks and text for terminals."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from .pool import WorkerRow

COLUMNS = ("worker", "address", "GPUs", "CPU", "RAM", "simulator", "queue", "running",
           "latency", "versions", "state")  # fmt: skip


def _gb(n: float) -> str:
    gib = n / 2**30
    return f"{gib:.0f} GiB" if gib >= 10 else f"{gib:.1f} GiB"


def _gpu_lines(status: dict[str, Any]) -> list[str]:
    caps = status.get("capabilities", {})
    queues = status.get("load", {}).get("queues", {})
    lines = []
    for g in caps.get("gpus", []):
        cc = g["compute_capability"]
        util = "n/a" if g.get("utilization") is None else f"{g['utilization']:.0f}%"
        q = queues.get(f"gpu{g['index']}", {})
        lines.append(
            f"{g['index']}: {g['name']} (cc {cc[0]}.{cc[1]}) "
            f"{_gb(g['memory_free'])} free / {_gb(g['memory_total'])}, util {util}, "
            f"{q.get('running', 0)} running, {q.get('waiting', 0)} waiting"
        )
    return lines or ["none"]


def row_cells(row: WorkerRow) -> tuple[list[str], ...]:
    """The row's cells; a cell is a list of lines."""
    if row.view is None or row.status is None:
        state = f"{row.state} ({row.origin}): {row.problem}"
        return ([row.address.split("//")[-1]], [row.address], *([[""]] * 8), [state])
    status, view = row.status, row.view
    caps = status.get("capabilities", {})
    versions = status.get("versions", {})
    return (
        [view.name],
        [view.address],
        _gpu_lines(status),
        [f"{view.cpu_count} cores, load {view.load_average:.1f}"],
        [f"{_gb(caps.get('memory_available', 0))} free / {_gb(caps.get('memory_total', 0))}"],
        ["yes" if view.simulator else "no"],
        [str(len(status.get("queued", [])))],
        [str(len(status.get("running", [])))],
        [f"{view.latency * 1000:.1f} ms"],
        [
            f"lan2gpu {versions.get('lan2gpu', '?')}, Python {versions.get('python', '?')}, "
            f"numba {versions.get('numba', '?')}, numpy {versions.get('numpy', '?')}"
        ],
        [f"ok ({row.origin})"],
    )


def as_text(rows: Sequence[WorkerRow]) -> str:
    table = [tuple([c] for c in COLUMNS)] + [row_cells(r) for r in rows]
    flat = [["; ".join(cell) for cell in r] for r in table]
    widths = [max(len(r[i]) for r in flat) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in flat
    )


def as_html(rows: Sequence[WorkerRow]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td style='text-align:left'>{'<br>'.join(html.escape(x) for x in cell)}</td>"
            for cell in row_cells(r)
        )
        + "</tr>"
        for r in rows
    )
    table = f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
    return f"<table class='lan2gpu-workers'>{table}</table>"
