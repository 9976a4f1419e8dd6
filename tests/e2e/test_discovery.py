"""mDNS discovery for real: a worker and a notebook in two network namespaces
joined by a veth pair, the notebook given no address at all."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker_kernel.protocol.keys import generate_key_file


@dataclass
class Lan:
    worker_ns: str
    client_ns: str
    worker_ip: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = secrets.token_hex(3)
    w, c, vw, vc = f"l2g-w-{tag}", f"l2g-c-{tag}", f"l2gw{tag}", f"l2gc{tag}"
    subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
    if _ip("netns", "add", w).returncode != 0:
        pytest.skip("this machine does not allow creating network namespaces")
    try:
        steps = [
            ("netns", "add", c),
            ("link", "add", vw, "type", "veth", "peer", "name", vc),
            ("link", "set", vw, "netns", w),
            ("link", "set", vc, "netns", c),
            ("-n", w, "addr", "add", f"{subnet}.1/24", "dev", vw),
            ("-n", c, "addr", "add", f"{subnet}.2/24", "dev", vc),
            ("-n", w, "link", "set", vw, "up"),
            ("-n", c, "link", "set", vc, "up"),
            ("-n", w, "link", "set", "lo", "up"),
            ("-n", c, "link", "set", "lo", "up"),
            # mDNS needs a multicast route in each namespace.
            ("-n", w, "route", "add", "224.0.0.0/4", "dev", vw),
            ("-n", c, "route", "add", "224.0.0.0/4", "dev", vc),
        ]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield Lan(w, c, f"{subnet}.1")
    finally:
        _ip("netns", "del", w)
        _ip("netns", "del", c)


def _start_worker(lan: Lan, tmp: Path, key: Path, *extra: str) -> subprocess.Popen[bytes]:
    ready = tmp / "ready.json"
    log = open(tmp / "worker.log", "ab")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        ["ip", "netns", "exec", lan.worker_ns, sys.executable, "-m", "worker_kernel",
         "--bind", f"tcp://{lan.worker_ip}:7340", "--key-file", str(key), "--simulate",
         "--name", "lanbox", "--ready-file", str(ready), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, (tmp / "worker.log").read_text()
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.05)
    return process


NOTEBOOK = textwrap.dedent(
    """
    import json, sys, time
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "lan2gpu_magic")
    shell.run_line_magic("config", "Lan2GPU.embedded_worker = False")
    shell.run_line_magic("config", "Lan2GPU.discovery_wait = 5.0")
    t0 = time.monotonic()
    result = shell.run_cell("%%lan2gpu\\nimport socket\\nwhere = socket.gethostname()\\nx = 6 * 7")
    magics = shell.magics_manager.registry["Lan2GPUMagics"]
    rows = magics.pool.rows()
    print(json.dumps({
        "ok": result.success,
        "error": repr(result.error_in_exec),
        "x": shell.user_ns.get("x"),
        "seconds": time.monotonic() - t0,
        "rows": [[r.origin, r.view.name if r.view else None, r.address] for r in rows],
    }))
    shell.run_line_magic("unload_ext", "lan2gpu_magic")
    """
)


def _notebook(lan: Lan, key: Path, script: str = NOTEBOOK) -> dict:
    """Run ``script`` in the notebook's namespace; the JSON its last line prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAN2GPU_")}
    env["LAN2GPU_KEY_FILE"] = str(key)
    done = subprocess.run(
        ["ip", "netns", "exec", lan.client_ns, sys.executable, "-c", script],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_notebook_finds_a_worker_on_the_lan_with_no_address(lan, tmp_path):
    key = generate_key_file(tmp_path / "key")
    worker = _start_worker(lan, tmp_path, key)
    try:
        seen = _notebook(lan, key)
    finally:
        worker.terminate()
        worker.wait(15)
    assert seen["ok"], seen["error"]
    assert seen["x"] == 42
    assert seen["rows"] == [["discovered", "lanbox", f"tcp://{lan.worker_ip}:7340"]]
    assert "announced as lanbox._lan2gpu._tcp.local." in (tmp_path / "worker.log").read_text()


def test_no_advertise_keeps_the_worker_off_the_lan(lan, tmp_path):
    key = generate_key_file(tmp_path / "key")
    worker = _start_worker(lan, tmp_path, key, "--no-advertise")
    try:
        seen = _notebook(lan, key)
    finally:
        worker.terminate()
        worker.wait(15)
    assert not seen["ok"]
    assert "NoWorkerAvailable" in seen["error"]
    assert seen["rows"] == []


FAKES = textwrap.dedent(
    """
    import os, socket, sys, threading, time, zmq
    from zeroconf import ServiceInfo, Zeroconf
    ip, ready = sys.argv[1], sys.argv[2]

    def listener(port, serve):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(64)
        def loop():
            while True:
                conn, _ = s.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
        return s

    def silent(conn):  # accepts, never speaks
        time.sleep(3600)

    def streaming(conn):  # pours bytes at whoever connects
        block = os.urandom(1 << 20)
        try:
            while True:
                conn.sendall(block)
        except OSError:
            pass

    keep = [listener(7401, silent), listener(7402, streaming)]
    ctx = zmq.Context()
    wrong = ctx.socket(zmq.ROUTER)  # a real CurveZMQ worker socket, with other keys
    wrong.curve_server = True
    wrong.curve_publickey, wrong.curve_secretkey = zmq.curve_keypair()
    wrong.bind(f"tcp://{ip}:7403")
    zc = Zeroconf(interfaces=[ip])
    for name, port in [("silent", 7401), ("streaming", 7402), ("wrongkey", 7403),
                       ("nobody", 7404)]:
        zc.register_service(ServiceInfo(
            "_lan2gpu._tcp.local.", f"{name}._lan2gpu._tcp.local.",
            addresses=[socket.inet_aton(ip)], port=port,
            properties={"name": name, "address": f"tcp://{ip}:{port}", "protocol": "2",
                        "instance": name, "encrypted": "0", "security": "shared-key"},
            server=f"{name}.local.",
        ))
    open(ready, "w").write("ok")
    time.sleep(3600)
    """
)

CELLS = textwrap.dedent(
    """
    import json, resource, time
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "lan2gpu_magic")
    shell.run_line_magic("config", "Lan2GPU.embedded_worker = False")
    shell.run_line_magic("config", "Lan2GPU.discovery_wait = 5.0")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, ok = [], []
    for i in range(4):
        t0 = time.monotonic()
        ok.append(shell.run_cell(f"%%lan2gpu\\nx = {i} * 7").success)
        seconds.append(time.monotonic() - t0)
    rows = shell.magics_manager.registry["Lan2GPUMagics"].pool.rows()
    print(json.dumps({
        "ok": ok, "x": shell.user_ns.get("x"), "seconds": seconds,
        "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss,
        "rows": {(r.view.name if r.view else r.address): r.state for r in rows},
    }))
    shell.run_line_magic("unload_ext", "lan2gpu_magic")
    """
)


def test_fake_workers_on_the_lan_neither_delay_nor_burden_the_notebook(lan, tmp_path):
    key = generate_key_file(tmp_path / "key")
    worker = _start_worker(lan, tmp_path, key)
    ready = tmp_path / "fakes.ready"
    fakes = subprocess.Popen(
        ["ip", "netns", "exec", lan.worker_ns, sys.executable, "-c", FAKES, lan.worker_ip,
         str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert fakes.poll() is None, fakes.stderr.read() if fakes.stderr else ""
            assert time.monotonic() < deadline, "the fake workers did not start"
            time.sleep(0.05)
        seen = _notebook(lan, key, CELLS)
    finally:
        for process in (fakes, worker):
            process.terminate()
            process.wait(15)
        if fakes.stderr:
            fakes.stderr.close()
    assert seen["ok"] == [True] * 4 and seen["x"] == 21, seen
    # The first cell waits for announcements (5 s here) and one probe deadline
    # for all fakes together; later cells do not wait for them at all.
    assert seen["seconds"][0] < 5 + 3 + 3, seen
    assert max(seen["seconds"][1:]) < 2, seen
    assert seen["grew_kib"] < 64 << 10, seen  # the streaming fake is not buffered
    assert seen["rows"]["lanbox"] == "up"
    assert all(seen["rows"][f"tcp://{lan.worker_ip}:{p}"] != "up" for p in (7401, 7402, 7403, 7404))
