"""Processes: lan2gpu workers and helper servers, started and always stopped; /proc.

Every process the benchmark starts goes through :func:`spawn`, which hands back
a :class:`Child` that is a context manager: leaving the block stops the process
(SIGTERM, then SIGKILL) however the block was left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lan2gpu_magic.launcher import launch, worker_argv
from worker_kernel.protocol.errors import WorkerUnreachable

REPO = Path(__file__).resolve().parent.parent
START_DEADLINE = 60.0
STOP_GRACE = 10.0


@dataclass
class Child:
    """A started process, its log, and what it wrote to its ready file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop it (idempotent): SIGTERM, then SIGKILL after a grace period."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(
    name: str,
    argv: Sequence[str],
    work: Path,
    *,
    prefix: Sequence[str] = (),
    ready_file: Path | None = None,
) -> Child:
    """Start ``prefix + argv`` in the repository root, logging to ``work/NAME.log``.

    With ``ready_file``, wait until the process has written JSON there (its
    address, pid, ...) and return it in :attr:`Child.ready`.
    """
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / f"{name}.log"
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*prefix, *argv],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    child = Child(name, process, log_path)
    if ready_file is None:
        return child
    deadline = time.monotonic() + START_DEADLINE
    try:
        while True:
            if ready_file.exists():
                child.ready = json.loads(ready_file.read_text())  # written atomically
                return child
            if process.poll() is not None or time.monotonic() > deadline:
                state = "exited" if process.poll() is not None else "did not get ready"
                raise RuntimeError(f"{name} {state}; its log ends:\n{child.log_tail()}")
            time.sleep(0.02)
    except BaseException:
        child.stop()
        raise


def keygen(work: Path) -> Path:
    """A fresh shared key under ``work`` (``python -m worker_kernel keygen``)."""
    from worker_kernel.protocol.keys import generate_key_file

    path = work / "key"
    if not path.exists():
        generate_key_file(path)
    return path


def start_worker(
    work: Path,
    key_file: Path,
    name: str,
    *,
    bind: str = "tcp://127.0.0.1:*",
    prefix: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> Child:
    """``python -m worker_kernel --simulate`` on ``bind`` (``extra`` flags added), ready
    to serve."""
    ready = work / f"{name}.ready"
    argv = worker_argv(
        key_file=key_file, name=name, ready_file=ready, bind=bind, log_level="WARNING",
        extra=extra,
    )  # fmt: skip
    try:
        launched = launch(
            argv, ready_file=ready, log_path=work / f"{name}.log", timeout=START_DEADLINE,
            prefix=prefix, cwd=REPO,
        )  # fmt: skip
    except WorkerUnreachable as exc:
        raise RuntimeError(f"{name}: {exc}") from None
    return Child(name, launched.process, launched.log_path, launched.ready)


def run_client(what: str, argv: Sequence[str], worker: Child, deadline: float) -> Any:
    """Run a measuring client to its end; the JSON it printed last.

    Raises ``RuntimeError`` with its stderr and the worker's log if it failed.
    """
    done = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=deadline, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the {what} client failed ({done.returncode}):\n{done.stderr[-2000:]}\n"
            f"worker log:\n{worker.log_tail()}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def proc_status(pid: int | str) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/PID/status`` (VmRSS, VmHWM, ...) in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    return fields


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from ``/proc/*/stat``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)
