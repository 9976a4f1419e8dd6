"""The README's commands: ``dask scheduler`` and ``dask worker ... --preload
worker_kernel.dask_plugin`` with lan2gpu flags after it, then cells from Python; a
multi-GPU cell on a one-GPU Dask worker, and the worker's lan2gpu service killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lan2gpu_magic.dask_backend import DaskCluster
from lan2gpu_magic.errors import NoWorkerAvailable
from lan2gpu_magic.placement import Requirements

from ..waiting import wait_until


@pytest.fixture
def cli_cluster(tmp_path: Path) -> Iterator[str]:
    file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    try:
        wait_until(lambda: file.exists() and file.stat().st_size > 0, 60, "the scheduler file")
        address = json.loads(file.read_text())["address"]
        env = {**os.environ, "LAN2GPU_SIMULATE": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                 "--resources", "GPU=1", "--name", "box", "--preload",
                 "worker_kernel.dask_plugin", "--simulated-gpus", "2", "--session-idle", "600"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
        yield str(file)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()


def _service_of(cluster: DaskCluster) -> int:
    """The pid of the worker's lan2gpu service (a child of the Dask worker process)."""
    (worker,) = cluster.dask.run(os.getpid).values()
    children = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _ppid(p) == worker and b"worker_kernel" in _cmdline(p)
    ]
    (service,) = children
    return service


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_the_readme_worker_command_serves_cells_and_survives_its_service(cli_cluster: str) -> None:
    with DaskCluster(cli_cluster) as cluster:

        def ready() -> list:
            return [r for r in cluster.rows(max_age=0) if r.view is not None]

        # At once, while the worker joins and its plugin starts the service: the cell
        # waits for them.
        ns = {"a": np.arange(6.0)}
        cluster.run("b = a * 2", ns)
        assert list(ns["b"]) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        (row,) = ready()
        assert row.view is not None and row.view.name == "box"
        assert len(row.view.gpus) == 2  # --simulated-gpus 2 went to the service

        # Two GPUs of a worker that declares GPU=1 to Dask: refused at once, not queued
        # forever.
        with pytest.raises(NoWorkerAvailable, match="declares GPU=1"):
            cluster.run("c = 1", {}, requirements=Requirements(gpus=2))

        # The service dies: the worker is not a place for cells until the plugin has
        # started a new one; then cells run again.
        os.kill(_service_of(cluster), signal.SIGKILL)
        wait_until(lambda: not ready(), 30, "the worker to say its service is gone")
        wait_until(ready, 120, "the plugin to start the service again")
        cluster.run("b = a * 3", ns)
        assert list(ns["b"]) == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0]
