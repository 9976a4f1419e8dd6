"""The same cells on a Dask cluster: ``%lan2gpu connect dask://SCHEDULER:8786``.

A lab whose GPUs sit in a Slurm or Kubernetes cluster already runs Dask there
(dask-jobqueue, the Dask Kubernetes operator, dask-cuda). This backend rides it: the
engine does deployment, membership, queueing on ``resources`` and transport (TLS with
``dask+tls://``); lan2gpu keeps capture, serialization, results, placement and its
session executors, which run on every Dask worker started with
``--preload worker_kernel.dask_plugin`` (see that module).

A cell is one Dask task (:func:`worker_kernel.dask_plugin.run_cell`), pinned to the
worker placement chose (``workers=[...]``, never elsewhere, ``retries=0``), asking
``resources={"GPU": n}`` where workers declare GPUs, so Dask queues it behind the
cells already using them. Its request is built here exactly as for a LAN worker
(:class:`~.upload.Uploads`: arrays the session holds go as digests); its live output
comes back as Dask events on this notebook's own topic; its result's frames are
unpickled here.

Placement reads each worker's lan2gpu status: once from the scheduler when connecting
(the ``lan2gpu`` worker metric), then as the plugins publish changes (``lan2gpu-status``
events: a few per cell, however many workers there are), so placing a cell asks nobody. A worker
that leaves while it runs a cell (the scheduler's ``remove-worker`` event) fails the
cell with :class:`WorkerLost` at once (Dask would leave such a task pending forever),
so ``--retry`` places it again elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.dask_tasks import STATUS_TOPIC
from worker_kernel.protocol.errors import (
    ConfigurationError,
    NoWorkerAvailable,
    ProtocolError,
    VersionMismatch,
    WorkerLost,
    WorkerUnreachable,
)
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.serialize import Payload
from worker_kernel.protocol.versions import check_compatible, local_versions

from . import pipeline, results
from .backend import Runner
from .client import Interrupted, InterruptFlag
from .connection import WorkerInfo
from .placement import Placement, Requirements, WorkerView, choose_slots, choose_worker
from .pool import WorkerRow, view_from_status
from .request import ExecuteRequest, OutputHandlers
from .results import RunResult
from .tracebacks import register_source
from .upload import Uploads

log = logging.getLogger(__name__)

SCHEMES = ("dask://", "dask+tcp://", "dask+tls://")
DASK = "dask"  # the origin column of `%lan2gpu workers`
STARTING = "starting"  # a worker's state while its plugin starts the lan2gpu service
_METRIC = "lan2gpu"  # worker_kernel.dask_plugin.PLUGIN (the notebook side does not import it)
_POLL = 0.05  # seconds between looks at a running cell's task and output
_MAX_VIEWS = 10_000  # cached worker rows (per worker and session), then start over
_DONE = "lan2gpu-task-done"  # put in a cell's output queue when its task ends
_OUTPUT_GRACE = 5.0  # seconds to wait for output still in flight after the result
_SCATTER_BYTES = 8 << 20  # inputs this large are scattered (below Dask's large-graph warning)
_RESULT_WAIT = 30.0  # seconds to fetch a finished cell's result
_DIED = "its connection to the scheduler dropped"
_CANCEL_GRACE = 10.0  # seconds a cancelled cell gets to confirm before we stop waiting
_SETTLING = 30.0  # seconds after a worker joined or left in which placement waits for more


def is_cluster_address(address: str) -> bool:
    """Whether ``address`` names a Dask cluster (``dask://``, ``dask+tls://``, or a
    scheduler file ``*.json`` written by ``dask scheduler --scheduler-file``)."""
    return address.startswith(SCHEMES) or address.endswith(".json")


def client_arguments(address: str) -> dict[str, Any]:
    """``distributed.Client`` arguments for a cluster address."""
    if address.endswith(".json") and "://" not in address:
        path = os.path.expanduser(address)
        if not os.path.exists(path):
            raise ConfigurationError(
                f"scheduler file {address!r} does not exist; dask-jobqueue and `dask scheduler "
                "--scheduler-file PATH` write it once the scheduler runs"
            )
        return {"scheduler_file": path}
    for scheme, dask_scheme in (("dask+tls://", "tls://"), ("dask+tcp://", "tcp://")):
        if address.startswith(scheme):
            return {"address": dask_scheme + address.removeprefix(scheme)}
    if address.startswith("dask://"):
        return {"address": "tcp://" + address.removeprefix("dask://")}
    raise ConfigurationError(
        f"{address!r} is not a Dask cluster address: use dask://HOST:8786, "
        "dask+tls://HOST:8786 or a scheduler file (.json)"
    )


def worker_info(address: str, name: str, status: dict[str, Any]) -> WorkerInfo:
    """Who a Dask worker's lan2gpu service is, as a LAN handshake would say."""
    return WorkerInfo(
        name=name,
        address=address,
        instance="",
        versions=dict(status.get("versions", {})),
        capabilities=dict(status.get("capabilities", {})),
        heartbeat=1.0,
    )


class _Requests:
    """What :class:`~.upload.Uploads` needs of a connection, for a Dask worker: it makes
    messages (signed on the worker, by its relay) and never measures the link (Dask's
    own transport compresses where that pays)."""

    def __init__(self, runner: DaskRunner) -> None:
        self.runner = runner
        self.clock = time.monotonic

    @property
    def info(self) -> WorkerInfo:
        return self.runner.info

    def message(self, kind: str, content: dict[str, Any] | None = None, **kw: Any) -> Message:
        return Message(kind, content or {}, **kw)

    def ping(self, timeout: float = 5.0, expect_bytes: int = 0) -> float:
        return 0.0

    def request(self, msg: Message, reply_kinds: set[str], timeout: float) -> Message:
        raise ProtocolError("a Dask worker is not asked directly")


@dataclass
class _Output:
    """A running cell's live output, as the event handler hands it over."""

    events: queue.SimpleQueue[tuple[str, list[Any]]] = field(default_factory=queue.SimpleQueue)


class DaskRunner:
    """Runs cells on one Dask worker, for one thread at a time (as a LAN
    :class:`~.client.Client` does for one worker)."""

    def __init__(self, cluster: DaskCluster, address: str, name: str, session: str) -> None:
        self.cluster = cluster
        self.address = address
        self.session = session
        self.info = worker_info(address, name, {})
        self.uploads = Uploads(_Requests(self), cache=True, compress="off")
        self.uploads.link_bandwidth = float("inf")  # never worth compressing here
        self._used_default_session = False
        self.closed = False

    @property
    def name(self) -> str:
        return self.info.name

    def __repr__(self) -> str:
        return f"<lan2gpu DaskRunner {self.name} {self.address}>"

    def adopt_session(self) -> str:
        self._used_default_session = True
        return self.session

    def close_session(self, session: str | None = None, timeout: float = 10.0) -> int:
        """Stop the session's executors on this Dask worker (frees their GPU memory)."""
        from worker_kernel.protocol.dask_tasks import close_session

        done = self.cluster.dask.run(
            close_session, session or self.session, workers=[self.address]
        )  # fmt: skip
        return int(done.get(self.address, 0))

    def execute(
        self, request: ExecuteRequest, payload: Payload, handlers: OutputHandlers | None = None
    ) -> RunResult:
        """As :meth:`.client.Client.execute`, over Dask."""
        shown = handlers or OutputHandlers()
        self._used_default_session |= request.session == self.session
        return self.uploads.exchange(request, payload, lambda m: self._run(m, request, shown))

    def _run(self, msg: Message, request: ExecuteRequest, handlers: OutputHandlers) -> Message:
        from worker_kernel.protocol.dask_tasks import run_cell

        cluster = self.cluster
        spec = {
            "kind": msg.kind,
            "content": msg.content,
            "session": msg.session,
            "digests": list(msg.digests),
            "codecs": list(msg.codecs),
            "cell": msg.id,
            "topic": cluster.topic,
            "notebook": cluster.id,
        }
        spec["worker_id"] = cluster.worker_id(self.address)  # not a restart at its address
        resources = cluster.resources(self.address, request)
        output = cluster.listen(msg.id)
        shown = 0
        cancel_asked: float | None = None
        future: Any = None  # distributed.Future (distributed is not typed)
        data: Any = list(msg.buffers)
        got: Any = None
        try:
            if msg.nbytes >= _SCATTER_BYTES:
                # Large inputs go to the worker as data, not inside the task (the
                # scheduler warns about large graphs, and would keep them in the graph).
                data = cluster.dask.scatter([data], workers=[self.address], hash=False)[0]
            future = cluster.dask.submit(
                run_cell, spec, data,
                key=f"lan2gpu-cell-{msg.id}",
                workers=[self.address],
                allow_other_workers=False,
                resources=resources,
                pure=False,
                retries=0,
            )  # fmt: skip
            # Wakes the wait below the moment the task ends (no polling delay).
            future.add_done_callback(lambda _: output.events.put((_DONE, [])))
            with InterruptFlag(request.cancel) as flag:
                # Until the result is here: a worker lost after its task ended would
                # otherwise leave us waiting for a recomputation that never comes.
                while got is None:
                    shown += _show(output, handlers, _POLL)
                    lost = cluster.lost(self.address)
                    if lost is not None:
                        raise WorkerLost(
                            f"Dask worker {self.name} ({self.address}) left the cluster while "
                            f"it ran the cell ({lost}); its session's variables there are lost",
                            gone=lost == _DIED,
                        )
                    now = time.monotonic()
                    if flag.requested() and cancel_asked is None:
                        cancel_asked = now
                        cluster.cancel(msg.id, self.address)
                    elif cancel_asked is not None and now - cancel_asked > _CANCEL_GRACE:
                        raise KeyboardInterrupt  # stop waiting; the finally cancels the task
                    if future.done():
                        got = future.result(timeout=_RESULT_WAIT)
                by_event = flag.by_event
            header, buffers = got
            deadline = time.monotonic() + _OUTPUT_GRACE
            while shown < int(header.get("events", 0)) and time.monotonic() < deadline:
                shown += _show(output, handlers, _POLL)
            shown += _show(output, handlers, 0.0)
        except BaseException:
            # Leaving without a result: do not leave the cell running there.
            if future is not None and got is None and cancel_asked is None:
                cluster.cancel(msg.id, self.address)
            raise
        finally:
            cluster.forget(msg.id)
            if future is not None and not future.done():
                future.cancel()
            data = future = None  # the worker may forget the inputs and the result
        reply = Message(
            str(header["kind"]),
            dict(header.get("content", {})),
            buffers=list(buffers),
            session=msg.session,
            parent=str(header.get("parent", msg.id)),
            digests=list(header.get("digests", [])),
        )
        if cancel_asked is not None and not by_event:
            raise Interrupted(bool(reply.content.get("session_lost")))
        return reply

    def close(self) -> None:
        """Stop this notebook's default session on the worker (named sessions stay
        until they are idle). Idempotent."""
        if self._used_default_session and not self.closed:
            self._used_default_session = False
            with contextlib.suppress(Exception):
                self.close_session(self.session, timeout=2.0)
        self.closed = True


def _incompatible(address: str, status: dict[str, Any]) -> str:
    """Why this notebook cannot use a worker's lan2gpu (versions, as the LAN handshake
    checks them), or ""."""
    try:
        check_compatible(
            local_versions(), dict(status.get("versions", {})), f"Dask worker {address}"
        )
    except VersionMismatch as exc:
        return str(exc)
    return ""


def _show(output: _Output, handlers: OutputHandlers, wait: float) -> int:
    """Show what arrived of the cell's output (waiting up to ``wait`` for the first)."""
    n = 0
    try:
        kind, args = output.events.get(timeout=wait) if wait else output.events.get_nowait()
    except queue.Empty:
        return 0
    while True:
        n += kind != _DONE
        if kind == _DONE:
            pass
        elif kind == m.STREAM:
            handlers.stream(str(args[0]), str(args[1]))
        elif kind == m.DISPLAY:
            handlers.display(dict(args[0]), dict(args[1]))
        else:
            handlers.status(str(args[0]), dict(args[1]))
        try:
            kind, args = output.events.get_nowait()
        except queue.Empty:
            return n


class DaskCluster:
    """The workers of one Dask cluster, as the magic, split cells and async jobs use
    them (the same calls as :class:`~.pool.WorkerPool`)."""

    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = 30.0,
        worker_wait: float = 60.0,
    ) -> None:
        try:
            import distributed
        except ImportError:
            raise ConfigurationError(
                "connecting to a Dask cluster needs dask distributed: pip install 'lan2gpu[dask]'"
            ) from None
        self.address = address
        try:
            # distributed is not typed: its client is Any here.
            self.dask: Any = getattr(distributed, "Client")(  # noqa: B009
                **client_arguments(address),
                timeout=connect_timeout,
                set_as_default=False,
            )
        except (OSError, TimeoutError) as exc:
            raise WorkerUnreachable(
                f"cannot reach the Dask scheduler at {address}: {exc}. Is it running, and "
                "is the address right (dask://HOST:8786)?"
            ) from None
        self.id = uuid.uuid4().hex
        # The cells' output goes to the topic named after this Dask client: the
        # scheduler drops its events once the client is gone (events-cleanup-delay).
        self.topic = str(self.dask.id)
        self._outputs: dict[str, _Output] = {}
        self._gone: dict[str, str] = {}  # workers that left since we connected: why
        self._changed_at = float("-inf")  # when a worker last joined or left
        self.worker_wait = worker_wait
        self._lock = threading.Lock()
        self._info: dict[str, Any] = {}
        self._info_at = float("-inf")
        self._runners: dict[str, DaskRunner] = {}
        # (worker, session) -> (the metric it was made from, the row)
        self._row_cache: dict[tuple[str, str | None], tuple[Any, WorkerRow]] = {}
        self._version = 0  # counts changes to what this notebook knows of the workers
        self._rows: tuple[int, str | None, list[WorkerRow]] | None = None
        self._chosen: tuple[tuple[Any, ...], Placement] | None = None  # the last choice
        self._cells = 0
        self._spare: dict[str, list[DaskRunner]] = {}
        self.real_gpu_workers: set[str] = set()
        self._session_prefix = f"{socket.gethostname()}:{os.getpid()}:{self.id[:8]}"
        self.identity_calls = 0  # scheduler_info calls made (placement makes none)
        self.status_events = 0  # status events received
        self._subscribed = threading.Event()
        self.dask.subscribe_topic("all", self._on_cluster_event)
        self.dask.subscribe_topic(STATUS_TOPIC, self._on_status)
        self.dask.subscribe_topic(self.topic, self._on_output)
        try:
            self._await_subscriptions(connect_timeout)
        except BaseException:
            self.dask.close()
            raise

    # -- events (on Dask's event loop thread) ----------------------------------------

    def _await_subscriptions(self, timeout: float) -> None:
        """Wait until the scheduler has our subscriptions, before the first read of the
        workers, so that no change falls between. They travel on Dask's batched stream,
        behind RPCs: an event of our own coming back on the last one proves them."""
        deadline = time.monotonic() + timeout
        while not self._subscribed.wait(0.05):
            if time.monotonic() > deadline:
                raise WorkerUnreachable(
                    f"the Dask scheduler at {self.address} did not take our event "
                    f"subscriptions within {timeout:g} s"
                )
            self.dask.log_event(self.topic, {"cell": "", "kind": "subscribed"})

    def _on_output(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        if msg.get("kind") == "subscribed":
            self._subscribed.set()
            return
        with self._lock:
            output = self._outputs.get(str(msg.get("cell")))
        if output is not None:
            output.events.put((str(msg.get("kind")), list(msg.get("args", []))))

    def _on_cluster_event(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        address = str(msg.get("worker"))
        if msg.get("action") == "remove-worker":
            # Its connection dropped (killed, host down): nothing of it runs any more.
            # Removed for missed heartbeats, it may still be running the cell.
            stimulus = str(msg.get("stimulus_id", ""))
            why = _DIED if stimulus.startswith("handle-worker-cleanup") else stimulus
            with self._lock:
                self._gone[address] = why or "removed"
                self._info.pop(address, None)
                self._changed_at = time.monotonic()
                self._version += 1
        elif msg.get("action") == "add-worker":
            with self._lock:  # its plugin publishes its status once its service is up
                self._gone.pop(address, None)
                self._info.setdefault(address, {})
                self._changed_at = time.monotonic()
                self._version += 1

    def _on_status(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        address = str(msg.get("worker", ""))
        metric = {
            "status": msg.get("status") or {},
            "problem": str(msg.get("problem", "")),
            "at": float(msg.get("at", 0.0)),
            "server": str(msg.get("server", "")),
        }
        with self._lock:
            self.status_events += 1
            if address in self._gone:
                return  # a late event from a worker that left
            info = self._info.setdefault(address, {})
            info["metrics"] = {**info.get("metrics", {}), _METRIC: metric}
            info["resources"] = dict(msg.get("resources") or {})
            self._version += 1

    def listen(self, cell: str) -> _Output:
        with self._lock:
            output = self._outputs[cell] = _Output()
        return output

    def forget(self, cell: str) -> None:
        with self._lock:
            self._outputs.pop(cell, None)

    def lost(self, address: str) -> str | None:
        """Why ``address`` left the cluster (:data:`_DIED`: its connection dropped, so
        nothing runs there any more), or None while it is a member."""
        with self._lock:
            return self._gone.get(address)

    def worker_id(self, address: str) -> str:
        """The Dask worker's own id, so that a worker restarted at the same address
        refuses a cell meant for the one that held its session."""
        info = self._workers().get(address, {})
        return str((info.get("metrics", {}).get(_METRIC) or {}).get("server", ""))

    def cancel(self, cell: str, address: str) -> None:
        """Ask the worker to cancel ``cell`` (running or queued), without waiting: the
        request goes through the scheduler, and the cell's wait must stay responsive."""
        from worker_kernel.protocol.dask_tasks import cancel_cell

        def ask() -> None:
            try:
                self.dask.run(cancel_cell, cell, workers=[address])
            except Exception as exc:  # the worker left, or the cluster closed: nothing to stop
                log.info("could not cancel cell %s on %s: %s", cell[:8], address, exc)

        threading.Thread(target=ask, name="lan2gpu-cancel", daemon=True).start()

    # -- workers -----------------------------------------------------------------------

    def _workers(self, max_age: float | None = None) -> dict[str, Any]:
        """The workers as this notebook knows them: read from the scheduler once (and
        when ``max_age`` is 0, or placement waits for workers), then kept by the
        plugins' status events and the scheduler's membership events."""
        now = time.monotonic()
        if max_age == 0 or self._info_at == float("-inf"):
            fetched = dict(self.dask.scheduler_info(n_workers=-1).get("workers", {}))
            self.identity_calls += 1
            with self._lock:
                for address, info in fetched.items():
                    # A heartbeat's metric may be older than the last event: keep the newer.
                    old = (self._info.get(address, {}).get("metrics", {})).get(_METRIC)
                    new = info.get("metrics", {}).get(_METRIC)
                    if old and (not new or old.get("at", 0) > new.get("at", 0)):
                        info["metrics"] = {**info.get("metrics", {}), _METRIC: old}
                self._info = fetched
                self._info_at = now
                self._version += 1
        with self._lock:
            return dict(self._info)

    def resources(self, address: str, request: ExecuteRequest) -> dict[str, float] | None:
        """What the cell's task asks of Dask: its GPUs, where the worker declares a
        ``GPU`` resource (``dask worker --resources GPU=1``)."""
        declared = self._workers().get(address, {}).get("resources", {})
        if request.cpu or "GPU" not in declared:
            return None
        wanted = float(max(1, len(request.gpus)))
        if wanted > float(declared["GPU"]):
            # Dask would queue such a task forever.
            raise NoWorkerAvailable(
                f"the cell asks for {wanted:g} GPUs, and Dask worker {address} declares "
                f"GPU={declared['GPU']:g}: start it with --resources GPU={wanted:g} (one "
                "Dask worker per GPU cannot run a multi-GPU cell)"
            )
        return {"GPU": wanted}

    def rows(
        self, session: str | None = None, detail: bool = False, max_age: float | None = None
    ) -> list[WorkerRow]:
        """Every Dask worker with its lan2gpu status, or why it cannot run cells."""
        workers = self._workers(max_age)
        with self._lock:
            version = self._version
        last = self._rows
        if last is not None and last[0] == version and last[1] == session:
            return list(last[2])  # nothing changed since: the same rows
        rows = [self._row(address, info, session) for address, info in sorted(workers.items())]
        self._rows = (version, session, rows)
        return list(rows)

    def _row(self, address: str, info: dict[str, Any], session: str | None) -> WorkerRow:
        """One worker's row. A row changes only with the worker's status, so it is made
        once per status (and session): placing a cell over hundreds of workers then
        costs the policy, not the parsing of their documents."""
        metric = info.get("metrics", {}).get(_METRIC) or {}
        status = metric.get("status")
        cached = self._row_cache.get((address, session))
        if cached is not None and cached[0] is metric:
            return cached[1]
        if not metric:
            problem = "no lan2gpu plugin: start the worker with --preload worker_kernel.dask_plugin"
            row = WorkerRow(address, DASK, None, None, problem, "no plugin")
        elif metric.get("problem"):  # the service stopped answering: not a place for cells
            row = WorkerRow(address, DASK, None, None, str(metric["problem"]), "no service")
        elif not status:
            row = WorkerRow(address, DASK, None, None, "starting its lan2gpu service", STARTING)
        elif problem := _incompatible(address, status):
            row = WorkerRow(address, DASK, None, None, problem, "version mismatch")
        else:
            mine = session or self.runner(address, str(status.get("worker", address))).session
            view = view_from_status(address, status, 0.0, mine)
            if not view.simulator and view.gpus:
                self.real_gpu_workers.add(address)
            row = WorkerRow(address, DASK, view, status)
        if len(self._row_cache) > _MAX_VIEWS:
            self._row_cache.clear()
        self._row_cache[address, session] = (metric, row)
        return row

    def runner(self, address: str, name: str = "") -> DaskRunner:
        """The runner of ``address`` for this thread's cells (one per worker)."""
        runner = self._runners.get(address)
        if runner is None:
            session = f"{self._session_prefix}:{len(self._runners)}"
            runner = self._runners[address] = DaskRunner(self, address, name or address, session)
        elif name and name != runner.name:
            runner.info = worker_info(address, name, {})
        return runner

    def _place(
        self,
        policy: Callable[[list[WorkerView], bool], Placement | list[Placement]],
        exclude: Collection[str],
        session: str | None,
    ) -> list[Placement]:
        deadline = time.monotonic() + self.worker_wait
        while True:
            rows = self.rows(session)
            views = [r.view for r in rows if r.view is not None and r.address not in exclude]
            with self._lock:
                views = [v for v in views if v.address not in self._gone]
                changing = time.monotonic() - self._changed_at < _SETTLING
            try:
                chosen = policy(views, bool(self.real_gpu_workers))
                return chosen if isinstance(chosen, list) else [chosen]
            except NoWorkerAvailable as exc:
                # Workers still coming (a nanny restarting one, a service starting, a
                # cluster scaling up) are waited for, a while; a cluster that is up
                # but lacks what was asked answers at once.
                booting = any(r.state == STARTING for r in rows)
                starting = not rows or changing or booting
                if starting and time.monotonic() < deadline:
                    time.sleep(_POLL * 5)
                    if not rows or booting:
                        # Ask the scheduler again: a worker's first status event may have
                        # gone out before we subscribed; its heartbeats carry it too.
                        self._info_at = float("-inf")
                    continue
                problems = [f"{r.address}: {r.problem}" for r in rows if r.view is None]
                if not rows:
                    problems.append(f"the cluster at {self.address} has no workers yet")
                if not problems:
                    raise
                listed = "\n  ".join(problems)
                raise NoWorkerAvailable(f"{exc}\nUnusable workers:\n  {listed}") from None

    def choose(
        self, req: Requirements, exclude: Collection[str] = (), session: str | None = None
    ) -> tuple[DaskRunner, Placement]:
        """The runner of the best Dask worker for ``req``, and where on it to run."""
        with self._lock:
            version = self._version
        key = (version, req, frozenset(exclude), session)
        if self._chosen is not None and self._chosen[0] == key:
            placement = self._chosen[1]  # nothing changed since: the same choice (pure policy)
        else:
            placement = self._place(
                lambda views, real: choose_worker(req, views, real_gpus_known=real),
                exclude,
                session,
            )[0]
            self._chosen = (key, placement)
        return self.runner(placement.worker.address, placement.worker.name), placement

    def slots(
        self, req: Requirements, count: int | None, session: str | None = None
    ) -> list[Placement]:
        return self._place(
            lambda views, real: choose_slots(req, views, count, real_gpus_known=real),
            (),
            session,
        )

    def session_for(self, address: str) -> str:
        return self.runner(address).adopt_session()

    def lease(self, address: str) -> DaskRunner:
        """A runner for one run in another thread (split chunks, async cells)."""
        main = self.runner(address)
        with self._lock:
            spare = self._spare.get(address, [])
            if spare:
                return spare.pop()
        return DaskRunner(self, address, main.name, main.session)

    def give_back(self, runner: Runner, healthy: bool = True) -> None:
        if not isinstance(runner, DaskRunner):
            raise TypeError(f"{runner!r} was not leased from this cluster")
        with self._lock:
            if healthy:
                self._spare.setdefault(runner.address, []).append(runner)

    def run(
        self,
        code: str,
        namespace: MutableMapping[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
        requirements: Requirements | None = None,
        handlers: OutputHandlers | None = None,
        retry: int = 0,
    ) -> RunResult:
        """Run ``code`` on the best worker for ``requirements`` as if it ran locally in
        ``namespace`` (:meth:`.client.Client.run`, on the cluster)."""
        ns: MutableMapping[str, Any] = {} if namespace is None else namespace
        self._cells += 1
        filename = f"<lan2gpu-cell-{self.id[:6]}-{self._cells}>"
        plan = pipeline.plan(code, ns, filename=filename)
        globals_ = ns if isinstance(ns, dict) else None
        cell = pipeline.Cell(
            code=code,
            plan=plan,
            filename=filename,
            session=session,
            timeout=timeout,
            namespace=globals_,
            keep_namespace=session is not None or namespace is None,
        )
        payload = pipeline.serialize(plan.inputs, ns, globals_=globals_)
        register_source(filename, code)
        req = requirements or Requirements()
        result = pipeline.execute(
            cell,
            payload,
            lambda lost: self.choose(req, exclude=lost, session=session),
            lambda _: handlers or OutputHandlers(),
            local=ns,
            retry=retry,
        )
        results.apply(result, ns, warn=print)
        return result

    def __enter__(self) -> DaskCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_probes(self, timeout: float = 30.0) -> None:
        """Wait (up to ``timeout``) for workers whose plugin is still starting its lan2gpu
        service, so a listing shows what they are rather than "starting"."""
        deadline = time.monotonic() + timeout
        asked = time.monotonic()
        while time.monotonic() < deadline:
            fresh = time.monotonic() - asked > 2.0  # now and then, read the heartbeats too
            if fresh:
                asked = time.monotonic()
            if not any(r.state == STARTING for r in self.rows(max_age=0 if fresh else None)):
                return
            time.sleep(_POLL * 4)

    def dashboard_link(self) -> str:
        return str(self.dask.dashboard_link)

    def close(self) -> None:
        """Close this notebook's default sessions and the Dask client. Idempotent."""
        if self.dask.status == "closed":
            return
        for runner in self._runners.values():
            runner.close()
        with contextlib.suppress(Exception):
            self.dask.unsubscribe_topic(self.topic)
            self.dask.unsubscribe_topic("all")
            self.dask.unsubscribe_topic(STATUS_TOPIC)
        self.dask.close()


__all__ = ["DaskCluster", "DaskRunner", "client_arguments", "is_cluster_address"]
