"""Step 4: what a cell's request carries, and what its result refers back to.

Per connection, :class:`Uploads` remembers which large arrays each session on the
worker holds (so unchanged ones go as digests, see :mod:`.cache`), what came
back that cannot be loaded here (the worker keeps it), and the link's speed
(measured once, to decide what to compress). It builds the ``execute`` message
and completes a result whose outputs refer to arrays this client has.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from worker_kernel.protocol import compress, datapath, refs
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.contents import RECEIVED_MAX, ExecuteContent
from worker_kernel.protocol.errors import ProtocolError
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.outcomes import CellStatus
from worker_kernel.protocol.serialize import Payload
from worker_kernel.protocol.wire import digest

from . import cache, results
from .cache import HeldArrays
from .results import RunResult

if TYPE_CHECKING:
    from .client import ExecuteRequest
    from .connection import WorkerInfo


class Requests(Protocol):
    """What :class:`Uploads` needs of a connection: a :class:`~.connection.Connection`
    to a LAN worker, or a Dask worker's stand-in (:mod:`.dask_backend`)."""

    clock: Callable[[], float]

    @property
    def info(self) -> WorkerInfo: ...

    def message(self, kind: str, content: dict[str, Any] | None = None, **kw: Any) -> Message: ...

    def ping(self, timeout: float = 5.0, expect_bytes: int = 0) -> float: ...

    def request(self, msg: Message, reply_kinds: set[str], timeout: float) -> Message: ...


_PROBE_BYTES = 1 << 20  # sent once to measure the link, when a large transfer comes


class Uploads:
    """What one connection's requests carry (see the module docstring)."""

    def __init__(self, connection: Requests, *, cache: bool, compress: str) -> None:
        self.connection = connection
        self.cache = cache  # send unchanged arrays as digests
        self.compress = compress
        self.held = HeldArrays()
        self.link_bandwidth: float | None = None
        self._unloadable: dict[str, set[str]] = {}  # per session: kept on the worker
        self._arrived: list[str] = []  # results not yet acknowledged to the worker
        # LAN2GPU_DIRECT_DATA=0: inputs always go through the worker's port (a firewall).
        self.direct = os.environ.get("LAN2GPU_DIRECT_DATA", "1") not in ("0", "false", "no")

    def local(
        self, request: ExecuteRequest, payload: Payload, digests: list[str]
    ) -> dict[str, memoryview]:
        """``digest -> data`` this client can supply for the result: the current values
        of the names the cell may bind, and the inputs it sends (empty without the cache)."""
        if not (self.cache and request.cache):
            return {}
        local = cache.local_buffers(request.plan.outputs, request.local)
        local.update(zip(digests, (memoryview(f).cast("B") for f in payload.frames), strict=True))
        return local

    def message(
        self,
        request: ExecuteRequest,
        payload: Payload,
        digests: list[str],
        local: Mapping[str, memoryview],
    ) -> Message:
        """The ``execute`` message: frames the session holds go as references, large
        ones are compressed when that pays on this link."""
        plan = request.plan
        holds = self.held.holds(request.session) if local else (lambda _: False)
        frames, sent_digests, in_refs = refs.split(payload.frames, digests, holds)
        mode = request.compress or self.compress
        bandwidth = self.bandwidth(payload.nbytes) if mode == "auto" else 0.0
        content: ExecuteContent = {
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
            "link": {"bandwidth": bandwidth, "compress": mode},
            "request": "",
            # Results that arrived: the worker need not keep them for a refetch.
            "received": self._arrived[:RECEIVED_MAX],
        }
        del self._arrived[:RECEIVED_MAX]
        msg = self.connection.message(
            m.EXECUTE, dict(content), buffers=frames, session=request.session
        )
        msg.digests = sent_digests
        msg.codecs = compress.choose(frames, bandwidth, mode)
        # Large inputs go straight to the executor once the cell starts (datapath.py).
        bulk = sum(memoryview(f).nbytes for f in frames)
        msg.direct = (
            self.direct and self.connection.info.direct_data and bulk >= datapath.DIRECT_MIN
        )
        # The request id makes retries idempotent: the worker runs it at most once.
        msg.content["request"] = msg.id
        return msg

    def relayed(self, msg: Message) -> Message:
        """``msg`` again as a new request, its buffers carried on the socket."""
        again = self.connection.message(
            msg.kind, dict(msg.content), buffers=msg.buffers, session=msg.session
        )
        again.digests, again.codecs = msg.digests, msg.codecs
        again.content["request"] = again.id
        return again

    def exchange(
        self, request: ExecuteRequest, payload: Payload, send: Callable[[Message], Message]
    ) -> RunResult:
        """One cell's request and result: ``send`` delivers a request and returns its
        reply. A cache miss costs one more round, with the data."""
        session = request.session
        digests = [digest(f) for f in payload.frames]  # once: for the signature and the cache
        local = self.local(request, payload, digests)
        for _ in range(3):
            reply = send(self.message(request, payload, digests, local))
            if reply.content.get("status") != CellStatus.CACHE_MISS:
                break
            self.missed(session, reply)
        else:
            raise ProtocolError(f"worker {self.connection.info.name} keeps missing cached arrays")
        self.received(reply, session, payload, digests, local)
        result = results.parse_result(reply, request.plan, request.timeout, request.namespace)
        self.kept(session, request.plan.inputs, result)
        return result

    def missed(self, session: str, reply: Message) -> None:
        """The session lacked arrays sent by reference: send them in full next time."""
        self.held.forget(session, reply.content.get("missing", []))

    def received(
        self,
        reply: Message,
        session: str,
        payload: Payload,
        digests: list[str],
        local: Mapping[str, memoryview],
    ) -> None:
        """Fill in the result's references to local arrays (copies), and learn what
        the session holds now."""
        self._arrived.append(reply.parent)
        full, full_digests, missing = refs.join(
            reply.buffers, reply.digests, dict(reply.content.get("refs", {})), cache.copy_of(local)
        )
        if missing:
            name = self.connection.info.name
            raise ProtocolError(f"worker {name} referred to arrays this client lacks")
        reply.buffers = full
        if reply.content.get("session_lost"):
            self.held.forget(session)
        else:
            self.held.learn(session, payload.frames, digests)
            self.held.learn(session, full, full_digests)

    def kept(self, session: str, inputs: Iterable[str], result: RunResult) -> None:
        """Remember what the worker keeps for the session (loaded nowhere here)."""
        kept = self._unloadable.setdefault(session, set())
        kept.difference_update(inputs)
        kept.difference_update(result.outputs)
        kept.update(result.unloadable)

    def bandwidth(self, nbytes: int) -> float:
        """The link's speed (bytes/s), measured once, when a large transfer first needs it."""
        conn = self.connection
        if self.link_bandwidth is None and nbytes >= compress.MIN_BYTES:
            base = conn.ping()
            probe = conn.message(m.PING, buffers=[os.urandom(_PROBE_BYTES)])
            t0 = conn.clock()
            conn.request(probe, {m.PONG}, 10.0)
            seconds = max(conn.clock() - t0 - base, 1e-6)
            self.link_bandwidth = _PROBE_BYTES / seconds
        return self.link_bandwidth or 0.0


__all__ = ["Uploads"]
