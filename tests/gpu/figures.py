"""The real-GPU checks and figures, in one go (``bash tests/gpu/run.sh``).

Starts a real worker (no ``--simulate``) on 127.0.0.1 and, as a GPU-less
notebook would, sends it cells with ``Client.run``: the Numba CUDA documentation
examples the suite runs on the simulator (there at tiny sizes, here at the
documented ones) checked against numpy; an illegal memory access (a clear error,
the executor replaced, the next session on the same GPU); placement by GPU name,
compute capability and memory; CuPy and PyTorch results coming back as numpy;
and figures: compile time of a first launch against later ones, host<->device
bandwidth inside a cell, and a 512 MiB round trip against the same work run
locally. Writes ``figures.md`` (a markdown table) and prints a log.

``--simulate`` runs the same script against a simulator worker at tiny sizes:
a dry run of the script itself, on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lan2gpu_magic import NoWorkerAvailable, RemoteExecutionError, connect  # noqa: E402
from lan2gpu_magic.placement import Requirements  # noqa: E402
from lan2gpu_magic.pool import WorkerPool  # noqa: E402
from tests.conftest import start_worker  # noqa: E402
from tests.e2e.test_numba_docs import EXAMPLES  # noqa: E402
from worker_kernel.protocol.keys import generate_key_file  # noqa: E402

Rows = list[tuple[str, str, str]]  # (check, outcome, figure)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def check(rows: Rows, name: str, fn: Callable[[], str]) -> None:
    """Run one check; its figure, or the error, becomes a row."""
    print(f"--- {name}", flush=True)
    try:
        figure = fn()
        rows.append((name, "ok", figure))
    except Exception as exc:  # a row that says what broke, and the rest still runs
        traceback.print_exc()
        rows.append((name, "FAILED", f"{type(exc).__name__}: {str(exc)[:200]}"))
    print(f"    {rows[-1][1]}: {rows[-1][2]}", flush=True)


def doc_examples(c: Any) -> str:
    """The suite's documentation examples, cell by cell, as in a notebook."""
    passed = 0
    for name, example in EXAMPLES.items():
        ns: dict[str, Any] = {"__name__": "__main__"}
        exec("import numpy as np\nfrom numba import cuda\n" + example.define, ns)  # noqa: S102
        c.run(example.launch, ns, timeout=300)
        exec(example.check, ns)  # noqa: S102
        passed += 1
        print(f"    {name}: ok", flush=True)
    return f"{passed} of {len(EXAMPLES)} examples match numpy"


# The documentation's vector add and shared-memory matmul (as the suite runs them),
# with the documentation's 16x16 blocks, and a reduction.
DOCUMENTED = (
    "from numba import cuda\nimport numpy as np\n"
    + EXAMPLES["vector add (grid-stride loop)"].define
    + EXAMPLES["matrix multiply with shared memory"].define.replace("TPB = 4", "TPB = 16")
    + "\n@cuda.reduce\ndef sum_reduce(a, b):\n    return a + b\n"
)


def documented_sizes(c: Any, n: int, side: int, grid: str) -> str:
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(DOCUMENTED, ns)  # noqa: S102
    rng = np.random.default_rng(0)
    ns.update(
        x=rng.random(n, dtype=np.float32),
        y=rng.random(n, dtype=np.float32),
        A=rng.random((side, side), dtype=np.float32),
        B=rng.random((side, side), dtype=np.float32),
    )
    cell = (
        f"out = np.empty_like(x)\nadd_kernel[{grid}](x, y, out)\n"
        "C = np.zeros_like(A)\nblocks = (A.shape[0] + TPB - 1) // TPB\n"
        "fast_matmul[(blocks, blocks), (TPB, TPB)](A, B, C)\n"
        "total = sum_reduce(x)\n"
    )
    seconds, _ = timed(lambda: c.run(cell, ns, timeout=300))
    assert np.array_equal(ns["out"], ns["x"] + ns["y"])
    assert np.allclose(ns["C"], ns["A"] @ ns["B"], rtol=1e-3, atol=1e-3)
    assert np.isclose(ns["total"], ns["x"].sum(dtype=np.float64), rtol=1e-3)
    return f"vector add {n:,}, matmul {side}x{side}, reduce {n:,}: {seconds:.2f} s"


def compile_times(c: Any, n: int, grid: str) -> str:
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(DOCUMENTED, ns)  # noqa: S102
    ns.update(x=np.ones(n, dtype=np.float32), y=np.ones(n, dtype=np.float32))
    cell = (
        "import time\nd_x, d_y = cuda.to_device(x), cuda.to_device(y)\n"
        "d_out = cuda.device_array_like(d_x)\nt0 = time.perf_counter()\n"
        f"add_kernel[{grid}](d_x, d_y, d_out)\ncuda.synchronize()\n"
        "launch = time.perf_counter() - t0\n"
    )
    c.run(cell, ns, session="compile")
    first = ns["launch"]
    later = []
    for _ in range(5):
        c.run(cell, ns, session="compile")
        later.append(ns["launch"])
    c.close_session("compile")
    return f"first launch {first * 1e3:.1f} ms (compiles); later median {np.median(later) * 1e3:.2f} ms"


def bandwidth(c: Any, nbytes: int) -> str:
    ns: dict[str, Any] = {"nbytes": nbytes}
    cell = (
        "import time, numpy as np\nfrom numba import cuda\n"
        "h = np.ones(nbytes // 8)\nd = cuda.to_device(h)\ncuda.synchronize()\n"
        "t0 = time.perf_counter()\nd = cuda.to_device(h)\ncuda.synchronize()\n"
        "h2d = nbytes / (time.perf_counter() - t0)\n"
        "t0 = time.perf_counter()\nback = d.copy_to_host()\n"
        "d2h = nbytes / (time.perf_counter() - t0)\ndel h, d, back\n"
    )
    c.run(cell, ns, timeout=300)
    return f"{nbytes >> 20} MiB: host->device {ns['h2d'] / 1e9:.1f} GB/s, device->host {ns['d2h'] / 1e9:.1f} GB/s"


NEGATE = """
from numba import cuda

@cuda.jit
def negate(a, b):
    start = cuda.grid(1)
    for i in range(start, a.size, cuda.gridsize(1)):
        b[i] = -a[i]
"""


def round_trip(c: Any, nbytes: int, grid: str, local_gpu: bool) -> str:
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(NEGATE, ns)  # noqa: S102
    ns["a"] = np.random.default_rng(1).random(nbytes // 8)
    cell = f"import numpy as np\nb = np.empty_like(a)\nnegate[{grid}](a, b)"
    c.run(cell, ns, session="trip")  # compiled, executor warm
    remote = []
    for i in range(3):
        ns["a"][0] = i  # changed: sent again, not by reference
        seconds, _ = timed(lambda: c.run(cell, ns, session="trip"))
        remote.append(seconds)
        assert np.array_equal(ns["b"], -ns["a"])
    c.close_session("trip")
    through = f"{nbytes >> 20} MiB b = -a: through lan2gpu median {np.median(remote):.3f} s"
    if not local_gpu:
        return f"{through} (min {min(remote):.3f}); no local GPU to compare with"
    local_ns: dict[str, Any] = {"__name__": "__main__", "a": ns["a"]}
    exec(NEGATE, local_ns)  # noqa: S102
    exec(cell, local_ns)  # noqa: S102 - compile locally first
    local = [timed(lambda: exec(cell, local_ns))[0] for _ in range(3)]  # noqa: S102
    return (
        f"{nbytes >> 20} MiB b = -a: through lan2gpu median {np.median(remote):.3f} s "
        f"(min {min(remote):.3f}), the same cell locally {np.median(local):.3f} s"
    )


def illegal_access(c: Any) -> str:
    ns: dict[str, Any] = {}
    bad = (
        "from numba import cuda\nimport numpy as np\n"
        "@cuda.jit\ndef wild(a):\n    a[cuda.grid(1) * 100_000_000] = 1\n"
        "wild[64, 64](cuda.to_device(np.zeros(4)))\ncuda.synchronize()\n"
    )
    failure: RemoteExecutionError | None = None
    try:
        c.run(bad, ns, session="poisoned")
    except RemoteExecutionError as exc:
        failure = exc
    if failure is None:
        raise AssertionError("an illegal address did not fail the cell")
    if not failure.session_lost:
        raise AssertionError("the executor was not replaced after an illegal address")
    text = str(failure)
    after: dict[str, Any] = {}
    c.run(
        "from numba import cuda\nimport numpy as np\nx = cuda.to_device(np.arange(3)).copy_to_host()",
        after,
        session="next",
    )
    assert after["x"].tolist() == [0, 1, 2]
    return f"clear error ({text.splitlines()[0][:90]}); executor replaced; next session ran"


def placement(address: str, key: Path, simulate: bool) -> str:
    pool = WorkerPool(addresses=[address], key_file=str(key), discovery=False, embedded=False)
    try:
        row = pool.rows()[0]
        gpu = row.view.gpus[0]  # type: ignore[union-attr]
        shown = f"{gpu.name}, cc {gpu.compute_capability}, {gpu.memory_total / 2**30:.0f} GiB"
        if simulate:
            return f"skipped on the simulator ({shown})"
        for req in (
            Requirements(min_cc=(9, 0)),
            Requirements(gpu="H200"),
            Requirements(min_memory=100 << 30),
        ):
            pool.choose(req)
        try:
            pool.choose(Requirements(min_cc=(10, 0)))
        except NoWorkerAvailable as exc:
            refused = str(exc).splitlines()[0][:120]
        else:
            raise AssertionError("--min-cc 10.0 was placed on this GPU")
        return f"{shown}; utilization {gpu.utilization}; --min-cc 10.0 refused: {refused}"
    finally:
        pool.close()


def arrays_of_other_libraries(c: Any) -> str:
    ns: dict[str, Any] = {}
    cell = (
        "import cupy, torch\nfrom_cupy = cupy.arange(6, dtype=cupy.float32).reshape(2, 3)\n"
        "from_torch = torch.arange(6, dtype=torch.int16, device='cuda').reshape(3, 2)\n"
    )
    c.run(cell, ns)
    cp_out, torch_out = ns["from_cupy"], ns["from_torch"]
    assert type(cp_out) is np.ndarray and cp_out.dtype == np.float32 and cp_out.shape == (2, 3)
    assert type(torch_out) is np.ndarray and torch_out.dtype == np.int16
    assert torch_out.shape == (3, 2) and torch_out.ravel().tolist() == list(range(6))
    return "CuPy float32 (2, 3) and torch int16 (3, 2) came back as numpy arrays"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-figures"))
    parser.add_argument("--simulate", action="store_true", help="dry run on the simulator")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="lan2gpu-gpu-"))
    key = generate_key_file(tmp / "key")
    worker = start_worker(tmp, "gpu-box", key, simulate=args.simulate)
    small = args.simulate
    grid = "4, 32" if small else "1024, 256"  # the simulator runs ~10,000 threads a second
    rows: Rows = []
    try:
        with connect(worker.address, key_file=key) as c:
            caps = c.status()["capabilities"]
            print(caps, flush=True)
            check(rows, "placement and NVML", lambda: placement(worker.address, key, small))
            check(rows, "documentation examples", lambda: doc_examples(c))
            check(
                rows,
                "documented sizes",
                lambda: documented_sizes(
                    c, 1 << (12 if small else 24), 32 if small else 1024, grid
                ),
            )
            check(rows, "compile time", lambda: compile_times(c, 1 << (10 if small else 24), grid))
            check(rows, "bandwidth in a cell", lambda: bandwidth(c, 1 << (22 if small else 29)))
            check(
                rows,
                "512 MiB round trip",
                lambda: round_trip(c, 1 << (20 if small else 29), grid, not small),
            )
            if not small:
                check(rows, "illegal memory access", lambda: illegal_access(c))
                check(rows, "CuPy and PyTorch", lambda: arrays_of_other_libraries(c))
    finally:
        worker.stop()
        (args.out / "worker.log").write_text(worker.log())
    table = ["| check | outcome | figure |", "|---|---|---|"]
    table += [f"| {name} | {outcome} | {figure} |" for name, outcome, figure in rows]
    (args.out / "figures.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if all(outcome == "ok" for _, outcome, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
