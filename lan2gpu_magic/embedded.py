"""A local worker started on demand, so a notebook works with no setup at all.

It listens on 127.0.0.1 only, uses a throwaway key made on the fly, simulates
CUDA when this machine has no GPU, and stops with the notebook's kernel (the
worker also watches this process and exits if it dies).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from worker_kernel.protocol.errors import WorkerUnreachable
from worker_kernel.protocol.keys import generate_key_file
from worker_kernel.protocol.pids import alive

PREFIX = "lan2gpu-embedded-"  # then the owner's pid, then a random part


def remove_stale(folder: Path | None = None) -> list[Path]:
    """Remove the folders of embedded workers whose notebook process is gone (killed
    before it could clean up); ours and live ones are kept. Returns what was removed."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        owner = path.name.removeprefix(PREFIX).split("-", 1)[0]
        with contextlib.suppress(OSError):
            info = path.lstat()  # a symlink named like ours is not ours
            mine = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            if owner.isdigit() and mine and not alive(int(owner)):
                shutil.rmtree(path)
                removed.append(path)
    return removed


class EmbeddedWorker:
    """Owns one ``python -m worker_kernel`` subprocess and its temporary directory.

    Also handy as a stand-in for GPU hosts when trying things out::

        with EmbeddedWorker(name="big-box", simulate="on", simulated_gpus=2) as w:
            ...  # %lan2gpu connect {w.address} --key-file {w.key_file}
    """

    def __init__(
        self,
        *,
        name: str = "local",
        simulate: str = "auto",
        simulated_gpus: int = 1,
        start_timeout: float = 120.0,
    ) -> None:
        self.name = name
        self._simulate = simulate
        self._simulated_gpus = simulated_gpus
        self._start_timeout = start_timeout
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.address = ""
        self.key_file: Path | None = None

    def start(self) -> str:
        """Start the worker and return its address once it listens."""
        if self._process is not None:
            return self.address
        remove_stale()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        self.key_file = generate_key_file(self._dir / "key")
        ready = self._dir / "ready.json"
        log_path = self._dir / "worker.log"
        log = open(log_path, "wb")  # noqa: SIM115 - owned until close()
        self._log = log
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker_kernel",
                "--bind",
                "tcp://127.0.0.1:*",
                "--key-file",
                str(self.key_file),
                "--simulate",
                self._simulate,
                "--name",
                self.name,
                "--simulated-gpus",
                str(self._simulated_gpus),
                "--no-advertise",
                "--ready-file",
                str(ready),
                "--parent-pid",
                str(os.getpid()),
                "--cleanup-dir",  # even if this process is killed before close()
                str(self._dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self._start_timeout
        while not ready.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                try:
                    tail = log_path.read_text(errors="replace")[-2000:]
                except OSError:
                    tail = "(no log)"
                self.close()
                raise WorkerUnreachable(
                    "the local worker did not start "
                    f"(within {self._start_timeout:.0f} s); its log says:\n{tail}"
                )
            time.sleep(0.05)
        self.address = str(json.loads(ready.read_text())["address"])
        return self.address

    def __enter__(self) -> EmbeddedWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def close(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL) and remove its files. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
