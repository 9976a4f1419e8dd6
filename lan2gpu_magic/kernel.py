"""``python -m lan2gpu_magic.kernel -f CONNECTION_FILE [placement]``: a local
stand-in for a kernel that runs on a LAN worker, for any Jupyter frontend.

A kernelspec (``python -m lan2gpu_magic install-kernel``) starts this process
where a frontend would start ``ipykernel``. It chooses a worker with the same
placement code as ``%%lan2gpu``, asks it to start a real ipykernel that uses
this connection file's Jupyter key, then relays the five channels between the
ports of the local connection file and the remote kernel, frames unchanged,
inside this process's lan2gpu connection to the worker (signed, and encrypted
by default); the remote kernel listens on the worker's 127.0.0.1 only
(``worker_kernel.kernel_relay``):

    frontend ──shell/control/stdin (ROUTER)──▶ forwarder ══kernel_frames══▶ worker ──▶ kernel
    frontend ◀──────── iopub (PUB) ─────────── forwarder ◀═kernel_frames═══ worker ◀── kernel
    frontend ──hb──▶ forwarder (answers while the kernel's own heartbeat answers it)

Interrupts travel as messages (``interrupt_mode: message``). The remote kernel
is shut down when this process exits; if it dies, this process exits, so the
frontend sees a dead kernel and offers a restart (a new remote kernel, possibly
on another worker).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import zmq
from jupyter_client.session import Session

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import Lan2GPUError, ProtocolError
from worker_kernel.protocol.outcomes import UNKNOWN_CLIENT
from worker_kernel.protocol.units import parse_size

from .client import Client
from .placement import Requirements, parse_cc
from .pool import WorkerPool, workers_from_env

log = logging.getLogger("lan2gpu.kernel")

_ROUTED = ("shell", "control", "stdin")
_HEARTBEAT = 1.0  # seconds between pings of the remote kernel and of the worker
_KERNEL_LIVENESS = 5  # missed kernel heartbeats before the kernel is taken for dead
_WORKER_LIVENESS = 10.0  # seconds without hearing from the worker before giving up
_HOLD = 3.0  # longest wait for a frontend to subscribe to iopub


class Forwarder:
    """Owns the local sockets (bound to the connection file's ports); the remote
    kernel is reached through ``client``'s connection."""

    def __init__(self, connection: dict[str, Any], client: Client, kernel: str = "") -> None:
        self.client = client
        self.kernel = kernel  # its id on the worker, named in our messages
        self.active_at = time.monotonic()  # the last request relayed, or output
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        local = f"{connection.get('transport', 'tcp')}://{connection.get('ip', '127.0.0.1')}"
        channels = (*_ROUTED, "iopub", "hb")
        self.front: dict[str, zmq.Socket[bytes]] = {}
        for name in channels:
            kind = zmq.XPUB if name == "iopub" else zmq.ROUTER
            self.front[name] = self._socket(kind, bind=f"{local}:{connection[f'{name}_port']}")
        # To greet frontends on iopub as ipykernel does (JEP 65), with their key.
        key = str(connection["key"]).encode()
        self.session = Session(key=key, signature_scheme="hmac-sha256")
        self.poller = zmq.Poller()
        for sock in self.front.values():
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(client.connection.socket, zmq.POLLIN)
        self.kernel_heard = time.monotonic()
        self.stopping = False
        # Requests wait until a frontend listens on iopub (or a few seconds): a
        # frontend that reconnects after a restart sends before it subscribes,
        # and output published before that would be lost.
        self.listening = False
        self.held: list[tuple[str, list[Any]]] = []
        self.hold_until = time.monotonic() + _HOLD
        self.stall_logged = False  # said once that a silent worker is waited for

    def _socket(self, kind: int, *, bind: str) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(bind)
        return sock

    def _to_kernel(self, channel: str, identity: bytes, frames: list[Any]) -> None:
        """One frontend message for the remote kernel, through the worker connection."""
        content = {"kernel": self.kernel, "channel": channel, "identity": identity.hex()}
        buffers = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
        conn = self.client.connection
        conn.send(conn.message(m.KERNEL_FRAMES, content, buffers=buffers))

    def serve(self) -> int:
        """Relay until the kernel dies, the worker is lost, or we are told to stop."""
        next_beat = self.kernel_heard = time.monotonic()  # the kernel has just started
        self.hold_until = next_beat + _HOLD
        while not self.stopping:
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + _HEARTBEAT
                if _frontend_gone():
                    # The Jupyter server or IDE that started us died without a
                    # shutdown: go, so the remote kernel (and its GPU) is freed.
                    log.error("the frontend that started this kernel is gone; stopping")
                    return 1
                self._to_kernel("hb", b"", [b"ping"])
                # Tell the worker when the kernel was last busy (for its idle column).
                idle = {"kernel": self.kernel, "idle": now - self.active_at}
                self.client.connection.send(self.client.connection.message(m.HEARTBEAT, idle))
            worker_silent = now - self.client.connection.last_heard
            if worker_silent > 2 * _HEARTBEAT:
                if worker_silent > _WORKER_LIVENESS and not self._stalled(worker_silent):
                    log.error("worker %s stopped answering", self.client.info.name)
                    return 1
                # The kernel's heartbeat comes through the worker: while the worker is
                # silent, the kernel's silence says nothing about the kernel.
                self.kernel_heard = max(self.kernel_heard, now - _HEARTBEAT)
            if now - self.kernel_heard > _KERNEL_LIVENESS * _HEARTBEAT:
                log.error("the remote kernel stopped answering its heartbeat")
                return 1
            self._release()  # held requests whose wait is over
            wait = 0.1 if self.held else _HEARTBEAT
            for sock, _ in self.poller.poll(int(wait * 1000)):
                status = self._handle(sock)
                if status is not None:
                    return status
        return 0

    def _stalled(self, silent: float) -> bool:
        """A silent worker whose connection is up (stopped, swapping, overloaded) is
        waited for up to its --stall-grace; the kernel there goes on."""
        grace = self.client.info.stall_grace
        if silent >= grace or not self.client.connection.transport.link_up():
            return False
        if not self.stall_logged:
            self.stall_logged = True
            log.warning(
                "worker %s silent for %.0f s, its connection up: waiting up to %g s",
                self.client.info.name,
                silent,
                grace,
            )
        return True

    def _handle(self, sock: zmq.Socket[bytes]) -> int | None:
        if sock is self.client.connection.socket:
            return self._from_worker()
        frames = sock.recv_multipart(copy=False)
        if log.isEnabledFor(logging.DEBUG):
            where = next((n for n, s in self.front.items() if s is sock), "?")
            log.debug("%s: %d frames", where, len(frames))
        if sock is self.front["iopub"]:
            self._greet(frames)
        elif sock is self.front["hb"]:
            sock.send_multipart(frames, copy=False)  # echo: the kernel is known alive
        else:
            channel = next(name for name, s in self.front.items() if s is sock)
            self.active_at = time.monotonic()
            self.held.append((channel, frames))
        self._release()
        return None

    def _release(self) -> None:
        if not self.held or not (self.listening or time.monotonic() >= self.hold_until):
            return
        for channel, frames in self.held:
            self._to_kernel(channel, frames[0].bytes, frames[1:])
        self.held.clear()

    def _greet(self, frames: list[Any]) -> None:
        for frame in frames:
            event = frame.bytes
            if event[:1] == b"\x01":  # a frontend subscribed
                self.listening = True
                topic = event[1:].decode("utf-8", errors="replace")
                self.session.send(
                    self.front["iopub"],
                    "iopub_welcome",
                    {"subscription": topic},
                    ident=[event[1:]] if topic else None,
                )

    def _from_worker(self) -> int | None:
        try:
            msg = self.client.connection.recv(0)
        except ProtocolError as exc:
            log.warning("%s", exc)
            return None
        if msg is None:
            return None
        self.client.connection.last_heard = time.monotonic()
        self.stall_logged = False
        if msg.kind == m.KERNEL_FRAMES and msg.content.get("kernel") == self.kernel:
            self._from_kernel(msg)
            return None
        if msg.kind == m.ERROR and msg.content.get("code") == UNKNOWN_CLIENT:
            # The worker let this connection go (a network cut): say hello again; the
            # kernel is ours by our client id, which the handshake gives again.
            log.warning("worker %s asked this connection to shake hands again", self.client.name)
            try:
                self.client.connection.handshake(10.0)
            except Lan2GPUError as exc:
                log.error("the worker did not shake hands again: %s", exc)
                return 1
            return None
        if msg.kind == m.KERNEL_EVENT and msg.content.get("event") == "died":
            code = msg.content.get("returncode")
            if code == 0:  # it was asked to shut down (a frontend's shutdown or restart)
                log.info("the remote kernel exited")
                return 0
            log.error("the remote kernel died (code %s)", code)
            return 1
        return None

    def _from_kernel(self, msg: m.Message) -> None:
        channel = str(msg.content.get("channel", ""))
        if channel == "hb":
            self.kernel_heard = time.monotonic()
        elif channel == "iopub":
            self.active_at = time.monotonic()
            self.front["iopub"].send_multipart(msg.buffers, copy=False)
        elif channel in _ROUTED:
            identity = bytes.fromhex(str(msg.content.get("identity", "")))
            self.front[channel].send_multipart([identity, *msg.buffers], copy=False)

    def close(self) -> None:
        for sock in self.front.values():
            sock.close(linger=0)
        self.ctx.term()


def _frontend_gone() -> bool:
    """Whether the process that launched this kernel has exited (jupyter_client
    names it in ``JPY_PARENT_PID``, as ipykernel's own parent poller uses it)."""
    parent = os.environ.get("JPY_PARENT_PID", "")
    if not parent.isdigit() or int(parent) <= 1:
        return False
    return os.getppid() != int(parent)  # re-parented: the launcher died


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lan2gpu_magic.kernel",
        description="Run a Jupyter kernel on a LAN GPU worker (started by a kernelspec).",
    )
    p.add_argument("-f", "--connection-file", required=True)
    p.add_argument("--worker", metavar="NAME")
    p.add_argument("--gpu", metavar="PATTERN")
    p.add_argument("--min-memory", type=parse_size, default=0, metavar="SIZE")
    p.add_argument("--min-cc", type=parse_cc, default=(0, 0), metavar="X.Y")
    p.add_argument("--gpus", type=int, default=1, metavar="N")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--workers", default="", metavar="ADDR,...", help="default: $LAN2GPU_WORKERS")
    p.add_argument("--key-file", metavar="PATH")
    p.add_argument("--server-key", metavar="PATH", help="the worker's worker.key (--encrypt)")
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=os.environ.get("LAN2GPU_INSECURE_PLAINTEXT", "0") in ("1", "true", "yes"),
        help="connect without encryption, to a worker run with --insecure-plaintext "
        "[LAN2GPU_INSECURE_PLAINTEXT]",
    )
    p.add_argument("--no-discovery", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if os.environ.get("LAN2GPU_KERNEL_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="[lan2gpu kernel] %(asctime)s %(message)s")
    connection = json.loads(Path(args.connection_file).read_text())
    if connection.get("signature_scheme", "hmac-sha256") != "hmac-sha256":
        log.error("only hmac-sha256 connection files are supported")
        return 2
    addresses = [a for a in args.workers.split(",") if a] or workers_from_env()
    pool = WorkerPool(
        addresses=addresses,
        key_file=args.key_file,
        embedded=False,
        discovery=not args.no_discovery,
        announce=log.info,
        server_keys=dict.fromkeys(addresses, args.server_key) if args.server_key else None,
        plaintext=args.insecure_plaintext,
    )
    forwarder: Forwarder | None = None
    kernel = ""
    stop = {"requested": False}

    def terminate(signum: int, frame: FrameType | None) -> None:
        stop["requested"] = True
        if forwarder is not None:
            forwarder.stopping = True

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts come as messages
    try:
        client, placement = pool.choose(Requirements.from_args(args))
        gpus = [g.index for g in placement.gpus]
        # The connection file's ports are taken before the remote kernel starts: the
        # frontend chose them free, and every second they stay unbound another
        # process's connection may be given one of them.
        forwarder = Forwarder(connection, client)
        kernel = client.start_kernel(connection["key"], gpus=gpus, cpu=placement.cpu)
        forwarder.kernel = kernel
        log.info("kernel %s on %s", kernel, placement.describe())
        if stop["requested"]:
            return 0
        return forwarder.serve()
    except Lan2GPUError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if forwarder is not None:
            forwarder.close()
        if kernel:
            try:
                client.stop_kernel(kernel, timeout=5)
            except Lan2GPUError as exc:  # the worker shuts it down after its grace period
                log.warning("could not stop the remote kernel: %s", exc)
        pool.close()


if __name__ == "__main__":
    sys.exit(main())
