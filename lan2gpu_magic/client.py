"""Steps 4-6 for one worker: send a planned cell, relay its output, get its result.

``Client.run(code, namespace)`` is the whole pipeline for scripts and
benchmarks (capture, serialize, submit, apply); the ``%%lan2gpu`` magic calls
the same steps, choosing the worker first. A client is three parts:

- :class:`~.connection.Connection`: the socket, the keys, the handshake, request
  and reply;
- :class:`~.upload.Uploads`: what a request carries (arrays the session holds go
  as digests, compression when it pays) and what its result refers back to;
- :class:`~.liveness.CellWait`: while the cell runs, when to heartbeat, ask
  again, wait for a stalled worker or give it up. The client only feeds it the
  messages and the time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from worker_kernel.protocol import buffer_pool
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.buffer_pool import pool_memory_from_env
from worker_kernel.protocol.errors import (
    ConfigurationError,
    ConnectionClosed,
    Lan2GPUError,
    ProtocolError,
)
from worker_kernel.protocol.keys import load_key
from worker_kernel.protocol.messages import Buffer, Message
from worker_kernel.protocol.serialize import Payload

from . import pipeline, results
from .connection import Connection, WorkerInfo, curve_keys
from .data_link import DataLink, DataPortUnreachable
from .liveness import ANSWERING, STALLED, CellWait, NotConfirmed, Step, Timing
from .replies import error_of
from .request import ExecuteRequest, OutputHandlers
from .results import RunResult
from .tracebacks import register_source
from .transport import Link
from .upload import Uploads

_FRESH = 1.0  # skip the pre-flight ping if the worker spoke this recently
_BIG_UPLOAD = 8 << 20  # announce uploads this large, so the worker heartbeats meanwhile
_COMPRESS_MODES = ("auto", "on", "off")

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the cell, and the worker confirmed it; ``session_lost``: its
    executor had to be killed (the cell did not stop within the worker's grace)."""

    def __init__(self, session_lost: bool) -> None:
        lost = "its session's variables there are lost" if session_lost else "its session is intact"
        super().__init__(f"the cell was cancelled on the worker; {lost}")
        self.session_lost = session_lost


class InterruptFlag:
    """While active (main thread only), the first SIGINT sets a flag instead of
    raising, so it can never split a multipart message; a second one raises
    KeyboardInterrupt at once (stop waiting for the worker)."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.pending = False
        self.event = event  # a cancel from another thread
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def requested(self) -> bool:
        return self.pending or (self.event is not None and self.event.is_set())

    @property
    def by_event(self) -> bool:
        """The cancel came from the other thread's event, not from Ctrl-C."""
        return not self.pending and self.requested()

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


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
        link: Callable[[], Link] | None = None,
    ) -> None:
        """``link`` makes the transport (default: a ZeroMQ socket to ``address``)."""
        self.address = address
        if compress not in _COMPRESS_MODES:
            raise ConfigurationError(f"compress={compress!r}: use one of {_COMPRESS_MODES}")
        self.key_file = Path(key_file).expanduser() if key_file else None
        self.liveness = liveness
        self.min_bandwidth = min_bandwidth
        self._clock = clock
        self._cells = 0
        self._used_default_session = False
        self.load: dict[str, Any] = {}  # the worker's live numbers, from heartbeats
        key = key if key is not None else load_key(key_file)
        self.plaintext = plaintext
        self.curve = curve_keys(key, key_file, server_key, client_key, plaintext)
        self.connection = Connection(
            address,
            key,
            self.curve,
            connect_timeout=connect_timeout,
            context=context,
            clock=clock,
            link=link,
        )
        self.id = self.connection.id
        self.session = f"{socket.gethostname()}:{os.getpid()}:{self.id[:8]}"
        self.uploads = Uploads(self.connection, cache=cache, compress=compress)
        # Results land in pre-faulted memory, reused cell after cell (buffer_pool.py).
        buffer_pool.install(pool_memory_from_env())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected"
        return f"<lan2gpu Client {self.info.name} {self.address} {state}>"

    @property
    def info(self) -> WorkerInfo:
        return self.connection.info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def transport(self) -> Link:
        return self.connection.transport

    @property
    def closed(self) -> bool:
        return self.connection.closed

    @property
    def cache(self) -> bool:
        """Send arrays the session already holds as digests (default on)."""
        return self.uploads.cache

    @cache.setter
    def cache(self, on: bool) -> None:
        self.uploads.cache = on

    @property
    def compress(self) -> str:
        """Compress large buffers: "auto" (when it pays on this link), "on" or "off"."""
        return self.uploads.compress

    @compress.setter
    def compress(self, mode: str) -> None:
        if mode not in _COMPRESS_MODES:
            raise ConfigurationError(f"compress={mode!r}: use one of {_COMPRESS_MODES}")
        self.uploads.compress = mode

    # -- requests -------------------------------------------------------------

    def ping(self, timeout: float = 5.0, expect_bytes: int = 0) -> float:
        """Round-trip time to the worker's service, in seconds.

        If the worker restarted since the handshake, shake hands again first.
        """
        return self.connection.ping(timeout, expect_bytes)

    def status(self, timeout: float = 10.0, detail: bool = False) -> dict[str, Any]:
        """The worker's queues, running cells, sessions and kernels; with ``detail``,
        also its GPU history and recently finished cells."""
        msg = self.connection.message(m.STATUS, {"detail": detail})
        return self.connection.request(msg, {m.STATUS_REPLY}, timeout).content

    def adopt_session(self) -> str:
        """This client's default session, for runs on other connections (split
        chunks, background cells); it is closed with this client, as if used here."""
        self._used_default_session = True
        return self.session

    def close_session(self, session: str | None = None, timeout: float = 10.0) -> int:
        """Stop the session's executor on the worker (frees its GPU memory)."""
        msg = self.connection.message(m.CLOSE_SESSION, {"session": session or self.session})
        reply = self.connection.request(msg, {m.STATUS_REPLY}, timeout)
        return int(reply.content.get("closed", 0))

    # -- whole kernels (for IDEs) ---------------------------------------------------

    def start_kernel(
        self, key: str, *, gpus: Sequence[int] = (), cpu: bool = False, timeout: float = 90.0
    ) -> str:
        """Start a Jupyter kernel on the worker that verifies frames with ``key``.

        Returns its id. It listens on the worker's 127.0.0.1 only; its channels
        travel through this connection as ``kernel_frames`` messages. See
        :mod:`lan2gpu_magic.kernel`.
        """
        msg = self.connection.message(
            m.START_KERNEL,
            {"key": key, "signature_scheme": "hmac-sha256", "gpus": list(gpus), "cpu": cpu},
        )
        reply = self.connection.request(msg, {m.KERNEL_STARTED, m.ERROR}, timeout)
        return str(reply.content["kernel"])

    def stop_kernel(self, kernel: str, timeout: float = 15.0) -> None:
        msg = self.connection.message(m.STOP_KERNEL, {"kernel": kernel})
        self.connection.request(msg, {m.STATUS_REPLY}, timeout)

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
        if self._clock() - self.connection.last_heard > _FRESH or payload.nbytes > _BIG_UPLOAD:
            # Fail fast before uploading, re-handshake after a worker restart, and
            # tell the worker how much is coming so it keeps heartbeating us.
            self.ping(expect_bytes=payload.nbytes)

        def send(msg: Message) -> Message:
            data = self.connection.send(msg)
            try:
                return self.wait(msg, handlers, request.timeout, request.cancel, data)
            except DataPortUnreachable as exc:
                # The cell was cancelled unrun (its inputs never left): send it again,
                # everything through the worker's port, as every later cell on this link.
                self.uploads.direct = False
                handlers.stream(
                    "stderr",
                    f"lan2gpu: {exc}; sending arrays through the worker's own port from now "
                    "on (open the worker's data ports in the firewall, or start it with "
                    "--no-direct-data, to avoid this wait)\n",
                )
                again = self.uploads.relayed(msg)
                self.connection.send(again)
                return self.wait(again, handlers, request.timeout, request.cancel)

        return self.uploads.exchange(request, payload, send)

    def wait(
        self,
        request: Message,
        handlers: OutputHandlers,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
        data: list[Buffer] | None = None,
    ) -> Message:
        """Relay the live output of the cell ``request`` (sent) until its result arrives.
        ``data``: its frames for the data connection, sent once the cell starts.

        Ctrl-C (SIGINT) only sets a flag here, checked between messages; the worker
        is then asked to cancel the cell and given a few seconds to confirm.
        """
        conn = self.connection
        wait = CellWait(
            request,
            conn.worker,
            self._clock(),
            timing=self._timing(),
            timeout=timeout,
            heard=conn.last_heard,
        )
        with InterruptFlag(cancel) as interrupted:
            try:
                reply = self._drive(wait, handlers, interrupted, data or [])
            except BaseException as exc:
                conn.last_heard = wait.heard
                # Leaving without a result (an error, or a second Ctrl-C): do not
                # leave the cell running on the worker.
                with contextlib.suppress(Lan2GPUError):
                    conn.send(conn.message(m.CANCEL, {"cell": request.id}))
                if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, NotConfirmed):
                    # The second Ctrl-C may have landed inside a multipart receive.
                    with contextlib.suppress(Lan2GPUError):
                        conn.reset()
                if isinstance(exc, DataPortUnreachable) and interrupted.requested():
                    raise Interrupted(False) from None  # not sent again: Ctrl-C meant stop
                raise
        if wait.cancelled:
            if reply.content.get("session_lost"):
                handlers.stream(
                    "stderr",
                    f"lan2gpu: the cell did not stop in time on worker {self.info.name}; its "
                    "executor was killed and the session's variables there are lost.\n",
                )
            if not wait.by_event:
                raise Interrupted(bool(reply.content.get("session_lost")))
        return reply  # cancelled by the event: the result says "cancelled"

    def _timing(self) -> Timing:
        return Timing(
            heartbeat=self.info.heartbeat,
            liveness=self.liveness,
            stall_grace=self.info.stall_grace,
            min_bandwidth=self.min_bandwidth,
        )

    def _drive(
        self, wait: CellWait, handlers: OutputHandlers, flag: InterruptFlag, data: list[Buffer]
    ) -> Message:
        """Feed ``wait`` what arrives and what time it is; do what it says."""
        conn = self.connection
        link: DataLink | None = None  # the cell's data connection, once it started

        def do(step: Step) -> None:
            nonlocal link
            for msg in step.send:
                data[:] = conn.send(msg) or data  # a resent request: its own frames
            for kind, content in step.shown:
                handlers.show(kind, content)
            if step.upload is not None and data and link is None:  # once: a resent "started"
                cell = wait.request.request
                link = DataLink.open(self.info.name, self.address, conn.key, cell, step.upload)
                link.send(data, flag.requested)
                wait.sent_inputs(self._clock())

        try:
            while True:
                now = self._clock()
                if flag.requested() and not wait.cancelled:
                    do(Step(send=wait.interrupt(now, by_event=flag.by_event)))
                try:
                    reply = conn.recv(wait.wake(now))
                except ProtocolError as exc:
                    # One bad message (tampered, or from a stranger) is dropped; the
                    # cell's own messages still count.
                    log.warning("%s", exc)
                    reply = None
                now = self._clock()
                if reply is not None and not reply.authenticated:
                    error = error_of(reply, self.info.name, self.address)
                    if wait.concerns(reply):  # the worker refused something this wait sent
                        raise error
                    log.warning("%s", error)
                    reply = None
                if reply is not None:
                    step = wait.received(reply, now)
                    conn.last_heard = wait.heard
                    if wait.load is not None:
                        self.load = wait.load
                    do(step)
                    if step.result is not None and step.result.arriving is not None:
                        # Its buffers come on the data connection, right behind it.
                        return DataLink.receive_on(link, step.result, self.info.name)
                    if step.result is not None:
                        return step.result
                do(wait.tick(now, conn.link_up))
        finally:
            if link is not None:
                link.close()

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
        plan = pipeline.plan(
            code, ns, filename=filename, hidden=hidden, inputs=inputs, outputs=outputs
        )
        cell = pipeline.Cell(
            code=code,
            plan=plan,
            filename=filename,
            session=session,
            timeout=timeout,
            namespace=dict_of(ns),
            # Without a namespace of its own, the caller's namespace is the session's.
            keep_namespace=session is not None or namespace is None,
            gpus=tuple(gpus),
            cpu=cpu,
        )
        payload = pipeline.serialize(plan.inputs, ns, globals_=dict_of(ns))
        register_source(filename, code)
        result = pipeline.execute(
            cell, payload, lambda lost: (self, None), lambda _: handlers or OutputHandlers(),
            local=ns,
        )  # fmt: skip
        if update_namespace:
            results.apply(result, ns, warn=print)  # news (a value kept there), not an error
        return result

    def close(self) -> None:
        """Close the connection, and this client's default session on the worker
        (named sessions stay until they are idle). Idempotent."""
        if self._used_default_session and not self.closed:
            self._used_default_session = False
            with contextlib.suppress(Lan2GPUError):
                self.close_session(self.session, timeout=0.5)
        self.connection.close()


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
    "ANSWERING",
    "STALLED",
    "Client",
    "ConnectionClosed",
    "ExecuteRequest",
    "Interrupted",
    "Lan2GPUError",
    "OutputHandlers",
    "RunResult",
    "WorkerInfo",
    "connect",
]
