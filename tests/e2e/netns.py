"""Two network namespaces joined by a veth pair: a worker's host and a notebook's, with a
real link between them that a test can cut (for discovery and for lost networks)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from lan2gpu_magic.launcher import launch, worker_argv


@dataclass
class Lan:
    worker_ns: str
    client_ns: str
    worker_ip: str
    worker_link: str  # the veth end inside worker_ns

    def cut(self) -> None:
        """Take the worker's end of the link down: its packets go nowhere, as when a
        cable is pulled or a host loses power (no FIN, no RST)."""
        done = ip("-n", self.worker_ns, "link", "set", self.worker_link, "down")
        assert done.returncode == 0, done.stderr


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def two_hosts() -> Iterator[Lan]:
    """Skips the test where namespaces cannot be made (not root, no iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = secrets.token_hex(3)
    w, c, vw, vc = f"l2g-w-{tag}", f"l2g-c-{tag}", f"l2gw{tag}", f"l2gc{tag}"
    subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
    if ip("netns", "add", w).returncode != 0:
        pytest.skip("this machine does not allow creating network namespaces")
    try:
        steps = [
            ("netns", "add", c),
            ("link", "add", vw, "type", "veth", "peer", "name", vc),
            ("link", "set", vw, "netns", w),
            ("link", "set", vc, "netns", c),
            ("-n", w, "addr", "add", f"{subnet}.1/24", "dev", vw),
            ("-n", c, "addr", "add", f"{subnet}.2/24", "dev", vc),
            ("-n", w, "link", "set", vw, "up"),
            ("-n", c, "link", "set", vc, "up"),
            ("-n", w, "link", "set", "lo", "up"),
            ("-n", c, "link", "set", "lo", "up"),
            # mDNS needs a multicast route in each namespace.
            ("-n", w, "route", "add", "224.0.0.0/4", "dev", vw),
            ("-n", c, "route", "add", "224.0.0.0/4", "dev", vc),
        ]
        for step in steps:
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield Lan(w, c, f"{subnet}.1", vw)
    finally:
        ip("netns", "del", w)
        ip("netns", "del", c)


def start_worker(lan: Lan, tmp: Path, key: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``python -m worker_kernel`` on the worker's host, port 7340, once it listens."""
    argv = worker_argv(
        key_file=key, name="lanbox", ready_file=tmp / "ready.json",
        bind=f"tcp://{lan.worker_ip}:7340", advertise=True, extra=extra,
    )  # fmt: skip
    launched = launch(
        argv, ready_file=tmp / "ready.json", log_path=tmp / "worker.log", timeout=60,
        prefix=["ip", "netns", "exec", lan.worker_ns],
    )  # fmt: skip
    return launched.process


def on_client_host(lan: Lan, key: Path, script: str, timeout: float = 180) -> dict:
    """Run ``script`` in a Python on the notebook's host; the JSON its last line prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAN2GPU_")}
    env["LAN2GPU_KEY_FILE"] = str(key)
    done = subprocess.run(
        ["ip", "netns", "exec", lan.client_ns, sys.executable, "-c", script],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))
