"""Choosing workers and GPUs for real: several simulator workers on 127.0.0.1."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from lan2gpu_magic import connect
from lan2gpu_magic.client import OutputHandlers

from .kernel_driver import Kernel


@pytest.fixture
def fleet(worker_factory):
    """box-a: 3 simulated GPUs, serving only 0 and 2; box-b: one GPU."""
    a = worker_factory("box-a", "--simulated-gpus", "3", "--gpus", "0,2")
    b = worker_factory("box-b")
    return a, b


@pytest.fixture
def kernel(fleet) -> Iterator[Kernel]:
    a, b = fleet
    k = Kernel({"LAN2GPU_WORKERS": f"{a.address},{b.address}", "LAN2GPU_KEY_FILE": str(a.key_file)})
    try:
        assert k.run("%load_ext lan2gpu_magic").reply["status"] == "ok"
        yield k
    finally:
        k.shutdown()


def where(k: Kernel, options: str) -> str:
    run = k.run(f"%%lan2gpu {options}\nimport os\ngpus = os.environ['LAN2GPU_CELL_GPUS']")
    assert run.reply["status"] == "ok", run.error()
    return k.run("print(gpus)").stream().strip() + " @ " + run.progress()[-1]


def test_workers_table_lists_gpus_restrictions_and_unusable_workers(kernel, fleet, tmp_path):
    a, b = fleet
    wrong_key = tmp_path / "other-key"
    from worker_kernel.protocol.keys import generate_key_file

    generate_key_file(wrong_key)
    kernel.run(f"%config Lan2GPU.connect_timeout = 2\n%lan2gpu connect {b.address}")
    run = kernel.run("%lan2gpu workers")
    (table,) = run.results()
    text = table["text/plain"]
    assert "box-a" in text and "box-b" in text
    assert "0: CUDA simulator (cc 5.0)" in text and "2: CUDA simulator (cc 5.0)" in text
    assert "1: CUDA simulator" not in text  # --gpus 0,2 hides GPU 1
    assert "util n/a" in text  # no NVML on this machine: reported, not crashed
    assert "Python 3." in text and "numba" in text
    # Connecting with a key the worker will not take fails with the reason...
    bad = kernel.run(f"%lan2gpu connect {a.address} --key-file {wrong_key}")
    assert bad.error() is not None and bad.error()["ename"] == "AuthenticationError"
    # ...and leaves the pool as it was: box-a keeps its working connection.
    assert where(kernel, "--worker box-a").startswith("0 @ lan2gpu: ran on box-a GPU0")


def test_worker_gpu_and_count_choose_right_or_fail_with_a_listing(kernel):
    assert where(kernel, "--worker box-b").startswith("0 @ lan2gpu: ran on box-b GPU0")
    assert where(kernel, "--gpus 2").startswith("0,2 @ lan2gpu: ran on box-a GPU0")
    assert where(kernel, "--cpu").startswith(" @ lan2gpu: ran on box-")
    run = kernel.run("%%lan2gpu --gpu A100\nx = 1")
    error = run.error()
    assert error is not None and error["ename"] == "NoWorkerAvailable"
    assert "named like 'A100'" in error["evalue"]
    assert "box-a (tcp://127.0.0.1:" in error["evalue"] and "CUDA simulator x2" in error["evalue"]
    run = kernel.run("%%lan2gpu --min-memory 100T\nx = 1")
    assert run.error() is not None and "with 100 TiB free" in run.error()["evalue"]
    assert kernel.run("%%lan2gpu --gpus 3\nx = 1").error()["ename"] == "NoWorkerAvailable"


def test_cpu_cells_run_njit_code_without_a_gpu(fleet):
    a, _ = fleet
    with connect(a.address, key_file=a.key_file) as c:
        ns: dict = {}
        code = (
            "import os\nfrom numba import njit\n@njit\ndef tri(n):\n    return n * (n + 1) // 2\n"
            "t = tri(100)\nseen = os.environ['LAN2GPU_CELL_GPUS']"
        )
        c.run(code, ns, cpu=True)
        assert ns["t"] == 5050 and ns["seen"] == ""


class Events(OutputHandlers):
    def __init__(self) -> None:
        self.seen: list[tuple[float, str, dict]] = []
        super().__init__(
            stream=lambda *_: None,
            status=lambda kind, content: self.seen.append((time.monotonic(), kind, content)),
        )

    def positions(self) -> list[int]:
        return [c["position"] for _, k, c in self.seen if k == "queued"]


def test_waiting_clients_see_their_position_and_it_updates(worker_factory):
    worker = worker_factory("single")
    clients = [connect(worker.address, key_file=worker.key_file) for _ in range(3)]
    events = [Events() for _ in clients]
    try:
        threads = []
        for i, (client, ev) in enumerate(zip(clients, events, strict=True)):
            t = threading.Thread(
                target=client.run,
                args=("import time\ntime.sleep(1.5)", {}),
                kwargs={"handlers": ev},
            )
            t.start()
            threads.append(t)
            time.sleep(0.4 if i == 0 else 0.2)
        for t in threads:
            t.join(60)
    finally:
        for client in clients:
            client.close()
    assert events[1].positions() == [1]
    assert events[2].positions() == [2, 1]  # it moved up when the first cell finished
    starts = [next(t for t, k, _ in ev.seen if k == "started") for ev in events]
    assert starts == sorted(starts)


def test_sessions_alternate_on_a_single_gpu(worker_factory):
    worker = worker_factory("fair")
    record = "import time\nt0 = time.time()\ntime.sleep(0.6)\nt1 = time.time()"
    results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    lock = threading.Lock()

    def submit(session: str) -> None:
        with connect(worker.address, key_file=worker.key_file) as c:
            ns: dict = {}
            c.run(record, ns, session=session)
            with lock:
                results[session].append((ns["t0"], ns["t1"]))

    with connect(worker.address, key_file=worker.key_file) as warm:
        for session in "AB":  # start both sessions' executors first
            warm.run("pass", {}, session=session)
    threads = [threading.Thread(target=submit, args=("A",)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # A's three cells are queued (one running) before B's arrive
    threads += [threading.Thread(target=submit, args=("B",)) for _ in range(3)]
    for t in threads[3:]:
        t.start()
    for t in threads:
        t.join(60)
    timeline = sorted((t0, s) for s, runs in results.items() for t0, _ in runs)
    order = "".join(s for _, s in timeline)
    assert order == "ABABAB", order  # first come, first served would be AAABBB
    spans = sorted(span for runs in results.values() for span in runs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # one at a time
