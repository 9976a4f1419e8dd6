"""The workers this notebook knows: configured, discovered, or the embedded one.

Addresses come from ``%lan2gpu connect``, the ``Lan2GPU.workers`` setting,
``$LAN2GPU_WORKERS`` and mDNS discovery. Only when none is configured or found
does the pool start a local worker, so a configured but unreachable worker is an
error, never silently replaced by a simulator.

Before placing a cell the pool asks every connected worker for its status at
once (one round trip, in parallel), so placement sees live queues, free memory
and latency.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zmq

from worker_kernel.protocol.contents import Queue, StatusDocument
from worker_kernel.protocol.errors import Lan2GPUError, NoWorkerAvailable, WorkerUnreachable

from .backend import Runner
from .client import Client
from .discovery import Browser
from .embedded import EmbeddedWorker
from .placement import (
    GpuView,
    Placement,
    Requirements,
    WorkerView,
    choose_slots,
    choose_worker,
)
from .statuses import StatusReply, fetch_statuses, state_of

CONFIGURED, DISCOVERED, EMBEDDED = "configured", "discovered", "embedded"


_RETRY_AFTER = 30.0  # seconds before a worker that failed is tried again (doubling)
_MAX_BACKOFF = 600.0
_RETRY_CONNECT = 3.0  # handshake limit when trying a failed worker again
_PROBE_DISCOVERED = 3.0  # handshake limit for a worker only announced on the LAN
_PROBES_AT_ONCE = 128  # fakes announced by the hundred must not queue the real one
_LAN_POLL = 0.05  # seconds between looks while a first cell waits for the LAN
_MAX_SPARE = 8  # idle extra connections kept per worker


@dataclass
class _Entry:
    address: str
    key_file: str | None
    origin: str
    server_key: str | None = None  # the worker's CurveZMQ public key file (--encrypt)
    plaintext: bool = False  # a worker run with --insecure-plaintext
    client: Client | None = None
    problem: str = ""
    state: str = "up"  # or why it is unusable: "unreachable", "key mismatch", ...
    retry_at: float = 0.0  # skip this worker until then (it just failed)
    failures: int = 0  # in a row: the wait before the next try doubles
    status: StatusDocument | None = None  # the last status reply, and when it came
    status_at: float = float("-inf")
    latency: float = float("inf")

    def failed(self, problem: str, state: str, retry_at: float) -> None:
        self.problem, self.state, self.retry_at = problem, state, retry_at
        self.failures += 1

    def succeeded(self) -> None:
        self.problem, self.state, self.retry_at, self.failures = "", "up", 0.0, 0


@dataclass(frozen=True)
class WorkerRow:
    """One line of ``%lan2gpu workers``: a worker's view, or why it is unusable."""

    address: str
    origin: str
    view: WorkerView | None
    status: StatusDocument | None
    problem: str = ""
    state: str = "up"  # else "unreachable", "key mismatch", "version mismatch", ...


def view_from_status(
    address: str, status: StatusDocument, latency: float, session: str = ""
) -> WorkerView:
    """Placement's view of a worker from its status reply; GPUs where ``session``
    already has an executor are marked sticky."""
    caps = status.get("capabilities", {})
    load = status.get("load", {})
    queues = load.get("queues", {})
    homes = {
        slot
        for executor in status.get("executors", [])
        if executor.get("session") == session
        for slot in executor.get("resources", [])
    }

    def queued(slot: str) -> int:
        q: Queue = queues.get(slot, {})
        return int(q.get("running", 0)) + int(q.get("waiting", 0)) + int(q.get("kernels", 0))

    gpus = tuple(
        GpuView(
            index=int(g["index"]),
            name=str(g["name"]),
            compute_capability=(int(g["compute_capability"][0]), int(g["compute_capability"][1])),
            memory_total=int(g["memory_total"]),
            memory_free=int(g["memory_free"]),
            utilization=g.get("utilization"),
            queue=queued(f"gpu{g['index']}"),
            simulated=bool(g.get("simulated")),
            sticky=f"gpu{g['index']}" in homes,
        )
        for g in caps.get("gpus", [])
    )
    return WorkerView(
        name=str(status.get("worker", "?")),
        address=address,
        simulator=bool(caps.get("simulator")),
        gpus=gpus,
        cpu_count=int(caps.get("cpu_count", 1)),
        load_average=float(caps.get("load_average", 0.0)),
        cpu_queue=queued("cpu"),
        latency=latency,
        cpu_sticky="cpu" in homes,
    )


class WorkerPool:
    """Owns a :class:`Client` per known worker, the LAN browser and the embedded worker."""

    def __init__(
        self,
        *,
        addresses: Sequence[str] = (),
        key_file: str | None = None,
        embedded: bool = True,
        discovery: bool = True,
        discovery_wait: float = 1.0,
        connect_timeout: float = 10.0,
        status_timeout: float = 2.0,
        status_ttl: float = 0.5,
        announce: Callable[[str], None] = print,
        server_keys: Mapping[str, str] | None = None,
        plaintext: bool = False,
        retry_after: float = _RETRY_AFTER,
        max_backoff: float = _MAX_BACKOFF,
    ) -> None:
        self.key_file = key_file
        self.connect_timeout = connect_timeout
        self.status_timeout = status_timeout
        self.status_ttl = status_ttl
        self.allow_embedded = embedded
        self.discovery = discovery
        self.discovery_wait = discovery_wait
        self.retry_after, self.max_backoff = retry_after, max_backoff
        self._announce = announce
        self._entries: dict[str, _Entry] = {}
        self._browser: Browser | None = None
        self._discovery_until: float | None = None  # first look: announcements may come
        self._announced = 0  # how many the last look saw
        # Workers found on the LAN are tried in background threads (addresses in
        # flight; what they found, taken in by the pool's own thread).
        self._probing: set[str] = set()
        self._probed: queue.SimpleQueue[tuple[_Entry, Client | Lan2GPUError]] = queue.SimpleQueue()
        self._probe_threads: list[threading.Thread] = []
        self.embedded: EmbeddedWorker | None = None
        self.real_gpu_workers: set[str] = set()  # addresses that ever reported a real GPU
        self.server_keys = dict(server_keys or {})
        self.plaintext = plaintext  # connect without encryption (--insecure-plaintext workers)
        # Extra connections for runs in other threads (split chunks, async cells),
        # kept when idle so they remember what each worker session holds.
        self._spare: dict[str, list[Client]] = {}
        self._lent: set[Client] = set()
        self._lock = threading.Lock()
        self._closed = False  # lent clients are closed by their thread on give_back
        # One ZeroMQ context (its I/O thread) for every connection of the pool, made
        # when the first is, ended when the pool is closed and the last is given back.
        self._zmq: zmq.Context[zmq.Socket[bytes]] | None = None
        for address in addresses:
            entry = _Entry(address, key_file, CONFIGURED, self.server_keys.get(address))
            entry.plaintext = plaintext
            self._entries[address] = entry

    # -- membership -------------------------------------------------------------

    def connect(
        self,
        address: str,
        key_file: str | None = None,
        server_key: str | None = None,
        *,
        plaintext: bool = False,
        timeout: float | None = None,
    ) -> Client:
        """Add a worker and connect now (errors are raised, not recorded).

        ``server_key``: the worker's public key file, for a worker run with --encrypt;
        ``plaintext``: for a worker run with --insecure-plaintext; ``timeout``: seconds
        to wait for the handshake (default ``connect_timeout``).
        """
        server_key = server_key or self.server_keys.get(address)
        entry = _Entry(address, key_file or self.key_file, CONFIGURED, server_key)
        entry.plaintext = plaintext or self.plaintext
        client = self._client(entry, timeout)  # raises: a failed connect changes nothing
        previous = self._entries.get(address)
        if previous is not None and previous.client is not None:
            previous.client.close()
        entry.client = client
        self._entries[address] = entry
        return client

    def _failed(self, entry: _Entry, problem: str, state: str, now: float) -> None:
        # Retry later, waiting twice as long after each failure in a row.
        wait = min(self.max_backoff, self.retry_after * 2**entry.failures)
        entry.failed(problem, state, now + wait)

    def _client(self, entry: _Entry, timeout: float | None = None) -> Client:
        return Client(
            entry.address,
            key_file=entry.key_file,
            connect_timeout=timeout or self.connect_timeout,
            server_key=entry.server_key,
            plaintext=entry.plaintext,
            context=self._context(),
        )

    def _context(self) -> zmq.Context[zmq.Socket[bytes]]:
        with self._lock:
            if self._zmq is None:
                self._zmq = zmq.Context()
            return self._zmq

    def _end_context(self) -> None:
        """End the context once the pool is closed and no connection is lent out (its
        sockets are all closed by then; destroy() also closes any left behind)."""
        with self._lock:
            ctx = self._zmq if self._closed and not self._lent else None
            if ctx is not None:
                self._zmq = None
        if ctx is not None:
            ctx.destroy(linger=0)

    def disconnect(self, address: str) -> bool:
        entry = self._entries.pop(address, None)
        with self._lock:
            spare = self._spare.pop(address, [])
        for client in spare:
            client.close()
        if entry is None:
            return False
        if entry.client is not None:
            entry.client.close()
        return True

    def _discover(self) -> None:
        if not self.discovery:
            return
        if self._browser is None:
            self._browser = Browser()
        # The first time, give announcements a moment to arrive.
        wait = 0.0
        if self._discovery_until is None:
            wait = self.discovery_wait
            self._discovery_until = time.monotonic() + wait
        announced = self._browser.workers(wait=wait)
        self._announced = len(announced)
        current = {found.address for found in announced}
        for entry in [e for e in self._entries.values() if e.origin == DISCOVERED]:
            if entry.address not in current:  # stopped announcing: gone, or moved
                self.disconnect(entry.address)
        for found in announced:
            if found.address in self._entries:
                continue
            entry = _Entry(
                found.address, self.key_file, DISCOVERED, self.server_keys.get(found.address)
            )
            entry.plaintext = self.plaintext
            if found.security == "plaintext" and not self.plaintext:
                entry.problem = (
                    "runs with --insecure-plaintext (no encryption): connect with `%lan2gpu "
                    f"connect {found.address} --insecure-plaintext` if you accept that"
                )
                entry.state, entry.retry_at = "plain text", float("inf")
            elif found.encrypted and entry.server_key is None:
                entry.problem = (
                    "encrypted (--encrypt): connect with `%lan2gpu connect "
                    f"{found.address} --server-key PATH-TO-ITS-worker.key`"
                )
                entry.state, entry.retry_at = "needs server key", float("inf")
            elif not found.compatible:
                entry.problem = (
                    f"announces lan2gpu protocol {found.protocol}; this notebook speaks "
                    "another: install the same lan2gpu version on both"
                )
                entry.state, entry.retry_at = "version mismatch", float("inf")
            self._entries[found.address] = entry

    def _connect_pending(self) -> None:
        """Connect to every worker not connected yet, all at once: a worker that
        does not answer (or a fake one announced on the LAN) costs one short
        deadline, not one per worker. Until a worker finished the signed,
        encrypted handshake (it holds the key), nothing of it is used. Workers
        found on the LAN are tried in the background, so they never delay a cell
        that has a worker to run on (:meth:`_place` waits for them only while it
        has none)."""
        self._collect_probes()
        now = time.monotonic()
        due = [
            e
            for e in self._entries.values()
            if e.client is None and e.retry_at <= now and e.address not in self._probing
        ]
        if not due:
            return
        later = [e for e in due if e.origin == DISCOVERED]
        if later:
            self._probing.update(e.address for e in later)
            thread = threading.Thread(
                target=self._probe_in_background, args=(later,), name="lan2gpu-probe"
            )
            self._probe_threads.append(thread)
            thread.start()
            due = [e for e in due if e not in later]
        for entry, outcome in zip(due, self._probe(due), strict=True):
            self._settle(entry, outcome, now)

    def _probe(self, entries: list[_Entry]) -> list[Client | Lan2GPUError]:
        """Try to connect to each of ``entries`` at once; a client or why not."""

        def attempt(entry: _Entry) -> Client | Lan2GPUError:
            timeout = self.connect_timeout
            if entry.failures:  # a worker that failed before must not stall cells
                timeout = min(timeout, _RETRY_CONNECT)
            elif entry.origin == DISCOVERED:  # unproven: anyone can announce one
                timeout = min(timeout, _PROBE_DISCOVERED)
            try:
                return self._client(entry, timeout)
            except Lan2GPUError as exc:
                return exc
            except Exception as exc:  # e.g. out of file descriptors: this worker, not all
                return WorkerUnreachable(f"cannot connect to {entry.address}: {exc}")

        if len(entries) <= 1:
            return [attempt(e) for e in entries]
        with ThreadPoolExecutor(min(len(entries), _PROBES_AT_ONCE), "lan2gpu-probe") as probes:
            futures = [probes.submit(attempt, entry) for entry in entries]
            try:
                return [f.result() for f in futures]
            except BaseException:  # e.g. Ctrl-C: close what the probes opened
                for future in futures:
                    future.cancel()
                probes.shutdown(wait=True)
                for future in futures:
                    opened = None if future.cancelled() else future.result()
                    if isinstance(opened, Client):
                        opened.close()
                raise

    def _probe_in_background(self, entries: list[_Entry]) -> None:
        try:
            outcomes = self._probe(entries)
        except BaseException as exc:  # every entry gets an answer: none stays "trying"
            failed = WorkerUnreachable(f"could not try it: {exc!r}")
            outcomes = [failed] * len(entries)
        for entry, outcome in zip(entries, outcomes, strict=True):
            self._probed.put((entry, outcome))

    def wait_for_probes(self, timeout: float = _PROBE_DISCOVERED + 1.0) -> None:
        """Wait (up to ``timeout``) for the workers being tried in the background,
        so a listing shows what they are rather than "trying"."""
        self._discover()
        self._connect_pending()
        deadline = time.monotonic() + timeout
        while self._probe_threads and time.monotonic() < deadline:
            self._probe_threads[0].join(max(0.0, deadline - time.monotonic()))
            self._collect_probes()
        self._collect_probes()

    def _collect_probes(self) -> None:
        """Take in what background probes found (in the pool's own thread)."""
        now = time.monotonic()
        while True:
            try:
                entry, outcome = self._probed.get_nowait()
            except queue.Empty:
                break
            self._probing.discard(entry.address)
            if self._entries.get(entry.address) is not entry or self._closed:
                if isinstance(outcome, Client):  # forgotten meanwhile
                    outcome.close()
                continue
            self._settle(entry, outcome, now)
        self._probe_threads = [t for t in self._probe_threads if t.is_alive()]

    def _settle(self, entry: _Entry, outcome: Client | Lan2GPUError, now: float) -> None:
        if isinstance(outcome, Client):
            entry.client = outcome
            entry.succeeded()
        else:
            self._failed(entry, str(outcome), state_of(outcome), now)

    def _start_embedded(self) -> None:
        self.embedded = EmbeddedWorker()
        try:
            address = self.embedded.start()
            client = Client(
                address,
                key_file=self.embedded.key_file,
                connect_timeout=60.0,
                context=self._context(),
            )
        except BaseException:
            self.embedded.close()
            self.embedded = None
            raise
        key_file = str(self.embedded.key_file)
        self._entries[address] = _Entry(address, key_file, EMBEDDED, client=client)
        kind = "CUDA simulator" if client.info.simulator else client.info.describe()
        self._announce(
            f"lan2gpu: no worker configured or found on the LAN; started a local worker on "
            f"{address} ({kind}); it stops with this kernel."
        )

    # -- looking and choosing -----------------------------------------------------

    def rows(
        self, session: str | None = None, detail: bool = False, max_age: float | None = None
    ) -> list[WorkerRow]:
        """Every known worker with its live status, or the reason it is unusable.

        ``session``: the cell's session (default: each client's own), so each
        view marks the GPUs where that session already has an executor.
        ``detail``: ask for GPU history and recent cells too (dashboards).
        ``max_age``: reuse a status at most this old (default ``status_ttl``;
        0 always asks), so cells run back to back skip one round trip.
        """
        self._discover()
        self._connect_pending()
        now = time.monotonic()
        max_age = self.status_ttl if max_age is None else max_age
        entries = list(self._entries.values())
        asked = [e for e in entries if e.client is not None and e.retry_at <= now]
        stale = [e for e in asked if detail or e.status is None or now - e.status_at > max_age]
        connections = [e.client.connection for e in stale if e.client]
        answers = fetch_statuses(connections, self.status_timeout, detail)
        fetched = dict(zip(map(id, stale), answers, strict=True))
        replies = [fetched.get(id(e)) or StatusReply(e.status, e.latency) for e in asked]
        rows: list[WorkerRow] = []
        for entry, reply in zip(asked, replies, strict=True):
            if id(entry) in fetched:
                entry.status, entry.latency = reply.status, reply.latency
                entry.status_at = now
            if reply.status is None or entry.client is None:
                self._failed(entry, reply.problem, reply.state, now)
            else:
                entry.succeeded()
                mine = session or entry.client.session
                view = view_from_status(entry.address, reply.status, reply.latency, mine)
                if not view.simulator and view.gpus:
                    self.real_gpu_workers.add(entry.address)
                rows.append(WorkerRow(entry.address, entry.origin, view, reply.status))
        rows += [
            WorkerRow(e.address, e.origin, None, None, e.problem, e.state)
            for e in entries
            if e.problem
        ]
        rows += [
            WorkerRow(e.address, e.origin, None, None, "announced; trying its handshake", "trying")
            for e in entries
            if not e.problem and e.client is None and e.address in self._probing
        ]
        return rows

    def choose(
        self, req: Requirements, exclude: Collection[str] = (), session: str | None = None
    ) -> tuple[Client, Placement]:
        """The client of the best worker for ``req``, and where on it to run.

        Workers whose address is in ``exclude`` are not considered (retries);
        ``session`` (default: each client's own) decides where the cell is at home.
        """
        placement = self._place(
            lambda views, real: choose_worker(req, views, real_gpus_known=real), exclude, session
        )[0]
        client = self._entries[placement.worker.address].client
        if client is None:  # cannot happen: views come from connected entries
            raise NoWorkerAvailable(f"lost the connection to {placement.worker.address}")
        return client, placement

    # -- connections for other threads -------------------------------------------

    def session_for(self, address: str) -> str:
        """The session this notebook uses on ``address`` (its main client's)."""
        entry = self._entries.get(address)
        if entry is None or entry.client is None:
            raise NoWorkerAvailable(f"{address} is not a connected worker")
        return entry.client.adopt_session()

    def lease(self, address: str) -> Client:
        """A connection to ``address`` for one run in another thread: an idle one
        from before, or a new one. Hand it back with :meth:`give_back`. Thread-safe."""
        with self._lock:
            entry = self._entries.get(address)
            if entry is None:
                raise NoWorkerAvailable(f"{address} is not a known worker")
            spare = self._spare.get(address, [])
            client = spare.pop() if spare else None
            key_file, server_key, plaintext = entry.key_file, entry.server_key, entry.plaintext
        if client is None:  # the handshake happens outside the lock
            client = Client(
                address,
                key_file=key_file,
                server_key=server_key,
                connect_timeout=self.connect_timeout,
                plaintext=plaintext,
                context=self._context(),
            )
        with self._lock:
            self._lent.add(client)
        return client

    def give_back(self, client: Runner, healthy: bool = True) -> None:
        """Return a leased client: kept for the next lease, or closed if the run
        left it in doubt (``healthy=False``) or its worker was forgotten."""
        if not isinstance(client, Client):
            raise TypeError(f"{client!r} was not leased from this pool")
        with self._lock:
            self._lent.discard(client)
            spare = self._spare.setdefault(client.address, [])
            if (
                not self._closed
                and healthy
                and client.address in self._entries
                and not client.closed
                and len(spare) < _MAX_SPARE
            ):
                spare.append(client)
                return
        client.close()
        self._end_context()  # the pool was closed while it was lent: the last one

    def slots(
        self, req: Requirements, count: int | None, session: str | None = None
    ) -> list[Placement]:
        """Up to ``count`` slots (``None``: all) for the chunks of a split cell,
        best first (:func:`~lan2gpu_magic.placement.choose_slots`)."""
        return self._place(
            lambda views, real: choose_slots(req, views, count, real_gpus_known=real),
            (),
            session,
        )

    def _place(
        self,
        policy: Callable[[list[WorkerView], bool], Placement | list[Placement]],
        exclude: Collection[str],
        session: str | None,
    ) -> list[Placement]:
        self._discover()
        if not self._entries and self.allow_embedded:
            self._start_embedded()
        rows = self.rows(session)
        # With no usable worker yet, wait for the LAN: announcements still coming
        # (within the discovery window) and workers still being tried. Anyone can
        # announce a worker, so the first ones heard may all be unusable.
        until = (self._discovery_until or 0.0) + _PROBE_DISCOVERED + 1.0
        while (
            self._browser is not None
            and not any(r.view is not None for r in rows)
            and (self._probing or time.monotonic() < (self._discovery_until or 0.0))
            and time.monotonic() < until
        ):
            self._browser.wait_for_change(self._announced, _LAN_POLL)
            self._discover()
            rows = self.rows(session)
        views = [r.view for r in rows if r.view is not None and r.address not in exclude]
        try:
            # Consent for simulators looks at every real GPU worker ever seen, not
            # only those that answered just now.
            chosen = policy(views, bool(self.real_gpu_workers))
        except NoWorkerAvailable as exc:
            problems = [f"{r.address}: {r.problem}" for r in rows if r.view is None]
            if problems:
                raise NoWorkerAvailable(
                    f"{exc}\nUnusable workers:\n  " + "\n  ".join(problems)
                ) from None
            raise
        return chosen if isinstance(chosen, list) else [chosen]

    def clients(self) -> list[Client]:
        return [e.client for e in self._entries.values() if e.client is not None]

    def close(self) -> None:
        """Close every connection, the browser and the embedded worker. Idempotent."""
        for entry in self._entries.values():
            if entry.client is not None:
                entry.client.close()
                entry.client = None
        self._entries.clear()
        with self._lock:
            # Lent clients are in use by another thread (sockets are not thread-safe):
            # that thread closes them when it gives them back.
            self._closed = True
            extra = [c for spare in self._spare.values() for c in spare]
            self._spare.clear()
        for client in extra:
            client.close()
        for thread in self._probe_threads:
            thread.join()  # each probe ends within its short deadline
        self._collect_probes()  # closes what they opened: the pool is closed
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self.embedded is not None:
            self.embedded.close()
            self.embedded = None
        self._end_context()


def workers_from_env() -> list[str]:
    """``$LAN2GPU_WORKERS``: a comma-separated list of addresses."""
    return [a.strip() for a in os.environ.get("LAN2GPU_WORKERS", "").split(",") if a.strip()]
