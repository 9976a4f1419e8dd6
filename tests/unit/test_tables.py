"""``%lan2gpu workers`` as text: at most 100 columns, whatever the fleet looks like."""

from __future__ import annotations

from lan2gpu_magic.placement import GpuView, WorkerView
from lan2gpu_magic.pool import WorkerRow
from lan2gpu_magic.tables import as_html, as_text

GiB = 2**30


def _up(name: str, gpus: int) -> WorkerRow:
    caps = {
        "memory_total": 512 * GiB,
        "memory_available": 400 * GiB,
        "gpus": [
            {"index": i, "name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0],
             "memory_free": 79 * GiB, "memory_total": 80 * GiB, "utilization": 37.0}
            for i in range(gpus)
        ],
    }  # fmt: skip
    status = {
        "capabilities": caps,
        "load": {"queues": {"gpu0": {"running": 1, "waiting": 3}}},
        "queued": [{}] * 3,
        "running": [{}],
        "versions": {"lan2gpu": "0.1.0", "python": "3.11.7", "numba": "0.61.2", "numpy": "2.2.6"},
    }
    views = tuple(
        GpuView(i, "NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB, 79 * GiB) for i in range(gpus)
    )
    view = WorkerView(
        name, f"tcp://{name}.lab.example.org:7340", False, views, 128, 12.5, 0, 0.0042
    )
    return WorkerRow(view.address, "discovered", view, status)


def test_a_wide_fleet_fits_100_columns_and_keeps_every_gpu():
    rows = [
        _up("gpu-node-with-a-rather-long-host-name-17", 8),
        _up("box1", 1),
        WorkerRow("tcp://10.0.0.99:7340", "configured", None, None, "did not answer within "
                  "10 s; is it running? " * 4, "unreachable"),
    ]  # fmt: skip
    text = as_text(rows)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    assert sum("NVIDIA H100 80GB HBM3 (cc 9.0)" in line for line in lines) == 9
    assert "79 GiB free / 80 GiB" in text and "400 GiB free / 512 GiB" in text
    assert "unreachable (configured)" in text and "problem: did not answer" in text
    assert lines[0].split()[:2] == ["worker", "address"]
    # HTML keeps every column; only the terminal table is shortened.
    assert "versions" in as_html(rows) and "numba 0.61.2" in as_html(rows)
