"""Whom the worker heartbeats, and whose cells it cancels: the registry, by the clock."""

from __future__ import annotations

from worker_kernel.clients import ClientRegistry

LIVENESS = 5.0


def cells(table: dict[bytes, list[str]]):
    return lambda rid: table.get(rid, [])


def test_a_client_is_heartbeated_while_it_has_cells_and_cancelled_when_silent():
    reg = ClientRegistry(liveness=LIVENESS)
    a = reg.heard(b"a", now=0.0)
    a.client = "client-a"
    table = {b"a": ["cell-1"]}
    sweep = reg.sweep(4.9, cells(table), owners=())
    assert [(s.client, c) for s, c in sweep.beat] == [("client-a", ["cell-1"])]
    assert not sweep.cancel
    sweep = reg.sweep(5.1, cells(table), owners=())
    assert [(s.client, c) for s, c in sweep.cancel] == [("client-a", ["cell-1"])]
    assert not sweep.beat


def test_a_client_that_spoke_lately_is_heartbeated_without_cells():
    reg = ClientRegistry(liveness=LIVENESS)
    reg.heard(b"a", now=0.0)
    assert len(reg.sweep(9.9, cells({}), owners=()).beat) == 1  # attached 10 s after it spoke
    assert reg.sweep(10.1, cells({}), owners=()).beat == []


def test_an_announced_upload_keeps_its_client_heartbeated_for_its_size():
    reg = ClientRegistry(liveness=LIVENESS)
    reg.heard(b"a", now=0.0, expect_bytes=100e6)  # 10 s at the assumed 10 MB/s
    assert len(reg.sweep(19.9, cells({}), owners=()).beat) == 1
    assert reg.sweep(20.1, cells({}), owners=()).beat == []


def test_a_kernels_owner_is_heartbeated_and_a_silent_stranger_forgotten():
    reg = ClientRegistry(liveness=LIVENESS)
    reg.heard(b"owner", now=0.0).client = "owner"
    reg.heard(b"other", now=0.0).client = "other"
    sweep = reg.sweep(3601.0, cells({}), owners={"owner"})
    assert [s.client for s, _ in sweep.beat] == ["owner"]
    assert [s.client for s in sweep.forgotten] == ["other"]
    assert reg.get(b"other") is None and reg.to(b"owner") == "owner"
    assert reg.to(b"other") == ""


def test_the_workers_own_stall_is_not_held_against_its_clients():
    reg = ClientRegistry(liveness=LIVENESS)
    reg.heard(b"a", now=0.0)
    table = {b"a": ["cell-1"]}
    reg.forgive(now=12.0, stalled=10.0)  # the worker was stopped for 10 of those 12 s
    assert reg.sweep(12.0, cells(table), owners=()).cancel == []
    assert reg.silent_for(12.0) == {"": 2.0}
    reg.forgive(now=13.0, stalled=100.0)  # never into the future
    assert reg.silent_for(13.0) == {"": 0.0}
