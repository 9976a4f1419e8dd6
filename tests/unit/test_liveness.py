"""The wait for a cell's result, driven by a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import re
import signal
import threading
from typing import Any

import pytest

from lan2gpu_magic.client import InterruptFlag
from lan2gpu_magic.liveness import ANSWERING, STALLED, CellWait, NotConfirmed, Timing, Worker
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import (
    AuthenticationError,
    ExecutionCancelled,
    ExecutionTimeout,
    MessageRejected,
    WorkerLost,
)
from worker_kernel.protocol.messages import Message

WORKER = Worker("gpu1", "tcp://10.0.0.7:7340", "instance-1")
# One heartbeat a second, silent after 3; a 10 s stall grace.
TIMING = Timing(heartbeat=1.0, liveness=3, stall_grace=10.0, timeout_grace=30.0)


class Run:
    """A wait and its clock; what it sent, showed and returned, step by step."""

    def __init__(self, timeout: float | None = None, timing: Timing = TIMING) -> None:
        self.now = 100.0
        self.request = Message(kind=m.EXECUTE, content={"code": "x = 1"}, to=WORKER.instance)
        self.wait = CellWait(self.request, WORKER, self.now, timing=timing, timeout=timeout)
        self.sent: list[Message] = []
        self.shown: list[tuple[str, dict[str, Any]]] = []
        self.link = True
        self.links_asked = 0

    def _link_up(self) -> bool:
        self.links_asked += 1
        return self.link

    def kinds(self) -> list[str]:
        return [msg.kind for msg in self.sent]

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Let time pass with nothing arriving, ticking as a client does."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + min(step, max(self.wait.wake(self.now), 1e-3)))
            out = self.wait.tick(self.now, self._link_up)
            self.sent += out.send
            self.shown += out.shown

    def arrive(self, kind: str, content: dict[str, Any] | None = None, parent: str = "") -> Any:
        msg = Message(kind=kind, content=content or {}, parent=parent or self.request.id)
        step = self.wait.received(msg, self.now)
        self.sent += step.send
        self.shown += step.shown
        return step.result

    def answering(self, seconds: int, say: str = m.HEARTBEAT) -> None:
        """A worker that speaks once a second (a heartbeat, or ``say`` about the cell)."""
        for _ in range(seconds):
            self.advance(1.0)
            if say == m.HEARTBEAT:
                self.beat([self.request.id])
            else:
                self.arrive(say, {"position": 3})

    def beat(self, cells: list[str] | None = None, done: list[str] | None = None) -> None:
        content: dict[str, Any] = {"load": {"queued": 0}}
        if cells is not None:
            content["cells"] = cells
        if done is not None:
            content["done"] = done
        self.arrive(m.HEARTBEAT, content, parent="-")


def test_a_heartbeat_goes_out_every_interval_while_the_worker_answers():
    run = Run()
    for _ in range(10):
        run.advance(1.0)
        run.beat([run.request.id])
    assert run.kinds().count(m.HEARTBEAT) in (9, 10)  # one a second (10.0 s is the edge)
    assert run.links_asked == 0  # a worker that answers is never in doubt
    assert run.wait.load == {"queued": 0}


def test_output_and_status_are_shown_in_order_and_the_result_ends_the_wait():
    run = Run()
    run.arrive(m.QUEUED, {"position": 1})
    run.arrive(m.STARTED)
    run.arrive(m.STREAM, {"name": "stdout", "text": "hi\n"})
    result = run.arrive(m.RESULT, {"status": "ok"})
    assert result is not None and result.kind == m.RESULT
    assert [kind for kind, _ in run.shown] == [m.QUEUED, m.STARTED, m.STREAM]


def test_a_silent_worker_is_asked_once_more_then_lost_when_its_connection_dropped():
    run = Run()
    run.link = False
    run.advance(3.05)  # past 3 silent intervals: a ping and a fetch, one more interval
    assert [k for k in run.kinds() if k != m.HEARTBEAT] == [m.PING, m.FETCH]
    assert run.links_asked == 0
    with pytest.raises(WorkerLost) as lost:
        run.advance(1.1)
    assert lost.value.gone is True
    assert "connection dropped" in str(lost.value)
    assert run.wait.heard == float("-inf")  # the next request shakes hands again


def test_a_silent_worker_whose_connection_is_up_is_waited_for_up_to_its_stall_grace():
    run = Run()
    run.advance(4.1)  # silent, asked again, still silent: but its connection is up
    assert [kind for kind, _ in run.shown] == [STALLED]
    run.advance(5.0)
    assert all(kind == STALLED for kind, _ in run.shown)  # said once a beat
    with pytest.raises(WorkerLost) as lost:
        run.advance(2.0)  # 10 s of silence: the grace is over
    assert lost.value.gone is False  # it may still finish there: --retry must not rerun it
    assert "--stall-grace of 10 s" in str(lost.value)


def test_a_stalled_worker_that_answers_again_moves_the_cells_deadline_by_the_stall():
    run = Run(timeout=5.0)
    run.arrive(m.STARTED)  # deadline: 5 s + 30 s grace from now
    run.advance(8.0)  # an 8 s stall
    assert run.wait.stalled
    run.beat([run.request.id])
    assert run.shown[-1][0] == ANSWERING
    assert run.shown[-1][1]["silent"] == pytest.approx(8.0, abs=0.2)
    run.answering(34)  # 42 s after the start, but only 34 s of the cell's own time
    with pytest.raises(WorkerLost, match="did not report the end of the cell"):
        run.answering(10)
    assert run.now - 100.0 == pytest.approx(35.0 + 8.0, abs=1.1)


def test_a_restarted_worker_loses_the_cell():
    run = Run()
    with pytest.raises(WorkerLost, match="restarted while the cell was in flight") as lost:
        run.arrive(m.ERROR, {"code": "wrong-recipient", "reason": "unknown client"})
    assert lost.value.gone is True
    assert run.wait.heard == float("-inf")


def test_an_error_about_something_else_does_not_end_the_wait():
    run = Run()
    assert run.arrive(m.ERROR, {"code": "wrong-recipient"}, parent="not-ours") is None
    run.arrive(m.RESULT, {"status": "ok"})


def test_a_lost_result_is_fetched_when_the_worker_says_the_cell_is_done():
    run = Run()
    run.arrive(m.STARTED)
    run.beat([run.request.id])  # still running
    assert m.FETCH not in run.kinds()
    run.beat([])  # done there, but no result came
    fetches = [msg for msg in run.sent if msg.kind == m.FETCH]
    assert len(fetches) == 1 and fetches[0].content == {"cell": run.request.id}
    run.beat([])  # asked at most every fetch_every seconds
    assert run.kinds().count(m.FETCH) == 1
    run.now += TIMING.fetch_every + 0.1
    run.beat([])
    assert run.kinds().count(m.FETCH) == 2
    result = run.arrive(m.RESULT, {"status": "ok"})  # the fetched result
    assert result is not None


def test_a_quick_cells_lost_result_is_fetched_though_no_started_came():
    # A cell done within moments is never told "started": the worker's heartbeat
    # lists its unacknowledged result as done, and the client asks for it.
    run = Run()
    run.beat([], done=["someone-else"])  # nothing about this cell yet: no fetch
    assert m.FETCH not in run.kinds()
    run.beat([], done=[run.request.id])
    fetches = [msg for msg in run.sent if msg.kind == m.FETCH]
    assert len(fetches) == 1 and fetches[0].content == {"cell": run.request.id}
    assert run.arrive(m.RESULT, {"status": "ok"}) is not None


def test_a_quick_cell_answered_but_not_kept_is_lost_not_run_again():
    run = Run()
    run.beat([], done=[run.request.id])  # answered; the result did not come
    fetch = next(msg for msg in run.sent if msg.kind == m.FETCH)
    with pytest.raises(WorkerLost, match="no longer knows the cell"):
        run.arrive(m.ERROR, {"code": "unknown-cell", "reason": "no such cell"}, parent=fetch.id)
    assert run.kinds().count(m.EXECUTE) == 0  # never sent again: it ran there


def test_a_fetch_the_worker_cannot_serve_loses_an_acknowledged_cell():
    run = Run()
    run.arrive(m.STARTED)
    run.beat([])
    fetch = next(msg for msg in run.sent if msg.kind == m.FETCH)
    with pytest.raises(WorkerLost, match="no longer knows the cell") as lost:
        run.arrive(m.ERROR, {"code": "unknown-cell"}, parent=fetch.id)
    assert lost.value.gone is False


def test_a_request_that_never_arrived_is_sent_again_with_the_same_request_id():
    run = Run()
    run.request.content["request"] = run.request.id
    run.advance(3.05)  # silence: ping and fetch
    fetch = next(msg for msg in run.sent if msg.kind == m.FETCH)
    run.arrive(m.ERROR, {"code": "unknown-cell"}, parent=fetch.id)  # never heard of it
    again = run.sent[-1]
    assert again.kind == m.EXECUTE and again.id != run.request.id
    assert again.content["request"] == run.request.id  # run at most once there
    assert run.wait.concerns(Message(kind=m.ERROR, parent=again.id))


def test_a_cell_that_never_starts_within_its_timeout_is_withdrawn():
    run = Run(timeout=2.0)
    with pytest.raises(ExecutionTimeout, match="did not start"):
        run.answering(40, say=m.QUEUED)
    assert run.now - 100.0 == pytest.approx(2.0 + 30.0, abs=1.1)


def test_a_started_cell_past_timeout_and_grace_is_given_up_not_rerun():
    run = Run(timeout=1.0)
    run.arrive(m.STARTED)
    with pytest.raises(WorkerLost, match="after its --timeout of 1 s") as lost:
        run.answering(40)
    assert lost.value.gone is False
    assert run.now - 100.0 == pytest.approx(31.0, abs=1.1)


def test_an_announced_transfer_allows_silence_for_its_size():
    run = Run(timing=Timing(heartbeat=1.0, liveness=3, min_bandwidth=1e6))
    run.arrive(m.TRANSFER, {"bytes": 20_000_000})  # 20 s at 1 MB/s
    run.link = False
    run.advance(22.9)  # 3 intervals and 20 s for the transfer
    assert m.PING not in run.kinds()
    run.advance(0.3)
    assert m.PING in run.kinds()
    with pytest.raises(WorkerLost):
        run.advance(21.5)  # the last interval, with the transfer's allowance again


def test_interrupt_sends_one_cancel_and_waits_for_the_confirmation():
    run = Run()
    sent = run.wait.interrupt(run.now)
    assert [msg.kind for msg in sent] == [m.CANCEL]
    assert sent[0].content == {"cell": run.request.id}
    assert run.wait.interrupt(run.now) == []  # a second request changes nothing
    run.advance(2.0)
    run.beat([run.request.id])
    result = run.arrive(m.RESULT, {"status": "cancelled"})
    assert result is not None and run.wait.cancelled and not run.wait.by_event


def test_an_unconfirmed_interrupt_stops_waiting_after_cancel_wait():
    run = Run()
    run.wait.interrupt(run.now)
    with pytest.raises(NotConfirmed):
        run.answering(10)
    assert run.now - 100.0 == pytest.approx(TIMING.cancel_wait, abs=1.1)


def test_an_unconfirmed_cancel_from_another_thread_raises_cancelled():
    run = Run()
    run.wait.interrupt(run.now, by_event=True)
    with pytest.raises(ExecutionCancelled, match="did not confirm"):
        run.advance(TIMING.cancel_wait + 1)


def test_an_unconfirmed_interrupt_is_not_waited_for_through_a_stall():
    run = Run()
    run.advance(4.1)
    assert run.wait.stalled
    run.wait.interrupt(run.now)
    with pytest.raises(NotConfirmed):
        run.advance(TIMING.cancel_wait + 0.5)


def test_an_error_for_the_cell_raises_what_it_stands_for():
    run = Run()
    with pytest.raises(MessageRejected, match=re.escape("at tcp://10.0.0.7:7340: bad request")):
        run.arrive(m.ERROR, {"code": "invalid", "reason": "bad request"})


def test_the_wait_never_sleeps_past_its_next_duty():
    run = Run(timeout=1.0)
    assert 0 < run.wait.wake(run.now) <= TIMING.poll_slice
    run.now += 0.95
    assert run.wait.wake(run.now) <= 0.05 + 1e-9  # the heartbeat is due


def test_a_refused_handshake_while_silent_is_raised():
    run = Run()

    def refused() -> bool:
        raise AuthenticationError("refused")

    run.advance(3.05)
    run.now += 1.1
    with pytest.raises(AuthenticationError):
        run.wait.tick(run.now, refused)


def test_a_result_with_a_remote_error_is_still_a_result():
    # The cell's own exception is the result's business (results.parse_result).
    run = Run()
    result = run.arrive(m.RESULT, {"status": "error", "error": {"ename": "ZeroDivisionError"}})
    assert result is not None and result.content["status"] == "error"


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals: main thread"
)
def test_a_second_ctrl_c_stops_waiting_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with InterruptFlag() as flag:
        signal.raise_signal(signal.SIGINT)  # the first: a flag, checked between messages
        assert flag.requested() and not flag.by_event
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second: raised where it lands
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_cancel_event_is_told_from_ctrl_c():
    event = threading.Event()
    flag = InterruptFlag(event)
    assert not flag.requested()
    event.set()
    assert flag.requested() and flag.by_event


def test_a_worker_that_let_the_connection_go_refuses_the_cell_which_can_run_elsewhere():
    run = Run()
    with pytest.raises(WorkerLost, match="did not run there") as lost:
        run.arrive(m.ERROR, {"code": "unknown-client", "reason": "shake hands again"})
    assert lost.value.gone is True  # it never ran: --retry may place it again
    assert run.wait.heard == float("-inf")  # the next request shakes hands first
