"""A connection to one worker: handshake, heartbeats, and running cells.

``Client.run(code, namespace)`` is the whole pipeline for scripts and
benchmarks (capture, serialize, submit, apply); the ``%%lan2gpu`` magic calls
the same steps, choosing the worker first.

Liveness (Paranoid Pirate style): while waiting for a cell, the client sends a
heartbeat every interval and expects to hear from the worker's service (which
answers even while a cell is busy) within ``liveness`` intervals, plus the time
an announced large result needs at ``min_bandwidth``. A silent worker is then asked
once more (ping, and a fetch of the result), and after one more interval the
connection decides: if it dropped (worker killed, host down, network cut; see
``Transport.link_up``), :class:`WorkerLost` with ``gone=True``; if it is up, the
worker has stalled (stopped, swapping, overloaded) and the client waits for it up to
its ``stall_grace``, after which :class:`WorkerLost` says the cell may still finish
there (``gone=False``, which ``--retry`` does not run again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from worker_kernel.protocol import compress, refs
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.curve import (
    CLIENT,
    WORKER,
    derived_keypair,
    ensure_keypair,
    key_dir,
    load_keypair,
    load_public,
)
from worker_kernel.protocol.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosed,
    ExecutionCancelled,
    ExecutionTimeout,
    Lan2GPUError,
    MessageRejected,
    ProtocolError,
    VersionMismatch,
    WorkerError,
    WorkerLost,
    WorkerUnreachable,
)
from worker_kernel.protocol.keys import default_key_file, load_key
from worker_kernel.protocol.messages import Message, new_id
from worker_kernel.protocol.serialize import Payload, dump_values
from worker_kernel.protocol.versions import check_compatible, local_versions
from worker_kernel.protocol.wire import digest

from . import cache, capture, results
from .cache import HeldArrays
from .capture import CellPlan
from .results import RunResult
from .tracebacks import register_source
from .transport import Curve, Transport

_FRESH = 1.0  # skip the pre-flight ping if the worker spoke this recently
_CANCEL_WAIT = 5.0  # after an interrupt, how long to wait for the worker's answer
_BIG_UPLOAD = 8 << 20  # announce uploads this large, so the worker heartbeats meanwhile
_POLL_SLICE = 0.1  # how often a waiting client looks at its interrupt flag
_TIMEOUT_GRACE = 30.0  # beyond a cell's --timeout, before the client stops waiting
_FETCH_EVERY = 2.0  # at most this often, ask again for a result that did not come
_PROBE_BYTES = 1 << 20  # sent once to measure the link, when a large transfer comes
_COMPRESS_MODES = ("auto", "on", "off")
# Status kinds of the client's own, next to the worker's queued/started/transfer.
STALLED = "stalled"  # connected, silent past liveness: content {"silent", "grace"}
ANSWERING = "answering"  # it spoke again after a stall: content {"silent"}

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the cell, and the worker confirmed it; ``session_lost``: its
    executor had to be killed (the cell did not stop within the worker's grace)."""

    def __init__(self, session_lost: bool) -> None:
        lost = "its session's variables there are lost" if session_lost else "its session is intact"
        super().__init__(f"the cell was cancelled on the worker; {lost}")
        self.session_lost = session_lost


class _InterruptFlag:
    """While active (main thread only), SIGINT sets a flag instead of raising."""

    def __init__(self) -> None:
        self.pending = False
        self.cancelled = False
        self.event: threading.Event | None = None  # a cancel from another thread
        self.by_event = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.pending:  # a second Ctrl-C: stop waiting for the worker at once
            raise KeyboardInterrupt
        self.pending = True

    def requested(self) -> bool:
        if self.event is not None and self.event.is_set() and not self.pending:
            self.by_event = True
        return self.pending or self.by_event

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


class _NotConfirmed(KeyboardInterrupt):
    """Ctrl-C, and the worker did not confirm the cancel in time. Raised between
    receives, so the connection is in step and needs no new handshake (which would wait
    on a stalled worker)."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker said about itself in the handshake."""

    name: str
    address: str
    instance: str
    versions: dict[str, str]
    capabilities: dict[str, Any]
    heartbeat: float
    warnings: tuple[str, ...] = ()
    stall_grace: float = 60.0  # how long to wait for it while connected but silent

    @property
    def simulator(self) -> bool:
        return bool(self.capabilities.get("simulator"))

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list(self.capabilities.get("gpus", []))

    def describe(self) -> str:
        gpus = ", ".join(f"GPU{g['index']} {g['name']}" for g in self.gpus) or "no GPU"
        return f"{self.name} ({self.address}, {gpus})"


def _write(stream_name: str, text: str) -> None:
    stream = sys.stderr if stream_name == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()


def _print_display(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    print(data.get("text/plain", "<display>"))


@dataclass
class OutputHandlers:
    """Where a running cell's live output goes (defaults: this process's stdout)."""

    stream: Callable[[str, str], None] = _write
    display: Callable[[dict[str, Any], dict[str, Any]], None] = _print_display
    status: Callable[[str, dict[str, Any]], None] = field(default=lambda kind, content: None)


@dataclass(frozen=True)
class ExecuteRequest:
    """A cell ready to send: its code, what to send and bring back, where it runs."""

    code: str
    plan: CellPlan
    session: str
    timeout: float | None = None
    local: Mapping[str, Any] = field(default_factory=dict)  # the namespace, for the cache
    cache: bool = True  # False: send every array, even ones the session holds
    compress: str | None = None  # "auto", "on", "off"; None: the client's setting
    filename: str = ""
    line_offset: int = 0
    gpus: tuple[int, ...] = ()  # the worker's GPU numbers; () lets the worker pick one
    cpu: bool = False  # a CPU cell: no GPU is visible to it
    # The namespace functions and kernels coming back get as their globals.
    namespace: dict[str, Any] | None = field(default=None, compare=False)
    # A named session keeps its namespace between cells; the notebook's own session
    # mirrors the notebook (a name the notebook does not send is not there).
    keep_namespace: bool = False
    # Set from another thread to cancel the cell (split chunks, async cells); the run
    # then raises ExecutionCancelled. In the main thread, Ctrl-C does the same.
    cancel: threading.Event | None = field(default=None, compare=False)


class Client:
    """A connection to one worker. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        address: str,
        *,
        key: bytes | None = None,
        key_file: str | os.PathLike[str] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        connect_timeout: float = 10.0,
        liveness: int = 3,
        min_bandwidth: float = 10e6,
        clock: Callable[[], float] = time.monotonic,
        server_key: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        cache: bool = True,
        compress: str = "auto",
        plaintext: bool = False,
    ) -> None:
        self.address = address
        if compress not in _COMPRESS_MODES:
            raise ConfigurationError(f"compress={compress!r}: use one of {_COMPRESS_MODES}")
        self.cache = cache  # send unchanged arrays as digests
        self.compress = compress
        self.held = HeldArrays()
        self._link_bandwidth: float | None = None
        self.key_file = Path(key_file).expanduser() if key_file else None
        self.id = new_id()
        self.session = f"{socket.gethostname()}:{os.getpid()}:{self.id[:8]}"
        self.liveness = liveness
        self.min_bandwidth = min_bandwidth
        self._clock = clock
        self._last_heard = float("-inf")
        self._cells = 0
        self._used_default_session = False
        self._unloadable: dict[str, set[str]] = {}  # per session: see _submit
        self.load: dict[str, Any] = {}  # the worker's live numbers, from heartbeats
        key = key if key is not None else load_key(key_file)
        self.plaintext = plaintext
        self.curve = _curve(key, key_file, server_key, client_key, plaintext)
        self.transport = Transport(address, key, context=context, curve=self.curve)
        try:
            self.info = self._handshake(connect_timeout)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.transport.closed else "connected"
        return f"<lan2gpu Client {self.info.name} {self.address} {state}>"

    @property
    def name(self) -> str:
        return self.info.name

    # -- request/reply --------------------------------------------------------

    def _message(self, kind: str, content: dict[str, Any] | None = None, **kw: Any) -> Message:
        to = kw.pop("to", None)
        if to is None:
            to = self.info.instance if hasattr(self, "info") else ""
        return Message(kind=kind, content=content or {}, to=to, **kw)

    def _recv(self, timeout: float) -> Message | None:
        """The next message for this client, or None (timeout, or one not for us).

        A worker that restarted does not know this client yet, so its errors
        come addressed to nobody; they are matched by their parent id instead.
        """
        msg = self.transport.recv(timeout)
        if msg is None or not msg.authenticated or msg.to == self.id:
            return msg
        if msg.kind == m.ERROR and msg.to == "":
            return msg
        log.warning("dropped a %s from %s addressed to another client", msg.kind, self.address)
        return None

    def _reset_transport(self) -> None:
        """A fresh socket and handshake, after an interrupt may have split a message."""
        key, context = self.transport.wire.key, self.transport.context
        own = self.transport.owns_context
        self.transport.close(term=own)
        self.transport = Transport(
            self.address, key, context=None if own else context, curve=self.curve
        )
        self._last_heard = float("-inf")
        self.info = self._handshake(10.0)

    def _request(self, msg: Message, reply_kinds: set[str], timeout: float) -> Message:
        """Send ``msg`` and wait for its reply; other messages are dropped."""
        self.transport.send(msg)
        deadline = self._clock() + timeout
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                hint = ""
                if self.curve is not None and not self.curve.shared:
                    hint = (
                        " With encryption, the worker ignores clients it does not know: is "
                        "this machine's client.key in its authorized_keys directory, and is "
                        "--server-key that worker's worker.key?"
                    )
                raise WorkerUnreachable(
                    f"worker at {self.address} did not answer within {timeout:g} s; is it "
                    "running (`python -m worker_kernel --help`), and is the address right? "
                    "To wait longer: `%lan2gpu connect ADDRESS --timeout S`, `%config "
                    "Lan2GPU.connect_timeout = S`, `connect(ADDRESS, connect_timeout=S)`, or "
                    f"`python -m lan2gpu_magic ping ADDRESS --timeout S`.{hint}"
                )
            reply = self._recv(remaining)
            if reply is None:
                continue
            if not reply.authenticated:
                if reply.parent in (msg.id, ""):
                    raise self.transport.notice_error(reply)
                continue
            self._last_heard = self._clock()
            if reply.parent != msg.id:
                continue
            if reply.kind == m.ERROR:
                self._raise_error(reply)
            if reply.kind in reply_kinds:
                return reply

    def _raise_error(self, reply: Message) -> None:
        code = str(reply.content.get("code", ""))
        reason = str(reply.content.get("reason", "unknown error"))
        if code == "version":
            raise VersionMismatch(reason)
        if code == "kernel":
            raise WorkerError(f"worker {self.info.name} ({self.address}): {reason}", self.info.name)
        raise MessageRejected(f"worker at {self.address}: {reason}")

    def _handshake(self, timeout: float) -> WorkerInfo:
        hello = self._message(
            m.HELLO,
            {"client": self.id, "host": socket.gethostname(), "versions": local_versions()},
            to="",
        )
        c = self._request(hello, {m.WELCOME}, timeout).content
        warnings = check_compatible(local_versions(), dict(c["versions"]), f"worker {c['worker']}")
        return WorkerInfo(
            name=str(c["worker"]),
            address=self.address,
            instance=str(c["instance"]),
            versions=dict(c["versions"]),
            capabilities=dict(c["capabilities"]),
            heartbeat=float(c.get("heartbeat", 1.0)),
            warnings=tuple(warnings) + tuple(c.get("warnings", [])),
            stall_grace=float(c.get("stall_grace", 60.0)),
        )

    def ping(self, timeout: float = 5.0, expect_bytes: int = 0) -> float:
        """Round-trip time to the worker's service, in seconds.

        If the worker restarted since the handshake, shake hands again first.
        """
        t0 = self._clock()
        try:
            self._request(self._message(m.PING, {"expect_bytes": expect_bytes}), {m.PONG}, timeout)
        except MessageRejected:
            self.info = self._handshake(timeout)
            t0 = self._clock()
            self._request(self._message(m.PING, {"expect_bytes": expect_bytes}), {m.PONG}, timeout)
        return self._clock() - t0

    def status(self, timeout: float = 10.0, detail: bool = False) -> dict[str, Any]:
        """The worker's queues, running cells, sessions and kernels; with ``detail``,
        also its GPU history and recently finished cells."""
        msg = self._message(m.STATUS, {"detail": detail})
        return self._request(msg, {m.STATUS_REPLY}, timeout).content

    def adopt_session(self) -> str:
        """This client's default session, for runs on other connections (split
        chunks, background cells); it is closed with this client, as if used here."""
        self._used_default_session = True
        return self.session

    def close_session(self, session: str | None = None, timeout: float = 10.0) -> int:
        """Stop the session's executor on the worker (frees its GPU memory)."""
        msg = self._message(m.CLOSE_SESSION, {"session": session or self.session})
        return int(self._request(msg, {m.STATUS_REPLY}, timeout).content.get("closed", 0))

    # -- whole kernels (for IDEs) ---------------------------------------------------

    def start_kernel(
        self, key: str, *, gpus: Sequence[int] = (), cpu: bool = False, timeout: float = 90.0
    ) -> str:
        """Start a Jupyter kernel on the worker that verifies frames with ``key``.

        Returns its id. It listens on the worker's 127.0.0.1 only; its channels
        travel through this connection as ``kernel_frames`` messages. See
        :mod:`lan2gpu_magic.kernel`.
        """
        msg = self._message(
            m.START_KERNEL,
            {"key": key, "signature_scheme": "hmac-sha256", "gpus": list(gpus), "cpu": cpu},
        )
        reply = self._request(msg, {m.KERNEL_STARTED, m.ERROR}, timeout)
        return str(reply.content["kernel"])

    def stop_kernel(self, kernel: str, timeout: float = 15.0) -> None:
        self._request(self._message(m.STOP_KERNEL, {"kernel": kernel}), {m.STATUS_REPLY}, timeout)

    # -- running cells ----------------------------------------------------------

    def execute(
        self,
        request: ExecuteRequest,
        payload: Payload,
        handlers: OutputHandlers | None = None,
    ) -> RunResult:
        """Send a planned cell with its serialized inputs; stream output; return results.

        Large frames the session already holds go as digests (a miss is resent);
        large buffers are compressed when that pays on this link.
        """
        handlers = handlers or OutputHandlers()
        session = request.session
        self._used_default_session |= session == self.session
        if self._clock() - self._last_heard > _FRESH or payload.nbytes > _BIG_UPLOAD:
            # Fail fast before uploading, re-handshake after a worker restart, and
            # tell the worker how much is coming so it keeps heartbeating us.
            self.ping(expect_bytes=payload.nbytes)
        digests = [digest(f) for f in payload.frames]  # once: for the signature and the cache
        use_cache = self.cache and request.cache
        local = cache.local_buffers(request.plan.outputs, request.local) if use_cache else {}
        local.update(zip(digests, (memoryview(f).cast("B") for f in payload.frames), strict=True))
        for _ in range(3):  # a cache miss costs one more round, with the data
            reply = self._submit(request, payload, digests, local if use_cache else {}, handlers)
            if reply.content.get("status") != "cache-miss":
                break
            self.held.forget(session, reply.content.get("missing", []))
        else:
            raise ProtocolError(f"worker {self.info.name} keeps missing cached arrays")
        full, full_digests, missing = refs.join(
            reply.buffers, reply.digests, dict(reply.content.get("refs", {})), cache.copy_of(local)
        )
        if missing:
            raise ProtocolError(f"worker {self.info.name} referred to arrays this client lacks")
        reply.buffers = full
        if reply.content.get("session_lost"):
            self.held.forget(session)
        else:
            self.held.learn(session, payload.frames, digests)
            self.held.learn(session, full, full_digests)
        result = results.parse_result(reply, request.plan, request.timeout, request.namespace)
        kept = self._unloadable.setdefault(session, set())
        kept.difference_update(request.plan.inputs)
        kept.difference_update(result.outputs)
        kept.update(result.unloadable)
        return result

    def _submit(
        self,
        request: ExecuteRequest,
        payload: Payload,
        digests: list[str],
        local: dict[str, memoryview],
        handlers: OutputHandlers,
    ) -> Message:
        plan = request.plan
        holds = self.held.holds(request.session) if local else (lambda _: False)
        frames, sent_digests, in_refs = refs.split(payload.frames, digests, holds)
        mode = request.compress or self.compress
        bandwidth = self._bandwidth(payload.nbytes) if mode == "auto" else 0.0
        link = {"bandwidth": bandwidth, "compress": mode}
        msg = self._message(
            m.EXECUTE,
            {
                "code": request.code,
                "filename": request.filename,
                "line_offset": request.line_offset,
                "inputs": payload.entries,
                "outputs": list(plan.outputs),
                "required": sorted(plan.required),
                "always": sorted(plan.always),
                "deletes": list(plan.deletes),
                "timeout": request.timeout,
                "gpus": list(request.gpus),
                "cpu": request.cpu,
                "keep_namespace": request.keep_namespace,
                # Values that came back but cannot be loaded here: the worker keeps them.
                "kept": sorted(self._unloadable.get(request.session, set()) - set(plan.inputs)),
                "refs": in_refs,
                "have": sorted(local),
                "link": link,
            },
            buffers=frames,
            session=request.session,
        )
        msg.digests = sent_digests
        msg.codecs = compress.choose(frames, bandwidth, mode)
        # The request id makes retries idempotent: the worker runs it at most once.
        msg.content["request"] = msg.id
        self.transport.send(msg)
        return self._wait(msg, handlers, request.timeout, request.cancel)

    def _bandwidth(self, nbytes: int) -> float:
        """The link's speed (bytes/s), measured once, when a large transfer first needs it."""
        if self._link_bandwidth is None and nbytes >= compress.MIN_BYTES:
            base = self.ping()
            probe = self._message(m.PING, buffers=[os.urandom(_PROBE_BYTES)])
            t0 = self._clock()
            self._request(probe, {m.PONG}, 10.0)
            seconds = max(self._clock() - t0 - base, 1e-6)
            self._link_bandwidth = _PROBE_BYTES / seconds
        return self._link_bandwidth or 0.0

    def _wait(
        self,
        request: Message,
        handlers: OutputHandlers,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Message:
        """Relay the cell's live output until its result arrives.

        Ctrl-C (SIGINT) only sets a flag here, checked between messages, so an
        interrupt can never split a multipart message; the worker is then asked
        to cancel the cell and given a few seconds to confirm.
        """
        cell_id = request.id
        with _InterruptFlag() as interrupted:
            interrupted.event = cancel
            try:
                reply = self._wait_loop(request, handlers, timeout, interrupted)
            except BaseException as exc:
                # Leaving without a result (an error, or a second Ctrl-C): do not
                # leave the cell running on the worker.
                with contextlib.suppress(Lan2GPUError):
                    self.transport.send(self._message(m.CANCEL, {"cell": cell_id}))
                if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, _NotConfirmed):
                    # The second Ctrl-C may have landed inside a multipart receive.
                    with contextlib.suppress(Lan2GPUError):
                        self._reset_transport()
                raise
        if interrupted.cancelled:
            self._report_cancel(reply, handlers)
            if not interrupted.by_event:
                raise Interrupted(bool(reply.content.get("session_lost")))
        return reply  # cancelled by the event: the result says "cancelled"

    def _wait_loop(
        self,
        request: Message,
        handlers: OutputHandlers,
        timeout: float | None,
        interrupted: _InterruptFlag,
    ) -> Message:
        cell_id = request.id
        heartbeat = self.info.heartbeat
        last_heard = self._clock()
        next_beat = last_heard + heartbeat
        allowance = 0.0
        # With a timeout the worker answers within it, queueing included: this only
        # guards a worker that never reports back (or only ever says "queued").
        started_by = self._clock() + timeout + _TIMEOUT_GRACE if timeout else float("inf")
        deadline = float("inf")  # set once the cell starts, if it has a timeout
        acknowledged = False  # the worker has said something about this cell
        recovering = False  # one silent spell was spent asking the worker again
        stalled = False  # silent, but its connection is up: waiting up to its stall grace
        waiting_since = silent_since = last_heard
        last_fetch = float("-inf")
        fetches: set[str] = set()
        sent = {cell_id}  # ids of what this wait sent: only their errors concern it

        def send(msg: Message) -> str:
            self.transport.send(msg)
            sent.add(msg.id)
            return msg.id

        while True:
            now = self._clock()
            if interrupted.requested() and not interrupted.cancelled:
                interrupted.cancelled = True
                send(self._message(m.CANCEL, {"cell": cell_id}))
                deadline = min(deadline, now + _CANCEL_WAIT)
                last_heard = now
            limit = last_heard + self.liveness * heartbeat + allowance
            wake = min(next_beat, limit, deadline, started_by + allowance, now + _POLL_SLICE)
            try:
                reply = self._recv(max(0.0, wake - now))
            except ProtocolError as exc:
                # One bad message (tampered, or from a stranger) is dropped; the
                # cell's own messages still count.
                log.warning("%s", exc)
                reply = None
            now = self._clock()
            if reply is not None and not reply.authenticated:
                if reply.parent in sent:  # the worker refused something this wait sent
                    raise self.transport.notice_error(reply)
                log.warning("%s", self.transport.notice_error(reply))
                reply = None
            if reply is not None:
                restarted = reply.content.get("code") == "wrong-recipient"
                if reply.kind == m.ERROR and restarted and reply.parent in sent:
                    self._last_heard = float("-inf")  # the next request shakes hands again
                    raise WorkerLost(
                        f"worker {self.info.name} ({self.address}) restarted while the cell "
                        "was in flight; the cell and its session state are lost. Run the "
                        "cell again (the client reconnects by itself)."
                    )
                if reply.kind == m.HEARTBEAT:
                    last_heard = self._last_heard = now
                    recovering = False
                    self.load = dict(reply.content.get("load", self.load))
                    cells = reply.content.get("cells")
                    lost = acknowledged and isinstance(cells, list) and cell_id not in cells
                    if lost and now - last_fetch > _FETCH_EVERY:
                        # The worker is done with the cell, but no result came: ask again.
                        last_fetch = now
                        fetches.add(send(self._message(m.FETCH, {"cell": cell_id})))
                elif reply.kind == m.PONG:
                    last_heard = self._last_heard = now
                elif reply.parent in fetches and reply.kind == m.ERROR:
                    if acknowledged:
                        raise WorkerLost(
                            f"worker {self.info.name} ({self.address}) no longer knows the "
                            "cell (its result expired or it was cancelled); run it again.",
                            gone=False,
                        )
                    # The request itself never arrived: send it again (same request id).
                    send(
                        Message(
                            kind=m.EXECUTE,
                            content=request.content,
                            buffers=request.buffers,
                            session=request.session,
                            to=self.info.instance,
                        )
                    )
                elif reply.parent == cell_id:
                    last_heard = self._last_heard = now
                    acknowledged, recovering = True, False
                    if reply.kind == m.RESULT:
                        return reply
                    if reply.kind == m.ERROR:
                        self._raise_error(reply)
                    if reply.kind == m.STARTED:
                        started_by = float("inf")
                        if timeout:
                            # The worker enforces --timeout; this only guards a worker
                            # that never reports back.
                            deadline = min(deadline, now + timeout + _TIMEOUT_GRACE)
                    allowance = self._dispatch(reply, handlers, allowance)
            if stalled and self._last_heard == now:
                stalled = False
                # The stall was the worker's time, not the cell's: move the guards.
                deadline += now - silent_since
                started_by += now - silent_since
                handlers.status(ANSWERING, {"silent": now - silent_since})
            if now >= next_beat:
                send(self._message(m.HEARTBEAT))
                next_beat = now + heartbeat
            if now >= started_by + allowance and not interrupted.cancelled and not stalled:
                raise ExecutionTimeout(
                    f"the cell did not start on worker {self.info.name} within its --timeout "
                    f"of {timeout:g} s (it was still waiting in the worker's queue); it was "
                    "withdrawn. Raise --timeout, or pick a less busy worker (--worker).",
                    self.info.name,
                )
            # A stall is bounded by its own grace; after Ctrl-C, only the cancel's wait.
            if now >= deadline and (not stalled or interrupted.cancelled):
                if interrupted.cancelled and interrupted.by_event:
                    raise ExecutionCancelled(
                        f"the cell was cancelled; worker {self.info.name} did not confirm "
                        f"within {_CANCEL_WAIT:g} s",
                        self.info.name,
                    )
                if interrupted.cancelled:
                    raise _NotConfirmed
                raise WorkerLost(
                    f"worker {self.info.name} ({self.address}) did not report the end of the "
                    f"cell within {_TIMEOUT_GRACE:.0f} s after its --timeout of {timeout:g} s; "
                    "the cell's result is lost. Check the worker's log.",
                    gone=False,
                )
            if now > last_heard + self.liveness * heartbeat + allowance:
                if not recovering:
                    # One more heartbeat interval: a network hiccup may have lost
                    # messages, and a live worker answers a ping at once.
                    recovering = True
                    last_heard = now - (self.liveness - 1) * heartbeat
                    send(self._message(m.PING))
                    fetches.add(send(self._message(m.FETCH, {"cell": cell_id})))
                    continue
                silent_since = max(self._last_heard, waiting_since)
                silent = now - silent_since
                up = self.transport.link_up()
                if self.transport.refused:  # it came back with other keys
                    raise self.transport.handshake_error()
                if up and silent < self.info.stall_grace:
                    # Silent, yet the connection is up: a stopped, swapping or overloaded
                    # worker, whose results come when it runs again. Look once a beat.
                    if not stalled:
                        log.warning(
                            "worker %s silent for %.0f s, its connection up: waiting up to "
                            "%g s (its --stall-grace)",
                            self.info.name,
                            silent,
                            self.info.stall_grace,
                        )
                    stalled = True
                    handlers.status(STALLED, {"silent": silent, "grace": self.info.stall_grace})
                    last_heard = now - (self.liveness - 1) * heartbeat
                    continue
                self._last_heard = float("-inf")
                if up:
                    raise WorkerLost(
                        f"worker {self.info.name} ({self.address}) kept its connection but "
                        f"did not answer for {silent:.0f} s, past its --stall-grace of "
                        f"{self.info.stall_grace:g} s. The cell may still finish there, so "
                        "it is not run again elsewhere (--retry); check the worker's host "
                        "(overloaded, swapping, stopped?) before you run it again.",
                        gone=False,
                    )
                raise WorkerLost(
                    f"worker {self.info.name} ({self.address}) stopped answering: its "
                    f"connection dropped and no heartbeat came for {silent:.0f} s while the "
                    "cell was in flight. The cell's result is lost; check that the worker "
                    "is running and reachable, then run the cell again."
                )

    def _report_cancel(self, reply: Message, handlers: OutputHandlers) -> None:
        if reply.content.get("session_lost"):
            handlers.stream(
                "stderr",
                f"lan2gpu: the cell did not stop in time on worker {self.info.name}; its "
                "executor was killed and the session's variables there are lost.\n",
            )

    def _dispatch(self, msg: Message, handlers: OutputHandlers, allowance: float) -> float:
        c = msg.content
        if msg.kind == m.STREAM:
            handlers.stream(str(c.get("name", "stdout")), str(c.get("text", "")))
        elif msg.kind == m.DISPLAY:
            handlers.display(dict(c.get("data", {})), dict(c.get("metadata", {})))
        elif msg.kind == m.TRANSFER:
            allowance = float(c.get("bytes", 0)) / self.min_bandwidth
            handlers.status(msg.kind, c)
        elif msg.kind in (m.QUEUED, m.STARTED):
            handlers.status(msg.kind, c)
        return allowance

    def run(
        self,
        code: str,
        namespace: MutableMapping[str, Any] | None = None,
        *,
        inputs: str | list[str] | None = None,
        outputs: str | list[str] | None = None,
        session: str | None = None,
        timeout: float | None = None,
        handlers: OutputHandlers | None = None,
        hidden: Mapping[str, Any] | None = None,
        update_namespace: bool = True,
        gpus: tuple[int, ...] = (),
        cpu: bool = False,
    ) -> RunResult:
        """Run ``code`` on this worker as if it ran locally in ``namespace``.

        Names the code reads are sent from ``namespace``; names it binds come back
        into it (unless ``update_namespace=False``). ``gpus`` picks the worker's
        GPUs by number (default: the least busy one); ``cpu=True`` runs a CPU cell
        that sees no GPU. Returns a :class:`RunResult`
        (``.outputs``, ``.value`` of a last expression, ``.stats``). Raises
        :class:`RemoteExecutionError` if the code raised on the worker.
        """
        ns: MutableMapping[str, Any] = {} if namespace is None else namespace
        self._cells += 1
        filename = f"<lan2gpu-cell-{self.id[:6]}-{self._cells}>"
        plan = capture.plan_cell(
            code, ns, hidden=hidden, inputs=inputs, outputs=outputs, filename=filename
        )
        payload, _ = dump_values({name: ns[name] for name in plan.inputs}, namespace=dict_of(ns))
        request = ExecuteRequest(
            code=code,
            plan=plan,
            session=session or self.session,
            timeout=timeout,
            filename=filename,
            gpus=tuple(gpus),
            cpu=cpu,
            local=ns,
            namespace=dict_of(ns),
            # Without a namespace of its own, the caller's namespace is the session's.
            keep_namespace=session is not None or namespace is None,
        )
        register_source(filename, code)
        result = self.execute(request, payload, handlers)
        if update_namespace:
            results.apply(result, ns, warn=print)  # news (a value kept there), not an error
        return result

    def close(self) -> None:
        """Close the connection, and this client's default session on the worker
        (named sessions stay until they are idle). Idempotent."""
        if self._used_default_session and not self.transport.closed:
            self._used_default_session = False
            with contextlib.suppress(Lan2GPUError):
                self.close_session(self.session, timeout=0.5)
        self.transport.close()


@dataclass(frozen=True)
class StatusReply:
    """One worker's answer to a status request (or why there was none)."""

    status: dict[str, Any] | None
    latency: float
    problem: str = ""
    state: str = "up"  # else "unreachable", "key mismatch", "version mismatch", "refused"


def state_of(exc: BaseException) -> str:
    """A worker's state in a table, from the error talking to it raised."""
    if isinstance(exc, AuthenticationError):
        return "key mismatch"
    if isinstance(exc, VersionMismatch):
        return "version mismatch"
    if isinstance(exc, WorkerUnreachable):
        return "unreachable"
    return "refused"


def fetch_statuses(
    clients: Sequence[Client], timeout: float = 2.0, detail: bool = False
) -> list[StatusReply]:
    """Ask every worker for its status at once and wait for all (up to ``timeout``).

    Replies come back in the order of ``clients``; a worker that restarted since
    its handshake is shaken hands with again and asked once more.
    """

    def failed(exc: Lan2GPUError) -> StatusReply:
        return StatusReply(None, float("inf"), str(exc), state_of(exc))

    poller = zmq.Poller()
    pending: dict[Any, tuple[int, Client, str, float]] = {}
    replies = [StatusReply(None, float("inf"), "no answer", "unreachable")] * len(clients)

    def ask(i: int, client: Client) -> None:
        msg = client._message(m.STATUS, {"detail": detail})
        try:
            client.transport.send(msg)
        except Lan2GPUError as exc:
            replies[i] = failed(exc)
            return
        sock = client.transport._socket()
        pending[sock] = (i, client, msg.id, time.monotonic())
        poller.register(sock, zmq.POLLIN)

    for i, client in enumerate(clients):
        ask(i, client)
    deadline = time.monotonic() + timeout
    retried: set[int] = set()
    while pending and (remaining := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(remaining * 1000) + 1):
            i, client, msg_id, t0 = pending[sock]
            try:
                reply = client._recv(0)
            except Lan2GPUError as exc:
                reply, replies[i] = None, failed(exc)
                del pending[sock]
                poller.unregister(sock)
                continue
            if reply is None or reply.parent != msg_id:
                continue
            del pending[sock]
            poller.unregister(sock)
            if not reply.authenticated:
                replies[i] = failed(client.transport.notice_error(reply))
            elif reply.kind == m.STATUS_REPLY:
                client._last_heard = time.monotonic()
                replies[i] = StatusReply(reply.content, time.monotonic() - t0)
            elif reply.kind == m.ERROR and i not in retried:
                retried.add(i)  # restarted worker: new handshake, ask again
                try:
                    client.info = client._handshake(max(remaining, 0.1))
                    ask(i, client)
                except Lan2GPUError as exc:
                    replies[i] = failed(exc)
    for i, _client, _, _ in pending.values():
        problem = f"did not answer within {timeout:g} s"
        replies[i] = StatusReply(None, float("inf"), problem, "unreachable")
    return replies


def _curve(
    key: bytes,
    key_file: str | os.PathLike[str] | None,
    server_key: str | os.PathLike[str] | None,
    client_key: str | os.PathLike[str] | None,
    plaintext: bool,
) -> Curve | None:
    """Keys for the connection: per-user ones for an ``--encrypt`` worker (this
    machine's pair is made if needed), else the pair derived from the shared key;
    None only in plain text."""
    if server_key is None:
        if plaintext:
            return None
        public, secret = derived_keypair(key, CLIENT)
        return Curve(derived_keypair(key, WORKER)[0], public, secret, shared=True)
    if client_key is None:
        client_key = ensure_keypair(key_dir(key_file or default_key_file()), CLIENT)[1]
    public, secret = load_keypair(client_key)
    return Curve(load_public(server_key), public, secret)


def dict_of(namespace: Mapping[str, Any]) -> dict[str, Any] | None:
    """The namespace as functions see it (their ``__globals__``), if it is a dict."""
    return namespace if isinstance(namespace, dict) else None


def connect(
    address: str,
    *,
    key_file: str | os.PathLike[str] | None = None,
    key: bytes | None = None,
    connect_timeout: float = 10.0,
    server_key: str | os.PathLike[str] | None = None,
    plaintext: bool = False,
) -> Client:
    """Connect to a worker and shake hands.

    ``key_file`` defaults to ``$LAN2GPU_KEY_FILE`` or ``~/.config/lan2gpu/key``.
    Connections are encrypted with CurveZMQ keys derived from the shared key.
    ``server_key`` (the worker's ``worker.key``) is for a worker started with
    ``--encrypt`` (per-user keys); ``plaintext=True`` for one started with
    ``--insecure-plaintext``. Raises :class:`WorkerUnreachable` if nothing answers
    within ``connect_timeout``, :class:`AuthenticationError` if the worker
    refuses the handshake (another key).
    """
    return Client(
        address,
        key=key,
        key_file=key_file,
        connect_timeout=connect_timeout,
        server_key=server_key,
        plaintext=plaintext,
    )


__all__ = [
    "Client",
    "ConnectionClosed",
    "ExecuteRequest",
    "Lan2GPUError",
    "OutputHandlers",
    "RunResult",
    "StatusReply",
    "WorkerInfo",
    "connect",
    "fetch_statuses",
]
