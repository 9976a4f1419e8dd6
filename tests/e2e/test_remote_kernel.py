"""Whole kernels on a worker, started from an installed kernelspec by jupyter_client's
KernelManager, the way JupyterLab, VS Code or PyCharm start them."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from lan2gpu_magic import connect

from ..conftest import process_gone
from ..waiting import wait_until


def _cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lan2gpu_magic", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def lan_kernel(worker_factory, tmp_path, monkeypatch) -> tuple[Any, str]:
    """A kernelspec 'lan-test' installed under a temporary JUPYTER_PATH."""
    worker = worker_factory("kernel-host", "--kernel-grace", "3")
    prefix = tmp_path / "prefix"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAN2GPU_")}
    out = _cli(
        "install-kernel", "--name", "lan-test", "--display-name", "Python (LAN test)",
        "--prefix", str(prefix), "--workers", worker.address,
        "--key-file", str(worker.key_file), "--simulate", env=env,
    )  # fmt: skip
    assert "installed kernelspec 'lan-test'" in out
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    listed = _cli("list-kernels", env={**env, "JUPYTER_PATH": str(prefix / "share" / "jupyter")})
    assert "lan-test" in listed and "--simulate" in listed
    return worker, "lan-test"


class Session:
    """A kernel started by KernelManager, and helpers to talk to it."""

    def __init__(self, name: str) -> None:
        self.km = KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager())
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=60)
        except BaseException:  # its sockets must not outlive the test (ResourceWarning)
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)
            raise

    def run(self, code: str, stdin: str | None = None, timeout: float = 60) -> list[dict[str, Any]]:
        msg_id = self.kc.execute(code, allow_stdin=stdin is not None)
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stdin is not None:
                try:
                    request = self.kc.get_stdin_msg(timeout=0.05)
                    seen.append(request)
                    self.kc.input(stdin)
                    stdin = None
                except queue.Empty:
                    pass
            try:
                msg = self.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return seen
            seen.append(msg)
        raise TimeoutError(code)

    def text(self, msgs: list[dict[str, Any]]) -> str:
        return "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)
        self.km.cleanup_resources()


def _hosted(worker) -> list[dict[str, Any]]:
    with connect(worker.address, key_file=worker.key_file) as c:
        return list(c.status()["kernels"])


def test_a_frontend_runs_a_whole_kernel_on_the_worker(lan_kernel):
    worker, name = lan_kernel
    s = Session(name)
    try:
        out = s.run("import os\nprint(os.environ.get('NUMBA_ENABLE_CUDASIM'), os.getpid())")
        sim, pid = s.text(out).split()
        assert sim == "1"  # a simulator worker's kernel simulates CUDA
        (hosted,) = _hosted(worker)
        assert hosted["pid"] == int(pid)  # the code ran in the worker's kernel process
        error = next(m for m in s.run("1 / 0") if m["msg_type"] == "error")
        assert error["content"]["ename"] == "ZeroDivisionError"
        shown = [
            m
            for m in s.run("from IPython.display import HTML\nHTML('<b>x</b>')")
            if m["msg_type"] == "execute_result"
        ]
        assert shown[0]["content"]["data"]["text/html"] == "<b>x</b>"
        reply = s.kc.complete("import collections; collections.Ord", 35, reply=True, timeout=30)
        assert "OrderedDict" in reply["content"]["matches"]
        reply = s.kc.inspect("len", 3, reply=True, timeout=30)
        assert reply["content"]["found"]
        asked = s.run("name = input('who? ')\nprint('hello', name)", stdin="ada")
        assert asked[0]["content"]["prompt"] == "who? "
        assert s.text(asked[1:]) == "hello ada\n"
        # The worker's status tells the kernel's last activity from its age.
        time.sleep(4)
        s.run("pass")
        time.sleep(2.5)  # a forwarder heartbeat or two
        (hosted,) = _hosted(worker)
        age = time.time() - hosted["started"]
        assert hosted["idle"] < 4.5 < age, hosted
    finally:
        s.close()
    # Shut down with its frontend: no kernel left on the worker.
    wait_until(lambda: _hosted(worker) == [], 20, "the worker to drop the kernel")
    log = worker.log()
    # A normal shutdown is no death, and ipykernel's banners stay out of the worker's log
    # (its channels are Unix sockets in a private folder, not TCP).
    assert "died (code 0)" not in log
    assert re.search(r"kernel \w+ (exited \(shut down by its frontend\)|shut down)", log), log
    assert "--existing" not in log and "without encryption" not in log


def test_interrupt_restart_and_comms(lan_kernel):
    _, name = lan_kernel
    s = Session(name)
    try:
        s.run("kept = 1")
        t0 = time.monotonic()
        msg_id = s.kc.execute("import time\ntime.sleep(60)")
        time.sleep(1.5)
        s.km.interrupt_kernel()  # interrupt_mode "message": travels on the control channel
        error = None
        while True:  # until the interrupted cell is over (ipykernel aborts what comes sooner)
            msg = s.kc.get_iopub_msg(timeout=20)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = msg
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert error is not None and error["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - t0 < 10
        survived = s.run("print(kept)")
        assert s.text(survived) == "1\n", survived  # the kernel survived the interrupt
        # A comm opened by the kernel, and a message round trip through it.
        opened = s.run(
            "from comm import create_comm\n"
            "c = create_comm(target_name='echo', data={'hi': 1})\n"
            "c.on_msg(lambda msg: c.send({'echo': msg['content']['data']}))"
        )
        comm_id = next(m for m in opened if m["msg_type"] == "comm_open")["content"]["comm_id"]
        request = s.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"x": 41}})
        s.kc.shell_channel.send(request)
        while True:
            msg = s.kc.get_iopub_msg(timeout=20)
            if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == comm_id:
                break
        assert msg["content"]["data"] == {"echo": {"x": 41}}
        s.km.restart_kernel(now=False)
        s.kc.wait_for_ready(timeout=60)
        assert s.text(s.run("print('kept' in dir())")) == "False\n"  # a fresh remote kernel
    finally:
        s.close()


def test_a_dead_remote_kernel_shows_as_dead_here(lan_kernel):
    _, name = lan_kernel
    s = Session(name)
    try:
        s.kc.execute("import os\nos._exit(1)")
        # The forwarder exits: the IDE offers a restart.
        wait_until(lambda: not s.km.is_alive(), 30, "the forwarder to exit")
    finally:
        s.close()


def test_a_remote_kernel_outlives_a_stall_of_its_worker(lan_kernel):
    worker, name = lan_kernel
    s = Session(name)
    try:
        s.run("x = 41")
        os.kill(worker.pid, signal.SIGSTOP)  # a swapping host: the connection stays up
        try:
            # Longer than the forwarder's 10 s and than the worker's --kernel-grace 3.
            time.sleep(11)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert s.text(s.run("print(x + 1)")) == "42\n"
        assert s.km.is_alive()
        assert len(_hosted(worker)) == 1
    finally:
        s.close()


def test_the_worker_stops_kernels_whose_forwarder_vanished(lan_kernel):
    worker, name = lan_kernel
    s = Session(name)
    try:
        assert len(_hosted(worker)) == 1
        forwarder = s.km.provisioner.pid  # type: ignore[union-attr]
        os.kill(forwarder, signal.SIGKILL)  # no goodbye: only the heartbeats stop
        wait_until(lambda: _hosted(worker) == [], 30, "the kernel to go (--kernel-grace 3)")
        assert "went silent; shutting it down" in worker.log()
    finally:
        s.close()


LAUNCHER = """
import sys, time
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

km = KernelManager(kernel_name=sys.argv[1], kernel_spec_manager=KernelSpecManager())
km.start_kernel()
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
print(km.provisioner.pid, flush=True)
time.sleep(600)
"""


def test_a_kernel_whose_frontend_crashed_is_stopped(lan_kernel, tmp_path):
    worker, name = lan_kernel
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    # A frontend (a Jupyter server, an IDE) that dies without shutting its kernel down.
    frontend = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, name], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert frontend.stdout is not None
        forwarder = int(frontend.stdout.readline())
        assert len(_hosted(worker)) == 1
    finally:
        frontend.kill()
        frontend.wait(30)
        if frontend.stdout is not None:
            frontend.stdout.close()
    try:
        wait_until(
            lambda: process_gone(forwarder) and not _hosted(worker),
            30,
            "the forwarder and its remote kernel to go with the frontend",
            every=0.3,
        )
        assert process_gone(forwarder), "the forwarder outlived the frontend that started it"
        assert _hosted(worker) == []  # and it took its remote kernel with it
    finally:
        if not process_gone(forwarder):  # do not leave it behind when the test fails
            os.kill(forwarder, signal.SIGKILL)


def test_remove_kernel(lan_kernel, tmp_path):
    _, name = lan_kernel
    env = dict(os.environ)
    out = _cli("remove-kernel", name, env=env)
    assert "removed" in out
    assert name not in _cli("list-kernels", env=env)
    assert not Path(out.split()[-1]).exists()


def test_processes_a_kernel_cell_detached_end_with_the_kernel(lan_kernel, tmp_path):
    from .test_isolation import DETACH, _all_gone, _detached

    _, name = lan_kernel
    s = Session(name)
    try:
        s.run(DETACH.format(pids=tmp_path))
        pids = _detached(tmp_path)
        assert not any(map(process_gone, pids))
    finally:
        s.close()
    assert _all_gone(pids, within=30), f"processes {pids} outlived their kernel"
