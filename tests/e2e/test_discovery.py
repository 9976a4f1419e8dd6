"""mDNS discovery for real: a worker and a notebook in two network namespaces
joined by a veth pair, the notebook given no address at all."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from worker_kernel.protocol.keys import generate_key_file
from worker_kernel.protocol.messages import PROTOCOL_VERSION

from .netns import Lan, on_client_host, start_worker

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
    return on_client_host(lan, key, script)


def test_a_notebook_finds_a_worker_on_the_lan_with_no_address(lan, tmp_path):
    key = generate_key_file(tmp_path / "key")
    worker = start_worker(lan, tmp_path, key)
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
    worker = start_worker(lan, tmp_path, key, "--no-advertise")
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
            properties={"name": name, "address": f"tcp://{ip}:{port}", "protocol": "@PROTOCOL@",
                        "instance": name, "encrypted": "0", "security": "shared-key"},
            server=f"{name}.local.",
        ))
    open(ready, "w").write("ok")
    time.sleep(3600)
    """
).replace("@PROTOCOL@", str(PROTOCOL_VERSION))  # announced as compatible

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
    worker = start_worker(lan, tmp_path, key)
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
