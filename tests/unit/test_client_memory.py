"""The client's own logic against a scripted worker in memory: no sockets, a fake clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lan2gpu_magic.client import Client
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import WorkerLost
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.outcomes import CellStatus

from ..memory_link import KEY, FakeClock, FakeWorker, MemoryLink


def client_for(worker: FakeWorker, **kw: Any) -> tuple[Client, list[MemoryLink], FakeClock]:
    clock = FakeClock()
    links: list[MemoryLink] = []

    def link() -> MemoryLink:
        links.append(MemoryLink(worker, clock))
        return links[-1]

    client = Client("memory://fake", key=KEY, plaintext=True, clock=clock, link=link, **kw)
    return client, links, clock


def test_a_cell_runs_and_its_outputs_come_back_into_the_namespace():
    worker = FakeWorker()
    client, links, _ = client_for(worker)
    ns = {"x": np.arange(4.0)}
    result = client.run("y = x * 2", ns)
    assert ns["y"].tolist() == [0.0, 2.0, 4.0, 6.0]
    assert result.worker == "fake" and client.info.name == "fake"
    execute = next(msg for msg in worker.received if msg.kind == m.EXECUTE)
    assert execute.content["outputs"] == ["y"] and execute.to == worker.instance
    assert links[0].kinds()[:2] == [m.HELLO, m.EXECUTE]  # it just spoke: no ping first


def test_a_worker_heard_from_lately_is_not_pinged_before_the_next_cell():
    worker = FakeWorker()
    client, links, clock = client_for(worker)
    client.run("a = 1", {})
    pings = links[0].kinds().count(m.PING)
    client.run("b = 2", {})  # at once: the worker just spoke
    assert links[0].kinds().count(m.PING) == pings
    clock.now += 5.0  # silent for a while: ping first
    client.run("c = 3", {})
    assert links[0].kinds().count(m.PING) == pings + 1


def test_a_cache_miss_sends_the_arrays_again_in_full():
    worker = FakeWorker()
    client, links, _ = client_for(worker)
    big = np.arange(1 << 17, dtype=np.float64)  # 1 MiB: sent by digest once held
    ns = {"big": big}
    client.run("total = float(big.sum())", ns)
    missed: list[Message] = []

    def miss_once(msg: Message) -> list[Message]:
        if msg.kind != m.EXECUTE or missed or not msg.content["refs"]:
            return []
        missed.append(msg)
        content = {"status": CellStatus.CACHE_MISS, "missing": list(msg.content["refs"].values())}
        return [worker.reply(msg, m.RESULT, content)]

    worker.overrides.append(miss_once)
    client.run("again = float(big.sum())", ns)
    executes = [msg for msg in links[0].sent if msg.kind == m.EXECUTE]
    assert len(missed) == 1 and missed[0].nbytes < big.nbytes  # by reference at first
    assert executes[-1].content["refs"] == {}  # the resend carries the data itself
    assert executes[-1].nbytes >= big.nbytes
    assert ns["again"] == ns["total"] == float(big.sum())


def test_a_restarted_worker_loses_the_cell_and_the_next_one_shakes_hands_again():
    worker = FakeWorker()
    client, links, _ = client_for(worker)
    client.run("a = 1", {})

    def restarted(msg: Message) -> list[Message]:
        if msg.kind == m.EXECUTE:
            worker.instance = m.new_id()  # a new run of the worker
            return [worker.reply(msg, m.ERROR, {"code": "wrong-recipient"}, to="")]
        return []

    worker.overrides.append(restarted)
    with pytest.raises(WorkerLost, match="restarted while the cell was in flight"):
        client.run("b = 2", {})
    worker.overrides.clear()
    hellos = links[0].kinds().count(m.HELLO)
    assert client.run("c = 3", {}).outputs == {"c": 3}
    assert links[0].kinds().count(m.HELLO) == hellos + 1


def test_a_silent_worker_with_its_connection_down_is_lost_in_seconds_of_its_clock():
    worker = FakeWorker()
    client, links, clock = client_for(worker)
    client.run("a = 1", {})
    worker.silent, links[0].up = True, False  # the host went down
    t0 = clock.now
    with pytest.raises(WorkerLost, match="connection dropped") as lost:
        client.run("b = 2", {})
    assert lost.value.gone
    # A ping first (it answers nothing: unreachable) would raise earlier; the worker
    # spoke just now, so the cell went out and the wait decided: 3 silent beats, one
    # more after asking again.
    assert 4.0 <= clock.now - t0 <= 6.0
    assert {m.PING, m.FETCH} <= set(links[0].kinds())


def test_a_worker_that_let_the_connection_go_is_greeted_again_by_the_next_ping():
    worker = FakeWorker()
    client, links, clock = client_for(worker)
    client.run("a = 1", {})

    def forgot(msg: Message) -> list[Message]:
        if msg.kind == m.PING:
            worker.overrides.clear()  # once
            return [worker.reply(msg, m.ERROR, {"code": "unknown-client"}, to="")]
        return []

    worker.overrides.append(forgot)
    clock.now += 5.0
    assert client.run("b = 2", {}).outputs == {"b": 2}
    assert links[0].kinds().count(m.HELLO) == 2
