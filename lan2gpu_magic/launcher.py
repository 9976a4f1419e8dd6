"""Starting ``python -m worker_kernel`` as a child process, and knowing when it serves.

The one launcher of the project: the embedded worker, the tests and the
benchmarks all start workers through :func:`launch`. The worker writes its
address and instance to ``--ready-file`` once it listens; :func:`launch` waits for
that file, and if the worker exits or takes too long, stops it and raises
:class:`WorkerUnreachable` with the end of its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker_kernel.protocol.errors import WorkerUnreachable

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


def worker_argv(
    *,
    key_file: str | os.PathLike[str],
    name: str,
    ready_file: str | os.PathLike[str],
    bind: str = "tcp://127.0.0.1:*",
    simulate: str | None = "on",
    advertise: bool = False,
    log_level: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a worker (``simulate=None``: the worker's own default)."""
    argv = [sys.executable, "-m", "worker_kernel", "--bind", bind, "--key-file", str(key_file)]
    if simulate is not None:
        argv += ["--simulate", simulate]
    argv += ["--name", name, "--ready-file", str(ready_file)]
    if not advertise:
        argv.append("--no-advertise")
    if log_level is not None:
        argv += ["--log-level", log_level]
    return [*argv, *extra]


@dataclass
class Launched:
    """A started worker: its process, its log, and what its ready file said."""

    process: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.ready.get("address", ""))

    @property
    def instance(self) -> str:
        return str(self.ready.get("instance", ""))

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGCONT (a stopped one cannot exit), SIGTERM, then SIGKILL. Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def launch(
    argv: Sequence[str],
    *,
    ready_file: str | os.PathLike[str],
    log_path: str | os.PathLike[str],
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    cwd: str | os.PathLike[str] | None = None,
) -> Launched:
    """Start ``prefix + argv`` (e.g. ``ip netns exec NS``), its output appended to
    ``log_path``, and return once it wrote ``ready_file``.

    ``env`` is added to this process's environment.
    """
    ready, log_path = Path(ready_file), Path(log_path)
    ready.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child has its own copy of the descriptor
        process = subprocess.Popen(
            [*prefix, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
            cwd=cwd,
        )
    launched = Launched(process, log_path)
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                how = (
                    f"exited ({process.returncode})"
                    if process.poll() is not None
                    else (f"did not get ready within {timeout:g} s")
                )
                raise WorkerUnreachable(f"the worker {how}; its log ends:\n{launched.log_tail()}")
            time.sleep(0.02)
        launched.ready = json.loads(ready.read_text())  # written atomically
    except BaseException:
        launched.stop()
        raise
    return launched


__all__ = ["Launched", "launch", "worker_argv"]
