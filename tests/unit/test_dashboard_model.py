"""The dashboard's documents from pool rows, and the worker's bounded memories."""

from __future__ import annotations

from typing import Any

from lan2gpu_magic.dashboard.model import snapshot
from lan2gpu_magic.pool import WorkerRow
from lan2gpu_magic.statuses import state_of
from worker_kernel.capabilities import Capabilities, GpuInfo
from worker_kernel.history import GpuHistory, JobLog
from worker_kernel.protocol.errors import (
    AuthenticationError,
    ExecutionTimeout,
    VersionMismatch,
    WorkerUnreachable,
)
from worker_kernel.scheduler import Cell

GIB = 1 << 30


def _status(name: str, *, running: int = 0, recent: tuple[float, ...] = ()) -> dict[str, Any]:
    gpu = {
        "index": 0,
        "name": "RTX",
        "compute_capability": [8, 6],
        "memory_total": 8 * GIB,
        "memory_free": 8 * GIB,
        "simulated": False,
    }
    return {
        "worker": name,
        "versions": {"lan2gpu": "0.1.0"},
        "capabilities": {"gpus": [gpu], "cpu_count": 8, "memory_total": 32 * GIB},
        "load": {
            "gpus": [{"index": 0, "memory_free": 6 * GIB, "utilization": 40.0}],
            "queues": {"gpu0": {"running": running, "waiting": 0}},
            "memory_available": 20 * GIB,
            "load_average": 1.5,
        },
        "running": [{"id": f"{name}-r{i}", "running": float(i)} for i in range(running)],
        "queued": [],
        "recent": [{"id": f"{name}-{t}", "finished": t, "status": "ok"} for t in recent],
        "history": {"0": [[1.0, 40.0, 2.0 * GIB, 1.0]]},
        "kernels": [],
    }


def test_live_numbers_override_the_static_ones_and_items_name_their_worker() -> None:
    rows = [WorkerRow("tcp://a:1", "configured", None, _status("a", running=2))]
    snap = snapshot(rows, 100.0)
    (worker,) = snap.workers
    assert worker["state"] == "up" and worker["name"] == "a" and worker["running"] == 2
    assert worker["memory_available"] == 20 * GIB and worker["load_average"] == 1.5
    (gpu,) = snap.gpus
    assert gpu["memory_used"] == 2 * GIB and gpu["utilization"] == 40.0
    assert gpu["worker"] == "a" and gpu["stale"] is False and gpu["running"] == 2
    assert gpu["history"] == [[1.0, 40.0, 2.0 * GIB, 1.0]]
    assert [j["id"] for j in snap.jobs["running"]] == ["a-r1", "a-r0"]  # longest first
    assert all(j["address"] == "tcp://a:1" for j in snap.jobs["running"])


def test_a_worker_gone_quiet_keeps_its_name_gpus_and_history_but_not_its_running_cells() -> None:
    last = {"tcp://b:1": _status("b", running=1, recent=(5.0,))}
    rows = [WorkerRow("tcp://b:1", "discovered", None, None, "did not answer", "unreachable")]
    snap = snapshot(rows, 100.0, last)
    (worker,) = snap.workers
    assert worker == {
        "name": "b",
        "address": "tcp://b:1",
        "origin": "discovered",
        "state": "unreachable",
        "problem": "did not answer",
    }
    assert snap.gpus[0]["stale"] is True
    assert snap.jobs["running"] == [] and [j["id"] for j in snap.jobs["recent"]] == ["b-5.0"]


def test_recent_cells_are_merged_newest_first_and_capped() -> None:
    rows = [
        WorkerRow("tcp://a:1", "configured", None, _status("a", recent=(1.0, 4.0))),
        WorkerRow("tcp://c:1", "configured", None, _status("c", recent=(2.0, 3.0))),
    ]
    snap = snapshot(rows, 100.0, recent=3)
    assert [j["id"] for j in snap.jobs["recent"]] == ["a-4.0", "c-3.0", "c-2.0"]


def test_states_say_whose_fault_it_is() -> None:
    assert state_of(AuthenticationError("x")) == "key mismatch"
    assert state_of(VersionMismatch("x")) == "version mismatch"
    assert state_of(WorkerUnreachable("x")) == "unreachable"
    assert state_of(ExecutionTimeout("x")) == "refused"


def _caps() -> Capabilities:
    gpus = tuple(GpuInfo(i, "sim", (5, 0), 100, 60, simulated=True) for i in range(2))
    return Capabilities(
        hostname="h",
        gpus=gpus,
        cpu_count=2,
        memory_total=100,
        memory_available=50,
        simulator=True,
        load_average=0.0,
    )


def test_gpu_history_is_spaced_and_bounded() -> None:
    history = GpuHistory(span=10.0, every=2.0)
    for t in range(0, 40):  # one call a second
        history.sample(_caps(), {"gpu1"} if t % 4 == 0 else set(), now=float(t))
    samples = history.to_json()
    assert set(samples) == {"0", "1"}
    assert [s[0] for s in samples["0"]] == [30.0, 32.0, 34.0, 36.0, 38.0]
    assert samples["0"][0][2] == 40.0  # memory used = total - free
    assert [s[3] for s in samples["1"]] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert all(s[3] == 0.0 for s in samples["0"])


def test_job_log_keeps_the_last_finished_cells_only() -> None:
    log = JobLog(size=3)
    for i in range(5):
        cell = Cell(f"c{i}", b"", "client", "s", ("gpu0",), [], 10, None, received=0.0)
        cell.started = 1.0
        log.record(cell, "ok" if i != 4 else "cache-miss", {"bytes_out": 7}, now=3.0)
    jobs = log.to_json()
    assert [j["id"] for j in jobs] == ["c1", "c2", "c3"]  # a cache miss is not an end
    assert jobs[0]["duration"] == 2.0 and jobs[0]["waited"] == 1.0 and jobs[0]["bytes_out"] == 7
