"""Fixtures: keys, real ``python -m worker_kernel`` processes, connected clients.

Workers run as subprocesses on 127.0.0.1 with the CUDA simulator, each with a
deadline to come up; a failing test prints the logs of the workers it used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lan2gpu_magic.launcher import launch, worker_argv
from worker_kernel.protocol.curve import CLIENT, WORKER, derived_keypair
from worker_kernel.protocol.errors import WorkerUnreachable
from worker_kernel.protocol.keys import generate_key_file, load_key

START_DEADLINE = 60.0

# Each executor and this process would fault in 5% of RAM for received arrays: the
# suite starts dozens of executors on a small machine, and its arrays are small.
os.environ.setdefault("LAN2GPU_POOL_MEMORY", "64M")


def key_holder(sock: object, key_file: Path) -> None:
    """Give a raw zmq socket the CurveZMQ keys every holder of ``key_file`` derives:
    workers encrypt by default, so tests that speak raw frames do it as key holders."""
    key = load_key(key_file)
    sock.curve_serverkey = derived_keypair(key, WORKER)[0]  # type: ignore[attr-defined]
    public, secret = derived_keypair(key, CLIENT)
    sock.curve_publickey = public  # type: ignore[attr-defined]
    sock.curve_secretkey = secret  # type: ignore[attr-defined]


def proc_rss(pid: int) -> int:
    """Resident memory of process ``pid``, in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("LAN2GPU_TEST_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a real GPU (set LAN2GPU_TEST_GPU=1 on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@dataclass
class WorkerProcess:
    """A running ``python -m worker_kernel`` and what tests need to reach it."""

    name: str
    key_file: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    address: str = ""
    instance: str = ""
    extra: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def key(self) -> bytes:
        return load_key(self.key_file)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_worker(
    tmp: Path,
    name: str,
    key_file: Path,
    *args: str,
    bind: str = "tcp://127.0.0.1:*",
    env: dict[str, str] | None = None,
    simulate: bool = True,
) -> WorkerProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    argv = worker_argv(
        key_file=key_file,
        name=name,
        ready_file=tmp / f"{name}.ready",
        bind=bind,
        simulate="on" if simulate else None,
        advertise=True,  # as a worker is started by hand (loopback is never announced)
        log_level="DEBUG",
        extra=args,
    )
    log_path = tmp / f"{name}.log"
    try:
        launched = launch(
            argv, ready_file=tmp / f"{name}.ready", log_path=log_path,
            timeout=START_DEADLINE, env=env,
        )  # fmt: skip
    except WorkerUnreachable as exc:
        raise RuntimeError(f"worker {name} did not start: {exc}") from None
    worker = WorkerProcess(name, key_file, log_path, launched.process, extra=list(args))
    worker.address, worker.instance = launched.address, launched.instance
    return worker


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return generate_key_file(tmp_path / "keys" / "key")


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def worker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start workers for one test; all are stopped after it, logs shown if it failed."""
    started: list[WorkerProcess] = []
    shared_key = generate_key_file(tmp_path / "factory" / "key")

    def factory(
        name: str = "w1", *args: str, key_file: Path | None = None, **kw: object
    ) -> WorkerProcess:
        worker = start_worker(
            tmp_path / "workers",
            name,
            key_file or shared_key,
            *args,
            **kw,  # type: ignore[arg-type]
        )
        started.append(worker)
        return worker

    yield factory
    for worker in started:
        worker.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for worker in started:
            print(f"----- log of worker {worker.name} -----\n{worker.log()}")


@pytest.fixture(scope="module")
def shared_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One simulator worker for a whole test module (tests that leave it healthy)."""
    tmp = tmp_path_factory.mktemp("shared")
    key = generate_key_file(tmp / "key")
    worker = start_worker(tmp, "shared", key)
    yield worker
    worker.stop()


@pytest.fixture
def client(shared_worker: WorkerProcess) -> Iterator[object]:
    from lan2gpu_magic import connect

    with connect(shared_worker.address, key_file=shared_worker.key_file) as c:
        yield c


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's headless Chromium through Playwright (never a downloaded browser)."""
    if CHROMIUM is None:
        if os.environ.get("LAN2GPU_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()
