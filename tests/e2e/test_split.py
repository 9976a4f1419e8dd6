"""``--split``: one cell over three workers on 127.0.0.1, in a real kernel."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import WorkerFactory, WorkerProcess
from .kernel_driver import Kernel, kernel_with, ok, value


@pytest.fixture
def trio(worker_factory: WorkerFactory) -> list[WorkerProcess]:
    return [worker_factory(f"w{i}") for i in (1, 2, 3)]


@pytest.fixture
def kernel(trio: list[WorkerProcess]) -> Iterator[Kernel]:
    with kernel_with(trio) as k:
        yield k


CELL = """\
out = x * y + 1
total = float((x * y).sum())
lo = x.min()
hi = y.max()
import os
where = (lan2gpu_rank, lan2gpu_size, len(x), os.getppid())
print("rows", len(x))
"""


def test_split_results_equal_the_single_worker_result(kernel: Kernel, trio) -> None:
    ok(kernel, "import numpy as np\nx = np.arange(10.0)\ny = np.arange(10.0) * 3 - 7")
    ok(kernel, "lan2gpu_rank, lan2gpu_size = 0, 1  # what one chunk of one sees\n")
    ok(kernel, "%%lan2gpu\n" + CELL)
    ok(kernel, "ref = (out.copy(), total, lo, hi)\ndel out, total, lo, hi")

    run = kernel.run("%%lan2gpu --split x,y --workers 3 --gather total:sum,lo:min,hi:max\n" + CELL)
    assert run.reply["status"] == "ok", run.error()
    assert value(kernel, "np.array_equal(out, ref[0]) and (total, lo, hi) == ref[1:]") == "True"
    # Uneven chunks (4, 3, 3 rows), each on its own worker, ranks in order.
    where = eval(value(kernel, "[w[:3] for w in where]"))  # noqa: S307 - our own repr
    assert where == [(0, 3, 4), (1, 3, 3), (2, 3, 3)]
    hosts = eval(value(kernel, "sorted(w[3] for w in where)"))  # noqa: S307
    assert hosts == sorted(w.pid for w in trio)
    assert sorted(run.stream().splitlines()) == ["[0] rows 4", "[1] rows 3", "[2] rows 3"]
    assert run.progress()[-1] == "lan2gpu: 3/3 chunks done on 3 slot(s)"

    # Another axis, and concat chosen by default for arrays as long as their chunk.
    ok(kernel, "m = np.arange(24.0).reshape(4, 6)\nm_id = id(m)")
    ok(kernel, "%%lan2gpu --split m:1\ntwice = m * 2\nwidth = m.shape[1]")
    assert value(kernel, "np.array_equal(twice, m * 2), width") == "(True, [2, 2, 2])"
    # Its chunks (strided views) came back as unchanged: `m` is the notebook's own still.
    assert value(kernel, "id(m) == m_id") == "True"

    # More workers than rows: two chunks, the same answer.
    ok(kernel, "z = np.arange(2.0)")
    ok(kernel, "%%lan2gpu --split z --workers all\nzz = z + 1\nn = lan2gpu_size")
    assert value(kernel, "zz.tolist(), n") == "([1.0, 2.0], [2, 2])"

    # Bad requests say what to do, and run nothing.
    bad = kernel.run("%%lan2gpu --split nope\nq = 1")
    assert "no variable of that name" in bad.error()["evalue"]
    bad = kernel.run("%%lan2gpu --gather q:avg --split z\nq = 1")
    assert "RULE one of concat, sum, min, max, list" in bad.error()["evalue"]
    bad = kernel.run("%%lan2gpu --workers all\nq = 1")  # a UsageError: on stderr
    assert bad.reply["status"] == "error" and "go with --split" in bad.stream("stderr")
    bad = kernel.run("%%lan2gpu --split m:2\nq = 1")
    assert "the array has 2 dimension(s)" in bad.error()["evalue"]
    assert bad.progress() == []  # no status line left behind by a cell that never started


def test_axes_of_their_own_rank_in_helpers_and_globals_of_functions(kernel: Kernel) -> None:
    ok(kernel, "import numpy as np\na = np.arange(8.0)\nm = np.arange(24.0).reshape(3, 8)")
    ok(kernel, "ids = (id(a), id(m))")
    # Notebook functions: one reads the chunk's rank, one assigns a global.
    ok(
        kernel,
        "def who():\n    return lan2gpu_rank\n\ndef note():\n    global noted\n    noted = 10 * who()",
    )
    run = kernel.run(
        "%%lan2gpu --split a,m:1 --workers 2 --gather mm:concat\n"
        "aa = a + 1\nmm = m * 1\nm2 = m * 2\nr = who()\nnote()"
    )
    assert run.reply["status"] == "ok", run.error()
    # a is cut along axis 0, m along axis 1: each output joins along the axis it fits.
    assert value(kernel, "np.array_equal(aa, a + 1), np.array_equal(mm, m), mm.shape") == (
        "(True, True, (3, 8))"
    )
    assert value(kernel, "np.array_equal(m2, m * 2)") == "True"  # the default rule too
    assert value(kernel, "r, noted") == "([0, 1], [0, 10])"
    assert value(kernel, "(id(a), id(m)) == ids") == "True"  # inputs left alone


def test_balance_gives_a_faster_slot_more_rows(kernel: Kernel, trio) -> None:
    # w1 is slow for these cells (it sleeps 0.2 s a row, the others 0.01 s).
    cell = (
        "%%lan2gpu --split v {}\n"
        "import os, time\n"
        "time.sleep(len(v) * (0.2 if os.getppid() == SLOW else 0.01))\n"
        "w = v + 0\n"
        "rows = (os.getppid() == SLOW, len(v))"
    )
    ok(kernel, f"import numpy as np\nv = np.arange(30.0)\nSLOW = {trio[0].pid}")
    ok(kernel, cell.format(""))
    assert value(kernel, "sorted(rows)") == "[(False, 10), (False, 10), (True, 10)]"
    ok(kernel, cell.format("--balance"))
    rows = dict(eval(value(kernel, "[r[::-1] for r in rows]")))  # noqa: S307
    assert value(kernel, "np.array_equal(w, v)") == "True"
    slow = [n for n, is_slow in rows.items() if is_slow]
    assert value(kernel, "sum(n for _, n in rows)") == "30"
    assert slow and slow[0] <= 3  # measured: the slow slot gets only a few rows


def test_a_chunk_whose_worker_dies_is_retried_elsewhere(
    kernel: Kernel, trio: list[WorkerProcess], tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    ok(kernel, f"import numpy as np\nx = np.arange(9.0)\nMARKS = {str(marks)!r}")
    cell = (
        "%%lan2gpu --split x --workers 3\n"
        "import os, time\n"
        "mark = os.path.join(MARKS, str(lan2gpu_rank))\n"
        "first = not os.path.exists(mark)\n"
        "open(mark, 'a').write(f'{os.getppid()}\\n')\n"
        "if lan2gpu_rank == 1 and first:\n"
        "    time.sleep(60)  # killed meanwhile, with its worker\n"
        "sq = x ** 2"
    )
    killed: list[int] = []

    def kill_the_worker_of_chunk_1() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = (marks / "1").read_text() if (marks / "1").exists() else ""
            if text.strip():
                killed.append(int(text.split()[0]))
                os.kill(killed[0], signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_worker_of_chunk_1)
    killer.start()
    run = kernel.run(cell, timeout=180)
    killer.join()
    assert run.reply["status"] == "ok", run.error()
    assert value(kernel, "sq.tolist() == (x ** 2).tolist()") == "True"
    tries = (marks / "1").read_text().split()
    assert len(tries) == 2 and int(tries[1]) != killed[0]  # retried on another worker
    assert "1 retried" in run.progress()[-1]


def test_interrupting_a_split_cell_stops_every_chunk(kernel: Kernel, trio) -> None:
    ok(kernel, "import numpy as np\nx = np.arange(6.0)")
    run = kernel.run(
        "%%lan2gpu --split x:-1\nimport time\nn = len(x)\ntime.sleep(120)\nnever = 1",
        timeout=60,
        interrupt_after=3,
    )
    error = run.error()
    assert error["ename"] == "KeyboardInterrupt" and len(error["traceback"]) <= 3
    last = run.progress()[-1]
    assert last.startswith("lan2gpu: cancelled after ") and "0/3 chunks had finished" in last
    assert "nothing was assigned, the sessions are intact" in last
    assert value(kernel, "'never' in globals()") == "False"
    # The workers are free again at once: a split cell over all three runs now.
    ok(kernel, "%%lan2gpu --split x --workers 3\ny = -x", timeout=60)
    assert value(kernel, "y.tolist()") == "[-0.0, -1.0, -2.0, -3.0, -4.0, -5.0]"


def test_a_chunk_failing_twice_raises_naming_it_with_every_error(kernel: Kernel) -> None:
    ok(kernel, "import numpy as np\nx = np.arange(6.0)")
    run = kernel.run(
        "%%lan2gpu --split x --workers 3\n"
        "if lan2gpu_rank == 2:\n    raise ValueError(f'bad rows {x.tolist()}')\nnever = 1"
    )
    error = run.error()
    assert error is not None and error["ename"] == "SplitError"
    assert "chunk 2 of 3 (rows 4:6) failed on w" in error["evalue"]
    assert "then w" in error["evalue"]  # tried twice, on two slots
    assert "ValueError: bad rows [4.0, 5.0]" in error["evalue"]
    detail = value(
        kernel,
        "type(_ex := __import__('sys').last_value).__name__, _ex.chunk, "
        "[type(e).__name__ for e in _ex.errors.exceptions]",
    )
    assert detail == "('SplitError', 2, ['RemoteExecutionError'])"
    assert value(kernel, "'never' in globals()") == "False"  # nothing assigned
