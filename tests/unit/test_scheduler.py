"""Fair queueing: round-robin across sessions, FIFO within one."""

from __future__ import annotations

from worker_kernel.scheduler import Cell, FairQueue


def cell(cell_id: str, session: str) -> Cell:
    return Cell(cell_id, b"rid", "client", session, 0, [], 0, None, 0.0)


def test_sessions_take_turns_and_keep_their_own_order():
    q = FairQueue()
    for i in range(3):
        q.push(cell(f"a{i}", "A"))
    q.push(cell("b0", "B"))
    q.push(cell("c0", "C"))
    assert [c.id for c in q.order()] == ["a0", "b0", "c0", "a1", "a2"]
    assert q.position("c0") == 2
    popped = [q.pop() for _ in range(5)]
    assert [c.id for c in popped if c] == ["a0", "b0", "c0", "a1", "a2"]
    assert q.pop() is None
    assert len(q) == 0


def test_push_reports_position_and_remove_keeps_turns_consistent():
    q = FairQueue()
    assert q.push(cell("a0", "A")) == 0
    assert q.push(cell("a1", "A")) == 1
    assert q.push(cell("b0", "B")) == 1
    removed = q.remove("b0")
    assert removed is not None and removed.id == "b0"
    assert q.remove("nope") is None
    assert [c.id for c in q.order()] == ["a0", "a1"]
    assert [q.pop().id, q.pop().id] == ["a0", "a1"]  # type: ignore[union-attr]
