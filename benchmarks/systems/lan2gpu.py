"""lan2gpu two ways: the Python API (``Client.run``) and ``%%lan2gpu`` in IPython.

Each starts its own ``python -m worker_kernel --simulate`` on 127.0.0.1 with a
fresh key. The magic runs in an in-process ``InteractiveShell`` with discovery
and the embedded worker turned off, so it talks to exactly that worker; what the
cell prints (its status line) is captured, and a failed cell raises.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import signal
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..procs import Child, children, keygen, start_worker
from . import Options

T = TypeVar("T")

NEGATE = "b = -a"


@dataclass(frozen=True)
class ClientOptions:
    """``--compression`` / ``--no-cache`` as the installed lan2gpu understands them."""

    kwargs: dict[str, Any]  # for lan2gpu_magic.connect, else lan2gpu_magic.Client
    cell_flags: str  # for %%lan2gpu
    note: str  # what was passed, or why not


def client_options(compression: str | None, no_cache: bool) -> ClientOptions:
    """Map the benchmark's options onto whatever lan2gpu's client accepts today."""
    import lan2gpu_magic

    accepted = set(inspect.signature(lan2gpu_magic.connect).parameters)
    accepted |= set(inspect.signature(lan2gpu_magic.Client).parameters)
    kwargs: dict[str, Any] = {}
    flags: list[str] = []
    notes: list[str] = []
    name = next((n for n in ("compress", "compression") if n in accepted), None)
    if compression is not None and name is None:
        notes.append(f"--compression {compression} ignored: the lan2gpu client has no such option")
    elif compression is not None and name is not None:
        kwargs[name] = compression
        flags.append(f"--compress {compression}")
    if no_cache and "cache" not in accepted:
        notes.append("--no-cache ignored: the lan2gpu client has no cache option")
    elif no_cache:
        kwargs["cache"] = False
        flags.append("--no-cache")
    passed = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    notes.insert(0, f"client({passed})" if passed else "client defaults")
    return ClientOptions(kwargs, " ".join(flags), "; ".join(notes))


def open_client(address: str, key_file: str | Path, kwargs: Mapping[str, Any]) -> Any:
    """``lan2gpu_magic.connect``, or the ``Client`` itself for options connect lacks."""
    import lan2gpu_magic

    if set(kwargs) <= set(inspect.signature(lan2gpu_magic.connect).parameters):
        return lan2gpu_magic.connect(address, key_file=key_file, **kwargs)
    return lan2gpu_magic.Client(address, key_file=key_file, **kwargs)


class Lan2GPUApi:
    label = "lan2gpu, Python API"
    trivial_call = 'Client.run("pass")'

    def __init__(self, worker: Child, options: Options) -> None:
        self.worker = worker
        self.client = open_client(worker.ready["address"], options.work / "key", options.client)

    def run(self, code: str, namespace: MutableMapping[str, Any], **kw: Any) -> Any:
        """``Client.run``, for the sections that only lan2gpu has."""
        return self.client.run(code, namespace, **kw)

    def trivial(self) -> None:
        self.client.run("pass", {})

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        ns: dict[str, Any] = {"a": a}
        self.client.run(NEGATE, ns)
        b: np.ndarray = ns["b"]
        return b

    def processes(self) -> dict[str, int]:
        return worker_processes(self.worker)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.worker.stop()


class Lan2GPUPlaintext(Lan2GPUApi):
    """The Python API without encryption (``--insecure-plaintext`` on both sides):
    side by side with the default, what CurveZMQ encryption costs."""

    label = "lan2gpu, Python API, --insecure-plaintext"
    trivial_call = 'Client.run("pass"), plain text'

    def __init__(self, worker: Child, options: Options) -> None:
        plain = Options(options.work, {**options.client, "plaintext": True}, options.cell_flags)
        super().__init__(worker, plain)


def worker_processes(worker: Child) -> dict[str, int]:
    """This process (the client), the worker's service and its executors, by role."""
    executors = children(worker.pid)  # the service starts executors itself
    roles = {"client": os.getpid(), "service": worker.pid}
    for i, pid in enumerate(executors):
        roles["executor" if len(executors) == 1 else f"executor {i}"] = pid
    return roles


def _on_a_worker(
    system: Callable[[Child, Options], T], name: str, options: Options, *flags: str
) -> T:
    """``system`` on a fresh worker, which is stopped if ``system`` fails to start."""
    worker = start_worker(options.work, keygen(options.work), name, extra=flags)
    try:
        return system(worker, options)
    except BaseException:
        worker.stop()
        raise


def start_api(options: Options) -> Lan2GPUApi:
    return _on_a_worker(Lan2GPUApi, "bench-api", options)


def start_plaintext(options: Options) -> Lan2GPUPlaintext:
    return _on_a_worker(Lan2GPUPlaintext, "bench-plain", options, "--insecure-plaintext")


class CellFailed(RuntimeError):
    pass


class Lan2GPUMagic:
    label = "lan2gpu, %%lan2gpu magic"
    trivial_call = "empty %%lan2gpu cell"

    def __init__(self, worker: Child, options: Options) -> None:
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        self.worker = worker
        self.address = worker.ready["address"]
        self.magic = f"%%lan2gpu {options.cell_flags}".rstrip()
        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        config.Lan2GPU.discovery = False
        config.Lan2GPU.embedded_worker = False
        # IPython installs its own SIGINT handling; keep the benchmark's.
        sigint = signal.getsignal(signal.SIGINT)
        self.shell = InteractiveShell.instance(config=config)
        signal.signal(signal.SIGINT, sigint)
        self.shell.run_line_magic("load_ext", "lan2gpu_magic")
        key_file = options.work / "key"
        self._line(f"connect {self.address} --key-file {key_file}")

    def _line(self, line: str) -> None:
        quiet = io.StringIO()  # "lan2gpu: connected to ..." goes to stderr
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            self.shell.run_line_magic("lan2gpu", line)

    def cell(self, source: str) -> None:
        """Run one cell in the shell; raise if it failed."""
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            result = self.shell.run_cell(source, store_history=False)  # type: ignore[no-untyped-call]
        if not result.success:
            error = result.error_in_exec or result.error_before_exec
            raise CellFailed(f"{error!r}; the cell printed:\n{printed.getvalue()[-2000:]}")

    def local_cell(self) -> None:
        """An empty local cell: IPython's own cost, for reference."""
        self.cell("pass")

    def trivial(self) -> None:
        self.cell(f"{self.magic}\npass")

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        self.shell.user_ns["a"] = a
        self.cell(f"{self.magic}\n{NEGATE}")
        b: np.ndarray = self.shell.user_ns.pop("b")
        del self.shell.user_ns["a"]
        return b

    def processes(self) -> dict[str, int]:
        return worker_processes(self.worker)

    def close(self) -> None:
        try:
            with contextlib.suppress(Exception):  # closing is best effort; the worker goes
                self._line(f"disconnect {self.address}")
            self.shell.run_line_magic("unload_ext", "lan2gpu_magic")
        finally:
            self.worker.stop()


def start_magic(options: Options) -> Lan2GPUMagic:
    return _on_a_worker(Lan2GPUMagic, "bench-magic", options)
