"""``%%lan2gpu`` cells on a real Dask cluster (issue: the same cells on a Dask cluster).

A ``LocalCluster`` of two worker processes (``resources={"GPU": 1}``, the plugin
preloaded, simulator executors) in a process of its own, and a real Jupyter kernel as
the notebook, connected with ``%lan2gpu connect dask://...``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..dask_cluster import Cluster, local_cluster
from ..waiting import wait_until
from .kernel_driver import Kernel, ok, value

DEFINE = """
import numpy as np
from numba import cuda

@cuda.jit
def kern(a, out, k):
    i = cuda.grid(1)
    if i < a.size:
        out[i] = a[i] * k

a = np.arange(64, dtype=np.float32)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with local_cluster(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def kernel(cluster: Cluster) -> Iterator[Kernel]:
    k = Kernel({"LAN2GPU_DISCOVERY": "0"})
    try:
        ok(k, "%load_ext lan2gpu_magic")
        connected = k.run(f"%lan2gpu connect {cluster.address}")
        assert connected.reply["status"] == "ok", connected.error()
        assert "2 worker(s), 2 with lan2gpu" in connected.stream()
        assert "dashboard http://127.0.0.1:" in connected.stream()
        ok(k, DEFINE)
        yield k
    finally:
        k.shutdown()


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_the_quickstart_cell_runs_on_a_dask_worker(kernel: Kernel) -> None:
    run = kernel.run(
        "%%lan2gpu --timeout 60\n"
        "d_a = cuda.to_device(a)\nd_out = cuda.device_array_like(a)\n"
        "kern[2, 32](d_a, d_out, 3.0)\nout = d_out.copy_to_host()\n"
        "print('sum on the worker:', out.sum())"
    )
    assert run.reply["status"] == "ok", run.error()
    assert run.stream() == "sum on the worker: 6048.0\n"
    assert value(kernel, "type(out).__name__, bool((out == 3 * a).all())") == "('ndarray', True)"
    assert run.progress()[-1].startswith("lan2gpu: ran on dask-worker-")
    assert kernel.run("%%lan2gpu\nn = 21\nn * 2").results() == [{"text/plain": "42"}]


def test_the_workers_table_lists_the_clusters_gpus_and_its_dashboard(kernel: Kernel) -> None:
    text = ok(kernel, "%lan2gpu workers")
    shown = kernel.run("%lan2gpu workers").results()[0]["text/plain"]
    assert shown.count("dask-worker-") == 2 and "simulator" in shown.lower()
    assert "dashboard: http://127.0.0.1:" in text


def test_a_session_keeps_its_namespace_and_compiled_kernel_on_one_worker(kernel: Kernel) -> None:
    cell = (
        "%%lan2gpu --session team\n"
        "import os\n"
        "try:\n    count += 1\nexcept NameError:\n    count = 1\n"
        "d = cuda.to_device(a)\nkern[2, 32](d, d, 2.0)\n"
        "where = os.getppid()\nkernel_id = id(kern)\ncompiled = len(kern.overloads)\n"
    )
    ok(kernel, cell)
    first = value(kernel, "where, kernel_id, compiled")
    ok(
        kernel,
        cell.replace("--session team", "--session team --out where,kernel_id,compiled,count"),
    )
    # The same service (same worker), the same dispatcher object, still one compilation.
    assert value(kernel, "where, kernel_id, compiled") == first
    assert value(kernel, "count") == "2"


def test_output_arrives_while_the_cell_runs(kernel: Kernel) -> None:
    run = kernel.run(
        "%%lan2gpu\nimport time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')"
    )
    assert run.reply["status"] == "ok", run.error()
    assert run.stream() == "first\nsecond\n"
    first = next(
        t for t, m in run.outputs if m["msg_type"] == "stream" and "first" in m["content"]["text"]
    )
    assert run.idle_at - first > 1.5


def test_a_remote_error_shows_the_cells_own_lines(kernel: Kernel) -> None:
    run = kernel.run("%%lan2gpu\nx = 1\ny = {}['nope']\n")
    error = run.error()
    assert error is not None and error["ename"] == "RemoteExecutionError"
    text = "\n".join(error["traceback"])
    assert ", line 3" in text and "y = {}['nope']" in text and "KeyError" in text
    assert "lan2gpu_magic" not in text


def test_timeout_and_interrupt_cost_the_cell_only(kernel: Kernel) -> None:
    ok(kernel, "%%lan2gpu --session keep\nkept = 'yes'")
    run = kernel.run("%%lan2gpu --timeout 1 --session keep\nimport time\ntime.sleep(30)")
    error = run.error()
    assert error is not None and error["ename"] == "ExecutionTimeout"
    t0 = time.monotonic()
    run = kernel.run("%%lan2gpu --session keep\nimport time\ntime.sleep(60)", interrupt_after=2)
    assert time.monotonic() - t0 < 12
    error = run.error()
    assert error is not None and error["ename"] == "KeyboardInterrupt"
    assert "cancelled on dask-worker-" in run.progress()[-1]
    # The timeout and the interrupt stopped the cells, not the session; the worker serves on.
    assert ok(kernel, "%%lan2gpu --session keep\nprint(kept)") == "yes\n"
    assert ok(kernel, "%%lan2gpu\nprint('still serving')") == "still serving\n"


def test_an_executor_killed_mid_cell_costs_its_session_only(kernel: Kernel) -> None:
    run = kernel.run(
        "%%lan2gpu --session doomed\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    )
    error = run.error()
    assert error is not None and error["ename"] == "ExecutorDied"
    assert ok(kernel, "%%lan2gpu --session doomed\nprint('back')") == "back\n"


def test_split_over_both_workers_equals_the_one_worker_result(kernel: Kernel) -> None:
    ok(kernel, "x = np.arange(10.0)\ny = x * 3 - 7\nlan2gpu_rank, lan2gpu_size = 0, 1")
    cell = "import os\nout = x * y + 1\ntotal = float((x * y).sum())\nwhere = (lan2gpu_rank, os.getppid())\n"
    ok(kernel, "%%lan2gpu\n" + cell)
    ok(kernel, "ref = (out.copy(), total)\ndel out, total")
    run = kernel.run("%%lan2gpu --split x,y --workers 2 --gather total:sum\n" + cell)
    assert run.reply["status"] == "ok", run.error()
    assert value(kernel, "np.array_equal(out, ref[0]) and total == ref[1]") == "True"
    assert value(kernel, "[w[0] for w in where], len({w[1] for w in where})") == "([0, 1], 2)"


def test_an_unchanged_input_is_not_sent_again(kernel: Kernel, cluster: Cluster) -> None:
    out = ok(
        kernel,
        "from lan2gpu_magic.dask_backend import DaskCluster\n"
        f"with DaskCluster({cluster.address!r}) as c:\n"
        "    ns = {'big': np.random.default_rng(1).random(8 << 20)}\n"
        "    one = c.run('s = big.sum()', ns, session='cache')\n"
        "    two = c.run('s = big.sum()', ns, session='cache')\n"
        "    print(one.stats['bytes_in'], two.stats['bytes_in'], two.stats['cached_in'], ns['s'] == ns['big'].sum())\n",
        timeout=180,
    )
    first, second, cached, same = out.split()
    assert int(first) >= 64 << 20 and int(second) < 10_000 and cached == "1" and same == "True"


def test_a_dask_worker_killed_mid_cell_is_lost_then_retried(kernel: Kernel, tmp_path: Path) -> None:
    marker = tmp_path / "first-try"
    cell = (
        "import os, time, pathlib\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n"
        "    m.write_text(str(os.getppid()))\n"
        "    time.sleep(60)\n"
        "where = os.getppid()\n"
    )
    # Without --retry: WorkerLost within seconds of the kill.
    kernel.kc.execute("%%lan2gpu\n" + cell, stop_on_error=False)
    service = int(
        wait_until(lambda: marker.exists() and marker.read_text(), 120, "the cell to start")
    )
    t0 = time.monotonic()
    os.kill(_parent_of(service), signal.SIGKILL)  # the Dask worker process itself
    run = kernel.run("pass", timeout=120)  # the killed cell's reply comes first
    assert run.reply["status"] == "ok"
    assert time.monotonic() - t0 < 30
    assert "WorkerLost" in value(
        kernel, "repr(_exc) if (_exc := __import__('sys').last_value) else ''"
    )

    # With --retry 1: the cell runs again on the other worker.
    marker.unlink()
    kernel.kc.execute("%%lan2gpu --retry 1\n" + cell, stop_on_error=False)
    service = int(
        wait_until(lambda: marker.exists() and marker.read_text(), 120, "the cell to start")
    )
    os.kill(_parent_of(service), signal.SIGKILL)
    ok(kernel, "pass", timeout=120)
    assert int(value(kernel, "where")) != service


def test_a_background_cell_runs_on_the_cluster_and_wait_assigns_it(kernel: Kernel) -> None:
    started = kernel.run(
        "%%lan2gpu --async job\nimport time\nprint('working', flush=True)\ntime.sleep(1)\nr = 5"
    )
    assert started.reply["status"] == "ok", started.error()
    assert ok(kernel, "print(1 + 1)") == "2\n"  # the notebook is free meanwhile
    waited = kernel.run("%lan2gpu wait job")
    assert waited.reply["status"] == "ok", waited.error()
    assert "working" in waited.stream()
    assert value(kernel, "r") == "5"


def test_the_dask_worker_process_itself_never_loads_cuda(kernel: Kernel, cluster: Cluster) -> None:
    ok(kernel, "%%lan2gpu\nd = cuda.to_device(a)\nn = int(d.copy_to_host().sum())")  # CUDA used
    from lan2gpu_magic.dask_backend import DaskCluster

    with DaskCluster(cluster.address) as c:
        loaded = c.dask.run(lambda: sorted(m for m in sys.modules if m.startswith("numba")))
    assert len(loaded) == 2 and all(mods == [] for mods in loaded.values()), loaded


def test_status_events_come_with_cells_not_with_time(kernel: Kernel, cluster: Cluster) -> None:
    from lan2gpu_magic.dask_backend import DaskCluster

    with DaskCluster(cluster.address) as c:
        wait_until(lambda: len([r for r in c.rows() if r.view]) == 2, 60, "both workers")
        idle = c.status_events
        time.sleep(3)  # nothing runs: the plugins have nothing to say
        assert c.status_events - idle <= 1
        before = c.status_events
        c.run("import time\ntime.sleep(1.5)\nx = 1", {}, session="events")
        # The executor and the cell starting and ending: a handful, from one worker.
        wait_until(lambda: c.status_events > before, 10, "the cell's status events")
        assert 1 <= c.status_events - before <= 8


def test_a_cell_cancelled_while_dask_queues_it_never_runs(kernel: Kernel, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ok(
        kernel,
        "%%lan2gpu --async blocker --worker dask-worker-0\nimport time\ntime.sleep(5)\nz = 1",
    )
    # Queued by Dask behind the blocker (one thread per worker), then Ctrl-C.
    run = kernel.run(
        f"%%lan2gpu --worker dask-worker-0\nopen({str(marker)!r}, 'w').close()",
        interrupt_after=1.5,
    )
    error = run.error()
    assert error is not None and error["ename"] == "KeyboardInterrupt"
    ok(kernel, "%lan2gpu wait blocker")
    ok(kernel, "%%lan2gpu --worker dask-worker-0\nafter = 1")  # ran after the blocker
    assert not marker.exists()
