"""A large cell's arrays go straight between the notebook and its executor
(worker_kernel/protocol/datapath.py), against a real worker.

Hostile peers speak raw frames: a signed ``execute`` whose buffers come on the data
connection, then whatever they like on that connection. The cell's first buffer is a
pickle that creates a marker file when unpickled, so "never unpickled" is observable,
and so is "ran" (the untampered stream).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lan2gpu_magic import connect
from lan2gpu_magic.client import Client
from lan2gpu_magic.request import OutputHandlers
from worker_kernel.protocol import datapath
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import ExecutorDied
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.serialize import Payload, dumps
from worker_kernel.protocol.wire import Wire

from ..conftest import proc_rss
from ..waiting import wait_until
from .test_tamper import RawPeer, Tripwire, assert_still_serving

pytestmark = pytest.mark.faults
MiB = 1 << 20


class Cell:
    """One direct cell sent by a raw peer: its records and what the worker said."""

    def __init__(self, worker: Any, peer: RawPeer, marker: Path, nbytes: int = 3 * MiB) -> None:
        payload = Payload()
        payload.add("trap", dumps(Tripwire(marker)))
        payload.add("arr", dumps(np.random.default_rng(0).random(nbytes // 8)))
        self.msg = Message(
            kind=m.EXECUTE,
            content={"code": "y = 1", "inputs": payload.entries, "outputs": ["y"]},
            buffers=payload.frames,
            session=f"direct-{marker.name}",
            to=worker.instance,
            direct=True,
        )
        self.id = self.msg.id
        signed, self.frames = Wire(worker.key).encode_parts(self.msg)
        assert len(signed) == 5 and len(self.frames) > 3  # buffers: not on the socket
        self.peer = peer
        peer.hello(worker)
        peer.send(signed)
        started = self.until(m.STARTED)
        self.pid = int(started["pid"])
        self.ticket = bytes.fromhex(started["data"]["ticket"])
        self.endpoint = datapath.Endpoint(started["data"]["endpoint"])
        self.aead = datapath.cell_key(worker.key, self.id, self.ticket)

    def until(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        """The content of the next message of ``kind`` about this cell."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            frames = self.peer.recv(left)
            if frames is None:
                break
            header = json.loads(frames[3])
            if header["kind"] == kind and header["parent"] == self.id:
                return dict(header["content"])
        raise AssertionError(f"no {kind} for the cell within {timeout} s")

    def records(self, aead: datapath.AESGCM | None = None) -> list[bytes]:
        aead = aead or self.aead
        out = []
        for n, frame in enumerate(self.frames):
            data = bytes(frame)
            length = len(data).to_bytes(4, "big")
            out.append(length + aead.encrypt(datapath.UP + n.to_bytes(8, "big"), data, length))
        return out

    def connect(self) -> socket.socket:
        return self.endpoint.connect(10)

    def admitted(self) -> socket.socket:
        """A connection that answered its challenge, as the notebook does."""
        sock = self.connect()
        datapath.answer_challenge(sock, self.ticket)
        return sock


@pytest.fixture
def peer(shared_worker) -> Iterator[RawPeer]:
    p = RawPeer(shared_worker.address, shared_worker.key_file)
    yield p
    p.close()


def _shut_out(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the worker closed ``sock`` (without waiting for what we would send)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):  # its challenge, perhaps: then the end
            pass
    except ConnectionResetError:  # closed with our bytes unread
        pass
    except TimeoutError:
        return False
    return True


def _sent(sock: socket.socket, records: list[bytes]) -> bool:
    """Whether all of ``records`` went (False: the other end went away meanwhile)."""
    try:
        for record in records:
            sock.sendall(record)
            time.sleep(0.01)
    except OSError:
        return False
    return True


def test_large_arrays_go_straight_to_the_executor_and_back(client: Client, monkeypatch) -> None:
    sent: list[int] = []
    received: list[int] = []
    send, receive = datapath.send_frames, datapath.receive_frames

    def counting_send(*args: Any, **kw: Any) -> bool:
        sent.append(len(args[2]))
        return send(*args, **kw)

    def counting_receive(*args: Any, **kw: Any) -> bool:
        received.append(1)
        return receive(*args, **kw)

    monkeypatch.setattr(datapath, "send_frames", counting_send)
    monkeypatch.setattr(datapath, "receive_frames", counting_receive)
    assert client.info.direct_data
    a = np.random.default_rng(1).random(3 * MiB // 8)
    ns = {"a": a, "small": np.arange(10)}
    result = client.run("b = a * 2\nc = small + 1", ns)
    assert np.array_equal(ns["b"], a * 2) and list(ns["c"]) == list(range(1, 11))
    assert sent and received == [1]  # inputs out, the result's arrays back, both direct
    assert result.stats["bytes_in"] >= a.nbytes and result.stats["bytes_out"] >= a.nbytes
    client.run("d = small * 3", ns)  # a small cell: on the socket, as before
    assert len(sent) == 1 and received == [1]
    assert list(ns["d"]) == [3 * i for i in range(10)]


def test_a_queued_cell_holds_no_input_memory_on_the_worker(worker_factory) -> None:
    worker = worker_factory("queue", "--max-executors", "1")
    busy_started = threading.Event()
    with (
        connect(worker.address, key_file=worker.key_file) as one,
        connect(worker.address, key_file=worker.key_file) as two,
    ):
        one.run("pass", {})
        baseline = proc_rss(worker.pid)

        def busy() -> None:
            busy_started.set()
            one.run("import time\ntime.sleep(4)", {})

        thread = threading.Thread(target=busy)
        thread.start()
        busy_started.wait(10)
        time.sleep(0.5)
        a = np.random.default_rng(2).random(96 * MiB // 8)
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc_rss(worker.pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        ns = {"a": a}
        two.run("s = float(a.sum())", ns)  # waits for the only executor, then runs
        done.set()
        watcher.join()
        thread.join()
    assert ns["s"] == pytest.approx(float(a.sum()))
    # Relayed, the service held the 96 MiB while the cell waited; direct, nothing.
    assert peak[0] - baseline < 24 * MiB, f"service grew by {(peak[0] - baseline) >> 20} MiB"


def test_peers_without_the_ticket_are_shut_out_and_the_cell_still_runs(
    shared_worker, peer, tmp_path
) -> None:
    marker = tmp_path / "ran"
    cell = Cell(shared_worker, peer, marker)
    with cell.connect() as stranger:  # garbage for an answer: closed at once
        stranger.sendall(os.urandom(4096))
        assert _shut_out(stranger)
    idle = cell.connect()  # connects and says nothing: holds up nobody
    with cell.connect() as replay:  # an answer to another connection's challenge
        replay.recv(datapath.CHALLENGE_BYTES)
        replay.sendall(datapath.hello(cell.ticket, bytes(datapath.CHALLENGE_BYTES)))
        assert _shut_out(replay)
    assert not marker.exists()
    with cell.admitted() as notebook:
        notebook.sendall(b"".join(cell.records()))
        assert cell.until(m.RESULT)["status"] == "ok"
    assert marker.exists()  # the real stream arrived and ran
    assert _shut_out(idle)
    idle.close()


def test_a_recorded_connection_does_not_get_in_again(shared_worker, peer, tmp_path) -> None:
    first = Cell(shared_worker, peer, tmp_path / "first")
    with first.connect() as notebook:
        challenge = notebook.recv(datapath.CHALLENGE_BYTES)
        answer = datapath.hello(first.ticket, challenge)
        notebook.sendall(answer + b"".join(first.records()))
        assert first.until(m.RESULT)["status"] == "ok"
    marker = tmp_path / "second"
    second = Cell(shared_worker, peer, marker)
    for recorded in (answer, datapath.hello(second.ticket, challenge)):
        with second.connect() as replay:  # what went on the wire, sent again
            replay.sendall(recorded + first.records()[0])
            assert _shut_out(replay)
    assert not marker.exists()
    with second.admitted() as notebook:
        notebook.sendall(b"".join(second.records()))
        assert second.until(m.RESULT)["status"] == "ok"
    assert marker.exists()


@pytest.mark.parametrize("spoil", ["flip", "swap", "drop", "cut", "other-cell"])
def test_a_spoiled_stream_fails_the_cell_unpickled(shared_worker, peer, tmp_path, spoil) -> None:
    marker = tmp_path / "unpickled"
    cell = Cell(shared_worker, peer, marker)
    records = cell.records()
    if spoil == "other-cell":  # the right bytes, sealed under another cell's key
        records = cell.records(datapath.cell_key(shared_worker.key, "other", cell.ticket))
    elif spoil == "flip":
        spoiled = bytearray(records[-1])
        spoiled[len(spoiled) // 2] ^= 0x10
        records[-1] = bytes(spoiled)
    elif spoil == "swap":
        records[-1], records[-2] = records[-2], records[-1]
    elif spoil == "drop":
        del records[-2]
    else:
        records[-1] = records[-1][: len(records[-1]) // 2]
    with cell.admitted() as notebook:
        notebook.sendall(b"".join(records))
        if spoil in ("cut", "drop"):
            notebook.shutdown(socket.SHUT_WR)  # then nothing more comes
        result = cell.until(m.RESULT)
    assert result["status"] == "error"
    evalue = result["error"]["evalue"]
    why = "closed after" if spoil == "cut" else "failed authentication"
    assert why in evalue, evalue
    assert not marker.exists(), "a spoiled stream was unpickled"
    assert "inputs did not arrive" in shared_worker.log()
    assert_still_serving(shared_worker)


def test_an_executor_killed_mid_transfer_is_reported_and_the_worker_serves(
    shared_worker, peer, tmp_path
) -> None:
    cell = Cell(shared_worker, peer, tmp_path / "never", nbytes=16 * MiB)
    records = cell.records()
    with cell.admitted() as notebook:
        notebook.sendall(b"".join(records[:4]))
        os.kill(cell.pid, signal.SIGKILL)
        assert not _sent(notebook, records[4:])  # the executor's end is gone
        result = cell.until(m.RESULT)
    assert result["status"] == "died" and result.get("session_lost")
    assert_still_serving(shared_worker)


def test_a_client_whose_executor_dies_mid_upload_is_told(client: Client, monkeypatch) -> None:
    pid = client.run("import os\npid = os.getpid()", {}).outputs["pid"]
    send = datapath.send_frames

    def killing_send(*args: Any, **kw: Any) -> bool:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the executor to die")
        return send(*args, **kw)

    monkeypatch.setattr(datapath, "send_frames", killing_send)
    with pytest.raises(ExecutorDied):
        client.run("b = -a", {"a": np.ones(2 * MiB // 8)})
    monkeypatch.setattr(datapath, "send_frames", send)
    ns = {"a": np.ones(2 * MiB // 8)}
    client.run("b = -a", ns)  # a fresh executor, direct again
    assert float(ns["b"].sum()) == -(2 * MiB // 8)


def test_with_direct_data_off_everything_goes_through_the_port(worker_factory, tmp_path) -> None:
    worker = worker_factory("relayed", "--no-direct-data")
    with connect(worker.address, key_file=worker.key_file) as c:
        assert not c.info.direct_data
        a = np.random.default_rng(3).random(2 * MiB // 8)
        ns = {"a": a}
        c.run("b = -a", ns)
        assert np.array_equal(ns["b"], -a)
    peer = RawPeer(worker.address, worker.key_file)
    try:
        peer.hello(worker)
        msg = Message(kind=m.EXECUTE, content={"code": "y = 1"}, buffers=[bytes(MiB)], direct=True)
        msg.to = worker.instance
        peer.send(Wire(worker.key).encode_parts(msg)[0])
        reply = peer.recv()
        assert reply is not None and b"no direct data connections" in reply[3]
    finally:
        peer.close()


def test_a_lost_direct_result_is_fetched_again_not_rerun(worker_factory, tmp_path) -> None:
    worker = worker_factory("lossy-direct", "--fault", "drop-first-result")
    ran = tmp_path / "ran"
    with connect(worker.address, key_file=worker.key_file) as c:
        ns = {"ran": str(ran), "a": np.random.default_rng(4).random(2 * MiB // 8)}
        t0 = time.monotonic()
        c.run("with open(ran, 'a') as f:\n    f.write('x')\nb = a + 1", ns)
        assert np.array_equal(ns["b"], ns["a"] + 1)
        # The signed prelude was lost; fetched again, its arrays were still waiting on
        # the cell's data connection.
        assert time.monotonic() - t0 < 15
    assert ran.read_text() == "x"  # once
    assert "fault injection: dropped the result" in worker.log()


def test_a_data_port_behind_a_firewall_falls_back_to_the_workers_port(worker_factory) -> None:
    worker = worker_factory("walled", "--fault", "closed-data-port")
    told: list[str] = []
    handlers = OutputHandlers(stream=lambda name, text: told.append(text))
    with connect(worker.address, key_file=worker.key_file) as c:
        for i in range(2):
            a = np.random.default_rng(i).random(2 * MiB // 8)
            ns = {"a": a}
            c.run("b = a * 3", ns, handlers=handlers)
            assert np.array_equal(ns["b"], a * 3)
    # Said once, with what to do; the second cell went through the port at once.
    assert len(told) == 1 and "through the worker's own port" in told[0], told
    assert "--no-direct-data" in told[0]
