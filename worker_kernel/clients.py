"""Who is connected to the worker, and which of them it still heartbeats.

:class:`ClientRegistry` keeps one :class:`ClientState` per connection (ZeroMQ
routing id) and decides, once a heartbeat interval, what each one gets
(:meth:`ClientRegistry.sweep`): its cells cancelled (silent too long), a
heartbeat (it has cells here, owns a kernel, or spoke lately), or nothing (and,
after an hour of silence, forgotten). No I/O and no clock of its own: the
service passes the time, the tests pass any.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

_ATTACH_SECONDS = 10.0  # keep heartbeating a client this long after it spoke
_MIN_BANDWIDTH = 10e6  # bytes/s assumed when a client announces a large upload
_FORGET_AFTER = 3600.0  # seconds of silence before a client without cells is forgotten

C = TypeVar("C")  # a cell, as the caller knows it


@dataclass(eq=False)
class ClientState:
    rid: bytes  # its connection's routing id
    client: str = ""  # the id it gave in its hello: what messages to it are addressed to
    user: str = ""  # with per-user keys: whose key the connection proved
    last_seen: float = 0.0
    attached_until: float = 0.0  # heartbeated until then, cells or not


@dataclass
class Sweep(Generic[C]):
    """What one pass decided, per client."""

    cancel: list[tuple[ClientState, list[C]]] = field(default_factory=list)  # silent too long
    beat: list[tuple[ClientState, list[C]]] = field(default_factory=list)  # with its cells
    forgotten: list[ClientState] = field(default_factory=list)


class ClientRegistry:
    """The connected clients, by routing id (see the module docstring).

    ``liveness``: seconds of silence after which a client's cells are cancelled.
    """

    def __init__(self, liveness: float) -> None:
        self.liveness = liveness
        self._by_rid: dict[bytes, ClientState] = {}

    def __iter__(self) -> Iterator[ClientState]:
        return iter(list(self._by_rid.values()))

    def __len__(self) -> int:
        return len(self._by_rid)

    def get(self, rid: bytes) -> ClientState | None:
        return self._by_rid.get(rid)

    def to(self, rid: bytes) -> str:
        """The recipient id for messages to the connection ``rid`` ("" if unknown)."""
        state = self._by_rid.get(rid)
        return state.client if state else ""

    def heard(self, rid: bytes, now: float, expect_bytes: float = 0.0) -> ClientState:
        """A verified message came from ``rid`` at ``now``; ``expect_bytes``: it
        announced an upload that large (heartbeated meanwhile)."""
        state = self._by_rid.get(rid)
        if state is None:
            state = self._by_rid[rid] = ClientState(rid, last_seen=now)
        state.last_seen = now
        state.attached_until = max(
            state.attached_until, now + _ATTACH_SECONDS + expect_bytes / _MIN_BANDWIDTH
        )
        return state

    def drop(self, rid: bytes) -> None:
        """Its connection is gone (and it has no cells here)."""
        self._by_rid.pop(rid, None)

    def forgive(self, now: float, stalled: float) -> None:
        """This process did not run for ``stalled`` seconds: nobody's silence counts
        for that time (their messages of then are still unread in the socket)."""
        for state in self._by_rid.values():
            state.last_seen = min(now, state.last_seen + stalled)

    def silent_for(self, now: float) -> dict[str, float]:
        """Seconds since each client (by its id) was last heard."""
        return {s.client: now - s.last_seen for s in self._by_rid.values()}

    def sweep(
        self, now: float, cells_of: Callable[[bytes], list[C]], owners: Collection[str]
    ) -> Sweep[C]:
        """Decide every client's fate at ``now``; ``owners``: ids of clients that own
        a kernel here (heartbeated while they are alive). Forgotten ones are removed."""
        out: Sweep[C] = Sweep()
        for state in list(self._by_rid.values()):
            cells = cells_of(state.rid)
            if cells and now - state.last_seen > self.liveness:
                out.cancel.append((state, cells))
            elif cells or state.attached_until > now or state.client in owners:
                # Listing its unanswered cells lets it notice a lost result.
                out.beat.append((state, cells))
            elif now - state.last_seen > _FORGET_AFTER:
                del self._by_rid[state.rid]
                out.forgotten.append(state)
        return out


__all__ = ["ClientRegistry", "ClientState", "Sweep"]
