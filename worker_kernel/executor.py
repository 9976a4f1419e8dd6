"""``python -m worker_kernel.executor``: runs the cells of one session on one GPU.

Started by the service as a fresh process (never forked from one holding a CUDA
context), with ``CUDA_VISIBLE_DEVICES`` pinned and ``NUMBA_ENABLE_CUDASIM`` set
when simulating. It reads the shared key from stdin, connects to the service's
private socket, and signs what it sends back to the client itself. It exits when
told to, or when the service process goes away.

Internal frames (service <-> executor)::

    service  -> executor   b"exec" control-json *message-frames | b"stop"
    executor -> service    b"ready" json | b"fwd" *message-frames

With ``--data-bind`` it also listens for direct data connections (datapath.py): a
cell whose ``execute`` is *direct* carries only its signed prelude on ``exec``; the
control JSON then holds the cell's ticket, and the buffers are read from the notebook's
data connection straight into this process's receive pool before the cell runs.
"""

from __future__ import annotations

import argparse
import builtins
import json
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

import zmq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import health, reaper
from .execute import CellRunner, TimeoutInterrupt
from .protocol import buffer_pool, datapath, heap
from .protocol.errors import ProtocolError, TransportError
from .protocol.messages import RESULT, Message
from .protocol.outcomes import CellStatus
from .protocol.receive import drain, recv_start
from .protocol.wire import Incoming, Wire
from .streams import OutputChannel

EXIT_ORPHANED = 70
IDLE_RELEASE = 60.0  # seconds without a cell before an executor gives back kept memory
DATA_WAIT = 60.0  # seconds a started cell waits for its notebook's data connection
log = logging.getLogger(__name__)  # unconfigured: warnings and errors go to stderr


def _watch_parent(parent: int) -> None:
    """Exit if the service dies: nobody else would ever stop this process."""
    stop = threading.Event()
    while not stop.wait(0.5):
        if os.getppid() != parent:
            os._exit(EXIT_ORPHANED)


def _route_display(display: Any) -> None:
    """Make ``display`` the one cells get, however they reach it.

    Helper functions pickled from the notebook look ``display`` up in the real
    builtins (IPython puts it there), and ``from IPython.display import display``
    would otherwise just print a repr here, where no IPython shell runs.
    """
    builtins.display = display  # type: ignore[attr-defined]
    try:
        import IPython.core.display_functions as functions
        import IPython.display
    except ImportError:  # IPython is optional on a worker
        return
    functions.display = display
    IPython.display.display = display


def _warm_imports() -> None:
    # Import numba now so the first cell does not pay for it; CUDA itself is
    # initialised lazily by the first cell that uses it.
    try:
        import numba.cuda  # noqa: F401
        import numpy  # noqa: F401
    except Exception as exc:  # reported, the cells will show the real error
        print(f"executor: warm-up import failed: {exc}", file=sys.stderr)


class Executor:
    """Owns the context and socket to the service, and the session's runner."""

    def __init__(
        self,
        endpoint: str,
        identity: str,
        worker: str,
        key: bytes,
        *,
        memory_limit: int = 0,
        session_memory: int = 0,
        cache_memory: int = 0,
        data_bind: str = "",
    ) -> None:
        self.listener = datapath.DataListener(data_bind) if data_bind else None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 5000)  # let the last result go out
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.connect(endpoint)
        self.wire = Wire(key)
        self.lock = threading.Lock()
        self.channel = OutputChannel()
        self.runner = CellRunner(
            worker,
            self.channel,
            self.send,
            memory_limit=memory_limit,
            session_memory=session_memory,
            cache_budget=cache_memory,
        )
        _route_display(self.runner.display)
        self._main_sending = False  # the main thread is inside send_multipart
        self._receiving = False  # the main thread waits for a cell's direct data
        self._expecting = False  # a direct cell was handed over: its wait is about to begin
        self._early: type[BaseException] | None = None  # a signal for it, meanwhile
        # The running cell's data connection: its result's buffers go back on it.
        self._data: tuple[str, socket.socket, AESGCM] | None = None
        self._deferred: type[BaseException] | None = None
        self.closed_data_port = False  # the closed-data-port test fault

    def send(self, msg: Message) -> None:
        data = self._data
        if data is not None and msg.kind == RESULT and msg.parent == data[0]:
            msg.direct = msg.nbytes >= datapath.DIRECT_MIN
        frames, direct = self.wire.encode_parts(msg)
        main = threading.current_thread() is threading.main_thread()
        with self.lock:
            self._main_sending = main
            try:
                self.sock.send_multipart([b"fwd", *frames], copy=False)
            finally:
                self._main_sending = False
        if direct and data is not None:  # the notebook reads them once it has the above
            self._data = None  # one result per connection: its nonces are used up
            try:
                with data[1]:
                    datapath.send_frames(data[1], data[2], direct, direction=datapath.DOWN)
            except OSError as exc:
                log.warning("cell %s: its result's buffers did not go back: %s", data[0][:8], exc)
        deferred, self._deferred = self._deferred, None
        if main and deferred is not None and self.runner.armed:
            raise deferred

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        # Only user code (or the wait for its inputs) is interrupted; a late signal
        # after the cell ended is dropped.
        exc = KeyboardInterrupt if signum == signal.SIGINT else TimeoutInterrupt
        if self._expecting and not self._receiving:
            # A direct cell's, before its wait began (reading its request): kept for it.
            self._early = exc
            return
        if not (self.runner.armed or self._receiving):
            return
        if self._main_sending:
            # Raising here would cut a multipart message in two: raise after it.
            self._deferred = exc
            return
        raise exc

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._interrupt)
        signal.signal(signal.SIGUSR1, self._interrupt)
        with self.lock:
            data = self.listener.address if self.listener else ""
            if data.startswith("tcp://") and self.closed_data_port:  # test fault: a firewall
                data = data.rpartition(":")[0] + ":1"
            ready = {"pid": os.getpid(), "data": data}
            self.sock.send_multipart([b"ready", json.dumps(ready).encode()])
        while True:
            self._receiving = self._expecting = False  # also after a signal cut a reset short
            self._early = None
            if not self.sock.poll(int(IDLE_RELEASE * 1000)):
                # Idle: the pool's free pieces and the freed heap go back to the system.
                buffer_pool.current().release_free()
                heap.release()
                continue
            tag = self.sock.recv()
            if tag == b"stop":
                drain(self.sock)
                return
            if tag != b"exec" or not self.sock.getsockopt(zmq.RCVMORE):
                drain(self.sock)
                continue
            control: dict[str, Any] = json.loads(self.sock.recv())
            self._expecting = bool(control.get("ticket"))
            # Into each buffer's final memory: the cell's arrays are built on it.
            got = recv_start(self.sock, self.wire, trusted_hop=True)
            msg = self._receive_direct(got, control) if isinstance(got, Incoming) else got
            if msg is None:
                continue  # answered already
            try:
                self.runner.run(msg, str(control["client"]))
            except Exception as exc:  # not the cell's own error: those are its result
                log.exception("cannot finish cell %s", msg.id[:8])
                self.runner.fail(msg, str(control["client"]), exc)
            finally:
                self._close_data()
            del msg  # its buffers go back to the pool while the executor waits

    def _receive_direct(self, incoming: Incoming, control: dict[str, Any]) -> Message | None:
        """The cell of ``incoming`` with its buffers read from the data connection, or
        None when they did not come (the cell is answered with why)."""
        skeleton = incoming.skeleton()
        client = str(control["client"])
        cell = skeleton.request
        conn: socket.socket | None = None
        try:
            ticket = bytes.fromhex(str(control.get("ticket", "")))
            if self.listener is None or len(ticket) != datapath.TICKET_BYTES:
                raise TransportError("this executor has no data connection for the cell")
            aead = datapath.cell_key(self.wire.key, cell, ticket)
            self._receiving = True
            try:
                if self._early is not None:  # cancelled while its request was read
                    raise self._early
                conn = self.listener.receive(cell, ticket, aead, incoming, wait=DATA_WAIT)
            finally:
                self._receiving = self._expecting = False
            msg = incoming.finish()
            self._data, conn = (cell, conn, aead), None
            return msg
        except (KeyboardInterrupt, TimeoutInterrupt) as exc:
            timeout = isinstance(exc, TimeoutInterrupt)
            status = CellStatus.TIMEOUT if timeout else CellStatus.CANCELLED
            reason = "stopped while its inputs were arriving"
            self.runner.answer(
                skeleton, client, {"status": status, "worker": self.runner.worker, "reason": reason}
            )
        except (ProtocolError, TransportError, OSError) as exc:
            log.warning("cell %s: its inputs did not arrive: %s", cell[:8], exc)
            self.runner.fail(skeleton, client, exc)
        except Exception as exc:  # a bug here must answer the cell, not end the session
            log.exception("cell %s: cannot receive its inputs", cell[:8])
            self.runner.fail(skeleton, client, exc)
        finally:
            if conn is not None:  # not handed over: nobody else will close it
                conn.close()
        return None

    def _close_data(self) -> None:
        if self._data is not None:
            self._data[1].close()
            self._data = None

    def close(self) -> None:
        self._close_data()
        if self.listener is not None:
            self.listener.close()
        self.channel.close()
        self.sock.close()
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker_kernel.executor")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--memory-limit", type=int, default=0)  # the first cap
    parser.add_argument("--memory-budget", type=int, default=0)  # the worker's, shared
    parser.add_argument("--session-memory", type=int, default=0)
    parser.add_argument("--cache-memory", type=int, default=0)
    parser.add_argument("--pool-memory", type=int, default=0)
    parser.add_argument("--pool-prefault", action="store_true")
    parser.add_argument("--data-bind", default="")  # tcp://host or ipc://path: direct data
    parser.add_argument("--fault", action="append", default=[])
    args = parser.parse_args(argv)
    key = bytes.fromhex(sys.stdin.readline().strip())
    sys.stdin.close()
    threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    if reaper.become_subreaper():  # what its cells start and orphan stays its own
        reaper.reap_adopted_zombies()
    _warm_imports()
    # --pool-prefault: the pool is faulted in now, on a thread, while the first cell comes.
    pool = buffer_pool.install(args.pool_memory, prefault=args.pool_prefault)
    if args.memory_limit:
        # The pool's mapping counts in RLIMIT_DATA: it comes on top of the session's cap.
        health.apply_memory_limit(args.memory_limit + pool.budget)
    # What cells free is kept for the next cell's arrays, up to the pool's size.
    heap.keep_freed(pool.budget, large=True)
    heap.watch(pool.budget)
    if "poison-hook" in args.fault:
        builtins.lan2gpu_poison_context = health.poison_hook  # type: ignore[attr-defined]
    executor = Executor(
        args.connect,
        args.identity,
        args.worker,
        key,
        memory_limit=args.memory_budget,
        session_memory=args.session_memory,
        cache_memory=args.cache_memory,
        data_bind=args.data_bind,
    )
    executor.closed_data_port = "closed-data-port" in args.fault
    try:
        executor.serve()
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
