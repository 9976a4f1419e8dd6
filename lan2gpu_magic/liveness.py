"""Step 5: waiting for one cell's result, as a state machine without I/O.

:class:`CellWait` decides, from the messages that arrive and the time an
injected clock says, what the client sends next (heartbeats, a ping, a fetch of
a result that did not come, a cancel, the request again) and when it gives up.
The client feeds it (``received``, ``tick``) and does the sending and receiving;
the unit tests drive it with a fake clock in milliseconds.

Liveness (Paranoid Pirate style): the client sends a heartbeat every interval
and expects to hear from the worker's service (which answers even while a cell
is busy) within ``liveness`` intervals, plus the time an announced large result
needs at ``min_bandwidth``. A silent worker is then asked once more (a ping,
and a fetch of the result), and after one more interval the connection
decides: if it dropped (worker killed, host down, network cut), the worker is
lost (``WorkerLost(gone=True)``); if it is up, the worker has stalled (stopped,
swapping, overloaded) and the wait goes on up to its ``stall_grace``, after
which ``WorkerLost(gone=False)`` says the cell may still finish there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import ExecutionCancelled, ExecutionTimeout, WorkerLost
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.outcomes import UNKNOWN_CLIENT, WRONG_RECIPIENT

from .replies import error_of

# Status kinds of the client's own, next to the worker's queued/started/transfer.
STALLED = "stalled"  # connected, silent past liveness: content {"silent", "grace"}
ANSWERING = "answering"  # it spoke again after a stall: content {"silent"}
# What the worker says about a cell that the cell's wait shows, in the order it came.
_SHOWN = frozenset({m.STREAM, m.DISPLAY, m.TRANSFER, m.QUEUED, m.STARTED})

log = logging.getLogger(__name__)


class NotConfirmed(KeyboardInterrupt):
    """Ctrl-C, and the worker did not confirm the cancel in time. Raised between
    receives, so the connection is in step and needs no new handshake (which would wait
    on a stalled worker)."""


@dataclass(frozen=True)
class Timing:
    """The numbers a wait runs by, in seconds (defaults: what a notebook uses)."""

    heartbeat: float = 1.0  # the worker's interval, from its handshake
    liveness: int = 3  # intervals of silence before the worker is asked again
    stall_grace: float = 60.0  # the worker's: how long a connected, silent worker is waited for
    min_bandwidth: float = 10e6  # bytes/s an announced transfer is allowed
    timeout_grace: float = 30.0  # beyond a cell's --timeout, before the wait gives up
    cancel_wait: float = 5.0  # after a cancel, how long the worker has to confirm it
    fetch_every: float = 2.0  # at most this often, ask again for a result that did not come
    poll_slice: float = 0.1  # how often the caller looks at its interrupt flag


@dataclass(frozen=True)
class Worker:
    """Who the wait is talking to: for messages and for error texts."""

    name: str
    address: str
    instance: str  # the worker process's id, the recipient of what the client sends


@dataclass
class Step:
    """What one received message means: output to show, messages to send, or the result."""

    shown: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    send: list[Message] = field(default_factory=list)
    result: Message | None = None
    # The cell started: send its inputs on a data connection (endpoint, ticket).
    upload: dict[str, str] | None = None


class CellWait:
    """The wait for the result of ``request`` (an EXECUTE message already sent).

    ``heard`` is when the worker last spoke on this connection (any message);
    the client keeps it between cells to skip a ping before the next one.
    """

    def __init__(
        self,
        request: Message,
        worker: Worker,
        now: float,
        *,
        timing: Timing | None = None,
        timeout: float | None = None,
        heard: float = float("-inf"),
    ) -> None:
        self.request = request
        self.worker = worker
        self.timing = t = timing or Timing()
        self.timeout = timeout
        self.heard = heard
        self.cancelled = False
        self.by_event = False  # the cancel came from another thread, not Ctrl-C
        self.stalled = False  # silent, but its connection is up: waiting up to its grace
        self.load: dict[str, Any] | None = None  # the worker's numbers, from its heartbeats
        self._last = now  # this wait's own clock of silence (moved when the worker is asked)
        self._next_beat = now + t.heartbeat
        self._allowance = 0.0  # extra silence allowed while an announced transfer runs
        # With a timeout the worker answers within it, queueing included: this only
        # guards a worker that never reports back (or only ever says "queued").
        self._started_by = now + timeout + t.timeout_grace if timeout else float("inf")
        self._deadline = float("inf")  # set once the cell starts, if it has a timeout
        self._acknowledged = False  # the worker has said something about this cell
        self._recovering = False  # one silent spell was spent asking the worker again
        self._waiting_since = self._silent_since = now
        self._last_fetch = float("-inf")
        self._fetches: set[str] = set()
        self._sent = {request.id}  # ids of what this wait sent: only their errors concern it

    # -- what the caller asks ---------------------------------------------------

    def concerns(self, msg: Message) -> bool:
        """Whether ``msg`` answers something this wait sent (its errors are the cell's)."""
        return msg.parent in self._sent

    def wake(self, now: float) -> float:
        """Seconds the caller may block in a receive before calling :meth:`tick`."""
        t = self.timing
        limit = self._last + t.liveness * t.heartbeat + self._allowance
        wake = min(self._next_beat, limit, self._deadline, self._started_by + self._allowance)
        return max(0.0, min(wake, now + t.poll_slice) - now)

    # -- what happens -----------------------------------------------------------

    def interrupt(self, now: float, *, by_event: bool = False) -> list[Message]:
        """Ctrl-C (or a cancel from another thread): ask the worker to cancel the cell,
        and give it ``cancel_wait`` to confirm. A second one changes nothing here (the
        client's signal handler stops the wait at once)."""
        if self.cancelled:
            return []
        self.cancelled, self.by_event = True, by_event
        self._deadline = min(self._deadline, now + self.timing.cancel_wait)
        self._last = now
        return [self._send(m.CANCEL, {"cell": self.request.id})]

    def received(self, msg: Message, now: float) -> Step:
        """A verified message for this client arrived at ``now``."""
        step = Step()
        cell = self.request.id
        w = self.worker
        code = msg.content.get("code") if msg.kind == m.ERROR else None
        if code == WRONG_RECIPIENT and msg.parent in self._sent:
            self.heard = float("-inf")  # the next request shakes hands again
            raise WorkerLost(
                f"worker {w.name} ({w.address}) restarted while the cell was in flight; "
                "the cell and its session state are lost. Run the cell again (the client "
                "reconnects by itself)."
            )
        if code == UNKNOWN_CLIENT and msg.parent in self._sent:
            self.heard = float("-inf")
            raise WorkerLost(
                f"worker {w.name} ({w.address}) had let this connection go (after a network "
                "problem) and refused the cell, which did not run there. Run it again (the "
                "client shakes hands again by itself)."
            )
        if msg.kind == m.HEARTBEAT:
            self._heard(now)
            self._recovering = False
            if isinstance(msg.content.get("load"), dict):
                self.load = dict(msg.content["load"])
            cells, done = msg.content.get("cells"), msg.content.get("done")
            lost = self._acknowledged and isinstance(cells, list) and cell not in cells
            # A quick cell is told no "started": its result is the first word of it.
            if isinstance(done, list) and cell in done:
                self._acknowledged = lost = True  # it ran: a failed fetch loses it
            if lost and now - self._last_fetch > self.timing.fetch_every:
                # The worker is done with the cell, but no result came: ask again.
                self._last_fetch = now
                step.send.append(self._fetch())
        elif msg.kind == m.PONG:
            self._heard(now)
        elif msg.parent in self._fetches and msg.kind == m.ERROR:
            if self._acknowledged:
                raise WorkerLost(
                    f"worker {w.name} ({w.address}) no longer knows the cell (its result "
                    "expired or it was cancelled); run it again.",
                    gone=False,
                )
            # The request itself never arrived: send it again (same request id).
            again = Message(
                kind=m.EXECUTE,
                content=self.request.content,
                buffers=self.request.buffers,
                session=self.request.session,
                to=w.instance,
                digests=self.request.digests,
                codecs=self.request.codecs,
                direct=self.request.direct,
            )
            self._sent.add(again.id)
            step.send.append(again)
        elif msg.parent == cell:
            self._heard(now)
            self._acknowledged, self._recovering = True, False
            if msg.kind == m.RESULT:
                step.result = msg
                return step
            if msg.kind == m.ERROR:
                raise error_of(msg, w.name, w.address)
            if msg.kind == m.STARTED:
                self._started_by = float("inf")
                data = msg.content.get("data")
                if isinstance(data, dict) and self.request.direct:
                    step.upload = {k: str(data.get(k, "")) for k in ("endpoint", "ticket")}
                if self.timeout:
                    # The worker enforces --timeout; this only guards a worker that
                    # never reports back.
                    self._deadline = min(
                        self._deadline, now + self.timeout + self.timing.timeout_grace
                    )
            if msg.kind == m.TRANSFER:
                self._allowance = float(msg.content.get("bytes", 0)) / self.timing.min_bandwidth
            if msg.kind in _SHOWN:
                step.shown.append((msg.kind, msg.content))
        if self.stalled and self.heard == now:
            self.stalled = False
            # The stall was the worker's time, not the cell's: move the guards.
            silent = now - self._silent_since
            self._deadline += silent
            self._started_by += silent
            step.shown.append((ANSWERING, {"silent": silent}))
        return step

    def sent_inputs(self, now: float) -> None:
        """The inputs went on the data connection until ``now``, and nothing was read
        meanwhile: the worker's silence counts from here."""
        self._last = max(self._last, now)

    def tick(self, now: float, link_up: Callable[[], bool]) -> Step:
        """Time passed: send what is due, or raise if the wait is over.

        ``link_up`` says whether the connection is up (and raises if the worker
        refused our handshake); it is asked only when the worker is silent.
        """
        t, w = self.timing, self.worker
        step = Step()
        if now >= self._next_beat:
            step.send.append(self._send(m.HEARTBEAT, {}))
            self._next_beat = now + t.heartbeat
        if now >= self._started_by + self._allowance and not self.cancelled and not self.stalled:
            raise ExecutionTimeout(
                f"the cell did not start on worker {w.name} within its --timeout of "
                f"{self.timeout:g} s (it was still waiting in the worker's queue); it was "
                "withdrawn. Raise --timeout, or pick a less busy worker (--worker).",
                w.name,
            )
        # A stall is bounded by its own grace; after a cancel, only the cancel's wait.
        if now >= self._deadline and (not self.stalled or self.cancelled):
            if self.cancelled and self.by_event:
                raise ExecutionCancelled(
                    f"the cell was cancelled; worker {w.name} did not confirm within "
                    f"{t.cancel_wait:g} s",
                    w.name,
                )
            if self.cancelled:
                raise NotConfirmed
            raise WorkerLost(
                f"worker {w.name} ({w.address}) did not report the end of the cell within "
                f"{t.timeout_grace:.0f} s after its --timeout of {self.timeout:g} s; the "
                "cell's result is lost. Check the worker's log.",
                gone=False,
            )
        if now <= self._last + t.liveness * t.heartbeat + self._allowance:
            return step
        if not self._recovering:
            # One more heartbeat interval: a network hiccup may have lost messages,
            # and a live worker answers a ping at once.
            self._recovering = True
            self._last = now - (t.liveness - 1) * t.heartbeat
            step.send += [self._send(m.PING, {}), self._fetch()]
            return step
        self._silent_since = max(self.heard, self._waiting_since)
        silent = now - self._silent_since
        up = link_up()
        if up and silent < t.stall_grace:
            # Silent, yet the connection is up: a stopped, swapping or overloaded
            # worker, whose results come when it runs again. Look once a beat.
            if not self.stalled:
                log.warning(
                    "worker %s silent for %.0f s, its connection up: waiting up to %g s "
                    "(its --stall-grace)",
                    w.name,
                    silent,
                    t.stall_grace,
                )
            self.stalled = True
            step.shown.append((STALLED, {"silent": silent, "grace": t.stall_grace}))
            self._last = now - (t.liveness - 1) * t.heartbeat
            return step
        self.heard = float("-inf")
        if up:
            raise WorkerLost(
                f"worker {w.name} ({w.address}) kept its connection but did not answer for "
                f"{silent:.0f} s, past its --stall-grace of {t.stall_grace:g} s. The cell may "
                "still finish there, so it is not run again elsewhere (--retry); check the "
                "worker's host (overloaded, swapping, stopped?) before you run it again.",
                gone=False,
            )
        raise WorkerLost(
            f"worker {w.name} ({w.address}) stopped answering: its connection dropped and no "
            f"heartbeat came for {silent:.0f} s while the cell was in flight. The cell's "
            "result is lost; check that the worker is running and reachable, then run the "
            "cell again."
        )

    # -- helpers ----------------------------------------------------------------

    def _heard(self, now: float) -> None:
        self._last = self.heard = now

    def _send(self, kind: str, content: dict[str, Any]) -> Message:
        msg = Message(kind=kind, content=content, to=self.worker.instance)
        self._sent.add(msg.id)
        return msg

    def _fetch(self) -> Message:
        msg = self._send(m.FETCH, {"cell": self.request.id})
        self._fetches.add(msg.id)
        return msg
