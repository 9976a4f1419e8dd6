"""A transport in memory, to a scripted worker: the client's logic without sockets.

Messages are signed and verified by the real :class:`Wire` on both sides (so digests,
limits and signatures are as on the network); only the socket is missing. Time is a
fake clock that a receive with nothing to read advances by its timeout, so a client
waiting seconds for a silent worker runs in microseconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import AuthenticationError, ConnectionClosed
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.outcomes import WRONG_RECIPIENT, CellStatus
from worker_kernel.protocol.serialize import dump_values, load_values
from worker_kernel.protocol.versions import local_versions
from worker_kernel.protocol.wire import Wire

KEY = b"k" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# What the scripted worker does with a message from the client: the replies.
Script = Callable[[Message], list[Message]]


class FakeWorker:
    """Answers hello, ping and status; runs a cell by a Python ``exec`` of its code on
    the values sent (here, in this process), with the outputs the client asked for."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.instance = m.new_id()
        self.client = ""
        self.received: list[Message] = []
        self.sessions: dict[str, dict[str, Any]] = {}
        self.overrides: list[Script] = []  # tried first; [] from one: not handled
        self.silent = False  # answers nothing (stopped, or the network is cut)

    def __call__(self, msg: Message) -> list[Message]:
        self.received.append(msg)
        if self.silent:
            return []
        for script in self.overrides:
            replies = script(msg)
            if replies:
                return replies
        if msg.kind == m.HELLO:
            self.client = str(msg.content["client"])
            return [self.reply(msg, m.WELCOME, self.welcome())]
        if msg.to != self.instance:  # for an earlier run of the worker
            return [self.reply(msg, m.ERROR, {"code": WRONG_RECIPIENT}, to="")]
        if msg.kind == m.PING:
            return [self.reply(msg, m.PONG, {})]
        if msg.kind == m.EXECUTE:
            return self.execute(msg)
        return []

    def welcome(self) -> dict[str, Any]:
        return {
            "worker": self.name,
            "instance": self.instance,
            "versions": local_versions(),
            "capabilities": {"gpus": [], "simulator": True},
            "heartbeat": 1.0,
            "stall_grace": 10.0,
        }

    def reply(self, req: Message, kind: str, content: dict[str, Any], **kw: Any) -> Message:
        kw.setdefault("to", self.client)
        return Message(kind=kind, content=content, parent=req.id, **kw)

    def execute(self, msg: Message) -> list[Message]:
        c = msg.content
        ns = self.sessions.setdefault(msg.session, {})
        values, failed = load_values(list(c["inputs"]), msg.buffers)
        assert not failed, failed
        ns.update(values)
        exec(c["code"], ns)  # noqa: S102 - the test's own code
        out = {n: ns[n] for n in c["outputs"] if n in ns}
        payload, _ = dump_values(out)
        result = {
            "status": CellStatus.OK,
            "worker": self.name,
            "outputs": payload.entries,
            "stats": {"total_seconds": 0.0},
        }
        parent = str(c.get("request") or msg.id)
        started = Message(kind=m.STARTED, content={}, parent=parent, to=self.client)
        done = Message(kind=m.RESULT, content=result, buffers=payload.frames, parent=parent)
        done.to = self.client
        return [started, done]


class MemoryLink:
    """One client's transport to ``worker`` (see the module docstring)."""

    def __init__(self, worker: Script, clock: FakeClock, *, up: bool = True) -> None:
        self.worker = worker
        self.clock = clock
        self.up = up
        self.refused = False
        self.sent: list[Message] = []
        self._client, self._worker = Wire(KEY), Wire(KEY)
        self._inbox: deque[list[Any]] = deque()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, msg: Message, timeout: float = 30.0) -> None:
        if self._closed:
            raise ConnectionClosed("closed")
        self.sent.append(msg)
        arrived = self._worker.decode(self._client.encode(msg))
        for reply in self.worker(arrived):
            self._inbox.append(self._worker.encode(reply))

    def recv(self, timeout: float) -> Message | None:
        if self._closed:
            raise ConnectionClosed("closed")
        if not self._inbox:
            self.clock.now += max(timeout, 1e-3)  # waited that long for nothing (time passes)
            return None
        return self._client.decode(self._inbox.popleft())

    def link_up(self) -> bool:
        return self.up

    def handshake_error(self) -> AuthenticationError:
        return AuthenticationError("the worker refused our handshake")

    def close(self) -> None:
        self._closed = True

    def kinds(self) -> list[str]:
        return [msg.kind for msg in self.sent]
