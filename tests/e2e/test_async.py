"""``%%lan2gpu --async``: background cells in a real kernel, two workers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..conftest import WorkerFactory, WorkerProcess
from .kernel_driver import Kernel, kernel_with, ok, value


@pytest.fixture
def pair(worker_factory: WorkerFactory) -> list[WorkerProcess]:
    return [worker_factory("a1"), worker_factory("a2")]


@pytest.fixture
def kernel(pair: list[WorkerProcess]) -> Iterator[Kernel]:
    with kernel_with(pair) as k:
        yield k


SLOW = """\
import time
began = time.time()
print('working on', len(x))
time.sleep(4)
{out} = x * {factor}
ended = time.time()
"""


def test_two_background_cells_overlap_and_wait_assigns_their_outputs(kernel: Kernel) -> None:
    ok(kernel, "import numpy as np\nx = np.arange(5.0)")
    first = kernel.run("%%lan2gpu --async j1 --worker a1\n" + SLOW.format(out="y1", factor=2))
    assert first.reply["status"] == "ok", first.error()
    ok(kernel, "x = np.zeros(5)  # changed after j1 started: j1 must not see it")
    ok(kernel, "x = np.arange(5.0)")
    ok(kernel, "%%lan2gpu --async j2 --worker a2\n" + SLOW.format(out="y2", factor=3))
    # Both returned at once: the cells are still running, nothing is assigned yet.
    assert value(kernel, "j1.done(), j2.done(), 'y1' in globals()") == "(False, False, False)"
    assert "running on a1" in value(kernel, "repr(j1)") or "waiting for a1" in value(
        kernel, "repr(j1)"
    )
    assert "j1: " in ok(kernel, "%lan2gpu jobs") and "j2: " in ok(kernel, "%lan2gpu jobs")
    ok(kernel, "j1.wait(60); j2.wait(60)")
    assert value(kernel, "'y1' in globals(), 'y2' in globals()") == "(False, False)"

    run = kernel.run("%lan2gpu wait j1 j2")
    assert run.reply["status"] == "ok", run.error()
    assert run.stream().count("working on 5") == 2  # the buffered output, shown on wait
    assert value(kernel, "y1.tolist(), y2.tolist()") == (
        "([0.0, 2.0, 4.0, 6.0, 8.0], [0.0, 3.0, 6.0, 9.0, 12.0])"
    )
    # Overlap, by the workers' clocks: each started before the other ended.
    assert value(kernel, "j1.result()['began'] < j2.result()['ended']") == "True"
    assert value(kernel, "j2.result()['began'] < j1.result()['ended']") == "True"
    assert "no background cell" in ok(kernel, "%lan2gpu jobs") or ok(kernel, "%lan2gpu jobs") == ""


def test_a_finished_job_is_not_replaced_before_it_is_collected(kernel: Kernel) -> None:
    ok(kernel, "%%lan2gpu --async j\nz2 = 2")
    ok(kernel, "assert j.wait(60)")
    bad = kernel.run("%%lan2gpu --async j\nz3 = 3")
    assert bad.reply["status"] == "error"  # a UsageError: IPython prints it on stderr
    assert "never collected" in bad.stream("stderr")
    assert "%lan2gpu wait j" in bad.stream("stderr")
    ok(kernel, "%lan2gpu wait j")
    assert value(kernel, "z2") == "2"  # nothing was lost
    ok(kernel, "%%lan2gpu --async j\nz3 = 3")  # collected: the name is free again
    ok(kernel, "%lan2gpu wait j")
    assert value(kernel, "z3") == "3"


def test_cancel_stops_the_cell_and_the_worker_keeps_serving(kernel: Kernel) -> None:
    ok(kernel, "import numpy as np\nx = np.arange(3.0)")
    ok(kernel, "%%lan2gpu --async slow --worker a1\nimport time\ntime.sleep(120)\nnever = 1")
    ok(kernel, "import time\ntime.sleep(1)")
    assert value(kernel, "slow.cancel()") == "True"
    assert value(kernel, "slow.wait(30), slow.state") == "(True, 'cancelled')"
    waited = kernel.run("%lan2gpu wait slow")
    assert waited.error()["ename"] == "ExecutionCancelled"
    assert value(kernel, "'never' in globals(), slow.cancel()") == "(False, False)"
    ok(kernel, "%%lan2gpu --worker a1\nz = x + 1")  # same worker, next cell: fine
    assert value(kernel, "z.tolist()") == "[1.0, 2.0, 3.0]"


def test_a_failed_background_cell_raises_on_wait_and_split_runs_in_the_background(
    kernel: Kernel,
) -> None:
    ok(kernel, "import numpy as np\nx = np.arange(8.0)")
    ok(kernel, "%%lan2gpu --async bad\npartial = 1\nraise KeyError('nope')")
    ok(kernel, "%%lan2gpu --async good\nfine = 2")
    ok(kernel, "bad.wait(60); good.wait(60)")
    run = kernel.run("%lan2gpu wait bad good")
    assert run.error()["ename"] == "RemoteExecutionError" and "KeyError" in run.error()["evalue"]
    assert value(kernel, "partial") == "1"  # bound before the error: kept, as in IPython
    assert value(kernel, "fine") == "2"  # the job after the failed one was collected too

    ok(kernel, "%%lan2gpu --async spread --split x --gather s:sum\nhalf = x / 2\ns = x.sum()")
    ok(kernel, "%lan2gpu wait spread")
    assert value(kernel, "half.tolist() == (x / 2).tolist(), float(s)") == "(True, 28.0)"
    busy = kernel.run("%%lan2gpu --async spread --retry 1\nq = 1")
    assert "--retry does not combine with --async" in busy.stream("stderr")


def test_a_background_cells_signature_function_compiles_when_collected(kernel: Kernel) -> None:
    # As for a plain cell: compiled for its declared signature only, so 2.9 converts to 2.
    ok(kernel, "from numba import njit")
    ok(
        kernel,
        '%%lan2gpu --async sig --worker a1\nOFFSET = 5\n@njit("int64(int64)")\n'
        "def plus(x):\n    return x + OFFSET\n",
    )
    ok(kernel, "%lan2gpu wait sig")
    assert value(kernel, "plus(1), plus(2.9), len(plus.signatures)") == "(6, 7, 1)"
