"""``python -m tests.dask_cluster``: a real Dask ``LocalCluster`` for the tests, in a
process of its own (its threads and warnings stay out of pytest's).

Worker processes (with nannies, so a killed worker is replaced, as on a real
cluster), one thread each, ``resources={"GPU": 1}``, ``worker_kernel.dask_plugin``
preloaded; lan2gpu's executors simulate CUDA (``LAN2GPU_SIMULATE=1``). Prints one JSON
line (the scheduler's address, its dashboard) once every worker's plugin reports its
service, then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            resources={"GPU": 1},
            preload=["worker_kernel.dask_plugin"],
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            ready = [
                w for w in workers if (w.get("metrics", {}).get("lan2gpu") or {}).get("status")
            ]
            if len(ready) == args.workers:
                break
            time.sleep(0.2)
        else:
            raise SystemExit("the workers' lan2gpu services did not come up")
        print(
            json.dumps(
                {"scheduler": cluster.scheduler_address, "dashboard": client.dashboard_link}
            ),
            flush=True,
        )
        sys.stdin.read()  # until the test closes our stdin


@dataclass
class Cluster:
    scheduler: str
    dashboard: str
    process: subprocess.Popen[str]

    @property
    def address(self) -> str:
        """As a notebook names it: ``dask://HOST:PORT``."""
        return "dask://" + self.scheduler.removeprefix("tcp://")


@contextmanager
def local_cluster(workers: int = 2, env: dict[str, str] | None = None) -> Iterator[Cluster]:
    full_env = {**os.environ, "LAN2GPU_SIMULATE": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.dask_cluster", "--workers", str(workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the test cluster did not start (exit {process.wait(30)})")
        info = json.loads(line)
        yield Cluster(info["scheduler"], info["dashboard"], process)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


if __name__ == "__main__":
    main()
