"""Hostile frames against a real worker: each is rejected before anything is
unpickled, and the worker keeps serving.

The payload of the tampered messages would create a marker file if it were ever
unpickled, so "not unpickled" is observable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from lan2gpu_magic import connect
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.messages import PROTOCOL_VERSION, Message
from worker_kernel.protocol.serialize import Payload, dumps
from worker_kernel.protocol.versions import local_versions
from worker_kernel.protocol.wire import Wire, _mac

from ..conftest import key_holder
from ..waiting import wait_until

VERSION = str(PROTOCOL_VERSION).encode()

pytestmark = pytest.mark.faults


class Tripwire:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class RawPeer:
    """A bare DEALER socket speaking frames directly; closed by the fixture."""

    def __init__(self, address: str, key_file: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        key_holder(self.sock, key_file)  # past the encryption; what it sends is unsigned
        self.sock.connect(address)

    def send(self, frames: list) -> None:
        self.sock.send_multipart([bytes(f) for f in frames])

    def hello(self, worker) -> None:
        """Shake hands as a client does (the worker answers nothing else before it)."""
        hello = Message(kind=m.HELLO, content={"client": "raw", "versions": local_versions()})
        self.send(Wire(worker.key).encode(hello))
        reply = self.recv()
        assert reply is not None and json.loads(reply[3])["kind"] == m.WELCOME, reply

    def recv(self, timeout: float = 10.0) -> list[bytes] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def peer(shared_worker) -> Iterator[RawPeer]:
    p = RawPeer(shared_worker.address, shared_worker.key_file)
    yield p
    p.close()


def execute_frames(worker, marker: Path, *, to: str | None = None, **kw) -> list[bytes]:
    payload = Payload()
    payload.add("trap", dumps(Tripwire(marker)))
    payload.add("arr", dumps(np.arange(8192, dtype=np.float32)))  # out of band: 32 KiB
    msg = Message(
        kind=m.EXECUTE,
        content={"code": "y = 1", "inputs": payload.entries, "outputs": ["y"]},
        buffers=payload.frames,
        session="tamper",
        to=worker.instance if to is None else to,
        **kw,
    )
    return [bytes(f) for f in Wire(worker.key).encode(msg)]


def flip(frame: bytes) -> bytes:
    data = bytearray(frame)
    data[len(data) // 2] ^= 0x10
    return bytes(data)


def assert_still_serving(worker) -> None:
    with connect(worker.address, key_file=worker.key_file) as c:
        assert c.run("alive = 1", {}).outputs == {"alive": 1}


def test_a_flipped_bit_in_every_frame_is_rejected_unpickled(shared_worker, peer, tmp_path):
    marker = tmp_path / "unpickled"
    frames = execute_frames(shared_worker, marker)
    # magic, version, kind, header, signature, trap pickle, arr pickle, arr buffer
    assert len(frames) == 8
    for index in range(len(frames)):
        tampered = list(frames)
        tampered[index] = flip(tampered[index])
        peer.send(tampered)
        reply = peer.recv()
        assert reply is not None, f"no answer for tampered frame {index}"
        assert reply[2] == b"reject", f"frame {index}: {reply[2]!r}"
    time.sleep(0.5)
    assert not marker.exists(), "a tampered message was unpickled"
    assert "rejected a message" in shared_worker.log()
    assert_still_serving(shared_worker)
    # The tripwire works: the same message untampered is unpickled (and runs).
    peer.hello(shared_worker)
    peer.send(execute_frames(shared_worker, marker))
    wait_until(marker.exists, 30, "the untampered message to run")


def test_replayed_message_runs_once(shared_worker, peer, tmp_path):
    peer.hello(shared_worker)
    msg = Message(kind=m.PING, to=shared_worker.instance)
    frames = [bytes(f) for f in Wire(shared_worker.key).encode(msg)]
    peer.send(frames)
    assert json.loads(peer.recv()[3])["kind"] == m.PONG  # type: ignore[index]
    peer.send(frames)
    reply = peer.recv()
    assert reply is not None and reply[2] == b"reject"
    assert b"replay" in reply[3]


def test_message_older_than_the_window_is_rejected(shared_worker, peer, tmp_path):
    marker = tmp_path / "unpickled"
    peer.send(execute_frames(shared_worker, marker, sent=time.time() - 600))
    reply = peer.recv()
    assert reply is not None and reply[2] == b"reject" and b"replay window" in reply[3]
    assert not marker.exists()


def test_message_for_another_worker_with_the_same_key_is_refused(worker_factory, tmp_path):
    a = worker_factory("a")
    b = worker_factory("b")  # same key as a
    marker = tmp_path / "unpickled"
    p = RawPeer(b.address, b.key_file)
    try:
        p.send(execute_frames(a, marker))  # addressed to a, delivered to b
        reply = p.recv()
    finally:
        p.close()
    assert reply is not None
    header = json.loads(reply[3])
    assert header["kind"] == m.ERROR and header["content"]["code"] == "wrong-recipient"
    time.sleep(0.5)
    assert not marker.exists()
    assert_still_serving(b)


def test_a_signed_request_before_the_handshake_is_refused_unrun(shared_worker, peer, tmp_path):
    # Answers to a connection that never said hello would be addressed to nobody.
    marker = tmp_path / "unpickled"
    peer.send(execute_frames(shared_worker, marker))
    reply = peer.recv()
    assert reply is not None
    header = json.loads(reply[3])
    assert header["kind"] == m.ERROR and header["content"]["code"] == "unknown-client"
    assert "shake hands again" in header["content"]["reason"]
    time.sleep(0.5)
    assert not marker.exists()
    assert_still_serving(shared_worker)


@pytest.mark.parametrize("version", [b"0", str(PROTOCOL_VERSION + 1).encode()])
def test_other_protocol_versions_are_rejected_by_name(shared_worker, peer, tmp_path, version):
    frames = execute_frames(shared_worker, tmp_path / "unpickled")
    frames[1] = version
    peer.send(frames)
    reply = peer.recv()
    assert reply is not None and reply[2] == b"reject"
    assert f"version {version.decode()}".encode() in reply[3]


def test_python_minor_mismatch_fails_the_handshake_naming_both(shared_worker, peer):
    versions = dict(local_versions(), python="3.99.0")
    hello = Message(kind=m.HELLO, content={"client": "x", "versions": versions})
    peer.send(Wire(shared_worker.key).encode(hello))
    reply = peer.recv()
    assert reply is not None
    header = json.loads(reply[3])
    assert header["kind"] == m.ERROR and header["content"]["code"] == "version"
    assert "3.99.0" in header["content"]["reason"]
    assert local_versions()["python"] in header["content"]["reason"]


def test_header_lying_about_sizes_and_extra_frames(shared_worker, peer, tmp_path):
    marker = tmp_path / "unpickled"
    key = shared_worker.key
    frames = execute_frames(shared_worker, marker)
    header = json.loads(frames[3])
    header["buffers"][-1][0] = 16  # the array buffer is 1024 bytes
    lying = [*frames[:3], json.dumps(header).encode()]
    lying = [*lying, _mac(key, lying), *frames[5:]]
    for bad in (lying, [*frames, b"extra"], frames[:-1]):
        peer.send(bad)
        reply = peer.recv()
        assert reply is not None and reply[2] == b"reject"
    time.sleep(0.3)
    assert not marker.exists()
    assert_still_serving(shared_worker)


def test_garbage_does_not_hurt_the_worker(shared_worker, peer):
    for junk in ([b"hello"], [b"L2G"], [os.urandom(64) for _ in range(6)], [b""] * 9):
        peer.send(junk)
    time.sleep(0.5)
    assert shared_worker.alive()
    assert_still_serving(shared_worker)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_an_oversize_frame_is_refused_before_it_is_allocated(shared_worker):
    before = _rss(shared_worker.pid)
    for _ in range(3):
        p = RawPeer(shared_worker.address, shared_worker.key_file)
        try:
            p.send([b"L2G", VERSION, b"execute", b"{}", b"", os.urandom(1 << 20) * 64])  # 64 MiB
            time.sleep(0.5)
        finally:
            p.close()
    assert _rss(shared_worker.pid) - before < 10 << 20
    assert_still_serving(shared_worker)


def test_large_arrays_cross_in_chunks_both_ways(client):
    big = np.random.default_rng(0).random(3_000_000)  # 24 MB: 23 frames of 1 MiB
    ns = {"big": big}
    client.run("doubled = big * 2", ns)
    assert np.array_equal(ns["doubled"], big * 2)


def test_a_deeply_nested_header_is_rejected_not_fatal(shared_worker, peer):
    nested = b"[" * 200_000 + b"]" * 200_000  # json.loads would recurse to death
    peer.send([b"L2G", VERSION, b"execute", nested, b"x" * 32])
    reply = peer.recv()
    assert reply is not None and reply[2] == b"reject"
    time.sleep(0.3)
    assert shared_worker.alive()
    assert_still_serving(shared_worker)


def test_unsigned_notices_from_a_client_are_ignored(shared_worker, peer):
    peer.send(Wire.encode_notice("pretend"))
    assert peer.recv(timeout=1.5) is None  # no answer, no state
    assert_still_serving(shared_worker)


def test_a_big_rejected_message_gives_its_memory_back(shared_worker):
    before = _rss(shared_worker.pid)
    p = RawPeer(shared_worker.address, shared_worker.key_file)
    try:
        chunk = os.urandom(1 << 20)
        p.send([b"L2G", VERSION, b"execute", b"{}", b"x" * 32, *([chunk] * 200)])  # 200 MiB
        assert p.recv() is not None
    finally:
        p.close()

    # Without --encrypt the worker must receive a message before it can check it;
    # afterwards the memory goes back to the system: at once, or (seen now and then
    # after earlier big messages, in libzmq's or asyncio's hands) with the next
    # message the worker handles. Never later, and never a second time over.
    def returned(within: float) -> bool:
        deadline = time.monotonic() + within
        while _rss(shared_worker.pid) - before >= 40 << 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        return _rss(shared_worker.pid) - before < 40 << 20

    if not returned(5):
        assert_still_serving(shared_worker)
    assert returned(15)
