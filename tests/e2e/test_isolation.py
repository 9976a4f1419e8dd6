"""One client's slow request does not stall another's cells; what a cell started
goes with its executor; a cell the executor cannot finish is answered, and its
session goes on; a cell sent along with the close of its session still runs."""

from __future__ import annotations

import os
import secrets
import threading
import time

import pytest

from lan2gpu_magic import ExecutionTimeout, RemoteExecutionError, connect
from worker_kernel.protocol import messages as m

from ..conftest import process_gone
from ..waiting import wait_until

pytestmark = pytest.mark.faults

# Put first on the worker's PYTHONPATH: its hosted kernels start this way.
SLOW_KERNEL_LAUNCHER = """\
import os, runpy, sys, time
time.sleep(6)  # a kernel that takes long to start (cold imports on a busy host)
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
"""


def test_a_slow_kernel_start_does_not_stall_other_clients_cells(worker_factory, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ipykernel_launcher.py").write_text(SLOW_KERNEL_LAUNCHER)
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    worker = worker_factory("slow-kernels", env={"PYTHONPATH": path})
    started: dict[str, str] = {}

    def start_a_kernel() -> None:
        with connect(worker.address, key_file=worker.key_file) as other:
            time.sleep(1)  # while the cell below runs
            kernel = other.start_kernel(secrets.token_hex(16))
            started["kernel"] = kernel
            other.stop_kernel(kernel)

    with connect(worker.address, key_file=worker.key_file) as client:
        client.run("pass", {})
        thread = threading.Thread(target=start_a_kernel)
        thread.start()
        ns: dict = {}
        # Its heartbeats must be read while the kernel starts, or the worker takes
        # this client for gone and cancels the cell.
        client.run("import time\ntime.sleep(9)\nx = 1", ns, timeout=60)
        thread.join(60)
    assert ns["x"] == 1 and "kernel" in started


def test_processes_a_cell_started_go_when_its_executor_is_killed(client, tmp_path):
    pid_file = tmp_path / "child.pid"
    stubborn = (
        "import subprocess, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(10)\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    with pytest.raises(ExecutionTimeout) as info:
        client.run(stubborn, {}, timeout=1)
    assert info.value.session_lost  # the executor had to be killed
    pid = int(pid_file.read_text())
    wait_until(
        lambda: process_gone(pid), 15, f"the cell's `sleep` (pid {pid}) to end with its executor"
    )


DETACH = """\
import os, subprocess
open("{pids}/executor", "w").write(str(os.getpid()))
# In a session of its own (no longer in the executor's process group)...
apart = subprocess.Popen(["setsid", "sleep", "300"])
# ...and a daemon: its parent exits at once, it calls setsid.
subprocess.run(["sh", "-c", "setsid sleep 301 & echo $! > {pids}/daemon"], check=True)
open("{pids}/apart", "w").write(str(apart.pid))
"""


def _detached(code_dir) -> list[int]:
    def pids() -> list[int]:
        try:
            return [int((code_dir / n).read_text()) for n in ("apart", "daemon")]
        except (FileNotFoundError, ValueError):
            return []

    return wait_until(pids, 10, "the cell to write its pids", every=0.05)


def _reaped(pid: int) -> bool:
    """Gone and reaped: not even a zombie is left."""
    return not os.path.exists(f"/proc/{pid}")


def _all_gone(pids: list[int], within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while not all(map(_reaped, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return all(map(_reaped, pids))


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_processes_a_cell_detached_live_with_its_session_and_end_with_it(client, tmp_path):
    (tmp_path / "other").mkdir()
    client.run(DETACH.format(pids=tmp_path), {}, session="detached")
    pids = _detached(tmp_path)
    executor = int((tmp_path / "executor").read_text())
    # The daemon's parent exited at once: it was re-parented to the executor, not init.
    assert _parent(pids[1]) == executor
    # Another session's executor ending (its orphans are stopped) spares this one's.
    client.run(DETACH.format(pids=tmp_path / "other"), {}, session="other")
    others = _detached(tmp_path / "other")
    assert client.close_session("other") == 1
    assert _all_gone(others)
    time.sleep(1)
    assert not any(map(process_gone, pids))  # a server the session started keeps running
    assert client.close_session("detached") == 1
    assert _all_gone(pids), f"processes {pids} outlived their session's executor"
    client.run("x = 1", {})  # the worker serves on


def test_detached_processes_end_when_the_executor_is_killed(client, tmp_path):
    stubborn = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass\n"
    with pytest.raises(ExecutionTimeout) as info:
        client.run(DETACH.format(pids=tmp_path) + stubborn, {}, timeout=2)
    assert info.value.session_lost  # it would not stop: its executor was killed
    assert _all_gone(_detached(tmp_path))


def test_a_result_the_executor_cannot_send_is_an_error_and_the_session_goes_on(client):
    client.run("kept = 41", {}, session="named")
    # The last value pickles not (a lock), and its display is not JSON (a set).
    odd = (
        "import threading\n"
        "class Odd:\n"
        "    def __init__(self):\n"
        "        self.lock = threading.Lock()\n"
        "    def _repr_json_(self):\n"
        "        return {1, 2}\n"
        "Odd()"
    )
    with pytest.raises(RemoteExecutionError, match="could not finish this cell"):
        client.run(odd, {}, session="named")
    ns: dict = {}
    client.run("again = kept + 1", ns, session="named")
    assert ns["again"] == 42


def test_a_cell_sent_with_the_close_of_its_session_still_runs(client):
    for _ in range(5):
        client.run("warm = 1", {})  # the session's executor is up and idle
        execute = client.connection.message(
            m.EXECUTE, {"code": "b = 2", "outputs": ["b"], "inputs": []}, session=client.session
        )
        execute.content["request"] = execute.id
        close = client.connection.message(m.CLOSE_SESSION, {"session": client.session})
        client.connection.send(execute)
        client.connection.send(close)
        deadline, reply = time.monotonic() + 30, None
        while reply is None and time.monotonic() < deadline:
            got = client.connection.recv(0.5)
            if got is not None and got.parent == execute.id and got.kind in (m.RESULT, m.ERROR):
                reply = got
        assert reply is not None and reply.kind == m.RESULT, reply
        assert reply.content["status"] == "ok", reply.content


def test_past_max_executors_the_session_idle_longest_makes_room(worker_factory):
    worker = worker_factory("capped", "--max-executors", "2")
    with connect(worker.address, key_file=worker.key_file) as client:
        client.run("x = 'a'", {}, session="A")
        client.run("x = 'b'", {}, session="B")
        client.run("x = 'c'", {}, session="C")  # a third executor: A's, idle longest, goes
        wait_until(lambda: len(client.status()["sessions"]) <= 2, 15, "A's executor to go")
        assert sorted(client.status()["sessions"]) == ["B", "C"]
        ns: dict = {}
        client.run("y = x", ns, session="B")
        assert ns["y"] == "b"  # the others keep their namespaces
        with pytest.raises(RemoteExecutionError, match="NameError"):
            client.run("y = x", {}, session="A")  # a fresh executor, C's making room
    assert "at --max-executors 2: stopping session A's executor" in worker.log()


def test_more_sessions_than_executors_wait_their_turn_instead_of_thrashing(worker_factory):
    """Three notebooks busy at once on a worker that keeps two executors: the third
    waits until one of the others is done, instead of evicting a session that is still
    working (which would start its executor again at once, and so on, for every cell)."""
    worker = worker_factory("crowded", "--max-executors", "2")
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def notebook(name: str) -> None:
        try:
            with connect(worker.address, key_file=worker.key_file) as c:
                got = []
                for k in range(5):
                    ns = {"k": k}
                    c.run("import time\ntime.sleep(0.2)\nseen = k * 10", ns, timeout=120)
                    got.append(ns["seen"])
                results[name] = got
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=notebook, args=(f"nb{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert errors == []
    assert results == {f"nb{i}": [0, 10, 20, 30, 40] for i in range(3)}  # none lost or run twice
    evictions = worker.log().count("at --max-executors 2: stopping session")
    assert evictions <= 1, worker.log()  # the waiting notebook's one, once another was done
