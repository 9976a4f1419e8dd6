"""The notebook's end of a cell's direct data connection (worker_kernel/protocol/datapath.py).

A large cell's request goes to the worker with its buffers declared, not carried. When
the worker says the cell started, its ``started`` names the executor's data endpoint
and a one-cell ticket: :meth:`DataLink.open` connects there, :meth:`DataLink.send`
streams the inputs sealed, and when the result's signed prelude arrives with its
buffers declared the same way, :meth:`DataLink.receive` reads them from the same
connection into this process's receive pool. Whoever opens a link closes it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker_kernel.protocol import datapath
from worker_kernel.protocol.errors import (
    AuthenticationError,
    ProtocolError,
    TransportError,
    WorkerLost,
)
from worker_kernel.protocol.messages import Buffer, Message

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open a cell's data connection and be admitted


class DataPortUnreachable(Exception):
    """The executor's data port cannot be reached (a firewall?). Internal: the client
    resends the cell through the worker's own port and stops using direct data."""


class DataLink:
    """One cell's data connection: inputs out, the result's buffers in."""

    def __init__(self, sock: socket.socket, aead: AESGCM, where: str) -> None:
        self.sock: socket.socket | None = sock  # None once closed
        self._aead, self.where = aead, where

    @classmethod
    def open(
        cls, worker: str, address: str, key: bytes, cell: str, started: dict[str, str]
    ) -> DataLink:
        """Connect to the data endpoint ``started`` names and be admitted, for ``cell``
        of the worker named ``worker`` that this client reaches at ``address``."""
        endpoint = started.get("endpoint", "")
        if endpoint.startswith("tcp://") and address.startswith("tcp://"):
            # The executor listens on the interface the worker does: reach it the same way.
            port = endpoint.rpartition(":")[2]
            endpoint = f"{address.rpartition(':')[0]}:{port}"
        try:
            ticket = bytes.fromhex(started.get("ticket", ""))
            if len(ticket) != datapath.TICKET_BYTES:
                raise ValueError(f"a ticket of {len(ticket)} bytes")
            target = datapath.Endpoint(endpoint)
        except ValueError as exc:
            raise ProtocolError(f"worker {worker} sent a bad data endpoint: {exc}") from None
        try:
            sock = target.connect(timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise DataPortUnreachable(
                f"cannot reach the data port of worker {worker} at {endpoint} ({exc})"
            ) from None
        try:
            datapath.answer_challenge(sock, ticket)
        except (OSError, TransportError) as exc:
            sock.close()
            raise TransportError(
                f"worker {worker} did not admit the cell's data connection at {endpoint}: {exc}"
            ) from None
        sock.settimeout(datapath.IDLE)
        return cls(sock, datapath.cell_key(key, cell, ticket), endpoint)

    def send(self, frames: Sequence[Buffer], stop: Callable[[], bool]) -> None:
        """Send the inputs. A broken connection is not raised: the executor answers
        the cell (it died, or its inputs were cut short), and that answer says more.
        ``stop()`` (a Ctrl-C) ends the stream early with the connection left open: the
        cancel that follows is what the executor answers."""
        if self.sock is None:
            return
        try:
            datapath.send_frames(self.sock, self._aead, frames, stop=stop)
        except OSError as exc:
            log.debug("the data connection %s broke while sending: %s", self.where, exc)
            self.close()

    @staticmethod
    def receive_on(link: DataLink | None, reply: Message, worker: str) -> Message:
        """``reply`` (a result whose buffers come on the cell's data connection) with its
        buffers, read from ``link`` (None: it never opened, e.g. a cell sent again)."""
        incoming = reply.arriving
        if link is None or link.sock is None or incoming is None:
            raise WorkerLost(
                f"the result's arrays were to come from worker {worker} on the cell's data "
                "connection, which is closed; run the cell again",
                gone=False,
            )
        try:
            datapath.receive_frames(link.sock, link._aead, incoming, datapath.DOWN)
            return incoming.finish()  # type: ignore[no-any-return]
        except AuthenticationError as exc:
            raise AuthenticationError(f"the result's arrays from worker {worker}: {exc}") from None
        except (OSError, TransportError) as exc:
            raise WorkerLost(
                f"the data connection to worker {worker} broke while the result's arrays "
                f"came ({exc}); run the cell again",
                gone=False,
            ) from None
        finally:
            link.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


__all__ = ["DataLink", "DataPortUnreachable"]
