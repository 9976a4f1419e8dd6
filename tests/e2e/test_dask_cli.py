"""The README's commands: ``dask scheduler`` and ``dask worker ... --preload
worker_kernel.dask_plugin`` with lan2gpu flags after it, then a cell from Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lan2gpu_magic.dask_backend import DaskCluster
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
                 "--resources", "GPU=2", "--name", "box", "--preload",
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


def test_flags_after_the_preload_reach_the_workers_lan2gpu_service(cli_cluster: str) -> None:
    with DaskCluster(cli_cluster) as cluster:

        def ready() -> list:
            return [r for r in cluster.rows(max_age=0) if r.view is not None]

        (row,) = wait_until(ready, 120, "the worker's lan2gpu service")
        assert row.view is not None and row.view.name == "box"
        assert len(row.view.gpus) == 2  # --simulated-gpus 2 went to the service
        ns = {"a": np.arange(6.0)}
        cluster.run(
            "b = a * 2",
            ns,
            requirements=Requirements(gpus=2),
        )
        assert list(ns["b"]) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
