"""What executors and hosted kernels write to their stdout and stderr, into the
worker's log: line by line, each line cut short, and at most a steady trickle
of lines per process.

A cell or a remote kernel's user can write to file descriptors 1 and 2 as fast
as it likes (``os.write(2, ...)`` in a loop, a C library's chatter); inherited
as they were, those bytes went straight into the worker's log, which then
grew by hundreds of MiB a minute. Here a flood becomes one summary line a
second, and the pipe is always drained, so the child never blocks on a write
(a process it started and left running gets EPIPE once the child is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Final

log = logging.getLogger(__name__)

MAX_LINE: Final = 500  # characters of a line that reach the log
BURST: Final = 200  # lines logged at once before the rate applies
PER_SECOND: Final = 20.0  # lines a second, sustained
_READ: Final = 1 << 16


class LineBudget:
    """A token bucket of log lines (pure: the clock is passed in)."""

    def __init__(self, burst: int = BURST, per_second: float = PER_SECOND) -> None:
        self.burst, self.per_second = burst, per_second
        self._tokens = float(burst)
        self._at = float("-inf")
        self.dropped = 0  # lines not logged since the last summary
        self.dropped_bytes = 0

    def take(self, now: float) -> bool:
        """Spend one line if there is one to spend."""
        if self._at != float("-inf"):
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def drop(self, lines: int, nbytes: int) -> None:
        self.dropped += lines
        self.dropped_bytes += nbytes


class _Relay:
    """Splits a byte stream into lines for the log, spending a :class:`LineBudget`.

    Once the budget is spent, the rest of a chunk's lines are only counted
    (``bytes.count``, not a Python loop per line), so a stream of newlines
    costs the service next to nothing."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.budget = LineBudget()
        self._partial = b""  # the start of a line still to be ended (at most MAX_LINE)
        self._partial_bytes = 0
        self._summary_at = time.monotonic()

    def feed(self, chunk: bytes, now: float) -> None:
        pos = 0
        while (end := chunk.find(b"\n", pos)) >= 0:
            if not self.budget.take(now):
                last = chunk.rfind(b"\n")
                self.budget.drop(
                    chunk.count(b"\n", pos, last + 1), self._partial_bytes + last - pos
                )
                self._partial, self._partial_bytes, pos = b"", 0, last + 1
                break
            piece = chunk[pos : min(end, pos + MAX_LINE)]
            self._emit(self._partial + piece, self._partial_bytes + end - pos)
            self._partial, self._partial_bytes, pos = b"", 0, end + 1
        rest = len(chunk) - pos
        if rest:
            if len(self._partial) < MAX_LINE:
                self._partial += chunk[pos : pos + MAX_LINE - len(self._partial)]
            self._partial_bytes += rest
        if now - self._summary_at >= 1.0:
            self.summarize(now)

    def close(self, now: float) -> None:
        if self._partial_bytes:
            if self.budget.take(now):
                self._emit(self._partial, self._partial_bytes)
            else:
                self.budget.drop(1, self._partial_bytes)
        self.summarize(now)

    def _emit(self, line: bytes, nbytes: int) -> None:
        text = line[:MAX_LINE].decode(errors="replace").rstrip()
        if nbytes > MAX_LINE:
            text += f"... ({nbytes} bytes)"
        log.info("%s: %s", self.label, text)

    def summarize(self, now: float) -> None:
        budget = self.budget
        if budget.dropped:
            log.warning(
                "%s: %d more lines of output (%d bytes) not logged (over %g lines a second)",
                self.label,
                budget.dropped,
                budget.dropped_bytes,
                budget.per_second,
            )
            budget.dropped = budget.dropped_bytes = 0
        self._summary_at = now


class Spawned:
    """The processes :func:`spawn` started that have not ended, and how many spawns
    are half-way (forked, pid not known yet): :mod:`.reaper` must not take those
    for orphans."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.starting = 0


SPAWNED = Spawned()


async def spawn(
    label: str, *argv: str, **kwargs: Any
) -> tuple[asyncio.subprocess.Process, ChildOutput]:
    """``asyncio.create_subprocess_exec(*argv, **kwargs)`` with its stdout and
    stderr going into the log as ``label PID: ...``; close the output (after the
    process ended) with :meth:`ChildOutput.close`."""
    output = ChildOutput(label)
    SPAWNED.starting += 1
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=output.fd, stderr=output.fd, **kwargs
        )
        SPAWNED.pids.add(process.pid)
    except BaseException:
        await output.close()
        raise
    finally:
        SPAWNED.starting -= 1
    output.started(process.pid)
    output.pid = process.pid
    return process, output


class ChildOutput:
    """The pipe a child writes its stdout and stderr to, and the task that logs it.

    The pipe is made here, not by asyncio's subprocess transport: a process
    whose pipes belong to the transport is not reported as exited (``wait()``)
    while anything it started still holds them, and cleaning up after it waits
    for exactly that. :func:`spawn` uses it.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.pid: int | None = None  # the child's, once spawned
        self._read, self.fd = os.pipe()
        os.set_blocking(self._read, False)
        self._task: asyncio.Task[None] | None = None

    def started(self, pid: int | None = None) -> None:
        os.close(self.fd)
        self.fd = -1
        label = f"{self.label} {pid}" if pid is not None else self.label
        self._task = asyncio.create_task(self._run(label), name=f"output of {label}")

    async def _run(self, label: str) -> None:
        relay = _Relay(label)
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self._read, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                try:
                    chunk = os.read(self._read, _READ)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                relay.feed(chunk, time.monotonic())
        finally:
            loop.remove_reader(self._read)
            relay.close(time.monotonic())

    async def close(self, grace: float = 1.0) -> None:
        """Log what the child wrote last, then stop: a process the child started
        may hold the pipe open long after the child ended. Idempotent."""
        if self.pid is not None:
            SPAWNED.pids.discard(self.pid)  # it ended: no longer a child of ours
        if self.fd >= 0:  # never started: the spawn failed
            os.close(self.fd)
            self.fd = -1
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), grace)
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._read >= 0:
            os.close(self._read)
            self._read = -1
