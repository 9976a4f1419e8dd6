"""Whole Jupyter kernels on this worker, for IDEs (``python -m lan2gpu_magic.kernel``).

A forwarder on the notebook machine asks, over the signed and encrypted
channel, for a kernel with some GPUs; this starts a real ipykernel that listens
on Unix sockets in a 0700 folder only (never on the network), with the Jupyter
key the forwarder chose (so the frames it relays verify unchanged), pinned to
those GPUs (or the simulator). Its traffic travels inside the forwarder's
lan2gpu connection (:mod:`kernel_relay`).
A kernel is shut down when its forwarder says so, when the forwarder's
heartbeats stop for longer than ``grace``, or when the worker stops; if a kernel
dies on its own, its forwarder is told, and exits so the IDE offers a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from . import child_output, reaper
from .capabilities import gpu_env
from .kernel_relay import KernelRelay

log = logging.getLogger(__name__)

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
_START_TIMEOUT = 60.0
_MAX_SOCKET_DIR = 90  # + "/" + 8 + "-N" stays under the 107 bytes of a Unix socket path


class KernelError(Exception):
    """A kernel could not be started; the message says why."""


@dataclass(eq=False)
class RemoteKernel:
    id: str
    owner: str  # the forwarder's client id
    owner_rid: bytes
    gpus: list[int]
    process: asyncio.subprocess.Process
    connection: dict[str, Any]
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)  # from its forwarder
    stopping: bool = False
    relay: KernelRelay | None = None
    output: child_output.ChildOutput | None = None  # its stdout/stderr, into the log

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "gpus": self.gpus,
            "pid": self.process.pid,
            "started": self.started,
            "idle": time.monotonic() - self.last_activity,
        }


Notify = Callable[[RemoteKernel, int], Awaitable[None]]
# (kernel, channel, frontend identity, frames): kernel output for its forwarder
Forward = Callable[[RemoteKernel, str, bytes, list[Any]], Awaitable[None]]


class KernelHost:
    """Owns the kernel processes and their connection files."""

    def __init__(
        self,
        *,
        ctx: zmq.asyncio.Context,
        simulate: bool,
        max_kernels: int,
        grace: float,
        on_death: Notify,
        on_frames: Forward,
    ) -> None:
        self.ctx = ctx
        self._on_frames = on_frames
        self.simulate = simulate
        self.max_kernels = max_kernels
        self.grace = grace
        self._on_death = on_death
        self._dir = Path(tempfile.mkdtemp(prefix="lan2gpu-kernels-"))  # 0700
        if len(str(self._dir)) > _MAX_SOCKET_DIR:  # a long $TMPDIR: Unix socket paths are short
            self._dir.rmdir()
            self._dir = Path(tempfile.mkdtemp(prefix="lan2gpu-kernels-", dir="/tmp"))
        self.kernels: dict[str, RemoteKernel] = {}
        self._starting = 0  # kernels being started (they count against the limit)
        self._watchers: set[asyncio.Task[None]] = set()

    async def start(
        self, owner: str, owner_rid: bytes, gpus: list[int], key: str, scheme: str
    ) -> RemoteKernel:
        if len(self.kernels) + self._starting >= self.max_kernels:
            raise KernelError(
                f"this worker already hosts {len(self.kernels)} kernels, its --max-kernels; "
                "shut one down or use another worker"
            )
        self._starting += 1
        try:
            return await self._start(owner, owner_rid, gpus, key, scheme)
        finally:
            self._starting -= 1

    async def _start(
        self, owner: str, owner_rid: bytes, gpus: list[int], key: str, scheme: str
    ) -> RemoteKernel:
        kernel_id = secrets.token_hex(8)
        conn_file = self._dir / f"kernel-{kernel_id}.json"
        # IPC, not TCP on 127.0.0.1: only this user can reach the sockets (the
        # folder is 0700), and no port is opened; the LAN reaches it only through
        # the relay, inside the forwarder's encrypted connection.
        base = str(self._dir / kernel_id[:8])
        info: dict[str, Any] = {
            "ip": base,
            "transport": "ipc",
            "key": key,
            "signature_scheme": scheme,
            **dict.fromkeys(PORTS, 0),  # the kernel picks free ports and writes them back
        }
        fd = os.open(conn_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        if self.simulate:
            env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        else:
            env = gpu_env(os.environ, gpus)
            env.pop("NUMBA_ENABLE_CUDASIM", None)
        env["LAN2GPU_CELL_GPUS"] = ",".join(map(str, gpus))
        # As jupyter_client does: a kernel with a parent prints no "--existing ..."
        # banner into our log, and exits if this worker dies.
        env["JPY_PARENT_PID"] = str(os.getpid())
        try:
            process, output = await child_output.spawn(
                f"kernel {kernel_id[:8]}",
                sys.executable,
                "-m",
                "worker_kernel.reaper",  # the reaper of its cells' orphans, then exec:
                sys.executable,
                "-m",
                "ipykernel_launcher",
                "-f",
                str(conn_file),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # signals for it come from its frontend, not ours
            )
        except BaseException:
            conn_file.unlink(missing_ok=True)
            raise
        try:
            connection = await self._ports(conn_file, process)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            await output.close()
            conn_file.unlink(missing_ok=True)
            raise
        endpoints = {p.removesuffix("_port"): f"ipc://{base}-{n}" for p, n in connection.items()}
        kernel = RemoteKernel(kernel_id, owner, owner_rid, gpus, process, connection)
        kernel.output = output

        async def forward(channel: str, identity: bytes, frames: list[Any]) -> None:
            await self._on_frames(kernel, channel, identity, frames)

        kernel.relay = KernelRelay(self.ctx, endpoints, forward)
        await kernel.relay.start()
        self.kernels[kernel_id] = kernel
        watcher = asyncio.create_task(self._watch(kernel, conn_file))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        log.info(
            "started kernel %s (pid %d) for client %s on GPU %s",
            kernel_id,
            process.pid,
            owner[:8],
            ",".join(map(str, gpus)) or "-",
        )
        return kernel

    async def _ports(self, conn_file: Path, process: asyncio.subprocess.Process) -> dict[str, Any]:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise KernelError(f"the kernel exited at start (code {process.returncode})")
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(conn_file.read_text())
                if all(int(info.get(p, 0)) > 0 for p in PORTS):
                    return {p: int(info[p]) for p in PORTS}
            await asyncio.sleep(0.05)
        raise KernelError(f"the kernel did not start within {_START_TIMEOUT:.0f} s")

    async def _watch(self, kernel: RemoteKernel, conn_file: Path) -> None:
        returncode = await kernel.process.wait()
        if kernel.output is not None:
            await kernel.output.close()
        reaper.reap_after_exit()
        self.kernels.pop(kernel.id, None)
        conn_file.unlink(missing_ok=True)
        for socket_file in self._dir.glob(f"{kernel.id[:8]}-*"):  # left by a killed kernel
            socket_file.unlink(missing_ok=True)
        if kernel.relay is not None:
            await kernel.relay.close()
        if kernel.stopping:
            log.info("kernel %s shut down", kernel.id)
            return
        if returncode == 0:  # its frontend asked it to shut down (shutdown_request)
            log.info("kernel %s exited (shut down by its frontend)", kernel.id)
        else:
            log.warning("kernel %s died (code %d)", kernel.id, returncode)
        await self._on_death(kernel, returncode)

    async def stop(self, kernel: RemoteKernel, grace: float = 5.0) -> None:
        """SIGTERM the kernel's process group, then SIGKILL after ``grace``."""
        kernel.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kernel.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(kernel.process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(kernel.process.pid, signal.SIGKILL)
            await kernel.process.wait()

    def orphans(self, alive: Callable[[str], float]) -> list[RemoteKernel]:
        """Kernels whose forwarder has been silent longer than the grace period.

        ``alive(owner)`` gives the seconds since that client was last heard from.
        """
        return [k for k in self.kernels.values() if not k.stopping and alive(k.owner) > self.grace]

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(k) for k in list(self.kernels.values())))
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)
        for leftover in self._dir.glob("*"):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._dir.rmdir()
