"""Hostile input in bulk: 10,000 fuzzed messages, garbage on the TCP port, oversize
requests. Nothing is ever unpickled (the loader is instrumented), nothing crashes
or hangs, and memory stays bounded."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import zmq

from lan2gpu_magic import connect
from lan2gpu_magic.errors import MessageRejected
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.messages import PROTOCOL_VERSION, Message
from worker_kernel.protocol.serialize import Payload, dumps
from worker_kernel.protocol.versions import local_versions
from worker_kernel.protocol.wire import Wire

from ..conftest import key_holder

VERSION = str(PROTOCOL_VERSION).encode()

pytestmark = pytest.mark.faults


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def instrumented(worker_factory, tmp_path):
    """A worker whose every unpickling (service and executors) is logged to a file."""
    log = tmp_path / "unpickles.log"
    worker = worker_factory("fuzzed", env={"LAN2GPU_UNPICKLE_LOG": str(log)})
    return worker, log


def _valid(worker, rng: random.Random) -> list[bytes]:
    payload = Payload()
    payload.add("a", dumps(np.arange(rng.randint(1, 400), dtype=np.float32)))
    payload.add("n", dumps(rng.random()))
    msg = Message(
        kind=m.EXECUTE,
        content={"code": "b = a * n", "inputs": payload.entries, "outputs": ["b"]},
        buffers=payload.frames,
        session="fuzz",
        to=worker.instance,
    )
    return [bytes(f) for f in Wire(worker.key).encode(msg)]


def _mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    out = list(frames)
    how = rng.randrange(7)
    i = rng.randrange(len(out))
    if how == 0 and out[i]:  # flip a bit
        data = bytearray(out[i])
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        out[i] = bytes(data)
    elif how == 1:  # truncate
        out[i] = out[i][: rng.randrange(len(out[i]) + 1)]
    elif how == 2:  # extend
        out[i] = out[i] + os.urandom(rng.randint(1, 64))
    elif how == 3:  # drop a frame
        del out[i]
    elif how == 4:  # duplicate a frame
        out.insert(i, out[i])
    elif how == 5:  # swap two frames
        j = rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    else:  # rewrite the header's content but keep the old signature
        out[3] = out[3].replace(b'"code":"b = a * n"', b'"code":"import os"')
    return out


def _random_frames(rng: random.Random) -> list[bytes]:
    frames = [os.urandom(rng.randint(0, 200)) for _ in range(rng.randint(1, 10))]
    if rng.random() < 0.5:  # look like lan2gpu at first glance
        frames[:3] = [b"L2G", VERSION, rng.choice([b"execute", b"hello", b"ping", b"status"])]
    return frames


def test_ten_thousand_fuzzed_messages_are_rejected_unpickled(instrumented):
    worker, unpickles = instrumented
    rng = random.Random(20261122)
    rss = _rss(worker.pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    key_holder(sock, worker.key_file)
    sock.connect(worker.address)
    try:
        # A key holder that shook hands: its valid messages would be served.
        hello = Message(kind=m.HELLO, content={"client": "fuzzer", "versions": local_versions()})
        sock.send_multipart(Wire(worker.key).encode(hello))
        assert sock.poll(30_000) and sock.recv_multipart()[2] == b"welcome"
        base = [_valid(worker, rng) for _ in range(20)]
        sent = 0
        while sent < 10_000:
            if sent % 2:
                original = rng.choice(base)
                frames = _mutate(original, rng)
                if frames == original:
                    continue
            else:
                frames = _random_frames(rng)
            sock.send_multipart(frames)
            sent += 1
            while sock.poll(0):
                sock.recv_multipart()  # notices; the worker never waits for us anyway
        # A valid ping on the same connection: its answer means every message before
        # it was handled (one peer's messages are handled in order).
        ping = Message(kind=m.PING, to=worker.instance)
        sock.send_multipart(Wire(worker.key).encode(ping))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert sock.poll(int((deadline - time.monotonic()) * 1000)), "no pong"
            reply = sock.recv_multipart()
            if reply[2] == b"pong":
                break
        # The worker answers promptly right after the flood...
        with connect(worker.address, key_file=worker.key_file) as c:
            assert c.ping(timeout=5) < 1.0
    finally:
        sock.close()
        ctx.term()
    time.sleep(0.5)
    assert not unpickles.exists(), unpickles.read_text()[:500]
    assert worker.alive()
    assert _rss(worker.pid) - rss < 50 << 20
    # ...rejections are logged once per peer (and summarised), not 10,000 times...
    assert worker.log().count("rejected a message from 127.0.0.1") <= 3
    # ...and the instrumentation does see a real cell unpickle its inputs.
    with connect(worker.address, key_file=worker.key_file) as c:
        assert c.run("y = x + 1", {"x": 1}).outputs == {"y": 2}
    assert unpickles.exists()


def test_garbage_on_the_tcp_port_does_not_hurt(shared_worker):
    url = urlsplit(shared_worker.address)
    for junk in (
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\xff" * 10 + b"\x7f" * 100,
    ):
        with socket.create_connection((url.hostname, url.port), timeout=5) as s:
            s.sendall(junk)
            time.sleep(0.2)
    assert shared_worker.alive()
    with connect(shared_worker.address, key_file=shared_worker.key_file) as c:
        assert c.ping(timeout=5) < 1.0


def test_a_message_over_the_byte_cap_fails_at_once_with_the_limit(worker_factory):
    worker = worker_factory("capped", "--max-message-bytes", "1M")
    with connect(worker.address, key_file=worker.key_file) as c:
        t0 = time.monotonic()
        with pytest.raises(MessageRejected, match="over the limit of 1048576"):
            c.run("y = x.sum()", {"x": np.zeros(300_000)})  # 2.4 MB
        assert time.monotonic() - t0 < 5
        assert c.run("ok = 1", {}).outputs == {"ok": 1}
