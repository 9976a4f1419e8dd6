"""A worker that stalls (SIGSTOP, as an overloaded or swapping host does) keeps its
connection, and the cells in flight deliver their results when it runs again; a worker
that is really gone (killed, or its network cut) is reported lost within seconds, and
only then does ``--retry`` run a cell elsewhere."""

from __future__ import annotations

import _thread
import os
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lan2gpu_magic import WorkerLost, connect
from lan2gpu_magic.client import STALLED, OutputHandlers
from worker_kernel.protocol.keys import generate_key_file

from ..waiting import wait_until
from .kernel_driver import Kernel
from .netns import Lan, on_client_host, start_worker

pytestmark = pytest.mark.faults

# Each run of the cell leaves a line: its i and its worker's pid (the executor's parent).
CELL = (
    "import os, time\nwith open(path, 'a') as f:\n    f.write(f'{i} {os.getppid()}\\n')\n"
    "time.sleep(2)\nr = i * i"
)


def _wait_for_lines(path: Path, n: int, within: float = 60) -> None:
    def lines() -> bool:
        return path.exists() and len(path.read_text().splitlines()) >= n

    wait_until(lines, within, f"{n} runs of the cell in {path}", every=0.05)


def test_cells_in_flight_on_a_stalled_worker_all_deliver_their_results(worker_factory, tmp_path):
    worker = worker_factory("stalls", "--simulated-gpus", "4")  # the four cells at once
    runs = tmp_path / "runs"
    clients = [connect(worker.address, key_file=worker.key_file) for _ in range(4)]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    kinds: list[str] = []

    def cell(i: int) -> None:
        handlers = OutputHandlers(status=lambda kind, content: kinds.append(kind))
        try:
            ns = {"i": i, "path": str(runs)}
            run = clients[i].run(CELL, ns, handlers=handlers, gpus=(i,))
            results[i] = run.outputs["r"]
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    try:
        for i, c in enumerate(clients):
            c.run("warm = 1", {}, gpus=(i,))  # each session's executor is up before the stall
        threads = [threading.Thread(target=cell, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        _wait_for_lines(runs, 4)  # all four cells are running
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            time.sleep(5)  # past the clients' liveness (3 heartbeats and one more)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        for t in threads:
            t.join(60)
    finally:
        for c in clients:
            c.close()
    assert not errors, errors
    assert results == {i: i * i for i in range(4)}
    ran = sorted(line.split()[0] for line in runs.read_text().splitlines())
    assert ran == ["0", "1", "2", "3"]  # each ran once
    assert STALLED in kinds  # the wait was shown, not silent
    assert "did not run for" in worker.log()  # the worker forgave its own stall


def test_a_worker_silent_past_its_stall_grace_is_lost_and_may_still_finish(
    worker_factory, tmp_path
):
    worker = worker_factory("grace", "--stall-grace", "3")
    with connect(worker.address, key_file=worker.key_file) as c:
        assert c.info.stall_grace == 3
        c.run("x = 1", {})
        threading.Timer(1.0, os.kill, (worker.pid, signal.SIGSTOP)).start()
        t0 = time.monotonic()
        try:
            with pytest.raises(WorkerLost, match="past its --stall-grace of 3 s") as lost:
                c.run("import time\ntime.sleep(60)", {})
        finally:
            time.sleep(1.5)  # the Timer has fired
            os.kill(worker.pid, signal.SIGCONT)
        assert time.monotonic() - t0 < 12
        assert not lost.value.gone  # so --retry does not run it a second time
        assert "may still finish there" in str(lost.value)


def test_retry_waits_for_a_stalled_worker_instead_of_running_the_cell_twice(
    worker_factory, tmp_path
):
    a = worker_factory("stall-a")
    b = worker_factory("stall-b", key_file=a.key_file)
    runs = tmp_path / "runs"
    k = Kernel({"LAN2GPU_WORKERS": f"{a.address},{b.address}", "LAN2GPU_KEY_FILE": str(a.key_file)})
    stalled: list[int] = []

    def stall_the_worker_running_it() -> None:
        _wait_for_lines(runs, 1)
        pid = int(runs.read_text().split()[1])
        os.kill(pid, signal.SIGSTOP)
        stalled.append(pid)
        time.sleep(5)
        os.kill(pid, signal.SIGCONT)

    try:
        k.run("%load_ext lan2gpu_magic")
        k.run(f"path, i = {str(runs)!r}, 7")
        stopper = threading.Thread(target=stall_the_worker_running_it)
        stopper.start()
        run = k.run("%%lan2gpu --retry 1\n" + CELL, timeout=120)
        stopper.join(30)
        assert run.reply["status"] == "ok", run.error()
        assert stalled and stalled[0] in (a.pid, b.pid)
        assert "running the cell again" not in run.stream("stderr")
        assert any("has not answered for" in line for line in run.progress())
        assert k.run("print(r)").stream() == "49\n"
        assert [line.split()[0] for line in runs.read_text().splitlines()] == ["7"]  # once
    finally:
        k.shutdown()


NETWORK_CUT = textwrap.dedent(
    """
    import json, subprocess, sys, threading, time
    from lan2gpu_magic import WorkerLost, connect
    address, worker_ns, link = sys.argv[1:4]
    cut = ["ip", "-n", worker_ns, "link", "set", link, "down"]
    with connect(address) as c:
        c.run("x = 1", {})
        threading.Timer(1.0, subprocess.run, (cut,)).start()
        t0 = time.monotonic()
        try:
            c.run("import time\\ntime.sleep(60)", {})
            out = {"lost": False}
        except WorkerLost as exc:
            out = {"lost": True, "gone": exc.gone, "message": str(exc)}
        out["seconds"] = time.monotonic() - t0
        # The network comes back: the same client works again (the worker hands the
        # client's identity over to its new connection).
        subprocess.run(["ip", "-n", worker_ns, "link", "set", link, "up"], check=True)
        t1 = time.monotonic()
        for _ in range(6):  # the socket reconnects within its 2 s connect timeout
            try:
                c.ping(timeout=5)
                break
            except Exception:
                pass
        out["reconnect"] = time.monotonic() - t1
        ns = {}
        c.run("y = 6 * 7", ns, timeout=60)
        out["again"] = ns.get("y")
    print(json.dumps(out))
    """
)


def test_a_cut_network_is_a_lost_worker_within_seconds(lan: Lan, tmp_path):
    key = generate_key_file(tmp_path / "key")
    worker = start_worker(lan, tmp_path, key, "--no-advertise")
    try:
        script = NETWORK_CUT.replace(
            "sys.argv[1:4]",
            repr([f"tcp://{lan.worker_ip}:7340", lan.worker_ns, lan.worker_link]),
        )
        seen = on_client_host(lan, key, script, timeout=120)
    finally:
        worker.terminate()
        worker.wait(30)
    assert seen["lost"], seen
    assert seen["gone"], seen  # the connection dropped: --retry may place it elsewhere
    assert "connection dropped" in seen["message"]
    assert seen["seconds"] < 20, seen
    assert seen["again"] == 42, seen
    # It had let the old connection go: the new one is asked to shake hands, at once.
    assert seen["reconnect"] < 10, seen


def test_ctrl_c_stops_waiting_for_a_stalled_worker_at_once(worker_factory):
    worker = worker_factory("stopped")
    with connect(worker.address, key_file=worker.key_file) as c:
        c.run("x = 1", {})
        threading.Timer(1.0, os.kill, (worker.pid, signal.SIGSTOP)).start()
        interrupt = threading.Timer(7.0, _thread.interrupt_main)  # waiting on the stall by then
        t0 = time.monotonic()
        interrupt.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                c.run("import time\ntime.sleep(60)", {})
            waited = time.monotonic() - t0
        finally:
            interrupt.cancel()
            time.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))  # the stop has happened
            os.kill(worker.pid, signal.SIGCONT)
        # The cancel's few seconds to confirm, not the rest of the 60 s stall grace.
        assert waited < 7 + 5 + 3, waited
        assert c.run("y = 2", {}).outputs == {"y": 2}  # the same connection, in step
