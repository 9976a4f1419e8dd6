"""A hostile peer on the LAN, without the key: what it can no longer do by default.

Workers encrypt every connection with CurveZMQ keys derived from the shared key,
so a peer without the key is refused during the handshake, before the worker
holds any of its bytes; hosted kernels listen on 127.0.0.1 only, their traffic
inside the encrypted connection. (The worker here binds 127.0.0.2, standing in
for its LAN interface.)
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import zmq

from lan2gpu_magic import connect
from lan2gpu_magic.errors import ConfigurationError
from worker_kernel.protocol.curve import CLIENT, ensure_keypair, key_dir, load_keypair
from worker_kernel.protocol.messages import PROTOCOL_VERSION

from ..waiting import wait_until

VERSION = str(PROTOCOL_VERSION).encode()

pytestmark = pytest.mark.faults

LAN = "tcp://127.0.0.2:*"  # the worker's "LAN" address in these tests


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed since the listing: a live process opens and closes files
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _listening(pid: int) -> set[str]:
    """``ip:port`` of every TCP socket process ``pid`` listens on."""
    inodes = _socket_inodes(pid)
    found = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes:  # LISTEN
            host, port = local.split(":")
            ip = socket.inet_ntoa(bytes.fromhex(host)[::-1])
            found.add(f"{ip}:{int(port, 16)}")
    return found


@pytest.fixture
def lan_worker(worker_factory):
    return worker_factory("lan-box", "--handshake-timeout", "2", bind=LAN)


@pytest.fixture(params=["shared key", "per-user keys"])
def guarded(request, worker_factory):
    """A worker in either encrypted mode, and what a legitimate client connects with."""
    if request.param == "shared key":
        return worker_factory("lan-box", "--handshake-timeout", "2", bind=LAN), {}
    worker = worker_factory("lan-box", "--handshake-timeout", "2", "--encrypt", bind=LAN)
    keys = key_dir(worker.key_file)
    public, _ = ensure_keypair(keys, CLIENT)  # the client key connect() uses by default
    shutil.copy(public, keys / "authorized_keys" / "me.key")
    return worker, {"server_key": keys / "worker.key"}


def test_a_keyless_peer_is_refused_before_the_worker_holds_its_bytes(guarded):
    lan_worker, how = guarded
    rss = _rss(lan_worker.pid)
    ctx = zmq.Context()
    try:
        for curve in (False, True):  # plain ZeroMQ, and CurveZMQ with guessed keys
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            if curve:
                public, secret = zmq.curve_keypair()
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
                    zmq.curve_keypair()[0],
                    public,
                    secret,
                )
            sock.connect(lan_worker.address)
            block = os.urandom(1 << 20)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # push ~a GiB at it, if it would take it
                try:
                    sock.send_multipart(
                        [b"L2G", VERSION, b"execute", b"{}", b"x", block], zmq.NOBLOCK
                    )
                except zmq.Again:
                    time.sleep(0.01)
            sock.close()
    finally:
        ctx.term()
    time.sleep(0.5)
    assert _rss(lan_worker.pid) - rss < 64 << 20, "the worker held a keyless peer's bytes"
    assert "rejected a message" not in lan_worker.log()  # nothing even reached verification
    with connect(lan_worker.address, key_file=lan_worker.key_file, **how) as c:
        assert c.run("ok = 1", {}).outputs == {"ok": 1}


def test_idle_connections_are_dropped_and_do_not_lock_clients_out(guarded):
    lan_worker, how = guarded
    url = urlsplit(lan_worker.address)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2_300
    if hard < wanted:
        pytest.skip(f"this machine allows only {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    before, rss = _open_fds(lan_worker.pid), _rss(lan_worker.pid)
    # A ZMTP 3 greeting asking for CURVE: each connection then waits for its HELLO.
    greeting = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\0") + bytes(32)
    idle: list[socket.socket] = []
    try:
        for _ in range(2_000):
            idle.append(socket.create_connection((url.hostname, url.port), timeout=5))
            idle[-1].sendall(greeting)
        assert _rss(lan_worker.pid) - rss < 64 << 20  # pending handshakes cost KiB each
        # With all of them open, a client with the key still gets in.
        t0 = time.monotonic()
        with connect(
            lan_worker.address, key_file=lan_worker.key_file, connect_timeout=20, **how
        ) as c:
            assert c.run("ok = 1", {}).outputs == {"ok": 1}
        assert time.monotonic() - t0 < 20
        # None of them finished a handshake: dropped after --handshake-timeout (2 s).
        wait_until(
            lambda: _open_fds(lan_worker.pid) <= before + 50, 30, "the idle peers to be dropped"
        )
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert lan_worker.alive()


def _unix_listening(pid: int) -> set[str]:
    """Paths of the Unix sockets process ``pid`` listens on."""
    inodes = _socket_inodes(pid)
    found = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000: listening
        if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
            found.add(fields[7])
    return found


def test_hosted_kernels_listen_on_no_network_port(lan_worker):
    """A hosted kernel's five channels are Unix sockets in a folder only the worker's
    user can enter (no port at all); the LAN reaches it only through the relay."""
    with connect(lan_worker.address, key_file=lan_worker.key_file) as c:
        kernel = c.start_kernel(secrets.token_hex(16))
        try:
            pid = next(k["pid"] for k in c.status(detail=True)["kernels"] if k["id"] == kernel)
            wait_until(lambda: len(_unix_listening(pid)) >= 5, 30, "the kernel's five channels")
            sockets = _unix_listening(pid)
            # No channel on TCP; ipykernel's own pipe for its subprocesses' output (one
            # port) is on loopback, as before.
            assert len(_listening(pid)) <= 1
            assert {p.split(":")[0] for p in _listening(pid)} <= {"127.0.0.1"}
            for path in sockets:
                folder = Path(path).parent
                assert folder.stat().st_mode & 0o077 == 0, folder  # nobody else gets in
                assert folder.stat().st_uid == os.getuid()
        finally:
            c.stop_kernel(kernel)


def test_secret_key_files_readable_by_others_are_refused(tmp_path):
    _, secret = ensure_keypair(tmp_path / "keys", CLIENT)
    secret.chmod(0o644)
    with pytest.raises(ConfigurationError, match=f"chmod 600 {secret}"):
        load_keypair(secret)
    secret.chmod(0o600)
    assert load_keypair(secret)[1]


# -- a peer with the key that is not a kernel's owner, or floods its own kernel ---------


def _kernel_frames(c, kernel: str, channel: str, frames: list[bytes]) -> None:
    from worker_kernel.protocol import messages as m

    content = {"kernel": kernel, "channel": channel, "identity": b"frontend".hex()}
    c.connection.send(c.connection.message(m.KERNEL_FRAMES, content, buffers=frames))


def test_a_kernel_that_stops_reading_does_not_stall_the_worker(lan_worker):
    import os as _os
    import signal

    with connect(lan_worker.address, key_file=lan_worker.key_file) as owner:
        kernel = owner.start_kernel(secrets.token_hex(16))
        pid = next(k["pid"] for k in owner.status(detail=True)["kernels"] if k["id"] == kernel)
        _os.kill(pid, signal.SIGSTOP)  # wedged: reads nothing more
        try:
            for _ in range(3000):
                _kernel_frames(owner, kernel, "shell", [b"x" * 16_000])
            _kernel_frames(owner, kernel, "hb", [])  # malformed: answered, not fatal
            with connect(lan_worker.address, key_file=lan_worker.key_file, connect_timeout=10) as c:
                assert c.run("ok = 1", {}, timeout=30).outputs == {"ok": 1}
        finally:
            _os.kill(pid, signal.SIGCONT)
            owner.stop_kernel(kernel)
    assert lan_worker.alive()


def test_only_the_connection_that_started_a_kernel_controls_it(lan_worker, monkeypatch):
    with connect(lan_worker.address, key_file=lan_worker.key_file) as owner:
        kernel = owner.start_kernel(secrets.token_hex(16))
        listed = next(k for k in owner.status(detail=True)["kernels"] if k["id"] == kernel)
        # Another key holder claims the owner's client id in its handshake.
        import lan2gpu_magic.connection as connection_module

        monkeypatch.setattr(connection_module, "new_id", lambda: listed["owner"])
        with connect(lan_worker.address, key_file=lan_worker.key_file) as other:
            other.stop_kernel(kernel)
        kernels = [k["id"] for k in owner.status(detail=True)["kernels"]]
        assert kernel in kernels, "another connection stopped the kernel"
        owner.stop_kernel(kernel)


def test_kernels_started_at_once_respect_max_kernels(worker_factory):
    import threading

    worker = worker_factory("two-kernels", "--max-kernels", "2")
    started: list[str] = []
    refused: list[str] = []

    release = threading.Event()

    def start() -> None:
        with connect(worker.address, key_file=worker.key_file) as c:
            try:
                kernel = c.start_kernel(secrets.token_hex(16))
            except Exception as exc:  # the refusal names the limit
                refused.append(str(exc))
                return
            started.append(kernel)
            release.wait(120)  # held until every start was answered
            c.stop_kernel(kernel)

    threads = [threading.Thread(target=start) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(started) + len(refused) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    release.set()
    for t in threads:
        t.join(120)
    assert len(started) <= 2 < len(started) + len(refused) == 5
    assert all("--max-kernels" in r for r in refused)


def test_a_cell_flooding_its_stderr_does_not_flood_the_worker_log(lan_worker):
    before = Path(lan_worker.log_path).stat().st_size
    flood = (
        "import os\n"
        "line = b'x' * 5000 + b'\\n'\n"
        "for _ in range(10_000):\n"
        "    os.write(2, line)\n"  # 50 MB past Python's sys.stderr, as C code writes
        "os.write(1, b'y' * 300_000)\n"  # and one line with no end
        "done = True"
    )
    with connect(lan_worker.address, key_file=lan_worker.key_file) as c:
        assert c.run(flood, {}, timeout=120).outputs["done"] is True
        assert c.run("ok = 1", {}).outputs == {"ok": 1}
    deadline = time.monotonic() + 10
    while "lines of output" not in lan_worker.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    grown = Path(lan_worker.log_path).stat().st_size - before
    assert grown < 1 << 20, f"the worker log grew by {grown} bytes"
    assert "lines of output" in lan_worker.log()  # the flood is summarized, not hidden
