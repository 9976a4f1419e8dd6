"""The fleet's status at once: one status request to every worker, answers in parallel.

Used by the pool (placement, ``%lan2gpu workers``, the dashboard) over the
connections its clients hold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import zmq

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.contents import StatusDocument
from worker_kernel.protocol.errors import (
    AuthenticationError,
    Lan2GPUError,
    VersionMismatch,
    WorkerUnreachable,
)

from .connection import Connection
from .replies import error_of


@dataclass(frozen=True)
class StatusReply:
    """One worker's answer to a status request (or why there was none)."""

    status: StatusDocument | None
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
    connections: Sequence[Connection], timeout: float = 2.0, detail: bool = False
) -> list[StatusReply]:
    """Ask every worker for its status at once and wait for all (up to ``timeout``).

    Replies come back in the order of ``connections``; a worker that restarted
    since its handshake is shaken hands with again and asked once more.
    """

    def failed(exc: Lan2GPUError) -> StatusReply:
        return StatusReply(None, float("inf"), str(exc), state_of(exc))

    poller = zmq.Poller()
    pending: dict[Any, tuple[int, Connection, str, float]] = {}
    replies = [StatusReply(None, float("inf"), "no answer", "unreachable")] * len(connections)

    def ask(i: int, conn: Connection) -> None:
        msg = conn.message(m.STATUS, {"detail": detail})
        try:
            conn.send(msg)
            sock = conn.socket
        except Lan2GPUError as exc:
            replies[i] = failed(exc)
            return
        pending[sock] = (i, conn, msg.id, time.monotonic())
        poller.register(sock, zmq.POLLIN)

    for i, conn in enumerate(connections):
        ask(i, conn)
    deadline = time.monotonic() + timeout
    retried: set[int] = set()
    while pending and (remaining := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(remaining * 1000) + 1):
            i, conn, msg_id, t0 = pending[sock]
            try:
                reply = conn.recv(0)
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
                replies[i] = failed(error_of(reply, conn.info.name, conn.address))
            elif reply.kind == m.STATUS_REPLY:
                conn.last_heard = time.monotonic()
                document = cast(StatusDocument, reply.content)  # read defensively
                replies[i] = StatusReply(document, time.monotonic() - t0)
            elif reply.kind == m.ERROR and i not in retried:
                retried.add(i)  # restarted worker: new handshake, ask again
                try:
                    conn.handshake(max(remaining, 0.1))
                    ask(i, conn)
                except Lan2GPUError as exc:
                    replies[i] = failed(exc)
    for i, _conn, _, _ in pending.values():
        problem = f"did not answer within {timeout:g} s"
        replies[i] = StatusReply(None, float("inf"), problem, "unreachable")
    return replies


__all__ = ["StatusReply", "fetch_statuses", "state_of"]
