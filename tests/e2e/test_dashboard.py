"""The dashboard end to end: a real ``jupyter server``, real workers, real cells.

The server loads the extension from the config file the package installs; the
JSON API is read over HTTP like a script would; the page is driven in Debian's
headless Chromium through Playwright (never a downloaded browser).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lan2gpu_magic import connect
from lan2gpu_magic.errors import ExecutionTimeout, RemoteExecutionError
from worker_kernel.protocol.keys import generate_key_file
from worker_kernel.protocol.messages import PROTOCOL_VERSION

from ..conftest import WorkerFactory
from .dashboard_server import TOKEN, JupyterServer, free_port


@pytest.fixture
def late_address() -> str:
    """An address configured in the server before any worker listens there."""
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def server(
    request: pytest.FixtureRequest, tmp_path: Path, worker_factory: WorkerFactory, late_address: str
) -> Iterator[JupyterServer]:
    key = tmp_path / "factory" / "key"  # the key worker_factory gives its workers
    srv = JupyterServer(tmp_path / "server", [late_address], key)
    yield srv
    srv.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"----- jupyter server log -----\n{srv.log()}")


def _worker(doc: dict[str, Any], address: str) -> dict[str, Any] | None:
    return next((w for w in doc["workers"] if w["address"] == address), None)


def _state(address: str, state: str) -> Any:
    def check(doc: dict[str, Any]) -> dict[str, Any] | None:
        w = _worker(doc, address)
        return w if w is not None and w["state"] == state else None

    return check


def test_the_page_and_api_follow_jupyter_authentication(server: JupyterServer) -> None:
    for path in ("/lan2gpu/api/", "/lan2gpu/api/workers", "/lan2gpu/api/gpus", "/lan2gpu/api/jobs"):
        assert server.get(path, token=None)[0] == 403, path
        assert server.get(path, token=secrets.token_hex(16))[0] == 403, path
    status, _, headers = server.get("/lan2gpu/", token=None)
    assert status == 302 and "/login" in headers["Location"]
    assert server.get("/lan2gpu/static/dashboard.js", token=None)[0] in (302, 403)
    status, page, headers = server.get("/lan2gpu/")
    assert status == 200 and b'src="static/dashboard.js"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]  # nothing from a CDN
    assert server.get("/lan2gpu/static/dashboard.js")[0] == 200
    status, _, headers = server.get("/lan2gpu")  # the page's links are relative to /lan2gpu/
    assert status == 302 and headers["Location"].endswith("/lan2gpu/")
    assert server.get("/lan2gpu/static/nope.js")[0] == 404
    index = server.api("")
    assert [e.rsplit("/", 1)[1] for e in index["endpoints"]] == ["workers", "gpus", "jobs"]


def test_a_worker_appearing_and_going_away(
    server: JupyterServer, worker_factory: WorkerFactory, late_address: str
) -> None:
    down = server.wait_for("workers", _state(late_address, "unreachable"))
    assert "did not answer" in down["problem"] and down["origin"] == "configured"
    assert server.api("gpus")["gpus"] == []

    worker = worker_factory("late", bind=late_address)
    up = server.wait_for("workers", _state(late_address, "up"))
    assert up["name"] == "late" and up["simulator"] is True
    assert up["versions"]["protocol"] == str(PROTOCOL_VERSION) and up["cpu_count"] >= 1
    assert 0 < up["memory_available"] <= up["memory_total"]
    gpus = server.wait_for("gpus", lambda d: d["gpus"])
    (gpu,) = gpus
    assert gpu["worker"] == "late" and gpu["index"] == 0 and gpu["simulated"] is True
    assert 0 <= gpu["memory_used"] <= gpu["memory_total"]
    assert isinstance(gpu["history"], list)

    os.kill(worker.pid, signal.SIGKILL)
    worker.process.wait()
    t0 = time.monotonic()
    gone = server.wait_for("workers", _state(late_address, "unreachable"), deadline=20)
    assert time.monotonic() - t0 < 15  # "within a few seconds", generously
    assert gone["name"] == "late"  # remembered from when it was up
    (stale,) = server.api("gpus")["gpus"]  # last known, marked as such
    assert stale["stale"] is True and stale["worker"] == "late"
    assert gpu["stale"] is False


def test_a_worker_with_another_key_shows_as_key_mismatch(
    server: JupyterServer, worker_factory: WorkerFactory, late_address: str, tmp_path: Path
) -> None:
    other = generate_key_file(tmp_path / "other" / "key")
    worker_factory("stranger", bind=late_address, key_file=other)
    row = server.wait_for("workers", _state(late_address, "key mismatch"))
    assert "key file differs" in row["problem"]


def test_running_waiting_and_recent_cells_with_their_outcomes(
    server: JupyterServer, worker_factory: WorkerFactory, late_address: str
) -> None:
    worker = worker_factory("jobs", bind=late_address)
    server.wait_for("workers", _state(late_address, "up"))
    errors: list[BaseException] = []

    def run(code: str, **kw: Any) -> threading.Thread:
        def target() -> None:
            try:
                with connect(worker.address, key_file=worker.key_file) as c:
                    c.run(code, {}, **kw)
            except (RemoteExecutionError, ExecutionTimeout) as exc:
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    first = run("import time\nprint('working')\ntime.sleep(4)\nx = 1")
    running = server.wait_for("jobs", lambda d: d["running"])
    assert running[0]["worker"] == "jobs" and running[0]["resources"] == ["gpu0"]
    second = run("y = 2")  # the one GPU is busy: this one waits
    waiting = server.wait_for("jobs", lambda d: d["waiting"])
    assert waiting[0]["session"] != running[0]["session"]
    gpu = server.api("gpus")["gpus"][0]
    assert gpu["running"] == 1 and gpu["waiting"] == 1
    first.join(60)
    second.join(60)
    run("1 / 0").join(60)
    run("import time\ntime.sleep(30)", timeout=1.0).join(60)
    assert [type(e) for e in errors] == [RemoteExecutionError, ExecutionTimeout]

    recent = server.wait_for("jobs", lambda d: len(d["recent"]) >= 4 and d["recent"])
    by_id = {j["id"]: j for j in recent}
    assert by_id[running[0]["id"]]["status"] == "ok"
    assert by_id[running[0]["id"]]["duration"] >= 3.5
    assert by_id[waiting[0]["id"]]["status"] == "ok"
    assert by_id[waiting[0]["id"]]["waited"] > 0.5  # it waited behind the first
    assert [j["status"] for j in recent[:2]] == ["timeout", "error"]  # newest first
    assert all(j["finished"] <= time.time() + 1 for j in recent)
    busy = [s for s in server.api("gpus")["gpus"][0]["history"] if s[3]]
    assert busy, "the GPU history never saw the GPU busy"


def test_hosted_kernels_are_listed(
    server: JupyterServer, worker_factory: WorkerFactory, late_address: str
) -> None:
    worker = worker_factory("host", bind=late_address)
    with connect(worker.address, key_file=worker.key_file) as c:
        kernel = c.start_kernel("a-jupyter-key")
        row = server.wait_for("jobs", lambda d: [k for k in d["kernels"] if k["id"] == kernel])
        assert row[0]["worker"] == "host" and row[0]["gpus"] == [0]
        c.stop_kernel(kernel)
        server.wait_for("jobs", lambda d: not d["kernels"])


def test_the_page_shows_workers_gpus_and_a_cell_going_by(
    server: JupyterServer,
    worker_factory: WorkerFactory,
    late_address: str,
    browser: Any,
    tmp_path: Path,
) -> None:
    worker = worker_factory("page", bind=late_address)
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(f"{server.url}/lan2gpu/?token={TOKEN}")
    row = f'tr[data-kind="worker"][data-address="{late_address}"]'
    page.wait_for_selector(f'{row}[data-state="up"]', timeout=30_000)
    card = page.wait_for_selector('[data-kind="gpu"][data-worker="page"]', timeout=30_000)
    assert "CUDA simulator" in card.inner_text()
    # Binary units, as the magic shows the same memory (GiB, never GB).
    assert re.search(r"\d (KiB|MiB|GiB)\b", card.inner_text()), card.inner_text()
    assert not re.search(r"\d (KB|MB|GB)\b", page.inner_text("body"))

    outputs: list[str] = []

    def cell() -> None:
        with connect(worker.address, key_file=worker.key_file) as c:
            c.run("import time\nprint('tick')\ntime.sleep(5)\nz = 3", {}, handlers=None)
            outputs.append("done")

    thread = threading.Thread(target=cell)
    thread.start()
    try:
        running = page.wait_for_selector('tr[data-kind="running"]', timeout=30_000)
        cell_id = running.get_attribute("data-id")
        assert "page" in running.inner_text()
        page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)
        page.wait_for_selector(
            f'tr[data-kind="recent"][data-id="{cell_id}"][data-status="ok"]', timeout=30_000
        )
        assert page.query_selector(f'tr[data-kind="running"][data-id="{cell_id}"]') is None
    finally:
        thread.join(60)
    assert outputs == ["done"]
    page.screenshot(path=str(tmp_path / "dashboard-recent.png"), full_page=True)

    # A worker killed while the page is open shows as unreachable within seconds.
    os.kill(worker.pid, signal.SIGKILL)
    t0 = time.monotonic()
    page.wait_for_selector(f'{row}[data-state="unreachable"]', timeout=20_000)
    assert time.monotonic() - t0 < 15
    # What it did is not lost: its GPU (marked stale) and its finished cell stay.
    page.wait_for_selector('[data-kind="gpu"][data-worker="page"][data-stale="true"]')
    assert page.query_selector(f'tr[data-kind="recent"][data-id="{cell_id}"]') is not None
    page.screenshot(path=str(tmp_path / "dashboard-unreachable.png"), full_page=True)
    assert (tmp_path / "dashboard-running.png").stat().st_size > 10_000
    assert problems == []
