"""``%%lan2gpu`` inside a real Jupyter kernel (ipykernel via jupyter_client)."""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..waiting import wait_until
from .kernel_driver import Kernel

DEFINE = """
from numba import cuda
import numpy as np

@cuda.jit(device=True)
def scale(x, k):
    return x * k

@cuda.jit
def kern(a, out, k):
    i = cuda.grid(1)
    if i < a.size:
        out[i] = scale(a[i], k)

a = np.arange(256, dtype=np.float32)
"""

ISSUE_CELL = """%%lan2gpu --timeout 60
d_a = cuda.to_device(a)
d_out = cuda.device_array_like(a)
kern[4, 64](d_a, d_out, 3.0)
out = d_out.copy_to_host()
print("sum on the worker:", out.sum())
"""


@pytest.fixture(scope="module")
def kernel(shared_worker) -> Iterator[Kernel]:
    k = Kernel()
    try:
        loaded = k.run("%load_ext lan2gpu_magic")
        assert loaded.reply["status"] == "ok", loaded.error()
        connected = k.run(
            f"%lan2gpu connect {shared_worker.address} --key-file {shared_worker.key_file}"
        )
        # News, not warnings: stdout (a frontend shows stderr on red, like an error).
        assert "connected to shared" in connected.stream()
        assert connected.stream("stderr") == ""
        assert k.run(DEFINE).reply["status"] == "ok"
        yield k
    finally:
        k.shutdown()


def test_the_issue_example_end_to_end(kernel):
    run = kernel.run(ISSUE_CELL)
    assert run.reply["status"] == "ok", run.error()
    assert run.stream() == "sum on the worker: 97920.0\n"
    check = kernel.run(
        "print(type(d_out).__name__, type(d_a).__name__, out.sum(), (out == 3 * a).all())"
    )
    assert check.stream() == "ndarray ndarray 97920.0 True\n"


def test_output_arrives_while_the_cell_runs(kernel):
    run = kernel.run("%%lan2gpu\nimport time\nprint('first')\ntime.sleep(2)\nprint('second')")
    assert run.reply["status"] == "ok", run.error()
    first = next(
        t for t, m in run.outputs if m["msg_type"] == "stream" and "first" in m["content"]["text"]
    )
    assert run.idle_at - first > 1.5


def test_last_expression_is_displayed_like_a_local_cell(kernel):
    run = kernel.run("%%lan2gpu\nn = 21\nn * 2")
    assert run.results() == [{"text/plain": "42"}]


def test_placement_line_says_where_and_is_updated_in_place(kernel):
    run = kernel.run("%%lan2gpu\nx = 1")
    lines = run.progress()
    assert lines[0].startswith("lan2gpu: running on shared GPU0 (CUDA simulator, ")
    assert lines[0].endswith("[simulator]")  # nothing ahead of it: no queue shown
    assert lines[-1].startswith("lan2gpu: ran on shared GPU0 (CUDA simulator, ")
    assert [m["msg_type"] for _, m in run.outputs][-1] == "update_display_data"


def test_remote_error_shows_the_cells_own_lines(kernel):
    run = kernel.run("%%lan2gpu\nx = 1\ny = {}['nope']\n")
    error = run.error()
    assert error is not None and error["ename"] == "RemoteExecutionError"
    text = "\n".join(error["traceback"])
    assert ", line 3" in text  # line 1 is the %%lan2gpu line
    assert "y = {}['nope']" in text and "KeyError" in text
    assert "lan2gpu_magic" not in text  # no frames from our internals
    # The status line says it raised, not that it "ran".
    (last,) = run.progress()[-1:]
    assert last.startswith("lan2gpu: raised KeyError on shared GPU0 ") and " after " in last
    assert kernel.run("%%lan2gpu\nz = 3").reply["status"] == "ok"


def test_a_value_that_stays_on_the_worker_is_news_not_an_error(kernel):
    run = kernel.run("%%lan2gpu\nimport threading\nlock = threading.Lock()\nn = 1")
    assert run.reply["status"] == "ok", run.error()
    assert "`lock` stays on the worker" in run.stream()
    assert run.stream("stderr") == ""


def test_interrupt_cancels_the_remote_cell_within_a_second_or_two(kernel):
    kernel.run("%%lan2gpu\nkept = 'yes'")
    t0 = time.monotonic()
    run = kernel.run("%%lan2gpu\nimport time\ntime.sleep(60)", interrupt_after=1.5)
    assert time.monotonic() - t0 < 6
    error = run.error()
    assert error is not None and error["ename"] == "KeyboardInterrupt"
    # As short as a local cell's: no traceback through lan2gpu's own code...
    text = "\n".join(error["traceback"])
    assert len(error["traceback"]) <= 3 and "magic.py" not in text and "client.py" not in text
    # ...and one line that says what became of the cell.
    last = run.progress()[-1]
    assert re.fullmatch(
        r"lan2gpu: cancelled on shared GPU0 .* after \d+\.\d s; the session is intact", last
    ), last
    after = kernel.run("%%lan2gpu\nprint(kept)")
    assert after.stream() == "yes\n"


def test_a_timeout_says_so_in_the_status_line(kernel):
    run = kernel.run("%%lan2gpu --timeout 1\nimport time\ntime.sleep(30)")
    error = run.error()
    assert error is not None and error["ename"] == "ExecutionTimeout"
    assert len(error["traceback"]) == 1
    last = run.progress()[-1]
    assert last.startswith("lan2gpu: stopped on shared GPU0 ") and "past its --timeout" in last
    assert "ran on" not in "".join(run.progress())


def test_help_is_shown_once_and_for_the_command_asked(kernel):
    top = kernel.run("%lan2gpu --help").stream()
    assert top.count("usage: %lan2gpu") == 1, top
    cell = kernel.run("%%lan2gpu --help\nx = 1").stream()
    assert cell.count("usage: %%lan2gpu") == 1, cell
    connect = kernel.run("%lan2gpu connect --help").stream()
    assert connect.count("usage:") == 1 and "usage: %lan2gpu connect" in connect
    assert "--timeout SECONDS" in connect and "Manage lan2gpu workers" not in connect


def test_syntax_error_points_at_the_line_the_user_sees(kernel):
    run = kernel.run("%%lan2gpu\nx = 1\ny = (\n")
    error = run.error()
    assert error is not None and error["ename"] == "CellSyntaxError"
    text = "\n".join(error["traceback"])
    assert "line 3" in text and "y = (" in text and "was never closed" in text
    assert "lan2gpu_magic" not in text


def test_status_and_workers_tables(kernel):
    table = kernel.run("%lan2gpu workers").results()
    assert len(table) == 1
    text, page = table[0]["text/plain"], table[0]["text/html"]
    assert "shared" in text and "CUDA simulator (cc 5.0)" in text and "ok (configured)" in text
    assert "<table" in page and "<td style='text-align:left'>shared</td>" in page
    status = kernel.run("%lan2gpu status").stream()
    assert "shared (tcp://127.0.0.1:" in status and "idle" in status


def test_unknown_option_is_a_usage_error(kernel):
    run = kernel.run("%%lan2gpu --gpuz 2\nx = 1")
    # IPython prints usage errors on stderr instead of a traceback.
    assert run.reply["status"] == "error"
    assert "UsageError: unrecognized arguments: --gpuz 2" in run.stream("stderr")
    assert "%%lan2gpu --help" in run.stream("stderr")


def test_unreachable_worker_is_one_clear_paragraph(kernel, shared_worker):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    run = kernel.run(
        "%config Lan2GPU.connect_timeout = 1\n"
        f"%lan2gpu connect tcp://127.0.0.1:{port} --key-file {shared_worker.key_file}"
    )
    assert time.monotonic() - t0 < 5
    kernel.run("%config Lan2GPU.connect_timeout = 10")
    error = run.error()
    assert error is not None and error["ename"] == "WorkerUnreachable"
    assert len(error["traceback"]) == 1
    assert "is it running" in error["traceback"][0]


def test_missing_key_file_says_how_to_make_one(kernel, tmp_path):
    run = kernel.run(f"%lan2gpu connect tcp://127.0.0.1:1 --key-file {tmp_path}/nokey")
    error = run.error()
    assert error is not None and error["ename"] == "ConfigurationError"
    assert "python -m worker_kernel keygen" in error["evalue"]


def test_worker_gone_mid_cell_is_a_clear_error(worker_factory):
    worker = worker_factory("gone")
    k = Kernel({"LAN2GPU_WORKERS": worker.address, "LAN2GPU_KEY_FILE": str(worker.key_file)})
    try:
        k.run("%load_ext lan2gpu_magic")
        assert k.run("%%lan2gpu\nx = 1").reply["status"] == "ok"
        # Stop the worker while the cell sleeps: the kernel hears no heartbeat.
        import threading

        threading.Timer(1.0, worker.process.kill).start()
        run = k.run("%%lan2gpu\nimport time\ntime.sleep(60)", timeout=60)
        error = run.error()
        assert error is not None and error["ename"] == "WorkerLost"
        assert len(error["traceback"]) == 1 and "stopped answering" in error["evalue"]
    finally:
        k.shutdown()


def _workers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker_kernel" in argv and str(pid).encode() in argv and b"--parent-pid" in argv:
            found.append(int(entry.name))
    return found


def test_embedded_worker_starts_on_demand_and_stops_with_the_kernel():
    k = Kernel()
    try:
        assert k.run("%load_ext lan2gpu_magic").reply["status"] == "ok"
        run = k.run("%%lan2gpu\nimport os\nwhere = os.getpid()", timeout=180)
        assert run.reply["status"] == "ok", run.error()
        assert "started a local worker on tcp://127.0.0.1:" in run.stream()
        assert run.stream("stderr") == ""  # news, not a warning: stdout
        assert _workers_of(k.pid), "no embedded worker process found"
        kernel_pid = k.pid
    finally:
        k.shutdown()
    wait_until(lambda: not _workers_of(kernel_pid), 20, "the embedded worker to stop")
    assert not os.path.exists(f"/proc/{kernel_pid}")
    # Its folder (a throwaway key, the worker's log) went with it.
    assert not list(Path(tempfile.gettempdir()).glob(f"lan2gpu-embedded-{kernel_pid}-*"))


def test_embedded_workers_folder_goes_even_when_the_kernel_is_killed():
    k = Kernel()
    try:
        assert k.run("%load_ext lan2gpu_magic").reply["status"] == "ok"
        assert k.run("%%lan2gpu\nx = 1", timeout=180).reply["status"] == "ok"
        kernel_pid = k.pid
        folders = list(Path(tempfile.gettempdir()).glob(f"lan2gpu-embedded-{kernel_pid}-*"))
        assert len(folders) == 1 and (folders[0] / "worker.log").exists()
        os.kill(kernel_pid, signal.SIGKILL)  # no exit handler runs in the kernel
        # The worker sees its parent go and cleans up; it removes its folder last, on its
        # way out.
        wait_until(lambda: not folders[0].exists(), 30, "the embedded worker's folder to go")
        wait_until(lambda: not _workers_of(kernel_pid), 30, "the embedded worker to stop")
    finally:
        k.kc.stop_channels()
        k.km.shutdown_kernel(now=True)  # reaps the killed process
        k.km.cleanup_resources()
