"""``dask worker ... --preload worker_kernel.dask_plugin``: lan2gpu cells on a Dask cluster.

On a Slurm or Kubernetes cluster the engine is Dask: it deploys the workers, knows who is
up, queues work on ``resources`` (``--resources GPU=1``) and carries the bytes over its
own transport (TLS where the cluster is configured for it). lan2gpu adds only what is
its own. On every Dask worker this preload starts:

- **a lan2gpu service of its own** (``python -m worker_kernel``) as a child process. It
  listens on an ``ipc://`` socket in a 0700 directory, so only this user on this host
  can reach it, and uses a throwaway key. It probes the GPUs, runs each session's cells
  in lan2gpu's executor subprocesses (crash, ``--timeout`` and CUDA-error isolation as
  on the LAN), enforces the memory budget and keeps compiled kernels. The Dask worker
  process never touches CUDA. Its settings come from the same ``LAN2GPU_*`` environment
  variables as ``python -m worker_kernel``, and the flags that follow ``--preload
  worker_kernel.dask_plugin`` on ``dask worker``'s command line.
- **its status**, refreshed every half second: as a worker metric (``lan2gpu``, sent
  with Dask's heartbeats; a notebook reads them all once, when it connects), and as an
  event on ``lan2gpu-status`` whenever something placement looks at changes. Notebooks
  keep their view of the GPUs, queues and sessions by these events, so a cell costs no
  status request however many workers there are.
- **the task a cell runs as** (:func:`run_cell`): it hands the cell's request, exactly as
  the notebook built it, to the local service, forwards the live output to the
  notebook's event topic (``Worker.log_event``) and returns the result's frames. The
  notebook unpickles them (:mod:`lan2gpu_magic.dask_backend`).

Who may submit tasks to a Dask cluster may run code on it: its security is Dask's
(``dask+tls://`` and Dask's TLS configuration). The local service's signed protocol
still guards the hop between the Dask worker and the service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from .protocol.dask_tasks import STATUS_TOPIC, placement_key
from .protocol.datapath import DIRECT_MIN

if TYPE_CHECKING:
    from distributed import Worker

    from lan2gpu_magic.client import Client
    from lan2gpu_magic.embedded import EmbeddedWorker

log = logging.getLogger(__name__)

PLUGIN = "lan2gpu"  # the attribute on the Dask worker, and the metric's name
STATUS_EVERY = 0.5  # seconds between status refreshes (the metric)
GPU_EVERY = 5.0  # seconds between events for GPU memory and load alone
RESTART_EVERY = 10.0  # seconds between tries to start an exited service again
_SPARE = 4  # idle relay connections kept per notebook
_NOTEBOOKS = 16  # notebooks whose idle relay connections are kept


class Lan2GPUWorker:
    """What the preload adds to one Dask worker: the local service and its relays."""

    def __init__(self, worker: Worker, argv: Sequence[str] = ()) -> None:
        self.worker = worker
        self.argv = list(argv)
        self.service: EmbeddedWorker | None = None
        self.status: dict[str, Any] = {}  # the service's last status document
        self.problem = ""  # why there is no service (shown in the notebook's table)
        self._relays: dict[str, list[Client]] = {}  # per notebook client: idle connections
        self._cancels: dict[str, threading.Event] = {}  # cells running here
        self._cancelled: dict[str, float] = {}  # cancelled before they started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._published = ""  # placement_key of the status last published
        self._published_fast = ""  # ... without the GPUs' memory and load
        self._published_at = float("-inf")

    # -- life ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the service and the status poller (blocking: run it off the event loop)."""
        self._start_service()
        self._poller = threading.Thread(target=self._poll, name="lan2gpu-status", daemon=True)
        self._poller.start()

    def _start_service(self) -> bool:
        from lan2gpu_magic.embedded import EmbeddedWorker

        name = str(self.worker.name)
        if name == self.worker.address or not name:
            name = self.worker.address.split("://", 1)[-1]  # host:port
        elif name.isdigit():  # LocalCluster numbers its workers
            name = f"dask-worker-{name}"
        service = EmbeddedWorker(
            name=name,
            simulate=None,
            simulated_gpus=None,
            bind="ipc",
            # ipc:// in a 0700 directory: only this user reaches it; nothing to encrypt.
            extra=["--insecure-plaintext", *self.argv],
            parent=os.getpid(),
        )
        log.info("starting lan2gpu's service with %s", " ".join(self.argv) or "no flags")
        try:
            service.start()
        except Exception as exc:
            # The end of its log says why (a bad flag, a missing GPU driver...).
            lines = [line for line in str(exc).splitlines() if line.strip()]
            self.problem = "the lan2gpu service did not start: " + " / ".join(lines[-2:])
            self.status = {}
            log.error("%s", self.problem)
            service.close()
            return False
        self.service = service
        return True

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10.0)
        with self._lock:
            relays = [c for idle in self._relays.values() for c in idle]
            self._relays.clear()
        for client in relays:
            client.close()
        if self.service is not None:
            self.service.close()
            self.service = None

    def _connect(self) -> Client:
        from lan2gpu_magic.client import Client

        if self.service is None or self.service.key_file is None:
            raise RuntimeError(self.problem or "the lan2gpu service is not running")
        return Client(
            self.service.address,
            key_file=self.service.key_file,
            plaintext=True,  # ipc:// in a 0700 directory: only this user reaches it
            connect_timeout=30.0,
            compress="off",
        )

    # -- status -------------------------------------------------------------------

    def metric(self, worker: Worker) -> dict[str, Any]:
        """The ``lan2gpu`` worker metric: the service's status, or why there is none."""
        return {
            "status": self.status,
            "problem": self.problem,
            "at": time.time(),
            "server": worker.id,  # unique to this process: a restart at its address differs
        }

    def _refresh(self, client: Client | None) -> None:
        if client is None:
            pass  # self.problem says why
        else:
            try:
                self.status = self._with_dask_queue(dict(client.status(timeout=5.0)))
                self.problem = ""
            except Exception as exc:  # the service hangs or died: not a place for cells
                self.status = {}
                self.problem = f"the lan2gpu service does not answer: {exc}"
        key = self.problem or placement_key(self.status)
        fast = self.problem or placement_key(self.status, gpus=False)
        now = time.monotonic()
        # Cells, sessions and queues at once; GPU memory and load at most every few
        # seconds (they move all the time on a busy GPU, and every notebook hears them).
        if fast != self._published_fast or (
            key != self._published and now - self._published_at >= GPU_EVERY
        ):
            self._published, self._published_fast, self._published_at = key, fast, now
            self.worker.log_event(STATUS_TOPIC, self.event())

    def _with_dask_queue(self, status: dict[str, Any]) -> dict[str, Any]:
        """Cells still queued by Dask on this worker count as waiting on its GPUs, so
        that placement does not pile cells onto a worker that looks idle."""
        queued = sum(
            1
            for key, task in list(self.worker.state.tasks.items())
            if str(key).startswith("lan2gpu-cell-")
            and task.state in ("waiting", "ready", "constrained", "fetch", "flight")
        )
        if queued:
            queues = status.setdefault("load", {}).setdefault("queues", {})
            for gpu in status.get("capabilities", {}).get("gpus", []):
                slot = queues.setdefault(f"gpu{gpu.get('index')}", {})
                slot["waiting"] = int(slot.get("waiting", 0)) + queued
        return status

    def event(self) -> dict[str, Any]:
        """This worker's status as published on :data:`STATUS_TOPIC`."""
        return {
            **self.metric(self.worker),
            "worker": self.worker.address,
            "resources": dict(self.worker.state.total_resources),
        }

    def _poll(self) -> None:
        """Refresh the status every STATUS_EVERY seconds; start the service again (at
        most every RESTART_EVERY seconds) if it exited."""
        client: Client | None = None
        restarted = time.monotonic()
        try:
            while not self._stop.is_set():
                service = self.service
                if service is not None and not service.running:
                    log.error("lan2gpu's service exited; starting it again")
                    if client is not None:
                        client.close()
                        client = None
                    service.close()
                    self.service = None
                    self.problem, self.status = "the lan2gpu service exited", {}
                if self.service is None and time.monotonic() - restarted >= RESTART_EVERY:
                    restarted = time.monotonic()
                    self._start_service()
                if client is None and self.service is not None:
                    try:
                        client = self._connect()
                    except Exception as exc:
                        self.problem, self.status = f"cannot reach the lan2gpu service: {exc}", {}
                self._refresh(client)
                self._stop.wait(STATUS_EVERY)
        finally:
            if client is not None:
                client.close()

    # -- cells --------------------------------------------------------------------

    def lease(self, notebook: str) -> Client:
        """A connection to the service for one of ``notebook``'s cells: an idle one to
        the service running now (not to one that exited), or a new one."""
        service = self.service.address if self.service is not None else ""
        stale: list[Client] = []
        found: Client | None = None
        with self._lock:
            idle = self._relays.get(notebook, [])
            while idle and found is None:
                client = idle.pop()
                if client.address == service and not client.closed:
                    found = client
                else:
                    stale.append(client)
        for client in stale:
            client.close()
        return found if found is not None else self._connect()

    def give_back(self, notebook: str, client: Client, healthy: bool) -> None:
        stale: list[Client] = []
        with self._lock:
            idle = self._relays.pop(notebook, [])
            self._relays[notebook] = idle  # the most recent notebook last
            keep = healthy and not self._stop.is_set() and len(idle) < _SPARE
            if keep:
                idle.append(client)
            while len(self._relays) > _NOTEBOOKS:  # notebooks long gone
                stale += self._relays.pop(next(iter(self._relays)))
        for old in stale if keep else [*stale, client]:
            old.close()

    def cancel(self, cell: str) -> bool:
        """Cancel a cell: running here, or not started yet (it then does not run)."""
        with self._lock:
            event = self._cancels.get(cell)
            if event is None:
                now = time.monotonic()
                self._cancelled = {c: t for c, t in self._cancelled.items() if now - t < 600}
                self._cancelled[cell] = now
                return False
        event.set()
        return True

    def close_session(self, session: str) -> int:
        client = self._connect()
        try:
            return client.close_session(session)
        finally:
            client.close()

    def begin(self, cell: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            if self._cancelled.pop(cell, None) is not None:
                event.set()
            self._cancels[cell] = event
        return event

    def end(self, cell: str) -> None:
        with self._lock:
            self._cancels.pop(cell, None)


def plugin_of(worker: Worker) -> Lan2GPUWorker:
    """The plugin of a Dask worker, or an error that says how to add it."""
    plugin: Lan2GPUWorker | None = getattr(worker, PLUGIN, None)
    if plugin is None:
        raise RuntimeError(
            f"Dask worker {worker.address} has no lan2gpu plugin: start it with "
            "--preload worker_kernel.dask_plugin"
        )
    return plugin


def run_cell(spec: dict[str, Any], buffers: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """The Dask task of one ``%%lan2gpu`` cell (submitted by the notebook's backend).

    ``spec`` is the ``execute`` request as the notebook built it (kind, content,
    session, digests, codecs), plus where its live output goes (``topic``, ``cell``).
    Returns the reply's header and its frames, or a ``cancelled`` header when the cell
    was cancelled before it started.
    """
    from distributed import get_worker

    from lan2gpu_magic.request import OutputHandlers
    from worker_kernel.protocol import messages as m
    from worker_kernel.protocol.errors import Lan2GPUError, WorkerLost

    worker = get_worker()
    plugin = plugin_of(worker)
    cell, topic = str(spec["cell"]), str(spec["topic"])
    sent = [0]

    def forward(kind: str) -> Callable[..., None]:
        def send(*args: Any) -> None:
            sent[0] += 1
            worker.log_event(topic, {"cell": cell, "kind": kind, "args": list(args)})

        return send

    if spec.get("worker_id") and spec["worker_id"] != worker.id:
        # Dask gave this worker, restarted at the address of the one that held the
        # session, the task again after the first one was lost: it must not run twice.
        raise WorkerLost(
            f"Dask worker {worker.address} restarted while the cell was on it; the cell is "
            "not run again here, and its session's variables are lost",
            gone=True,
        )
    cancel = plugin.begin(cell)
    try:
        if cancel.is_set():  # cancelled while Dask still queued it: it never ran
            name = plugin.status.get("worker", worker.address)
            content = {"status": "cancelled", "worker": name, "reason": "before it started"}
            return {"kind": m.RESULT, "content": content, "events": 0}, []
        notebook = str(spec["notebook"])
        client = plugin.lease(notebook)
        healthy = False
        try:
            conn = client.connection
            # The notebook's own id: its request id (run at most once) and the results
            # it acknowledges in later requests refer to it.
            msg = conn.message(
                str(spec["kind"]), dict(spec["content"]), buffers=list(buffers),
                session=str(spec["session"]), id=cell,
            )  # fmt: skip
            msg.digests = list(spec["digests"])
            msg.codecs = list(spec["codecs"])
            # Large arrays straight to the executor, past the local service (datapath.py).
            msg.direct = conn.info.direct_data and msg.nbytes >= DIRECT_MIN
            data = conn.send(msg)
            handlers = OutputHandlers(
                stream=forward(m.STREAM), display=forward(m.DISPLAY), status=forward("status")
            )
            reply = client.wait(msg, handlers, spec["content"].get("timeout"), cancel, data)
            healthy = True
        except Lan2GPUError:
            raise
        finally:
            plugin.give_back(notebook, client, healthy)
        header = {
            "kind": reply.kind,
            "content": reply.content,
            "parent": reply.parent,
            "digests": list(reply.digests),
            "events": sent[0],
        }
        return header, [memoryview(b) for b in reply.buffers]
    finally:
        plugin.end(cell)


async def _setup(worker: Worker, argv: Sequence[str]) -> None:
    import asyncio

    plugin = Lan2GPUWorker(worker, argv)
    setattr(worker, PLUGIN, plugin)
    worker.metrics[PLUGIN] = plugin.metric
    await asyncio.to_thread(plugin.start)


# Set by the plugin itself: the service's socket, key, files, transport and name.
_OWN = {"--bind", "--key-file", "--name", "--ready-file", "--parent-pid", "--cleanup-dir",
        "--encrypt", "--authorized-keys", "--insecure-plaintext", "--advertise",
        # dask worker's own (its worker's memory): set lan2gpu's with LAN2GPU_MEMORY_LIMIT.
        "--memory-limit",
        "--fault"}  # fault injection, for lan2gpu's own tests  # fmt: skip


def _worker_flags() -> list[tuple[str, str]]:
    """``(flag, kind)`` of each ``python -m worker_kernel`` option a Dask worker may pass."""
    from .options import OPTIONS

    return [(o.flag, o.kind) for o in OPTIONS if o.flag not in _OWN]


def _click_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The worker's own options, as options of ``dask_setup``: ``dask worker ... --preload
    worker_kernel.dask_plugin --session-idle 600`` (Dask parses them with this command)."""
    for flag, kind in reversed(_worker_flags()):
        name = flag.removeprefix("--").replace("-", "_")
        if kind == "switch":
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None)
        elif kind == "flag":
            option = click.option(flag, name, is_flag=True, default=False)
        elif kind == "append":
            option = click.option(flag, name, multiple=True)
        else:
            option = click.option(flag, name, default=None)
        command = option(command)
    return command


def service_argv(params: dict[str, Any]) -> list[str]:
    """The parsed ``dask_setup`` options back as ``python -m worker_kernel`` flags."""
    argv: list[str] = []
    for flag, kind in _worker_flags():
        value = params.get(flag.removeprefix("--").replace("-", "_"))
        if value is None or value is False or value == ():
            continue
        if kind == "switch":
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif kind == "flag":
            argv.append(flag)
        elif kind == "append":
            argv += [f"{flag}={v}" for v in value]
        else:
            argv.append(f"{flag}={value}")
    return argv


@click.command()
@_click_options
def dask_setup(worker: Worker, **params: Any) -> Any:
    """Dask's preload hook. Flags after ``--preload worker_kernel.dask_plugin`` (any
    option of ``python -m worker_kernel`` but those the plugin sets itself) go to the
    worker's lan2gpu service; its ``LAN2GPU_*`` environment variables apply too."""
    return _setup(worker, service_argv(params))


async def dask_teardown(worker: Worker) -> None:
    import asyncio

    plugin: Lan2GPUWorker | None = getattr(worker, PLUGIN, None)
    worker.metrics.pop(PLUGIN, None)
    if plugin is not None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(plugin.close)


__all__ = ["PLUGIN", "Lan2GPUWorker", "dask_setup", "dask_teardown", "plugin_of", "run_cell"]
