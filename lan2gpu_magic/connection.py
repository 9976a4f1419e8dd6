"""Step 4: one connection to one worker: its keys, the handshake, request and reply.

:class:`Connection` owns the :class:`~.transport.Transport` (the socket) and knows
the worker from its handshake (:class:`WorkerInfo`). It is what everything that
talks to a worker shares: the :class:`~.client.Client` running cells, the fleet's
status poll (:mod:`.statuses`) and the IDE kernel forwarder (:mod:`.kernel`), each
through its public methods. Running a cell is not here (see :mod:`.client`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.contents import Hello, Welcome
from worker_kernel.protocol.curve import (
    CLIENT,
    WORKER,
    derived_keypair,
    ensure_keypair,
    key_dir,
    load_keypair,
    load_public,
)
from worker_kernel.protocol.errors import ConfigurationError, MessageRejected, WorkerUnreachable
from worker_kernel.protocol.keys import default_key_file
from worker_kernel.protocol.messages import Buffer, Message, new_id
from worker_kernel.protocol.versions import check_compatible, local_versions

from .liveness import Worker
from .replies import error_of
from .transport import Curve, Link, Transport

log = logging.getLogger(__name__)


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
    direct_data: bool = False  # large inputs may go straight to the executor

    @property
    def simulator(self) -> bool:
        return bool(self.capabilities.get("simulator"))

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list(self.capabilities.get("gpus", []))

    def describe(self) -> str:
        gpus = ", ".join(f"GPU{g['index']} {g['name']}" for g in self.gpus) or "no GPU"
        return f"{self.name} ({self.address}, {gpus})"


class Connection:
    """A socket to one worker and the handshake on it; :meth:`close` it (idempotent).

    ``last_heard`` is when the worker last spoke (by ``clock``); who reads a
    message from the worker outside :meth:`request` sets it.
    """

    def __init__(
        self,
        address: str,
        key: bytes,
        curve: Curve | None,
        *,
        connect_timeout: float = 10.0,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        link: Callable[[], Link] | None = None,
    ) -> None:
        self.address = address
        self.curve = curve
        self.id = new_id()  # this client, to the worker
        self.clock = clock
        self.last_heard = float("-inf")
        self.key = key  # signs messages; derives each direct data connection's key
        # A fresh transport (also after an interrupt split a message): a ZeroMQ socket
        # with its own context unless one is given, or the caller's (tests: in memory).
        self._link = link or (lambda: Transport(address, key, context=context, curve=curve))
        self.transport: Link = self._link()
        try:
            self.info = self.handshake(connect_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self.transport.closed

    @property
    def socket(self) -> zmq.Socket[bytes]:
        """The socket, to poll it together with others (the fleet's status, the IDE
        forwarder); read from it only with :meth:`recv`."""
        if not isinstance(self.transport, Transport):
            raise ConfigurationError("only a ZeroMQ transport has a socket to poll")
        return self.transport._socket()

    @property
    def worker(self) -> Worker:
        return Worker(self.info.name, self.address, self.info.instance)

    def message(self, kind: str, content: dict[str, Any] | None = None, **kw: Any) -> Message:
        """A message for the worker (addressed to its instance, once known)."""
        to = kw.pop("to", None)
        if to is None:
            to = self.info.instance if hasattr(self, "info") else ""
        return Message(kind=kind, content=content or {}, to=to, **kw)

    def send(self, msg: Message) -> list[Buffer]:
        """Send ``msg``; the frames for its direct data connection, if it has one."""
        return self.transport.send(msg)

    def recv(self, timeout: float) -> Message | None:
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

    def link_up(self) -> bool:
        """Whether the connection is up (see :meth:`Transport.link_up`); raises
        :class:`AuthenticationError` if the worker refused our handshake."""
        up = self.transport.link_up()
        if self.transport.refused:  # it came back with other keys
            raise self.transport.handshake_error()
        return up

    def request(self, msg: Message, reply_kinds: set[str], timeout: float) -> Message:
        """Send ``msg`` and wait for its reply; other messages are dropped."""
        self.transport.send(msg)
        deadline = self.clock() + timeout
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise self._unreachable(timeout)
            reply = self.recv(remaining)
            if reply is None:
                continue
            if not reply.authenticated:
                if reply.parent in (msg.id, ""):
                    raise error_of(reply, self._name(), self.address)
                continue
            self.last_heard = self.clock()
            if reply.parent != msg.id:
                continue
            if reply.kind == m.ERROR:
                raise error_of(reply, self._name(), self.address)
            if reply.kind in reply_kinds:
                return reply

    def handshake(self, timeout: float) -> WorkerInfo:
        """Say hello and learn who the worker is (again, after it restarted)."""
        me: Hello = {"client": self.id, "host": socket.gethostname(), "versions": local_versions()}
        hello = self.message(m.HELLO, dict(me), to="")
        c = cast(Welcome, self.request(hello, {m.WELCOME}, timeout).content)
        warnings = check_compatible(local_versions(), dict(c["versions"]), f"worker {c['worker']}")
        self.info = WorkerInfo(
            name=str(c["worker"]),
            address=self.address,
            instance=str(c["instance"]),
            versions=dict(c["versions"]),
            capabilities=dict(c["capabilities"]),
            heartbeat=float(c.get("heartbeat", 1.0)),
            warnings=tuple(warnings) + tuple(c.get("warnings", [])),
            stall_grace=float(c.get("stall_grace", 60.0)),
            direct_data=bool(c.get("direct_data")),
        )
        return self.info

    def ping(self, timeout: float = 5.0, expect_bytes: int = 0) -> float:
        """Round-trip time to the worker's service, in seconds.

        If the worker restarted since the handshake, shake hands again first.
        """
        t0 = self.clock()
        try:
            self.request(self.message(m.PING, {"expect_bytes": expect_bytes}), {m.PONG}, timeout)
        except MessageRejected:
            self.handshake(timeout)
            t0 = self.clock()
            self.request(self.message(m.PING, {"expect_bytes": expect_bytes}), {m.PONG}, timeout)
        return self.clock() - t0

    def reset(self) -> None:
        """A fresh socket and handshake, after an interrupt may have split a message."""
        self.transport.close()
        self.transport = self._link()
        self.last_heard = float("-inf")
        self.handshake(10.0)

    def close(self) -> None:
        self.transport.close()

    def _name(self) -> str:
        return self.info.name if hasattr(self, "info") else self.address

    def _unreachable(self, timeout: float) -> WorkerUnreachable:
        hint = ""
        if self.curve is not None and not self.curve.shared:
            hint = (
                " With encryption, the worker ignores clients it does not know: is this "
                "machine's client.key in its authorized_keys directory, and is --server-key "
                "that worker's worker.key?"
            )
        return WorkerUnreachable(
            f"worker at {self.address} did not answer within {timeout:g} s; is it running "
            "(`python -m worker_kernel --help`), and is the address right? To wait longer: "
            "`%lan2gpu connect ADDRESS --timeout S`, `%config Lan2GPU.connect_timeout = S`, "
            "`connect(ADDRESS, connect_timeout=S)`, or `python -m lan2gpu_magic ping ADDRESS "
            f"--timeout S`.{hint}"
        )


def curve_keys(
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


__all__ = ["Connection", "WorkerInfo", "curve_keys"]
