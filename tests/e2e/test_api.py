"""The Python API against a real ``python -m worker_kernel --simulate`` process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from numba import cuda, njit
from numba.cuda.random import xoroshiro128p_uniform_float32

from lan2gpu_magic import Client, OutputHandlers, RemoteExecutionError, SerializationError, connect

# Kernels "defined in a notebook": in __main__ (so they travel by value), in this
# process, which (like a laptop) has no GPU and no simulator.
NOTEBOOK_CELL = """
from numba import cuda, njit
from numba.cuda.random import xoroshiro128p_uniform_float32

@cuda.jit(device=True)
def scale(x, k):
    return x * k

@cuda.jit
def kern(a, out, k):
    i = cuda.grid(1)
    if i < a.size:
        out[i] = scale(a[i], k)

@njit
def add1(x):
    return x + 1
"""
NOTEBOOK: dict = {"__name__": "__main__"}
exec(NOTEBOOK_CELL, NOTEBOOK)  # noqa: S102
kern, add1 = NOTEBOOK["kern"], NOTEBOOK["add1"]


class Recorder(OutputHandlers):
    """Keeps live output with arrival times."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, object]] = []
        super().__init__(
            stream=lambda name, text: self.events.append((time.monotonic(), name, text)),
            display=lambda data, md: self.events.append((time.monotonic(), "display", data)),
            status=lambda kind, content: self.events.append((time.monotonic(), kind, content)),
        )

    def text(self, name: str = "stdout") -> str:
        return "".join(str(e[2]) for e in self.events if e[1] == name)


ISSUE_CELL = """
d_a = cuda.to_device(a)
d_out = cuda.device_array_like(a)
kern[4, 64](d_a, d_out, 3.0)
out = d_out.copy_to_host()
print("sum on the worker:", out.sum())
"""


def test_kernels_from_a_gpu_less_process_run_and_arrays_come_back(client: Client):
    a = np.arange(256, dtype=np.float32)
    ns = {"a": a, "cuda": cuda, "kern": kern}
    rec = Recorder()
    result = client.run(ISSUE_CELL, ns, handlers=rec)
    assert rec.text() == "sum on the worker: 97920.0\n"
    assert np.array_equal(ns["out"], a * 3)
    assert type(ns["d_out"]) is np.ndarray and np.array_equal(ns["d_out"], a * 3)
    assert type(ns["d_a"]) is np.ndarray and np.array_equal(ns["d_a"], a)
    assert result.worker == "shared"
    assert result.stats["bytes_in"] > a.nbytes


def test_a_kernel_filling_a_host_array_fills_it_here(client: Client):
    # numba copies host arrays passed to a kernel back into them; so does lan2gpu.
    a = np.arange(256, dtype=np.float32)
    out = np.zeros_like(a)
    ns = {"a": a, "out": out, "kern": kern}
    client.run("kern[4, 64](a, out, 2.0)", ns)
    assert np.array_equal(ns["out"], 2 * a)


def test_bindings_before_an_error_are_kept(client: Client):
    ns: dict = {}
    with pytest.raises(RemoteExecutionError, match="ZeroDivisionError"):
        client.run("before = 'kept'\n1 / 0\nafter = 'never'", ns)
    assert ns == {"before": "kept"}


def test_output_streams_while_the_cell_runs(client: Client):
    rec = Recorder()
    client.run(
        "import time\nprint('before', flush=False)\ntime.sleep(2)\nprint('after')", {}, handlers=rec
    )
    done = time.monotonic()
    first = next(t for t, name, text in rec.events if name == "stdout" and "before" in str(text))
    assert done - first > 1.5, "the first line arrived only when the cell ended"
    assert rec.text() == "before\nafter\n"


def test_started_is_told_before_output_and_only_to_cells_that_last(client: Client):
    seen: list[str] = []
    handlers = OutputHandlers(
        stream=lambda name, text: seen.append(f"{name}:{text.strip()}"),
        status=lambda kind, content: seen.append(kind),
    )
    client.run("print('hi')\nimport time\ntime.sleep(0.2)", {}, handlers=handlers)
    assert seen[:2] == ["started", "stdout:hi"]  # before its first output
    seen.clear()
    client.run("import time\ntime.sleep(0.3)", {}, handlers=handlers)
    assert seen == ["started"]  # silent, but it outlasted the moment
    told = []
    for _ in range(5):  # a loaded machine may make one of them outlast the moment
        seen.clear()
        client.run("x = 1", {}, handlers=handlers)
        told.append("started" in seen)
    assert not all(told)  # done at once: its result is all there is to say


def test_last_expression_value_and_display(client: Client):
    rec = Recorder()
    code = "class H:\n    def _repr_html_(self):\n        return '<i>x</i>'\ndisplay(H())\n6 * 7"
    result = client.run(code, {}, handlers=rec)
    assert result.has_value and result.value == 42
    shown = [e[2] for e in rec.events if e[1] == "display"]
    assert shown and shown[0]["text/html"] == "<i>x</i>"  # type: ignore[index]


def test_ipython_display_and_notebook_helpers_reach_the_notebook(client: Client):
    rec = Recorder()
    ns: dict = {"__name__": "__main__"}
    exec("def show(x):\n    display(x)", ns)  # noqa: S102 - a helper "defined in the notebook"
    code = "from IPython.display import HTML, display as d\nd(HTML('<b>1</b>'))\nshow(HTML('<b>2</b>'))"
    client.run(code, {"show": ns["show"]}, handlers=rec)
    shown = [e[2]["text/html"] for e in rec.events if e[1] == "display"]  # type: ignore[index]
    assert shown == ["<b>1</b>", "<b>2</b>"]


def test_session_keeps_state_that_cannot_travel(client: Client, capsys):
    ns: dict = {}
    client.run("import threading\nlock = threading.Lock()\nn = 1", ns)
    assert "lock" not in ns and ns["n"] == 1
    assert "`lock` stays on the worker" in capsys.readouterr().out  # news, not an error
    client.run("got = lock.acquire(blocking=False)", ns)
    assert ns["got"] is True


def test_named_sessions_are_shared_by_name_and_isolated_otherwise(shared_worker):
    with (
        connect(shared_worker.address, key_file=shared_worker.key_file) as one,
        connect(shared_worker.address, key_file=shared_worker.key_file) as two,
    ):
        one.run("secret = 41", {}, session="team")
        ns: dict = {}
        two.run("seen = secret + 1", ns, session="team")
        assert ns["seen"] == 42
        with pytest.raises(RemoteExecutionError, match="NameError"):
            two.run("seen = secret", {}, session="other")


def test_unchanged_kernels_are_not_rebuilt_between_cells(client: Client):
    ns = {"add1": add1, "kern": kern, "np": np}
    cell = "ids = (id(add1), id(kern))\nn = add1(1)\nnover = len(add1.overloads)"
    client.run(cell, ns)
    first = ns["ids"]
    client.run(cell, ns)
    assert ns["ids"] == first  # same dispatcher objects: nothing recompiled
    assert ns["nover"] == 1 and ns["n"] == 2

    changed: dict = {"__name__": "__main__", "njit": njit}
    exec("@njit\ndef add1(x):\n    return x + 2", changed)  # noqa: S102
    ns["add1"] = changed["add1"]
    client.run(cell, ns)
    assert ns["ids"][0] != first[0] and ns["n"] == 3


def test_numba_library_device_functions_are_the_workers_own(client: Client):
    # numba.cuda.random differs between the simulator and a GPU: by reference, the
    # worker uses its own version instead of the notebook's.
    ns: dict = {"__name__": "__main__", "cuda": cuda, "uniform": xoroshiro128p_uniform_float32}
    exec(  # noqa: S102
        "@cuda.jit\n"
        "def pi_kernel(states, n, out):\n"
        "    t = cuda.grid(1)\n"
        "    inside = 0\n"
        "    for _ in range(n):\n"
        "        x = uniform(states, t)\n"
        "        y = uniform(states, t)\n"
        "        if x * x + y * y <= 1.0:\n"
        "            inside += 1\n"
        "    out[t] = 4.0 * inside / n\n",
        ns,
    )
    code = (
        "from numba.cuda.random import create_xoroshiro128p_states\n"
        "states = create_xoroshiro128p_states(32, seed=7)\n"
        "out = np.zeros(32, dtype=np.float32)\n"
        "pi_kernel[1, 32](states, 200, out)\n"
        "estimate = float(out.mean())"
    )
    ns["np"] = np
    client.run(code, ns, outputs="estimate")
    assert abs(ns["estimate"] - 3.14159) < 0.3


def test_cuda_reduce_made_here_runs_there(client: Client):
    ns = {"total": cuda.reduce(lambda a, b: a + b), "np": np}
    client.run("s = total(np.arange(100, dtype=np.float64))", ns)
    assert ns["s"] == 4950


def test_kernel_defined_on_the_worker_comes_back_usable_here(client: Client):
    ns: dict = {}
    client.run("from numba import njit\n@njit\ndef sq(x):\n    return x * x", ns)
    assert ns["sq"](7) == 49


def test_remote_error_has_the_cells_lines_and_the_worker_keeps_serving(client: Client):
    code = "x = 1\ny = [1, 2][x]\nz = {}['missing']"
    with pytest.raises(RemoteExecutionError) as info:
        client.run(code, {})
    err = info.value
    assert err.ename == "KeyError" and err.worker == "shared"
    text = "\n".join(err._render_traceback_())
    assert "line 3" in text and "z = {}['missing']" in text
    assert client.run("ok = True", {}).outputs == {"ok": True}


def test_unpicklable_input_fails_before_sending(client: Client, tmp_path):
    with open(tmp_path / "f", "w") as fh, pytest.raises(SerializationError, match="input `fh`"):
        client.run("fh.write('x')", {"fh": fh})


def test_required_output_that_cannot_travel_is_a_serialization_error(client: Client):
    with pytest.raises(SerializationError, match="output `lock`") as info:
        client.run("import threading\nlock = threading.Lock()", {}, outputs="lock")
    assert info.value.name == "lock"


def test_open_files_stay_on_the_worker_and_are_never_read(client: Client, capsys):
    ns: dict = {}
    client.run("fh = open('/dev/zero', 'rb')\nn = 1", ns)  # reading it would never end
    assert ns == {"n": 1}
    assert "`fh` stays on the worker" in capsys.readouterr().out


def test_heartbeats_carry_live_load(client: Client):
    client.run("import time\ntime.sleep(1.5)", {})
    assert set(client.load) >= {"queues", "gpus", "load_average", "memory_available"}
    assert client.load["gpus"][0]["memory_free"] > 0


def test_service_answers_while_a_cell_is_busy(shared_worker):
    with (
        connect(shared_worker.address, key_file=shared_worker.key_file) as busy,
        connect(shared_worker.address, key_file=shared_worker.key_file) as other,
    ):
        runner = threading.Thread(target=busy.run, args=("import time\ntime.sleep(3)", {}))
        runner.start()
        try:
            time.sleep(0.5)
            rtts = [other.ping() for _ in range(5)]
            status = other.status()
        finally:
            runner.join(30)
        assert max(rtts) < 0.5
        assert [c["resources"] for c in status["running"]] == [["gpu0"]]


KERNEL_MODULE = """
from numba import cuda

@cuda.jit
def fill(out, value):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = value
"""


def test_kernels_from_a_user_module_travel_by_reference_or_by_value(worker_factory, tmp_path):
    import importlib
    import sys

    import cloudpickle

    (tmp_path / "mykernels_l2g.py").write_text(KERNEL_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        mykernels = importlib.import_module("mykernels_l2g")
        cell = "out = np.zeros(8, dtype=np.int32)\nfill[1, 8](out, 5)"
        with_module = worker_factory("has-module", env={"PYTHONPATH": str(tmp_path)})
        without = worker_factory("no-module")
        with connect(with_module.address, key_file=with_module.key_file) as c:
            ns = {"np": np, "fill": mykernels.fill}
            c.run(cell, ns)
            assert ns["out"].tolist() == [5] * 8
        with connect(without.address, key_file=without.key_file) as c:
            ns = {"np": np, "fill": mykernels.fill}
            with pytest.raises(RemoteExecutionError, match="fill: ModuleNotFoundError") as info:
                c.run(cell, ns)
            assert "register_pickle_by_value" in str(info.value)
            cloudpickle.register_pickle_by_value(mykernels)
            try:
                c.run(cell, ns)
            finally:
                cloudpickle.unregister_pickle_by_value(mykernels)
            assert ns["out"].tolist() == [5] * 8
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mykernels_l2g", None)
