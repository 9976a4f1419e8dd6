"""Encryption: by default CurveZMQ with keys derived from the shared key; with
``--encrypt``, a pinned worker key and an allow-list of client keys; plain text
only with ``--insecure-plaintext``."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lan2gpu_magic import connect
from lan2gpu_magic.errors import AuthenticationError
from worker_kernel.protocol.curve import CLIENT, ensure_keypair

from ..waiting import wait_until

pytestmark = pytest.mark.faults


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def encrypted(worker_factory, tmp_path):
    """An --encrypt worker, and a client key pair that is on its allow-list."""
    worker = worker_factory("secret-box", "--encrypt")
    keys = worker.key_file.parent
    server_key = keys / "worker.key"
    assert server_key.exists() and (keys / "worker.key_secret").stat().st_mode & 0o077 == 0
    client_dir = tmp_path / "laptop"
    client_dir.mkdir()
    out = _cli("lan2gpu_magic", "curve-keygen", "--key-file", str(client_dir / "key"))
    assert "client public key" in out
    shutil.copy(client_dir / "client.key", keys / "authorized_keys" / "laptop.key")
    return worker, server_key, client_dir / "client.key_secret"


def test_an_authorized_client_runs_cells_encrypted(encrypted):
    worker, server_key, client_key = encrypted
    listing = _cli("worker_kernel", "authorized-keys", "--key-file", str(worker.key_file))
    assert "laptop.key" in listing and "1 client key(s)" in listing
    from lan2gpu_magic.client import Client

    with Client(
        worker.address, key_file=worker.key_file, server_key=server_key, client_key=client_key
    ) as c:
        assert c.run("y = x * 2", {"x": 21}).outputs == {"y": 42}


def test_an_unknown_client_key_gets_nothing(encrypted, tmp_path):
    worker, server_key, _ = encrypted
    _, stranger = ensure_keypair(tmp_path / "stranger", CLIENT)
    from lan2gpu_magic.client import Client

    with pytest.raises(AuthenticationError, match="authorized_keys"):
        Client(
            worker.address,
            key_file=worker.key_file,
            server_key=server_key,
            client_key=stranger,
            connect_timeout=10,
        )
    # Nor does the shared key alone, nor a client in plain text.
    with pytest.raises(AuthenticationError):
        connect(worker.address, key_file=worker.key_file, connect_timeout=10)
    with pytest.raises(AuthenticationError):
        connect(worker.address, key_file=worker.key_file, connect_timeout=10, plaintext=True)
    assert worker.alive()


@contextmanager
def _capture_loopback() -> Iterator[bytearray]:
    """Every byte on the loopback interface while the block runs (root only)."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    except (PermissionError, AttributeError, OSError) as exc:
        pytest.skip(f"cannot capture packets here ({exc})")
    sock.bind(("lo", 0))
    sock.settimeout(0.1)
    seen = bytearray()
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            try:
                seen.extend(sock.recv(65535))
            except TimeoutError:
                continue

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(5)
        sock.close()


def _marked_cell(client) -> bytes:
    marker = f"MARKER-{secrets.token_hex(8)}"
    ns: dict = {}
    client.run(f"text = '{marker}' * 3\nprint(text)", ns, handlers=_quiet())
    assert marker in ns["text"]
    return marker.encode()


def _quiet():
    from lan2gpu_magic import OutputHandlers

    return OutputHandlers(stream=lambda *_: None)


def test_a_passive_capture_shows_no_plaintext_unless_asked_for(
    encrypted, shared_worker, worker_factory
):
    if os.geteuid() != 0:
        pytest.skip("capturing packets needs root")
    worker, server_key, client_key = encrypted
    from lan2gpu_magic.client import Client

    # Control: in plain text the marker is on the wire, so the capture works.
    plain_worker = worker_factory("plain", "--insecure-plaintext")
    with connect(plain_worker.address, key_file=plain_worker.key_file, plaintext=True) as plain:
        with _capture_loopback() as wire:
            marker = _marked_cell(plain)
        assert marker in wire
    assert "--insecure-plaintext" not in plain_worker.log()  # loopback: no warning
    # The default: encrypted with the shared key.
    with connect(shared_worker.address, key_file=shared_worker.key_file) as default:
        with _capture_loopback() as wire:
            marker = _marked_cell(default)
        assert len(wire) > 1000 and marker not in wire
    # Per-user keys.
    with Client(
        worker.address, key_file=worker.key_file, server_key=server_key, client_key=client_key
    ) as c:
        with _capture_loopback() as wire:
            marker = _marked_cell(c)
        assert len(wire) > 1000  # traffic was captured...
        assert marker not in wire  # ...and none of it is readable


def test_keygen_commands_keep_existing_keys(tmp_path):
    key = tmp_path / "k" / "key"
    _cli("worker_kernel", "keygen", "--key-file", str(key))
    first = _cli("worker_kernel", "curve-keygen", "--key-file", str(key))
    public = Path(first.split()[3])
    before = public.read_bytes()
    _cli("worker_kernel", "curve-keygen", "--key-file", str(key))
    assert public.read_bytes() == before


def test_with_per_user_keys_the_queue_is_fair_per_user_and_shows_whose_cells_wait(
    encrypted, tmp_path
):
    worker, server_key, alice_key = encrypted  # alice is "laptop" on the allow-list
    bob_dir = tmp_path / "bob"
    bob_dir.mkdir()
    _cli("lan2gpu_magic", "curve-keygen", "--key-file", str(bob_dir / "key"))
    shutil.copy(bob_dir / "client.key", worker.key_file.parent / "authorized_keys" / "bob.key")
    from lan2gpu_magic.client import Client

    def client(secret: Path) -> Client:
        return Client(
            worker.address, key_file=worker.key_file, server_key=server_key, client_key=secret
        )

    started: dict[str, float] = {}
    errors: list[BaseException] = []

    def run(secret: Path, session: str, code: str) -> None:
        try:
            with client(secret) as c:
                ns: dict[str, object] = {}
                c.run(code, ns, session=session, timeout=120)
                started[session] = float(ns["t"])  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    cell = "import time\nt = time.time()\ntime.sleep(0.2)"
    threads = [
        threading.Thread(target=run, args=(alice_key, "busy", "import time\nt = 0\ntime.sleep(4)"))
    ]
    # Alice opens a new session for every cell, to jump the queue; then Bob sends one.
    threads += [
        threading.Thread(target=run, args=(alice_key, f"alice-{i}", cell)) for i in range(3)
    ]
    threads.append(threading.Thread(target=run, args=(bob_dir / "client.key_secret", "bob", cell)))
    with client(alice_key) as watcher:
        threads[0].start()
        wait_until(lambda: watcher.status()["running"], 60, "the first cell to start")
        for thread in threads[1:]:
            thread.start()
            time.sleep(0.3)  # in this order
        queued = watcher.status()["queued"]
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    assert sorted(c["user"] for c in queued) == ["bob", "laptop", "laptop", "laptop"], queued
    # Bob waited for one of Alice's cells (the running one), not for all of her sessions.
    assert started["bob"] < min(started[f"alice-{i}"] for i in range(3)), started
