"""Placement over a cluster of 200 GPU workers, without 200 workers: a real Dask
scheduler, and the status events 200 plugins would publish, sent through it.

What is checked is the traffic: after the first read of the workers, placing a cell
asks the scheduler nothing, and placement follows the events alone. (How often real
plugins publish is checked in ``test_dask.py`` against real workers.) (Placement's time
over these views is a benchmark figure: ``python -m benchmarks.run``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.placement import GIB, fake_event
from lan2gpu_magic.dask_backend import DaskCluster
from lan2gpu_magic.errors import NoWorkerAvailable
from lan2gpu_magic.placement import Requirements
from worker_kernel.protocol.dask_tasks import STATUS_TOPIC

from ..waiting import wait_until


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    file = tmp_path_factory.mktemp("sched") / "scheduler.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: file.exists() and file.stat().st_size > 0, 60, "the scheduler file")
        yield str(file)
    finally:
        proc.terminate()
        proc.wait(30)


def test_placement_over_200_workers_asks_the_scheduler_nothing(scheduler: str) -> None:
    with DaskCluster(scheduler) as cluster:
        assert cluster.rows() == []  # the one read of the workers: none are real
        assert cluster.identity_calls == 1
        for i in range(200):
            cluster.dask.log_event(STATUS_TOPIC, fake_event(i))
        wait_until(lambda: cluster.status_events >= 200, 60, "200 status events")
        rows = cluster.rows()
        assert len(rows) == 200 and all(r.view is not None for r in rows)

        req = Requirements(gpu="A100", min_memory=40 * GIB)
        fits = [r.view for r in rows if r.view and "A100" in r.view.gpus[0].name
                and r.view.gpus[0].memory_free >= 40 * GIB]  # fmt: skip
        shortest = min(v.gpus[0].queue for v in fits)
        chosen = set()
        for _ in range(50):
            _, placement = cluster.choose(req)
            gpu = placement.gpus[0]
            assert "A100" in gpu.name and gpu.memory_free >= 40 * GIB
            assert gpu.queue == shortest
            chosen.add(placement.worker.address)
        assert cluster.identity_calls == 1  # 50 placements, no status request
        (best,) = chosen  # stable: the same worker every time

        # That worker gets busy: its event alone moves the next cell elsewhere.
        events = cluster.status_events
        busy = next(i for i in range(200) if fake_event(i)["worker"] == best)
        cluster.dask.log_event(STATUS_TOPIC, fake_event(busy, queue=9))
        wait_until(lambda: cluster.status_events == events + 1, 30, "the one event")
        _, placement = cluster.choose(req)
        assert placement.worker.address != best and placement.gpus[0].queue == shortest
        assert cluster.identity_calls == 1


def test_a_worker_without_the_plugin_is_listed_with_what_to_do(scheduler: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAN2GPU_")}
    address = json.loads(Path(scheduler).read_text())["address"]
    plain = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
         "--name", "plain", "--no-nanny"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with DaskCluster(scheduler, worker_wait=2.0) as cluster:
            (row,) = wait_until(lambda: cluster.rows(max_age=0), 60, "the plain worker")
            assert row.view is None and "--preload worker_kernel.dask_plugin" in row.problem
            with pytest.raises(NoWorkerAvailable, match=r"--preload worker_kernel\.dask_plugin"):
                cluster.choose(Requirements(cpu=True))
    finally:
        plain.terminate()
        plain.wait(30)
