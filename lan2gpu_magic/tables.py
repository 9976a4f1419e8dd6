"""``%lan2gpu workers``: the fleet as a table, HTML for notebooks and text for terminals."""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from typing import Any

from worker_kernel.protocol.contents import StatusDocument
from worker_kernel.protocol.units import binary_size

from .placement import WorkerView
from .pool import WorkerRow

COLUMNS = ("worker", "address", "GPUs", "CPU", "RAM", "simulator", "queue", "running",
           "latency", "versions", "state")  # fmt: skip


def _ram(caps: dict[str, Any]) -> str:
    free, total = caps.get("memory_available", 0), caps.get("memory_total", 0)
    return f"{binary_size(free)} free / {binary_size(total)}"


def _gpu_lines(status: StatusDocument) -> list[str]:
    caps = status.get("capabilities", {})
    queues = status.get("load", {}).get("queues", {})
    lines = []
    for g in caps.get("gpus", []):
        cc = g["compute_capability"]
        util = "n/a" if g.get("utilization") is None else f"{g['utilization']:.0f}%"
        q = queues.get(f"gpu{g['index']}", {})
        lines.append(
            f"{g['index']}: {g['name']} (cc {cc[0]}.{cc[1]}) "
            f"{binary_size(g['memory_free'])} free / {binary_size(g['memory_total'])}, "
            f"util {util}, "
            f"{q.get('running', 0)} running, {q.get('waiting', 0)} waiting"
        )
    return lines or ["none"]


def _summary(origin: str, status: StatusDocument, view: WorkerView) -> dict[str, str]:
    """A reachable worker's one-line facts, by column name (both tables use them)."""
    versions = status.get("versions", {})
    return {
        "worker": view.name,
        "address": view.address,
        "CPU": f"{view.cpu_count} cores, load {view.load_average:.1f}",
        "RAM": _ram(status.get("capabilities", {})),
        "simulator": "yes" if view.simulator else "no",
        "queue": str(len(status.get("queued", []))),
        "running": str(len(status.get("running", []))),
        "latency": f"{view.latency * 1000:.1f} ms",
        "versions": f"lan2gpu {versions.get('lan2gpu', '?')}, "
        f"Python {versions.get('python', '?')}, numba {versions.get('numba', '?')}, "
        f"numpy {versions.get('numpy', '?')}",
        "state": f"ok ({origin})",
    }


def row_cells(row: WorkerRow) -> tuple[list[str], ...]:
    """The row's cells; a cell is a list of lines."""
    if row.view is None or row.status is None:
        state = f"{row.state} ({row.origin}): {row.problem}"
        return ([row.address.split("//")[-1]], [row.address], *([[""]] * 8), [state])
    facts = _summary(row.origin, row.status, row.view)
    return tuple(_gpu_lines(row.status) if c == "GPUs" else [facts[c]] for c in COLUMNS)


WIDTH = 100  # a terminal's table fits this many columns, as `pip list` does
_TEXT_COLUMNS = ("worker", "address", "GPUs", "CPU", "RAM", "queue", "running", "latency",
                 "state")  # fmt: skip
_MOVED_FIRST = ("latency", "running", "queue", "CPU", "RAM")  # under the row, when too wide
_NAME_MAX, _ADDRESS_MAX = 22, 40  # longer ones are cut with "…"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _text_row(row: WorkerRow) -> tuple[dict[str, str], list[str]]:
    """The row's short cells, and the lines printed under it (GPUs, versions, why not)."""
    if row.view is None or row.status is None:
        cells = dict.fromkeys(_TEXT_COLUMNS, "-")
        cells.update(
            worker=_cut(row.address.split("//")[-1], _NAME_MAX),
            address=_cut(row.address, _ADDRESS_MAX),
        )
        cells["state"] = f"{row.state} ({row.origin})"
        return cells, [f"problem: {row.problem}"]
    status, view = row.status, row.view
    facts = _summary(row.origin, status, view)
    cells = {c: facts[c] for c in _TEXT_COLUMNS if c in facts}
    cells.update(
        worker=_cut(view.name, _NAME_MAX),
        address=_cut(view.address, _ADDRESS_MAX),
        GPUs=f"{len(status.get('capabilities', {}).get('gpus', []))}"
        + (" sim" if view.simulator else ""),
    )
    below = [f"address {view.address}"] if len(view.address) > _ADDRESS_MAX else []
    below += [f"GPU {line}" for line in _gpu_lines(status) if line != "none"] or ["no GPU"]
    below.append(facts["versions"] + ("; CUDA simulator" if view.simulator else ""))
    return cells, below


def as_text(rows: Sequence[WorkerRow], width: int = WIDTH) -> str:
    """The table for a terminal: one short line per worker, at most ``width`` columns,
    with its GPUs and versions (or why it cannot be used) wrapped underneath."""
    built = [_text_row(r) for r in rows]
    columns = list(_TEXT_COLUMNS)

    def widths() -> dict[str, int]:
        return {c: max([len(c)] + [len(cells[c]) for cells, _ in built]) for c in columns}

    for dropped in _MOVED_FIRST:
        if sum(widths().values()) + 2 * (len(columns) - 1) <= width:
            break
        columns.remove(dropped)
    w = widths()
    moved = [c for c in _TEXT_COLUMNS if c not in columns]  # shown under the row instead

    def line(cells: dict[str, str]) -> str:
        return "  ".join(cells[c].ljust(w[c]) for c in columns).rstrip()[:width]

    out = [line({c: c for c in columns})]
    for cells, below in built:
        out.append(line(cells))
        rest = "; ".join(f"{c} {cells[c]}" for c in moved if cells[c] != "-")
        for extra in ([rest] if rest else []) + below:
            out += textwrap.wrap(extra, width, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(out)


def as_html(rows: Sequence[WorkerRow]) -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in COLUMNS)
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
