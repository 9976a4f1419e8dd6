"""What only a real NVIDIA GPU can check. Run on a GPU host with LAN2GPU_TEST_GPU=1;
skipped elsewhere. The worker runs without --simulate."""

from __future__ import annotations

import numpy as np
import pytest

from lan2gpu_magic import connect
from lan2gpu_magic.placement import Requirements
from lan2gpu_magic.pool import WorkerPool

pytestmark = pytest.mark.gpu

KERNELS = """
from numba import cuda

@cuda.jit
def saxpy(a, x, y, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]
"""


@pytest.fixture
def gpu_worker(worker_factory):
    return worker_factory("real-gpu", simulate=False)


def test_real_gpu_is_probed_with_live_numbers(gpu_worker):
    with connect(gpu_worker.address, key_file=gpu_worker.key_file) as c:
        status = c.status()
    caps = status["capabilities"]
    assert caps["simulator"] is False and caps["gpus"]
    gpu = caps["gpus"][0]
    assert gpu["compute_capability"][0] >= 3 and gpu["memory_total"] > 2**30
    assert caps["nvml"] is True and gpu["utilization"] is not None


def test_kernels_from_a_gpu_less_notebook_compile_once_on_the_gpu(gpu_worker):
    ns: dict = {"__name__": "__main__"}
    exec(KERNELS, ns)  # noqa: S102
    x = np.arange(1 << 20, dtype=np.float32)
    ns.update(x=x, y=np.ones_like(x), np=np)
    cell = "out = np.empty_like(x)\nsaxpy[(x.size + 255) // 256, 256](2.0, x, y, out)\nn = len(saxpy.overloads)"
    with connect(gpu_worker.address, key_file=gpu_worker.key_file) as c:
        c.run(cell, ns)
        c.run(cell, ns)
    assert np.allclose(ns["out"], 2 * x + 1)
    assert ns["n"] == 1  # compiled once, reused by the second cell


def test_placement_by_gpu_name_memory_and_cc(gpu_worker):
    pool = WorkerPool(
        addresses=[gpu_worker.address], key_file=str(gpu_worker.key_file), discovery=False
    )
    try:
        rows = pool.rows()
        gpu = rows[0].view.gpus[0]  # type: ignore[union-attr]
        _, placement = pool.choose(
            Requirements(
                gpu=gpu.name.split()[-1], min_memory=1 << 30, min_cc=gpu.compute_capability
            )
        )
        assert placement.gpus[0].index == gpu.index and not placement.worker.simulator
    finally:
        pool.close()


def test_device_arrays_come_back_as_host_arrays(gpu_worker):
    with connect(gpu_worker.address, key_file=gpu_worker.key_file) as c:
        ns: dict = {}
        c.run("from numba import cuda\nimport numpy as np\nd = cuda.to_device(np.arange(4))", ns)
    assert type(ns["d"]) is np.ndarray and ns["d"].tolist() == [0, 1, 2, 3]
