"""Fair queueing: round-robin across users (or sessions), first fit with reservation."""

from __future__ import annotations

from worker_kernel.scheduler import CPU, Cell, FairQueue


def cell(cell_id: str, session: str, *resources: str) -> Cell:
    return Cell(cell_id, b"rid", "client", session, resources or ("gpu0",), [], 0, None, 0.0)


def ids(cells):
    return [c.id for c in cells]


def test_sessions_take_turns_and_keep_their_own_order():
    q = FairQueue()
    for i in range(3):
        q.push(cell(f"a{i}", "A"))
    q.push(cell("b0", "B"))
    q.push(cell("c0", "C"))
    assert ids(q.order()) == ["a0", "b0", "c0", "a1", "a2"]
    started = []
    for _ in range(5):  # one GPU: one cell at a time
        (only,) = q.take(busy=set())
        started.append(only.id)
    assert started == ["a0", "b0", "c0", "a1", "a2"]
    assert q.take(busy=set()) == []


def test_a_session_that_just_ran_waits_behind_a_newcomer():
    q = FairQueue()
    q.push(cell("a0", "A"))
    q.push(cell("a1", "A"))
    assert ids(q.take(busy=set())) == ["a0"]
    q.push(cell("b0", "B"))  # arrives while a0 runs
    assert ids(q.order()) == ["b0", "a1"]


def test_a_busy_gpu_blocks_only_its_own_cells():
    q = FairQueue()
    q.push(cell("a", "A", "gpu0"))
    q.push(cell("b", "B", "gpu1"))
    q.push(cell("c", "C", CPU))
    assert ids(q.take(busy={"gpu0"})) == ["b", "c"]
    assert ids(q.take(busy=set())) == ["a"]


def test_a_waiting_two_gpu_cell_reserves_its_gpus():
    q = FairQueue()
    q.push(cell("wide", "A", "gpu0", "gpu1"))
    q.push(cell("narrow", "B", "gpu1"))
    # gpu0 is busy: the wide cell waits and keeps gpu1 free for itself.
    assert q.take(busy={"gpu0"}) == []
    assert ids(q.take(busy=set())) == ["wide"]
    assert ids(q.take(busy=set())) == ["narrow"]


def test_positions_count_cells_ahead_on_shared_resources():
    q = FairQueue()
    running = [cell("r", "R", "gpu0")]
    q.push(cell("a", "A", "gpu0"))
    q.push(cell("b", "B", "gpu1"))
    q.push(cell("c", "C", "gpu0", "gpu1"))
    assert q.positions(running) == {"a": 1, "b": 0, "c": 3}


def test_remove_keeps_turns_consistent():
    q = FairQueue()
    q.push(cell("a0", "A"))
    q.push(cell("a1", "A"))
    q.push(cell("b0", "B"))
    removed = q.remove("b0")
    assert removed is not None and removed.id == "b0"
    assert q.remove("nope") is None
    assert ids(q.order()) == ["a0", "a1"]
    assert len(q) == 2


def test_with_users_known_a_new_session_per_cell_does_not_jump_the_queue():
    q = FairQueue()
    for i in range(3):  # alice: a new session for every cell
        c = cell(f"a{i}", f"alice-{i}")
        c.user = "alice"
        q.push(c)
    bob = cell("b0", "bob-session")
    bob.user = "bob"
    q.push(bob)
    assert ids(q.order()) == ["a0", "b0", "a1", "a2"]
    # Without users (the shared key: every holder is equal), sessions take turns.
    q = FairQueue()
    for c in [cell("a0", "s0"), cell("a1", "s1"), cell("b0", "s2")]:
        q.push(c)
    assert ids(q.order()) == ["a0", "a1", "b0"]


def test_a_cell_without_an_executor_is_passed_over_and_reserves_nothing():
    q = FairQueue()
    q.push(cell("c0", "C"))  # its turn first, but no executor can be had for it yet
    q.push(cell("a0", "A"))
    assert ids(q.take(busy=set(), room=lambda c: c.session != "C")) == ["a0"]
    assert ids(q.order()) == ["c0"]  # still waiting, and first once there is room
    assert ids(q.take(busy=set())) == ["c0"]
