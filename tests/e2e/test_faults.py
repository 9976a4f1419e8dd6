"""Timeouts, interrupts, crashes and lost workers: always an answer, never a hang."""

from __future__ import annotations

import _thread
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from lan2gpu_magic import (
    ExecutionTimeout,
    ExecutorDied,
    WorkerLost,
    WorkerUnreachable,
    connect,
)
from lan2gpu_magic.errors import AuthenticationError
from worker_kernel.protocol.keys import generate_key_file
from worker_kernel.protocol.messages import PROTOCOL_VERSION

from ..conftest import key_holder

VERSION = str(PROTOCOL_VERSION).encode()

pytestmark = pytest.mark.faults


def test_timeout_stops_a_runaway_cell_and_keeps_the_session(client):
    client.run("kept = 'still here'", {}, session="named")
    t0 = time.monotonic()
    with pytest.raises(ExecutionTimeout) as info:
        client.run("while True:\n    pass", {}, timeout=2)
    elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 15
    assert not info.value.session_lost
    assert "intact" in str(info.value)
    ns: dict = {}
    client.run("again = kept", ns, session="named")
    assert ns["again"] == "still here"


def test_a_cell_that_ignores_the_timeout_is_killed_and_replaced(client):
    client.run("kept = 1", {}, session="named")
    stubborn = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass"
    with pytest.raises(ExecutionTimeout) as info:
        client.run(stubborn, {}, timeout=1, session="named")
    assert info.value.session_lost
    assert "lost" in str(info.value)
    ns: dict = {}
    client.run("fresh = 'kept' in dir()", ns, session="named")  # a new executor, a new namespace
    assert ns["fresh"] is False


def test_interrupt_cancels_the_remote_cell_and_the_session_survives(client):
    client.run("kept = 2", {}, session="named")
    timer = threading.Timer(1.0, _thread.interrupt_main)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            client.run("import time\ntime.sleep(60)", {}, session="named")
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 5
    ns: dict = {}
    client.run("again = kept", ns, session="named")
    assert ns["again"] == 2


@pytest.mark.parametrize(
    ("cell", "cause"),
    [
        ("import os\nos._exit(3)", "exit code 3"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
        ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
    ],
)
def test_executor_death_is_reported_and_the_next_cell_works(client, cell, cause):
    t0 = time.monotonic()
    with pytest.raises(ExecutorDied, match=cause) as info:
        client.run(cell, {})
    assert time.monotonic() - t0 < 10
    assert info.value.session_lost
    assert client.run("x = 5", {}).outputs == {"x": 5}


def test_worker_killed_mid_cell_is_detected_by_heartbeat(worker_factory):
    worker = worker_factory("doomed")
    with connect(worker.address, key_file=worker.key_file) as c:
        c.run("x = 1", {})
        threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match="stopped answering"):
            c.run("import time\ntime.sleep(60)", {})
        assert time.monotonic() - t0 < 10


def test_client_reconnects_to_a_restarted_worker(worker_factory, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = generate_key_file(tmp_path / "restart-key")
    first = worker_factory("again", key_file=key, bind=f"tcp://127.0.0.1:{port}")
    with connect(first.address, key_file=key) as c:
        c.run("x = 1", {})
        first.stop()
        second = worker_factory("again", key_file=key, bind=f"tcp://127.0.0.1:{port}")
        assert second.instance != first.instance
        time.sleep(1.2)  # let the client's "recently heard" window pass
        assert c.run("y = 2", {}).outputs == {"y": 2}


def test_worker_restarted_mid_cell_is_reported_not_waited_for(worker_factory, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = generate_key_file(tmp_path / "k")
    bind = f"tcp://127.0.0.1:{port}"
    first = worker_factory("flaky", key_file=key, bind=bind)
    with connect(first.address, key_file=key) as c:
        c.run("x = 1", {})

        def restart() -> None:
            first.process.kill()
            first.process.wait()
            worker_factory("flaky", key_file=key, bind=bind)

        threading.Timer(1.0, restart).start()
        t0 = time.monotonic()
        with pytest.raises(WorkerLost):
            c.run("import time\ntime.sleep(5)", {}, timeout=10)
        assert time.monotonic() - t0 < 15
        assert c.run("y = 2", {}).outputs == {"y": 2}  # and the next cell just works


def test_a_signed_but_nonsensical_request_does_not_stop_the_worker(client, shared_worker):
    from worker_kernel.protocol import messages as m
    from worker_kernel.protocol.errors import MessageRejected
    from worker_kernel.protocol.messages import Message

    bad = Message(
        kind=m.EXECUTE,
        content={"code": "x = 1", "timeout": "soon"},
        to=client.info.instance,
        session=client.session,
    )
    with pytest.raises(MessageRejected, match="timeout='soon' is not a non-negative number"):
        client.connection.request(bad, {m.RESULT}, 10)
    assert shared_worker.alive()
    assert client.run("ok = 1", {}).outputs == {"ok": 1}


def test_many_interrupts_never_lose_or_garble_a_message(client):
    # Output-heavy cells interrupted at varied moments: every interrupt cancels the
    # cell promptly and the next cell works.
    noisy = "import time\nwhile True:\n    print('x' * 500)\n    time.sleep(0.001)"
    for delay in (0.2, 0.35, 0.5, 0.65, 0.8):
        timer = threading.Timer(delay, _thread.interrupt_main)
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            client.run(noisy, {}, handlers=_quiet())
        timer.cancel()
        assert time.monotonic() - t0 < delay + 6
        assert client.run("z = 3", {}).outputs == {"z": 3}


def _quiet():
    from lan2gpu_magic import OutputHandlers

    return OutputHandlers(stream=lambda *_: None)


def test_unreachable_worker_says_where_and_what_to_do():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(WorkerUnreachable, match=f"tcp://127.0.0.1:{port}.*is it running"):
        connect(f"tcp://127.0.0.1:{port}", key=os.urandom(32), connect_timeout=1)
    assert time.monotonic() - t0 < 5


def test_wrong_key_is_reported_as_such_at_once(shared_worker):
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError, match="key file differs from the worker's"):
        connect(shared_worker.address, key=os.urandom(32), connect_timeout=30)
    assert time.monotonic() - t0 < 5  # the refused handshake, not the timeout


def test_wrong_key_in_plain_text_is_reported_as_such(worker_factory):
    worker = worker_factory("plain", "--insecure-plaintext")
    with pytest.raises(AuthenticationError, match="key file differs"):
        connect(worker.address, key=os.urandom(32), connect_timeout=5, plaintext=True)


def test_a_lost_result_is_fetched_again_not_rerun(worker_factory, tmp_path):
    worker = worker_factory("lossy", "--fault", "drop-first-result")
    ran = tmp_path / "ran"
    with connect(worker.address, key_file=worker.key_file) as c:
        ns = {"ran": str(ran)}
        t0 = time.monotonic()
        c.run("with open(ran, 'a') as f:\n    f.write('x')\nanswer = 42", ns)
        assert ns["answer"] == 42
        assert time.monotonic() - t0 < 10
    assert ran.read_text() == "x"  # once
    assert "fault injection: dropped the result" in worker.log()


def test_a_retried_request_runs_once(client, tmp_path):
    from lan2gpu_magic.client import OutputHandlers
    from worker_kernel.protocol import messages as m
    from worker_kernel.protocol.messages import Message
    from worker_kernel.protocol.serialize import dump_values

    ran = tmp_path / "ran"
    payload, _ = dump_values({"ran": str(ran)})
    code = "import time\nwith open(ran, 'a') as f:\n    f.write('x')\ntime.sleep(0.5)\nv = 7"
    content = {"code": code, "inputs": payload.entries, "outputs": ["v"]}
    first = client.connection.message(
        m.EXECUTE, content, buffers=payload.frames, session=client.session
    )
    first.content["request"] = first.id
    # The same request again, as a client unsure whether the first arrived sends it.
    again = Message(
        kind=m.EXECUTE,
        content=dict(first.content),
        buffers=payload.frames,
        session=client.session,
        to=client.info.instance,
    )
    client.ping()
    client.connection.send(first)
    client.connection.send(again)
    reply = client.wait(first, OutputHandlers(stream=lambda *_: None))
    assert reply.content["status"] == "ok"
    time.sleep(1.0)
    client.connection.send(
        Message(
            kind=m.EXECUTE,
            content=dict(first.content),
            buffers=payload.frames,
            session=client.session,
            to=client.info.instance,
        )
    )
    time.sleep(1.0)
    assert ran.read_text() == "x"  # three requests, one run


def test_a_flood_of_bad_messages_does_not_starve_a_running_cell(shared_worker):
    import zmq

    stop = threading.Event()

    def flood() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        key_holder(sock, shared_worker.key_file)
        sock.connect(shared_worker.address)
        junk = [b"L2G", VERSION, b"ping", b"{}", b"x" * 32]
        while not stop.is_set():
            for _ in range(500):
                sock.send_multipart(junk)
            while sock.poll(0):
                sock.recv_multipart()
        sock.close()
        ctx.term()

    floods = [threading.Thread(target=flood) for _ in range(2)]
    for f in floods:
        f.start()
    try:
        with connect(shared_worker.address, key_file=shared_worker.key_file) as c:
            ns: dict = {}
            c.run("import time\ntime.sleep(6)\ndone = True", ns)  # heartbeats keep flowing
            assert ns["done"] is True
    finally:
        stop.set()
        for f in floods:
            f.join(30)


def test_a_client_that_stops_reading_gets_all_its_output_later(shared_worker):
    from lan2gpu_magic import OutputHandlers

    texts: list[str] = []
    paused = {"done": False}

    def stream(name: str, text: str) -> None:
        if not paused["done"]:
            paused["done"] = True
            time.sleep(5)  # a notebook busy elsewhere: the worker must hold, not drop
        texts.append(text)  # pieces need not end at a line break

    with connect(shared_worker.address, key_file=shared_worker.key_file) as c:
        code = "for i in range(20000):\n    print(i, flush=True)"
        c.run(code, {}, handlers=OutputHandlers(stream=stream), timeout=120)
    assert "".join(texts).splitlines() == [str(i) for i in range(20000)]


def test_cancelling_a_waiting_cell_releases_its_reservation(worker_factory):
    worker = worker_factory("reserve", "--simulated-gpus", "2")
    with (
        connect(worker.address, key_file=worker.key_file) as a,
        connect(worker.address, key_file=worker.key_file) as c,
    ):
        holder = threading.Thread(
            target=a.run, args=("import time\ntime.sleep(8)", {}), kwargs={"gpus": (0,)}
        )
        holder.start()
        time.sleep(1.0)
        script = (
            "import sys\nfrom lan2gpu_magic import connect\n"
            "with connect(sys.argv[1], key_file=sys.argv[2]) as b:\n"
            "    print('go', flush=True)\n"
            "    b.run('x = 1', {}, gpus=(0, 1))\n"
        )
        b = subprocess.Popen(
            [sys.executable, "-c", script, worker.address, str(worker.key_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert b.stdout is not None and b.stdout.readline().strip() == "go"
            time.sleep(1.0)  # b waits for GPU 0 and holds GPU 1 for itself
            b.kill()  # the worker cancels b once its heartbeats stop
        finally:
            b.wait(10)
            if b.stdout is not None:
                b.stdout.close()
        t0 = time.monotonic()
        c.run("y = 2", {}, gpus=(1,))  # GPU 1 is free again once b is cancelled
        assert time.monotonic() - t0 < 7.5  # well before the holder's cell ends
        holder.join(30)


def test_timeout_counts_the_wait_in_the_queue(worker_factory):
    worker = worker_factory("busy-box")
    with connect(worker.address, key_file=worker.key_file) as hog:
        blocker = threading.Thread(
            target=lambda: hog.run("import time\ntime.sleep(12)", {}, session="first"),
            daemon=True,
        )
        blocker.start()
        time.sleep(1.0)  # the GPU is taken
        with connect(worker.address, key_file=worker.key_file) as c:
            t0 = time.monotonic()
            with pytest.raises(ExecutionTimeout, match="did not start within its --timeout"):
                c.run("x = 1", {}, timeout=3, session="second")
            assert time.monotonic() - t0 < 8
            blocker.join(30)
            assert c.run("x = 1", {}, timeout=3, session="second").outputs == {"x": 1}
