"""A local worker started on demand, so a notebook works with no setup at all.

It listens on 127.0.0.1 only, uses a throwaway key made on the fly, simulates
CUDA when this machine has no GPU, and stops with the notebook's kernel (the
worker also watches this process and exits if it dies).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from worker_kernel.protocol.errors import WorkerUnreachable
from worker_kernel.protocol.keys import generate_key_file
from worker_kernel.protocol.pids import alive

from .launcher import Launched, launch, worker_argv

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
        simulate: str | None = "auto",
        simulated_gpus: int | None = 1,
        start_timeout: float = 120.0,
        bind: str = "tcp://127.0.0.1:*",
        extra: Sequence[str] = (),
        parent: int | None = None,
    ) -> None:
        """``simulate=None`` and ``simulated_gpus=None`` leave them to the worker's
        ``LAN2GPU_*`` environment; ``bind="ipc"``: an ``ipc://`` socket in the worker's
        own 0700 directory (only this user reaches it); ``extra``: more worker flags;
        ``parent``: the process the worker watches (default this one)."""
        self.name = name
        self._bind = bind
        self._extra = list(extra)
        self._parent = os.getpid() if parent is None else parent
        self._simulate = simulate
        self._simulated_gpus = simulated_gpus
        self._start_timeout = start_timeout
        self._dir: Path | None = None
        self._launched: Launched | None = None
        self.address = ""
        self.key_file: Path | None = None

    def start(self) -> str:
        """Start the worker and return its address once it listens."""
        if self._launched is not None:
            return self.address
        remove_stale()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        self.key_file = generate_key_file(self._dir / "key")
        ready = self._dir / "ready.json"
        bind = f"ipc://{self._dir / 'service'}" if self._bind == "ipc" else self._bind
        gpus = (
            [] if self._simulated_gpus is None else ["--simulated-gpus", str(self._simulated_gpus)]
        )
        argv = worker_argv(
            key_file=self.key_file,
            name=self.name,
            ready_file=ready,
            bind=bind,
            simulate=self._simulate,
            extra=[
                *gpus,
                "--parent-pid",
                str(self._parent),
                "--cleanup-dir",  # even if this process is killed before close()
                str(self._dir),
                *self._extra,
            ],
        )
        try:
            self._launched = launch(
                argv,
                ready_file=ready,
                log_path=self._dir / "worker.log",
                timeout=self._start_timeout,
            )
        except WorkerUnreachable as exc:
            self.close()
            raise WorkerUnreachable(f"the local worker did not start: {exc}") from None
        self.address = self._launched.address
        return self.address

    def __enter__(self) -> EmbeddedWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._launched is not None and self._launched.process.poll() is None

    def close(self) -> None:
        """Stop the worker (SIGTERM, then SIGKILL) and remove its files. Idempotent."""
        launched, self._launched = self._launched, None
        if launched is not None:
            launched.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
