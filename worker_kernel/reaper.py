"""Every process a cell starts ends with its executor, however it detached.

Killing an executor's process group stops what its cells started, except what
left the group: ``setsid``, or a daemon's double fork. On Linux the service,
each executor and each hosted kernel are *child subreapers*
(``PR_SET_CHILD_SUBREAPER``): an orphan is re-parented to the nearest of them,
never to init, so nothing escapes the tree.

- While an executor (or kernel) lives, its cells' orphans are its own children:
  a server a session started keeps running with its session.
- When it ends, they land on the service. The service's only legitimate children
  are the processes it spawned (:func:`worker_kernel.child_output.spawn`), so
  every other child is an orphan of an ended executor or kernel: it is killed,
  with its descendants, and reaped (:func:`kill_orphans`).

Elsewhere (no ``prctl``) this degrades to the process-group kill alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Collection
from pathlib import Path

from .child_output import SPAWNED
from .protocol.pids import state

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class _State:
    subreaper = False  # this process became one: its unknown children are orphans


_STATE = _State()


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux); whether it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _STATE.subreaper = int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        _STATE.subreaper = False
    return _STATE.subreaper


def _children(pid: int) -> list[int]:
    """The children of ``pid`` (``/proc/PID/task/*/children``: no scan of all /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(p) for p in task.read_text().split()]
    return found


def kill_orphans(known: Collection[int]) -> list[int]:
    """Kill (SIGKILL) this process's children that are not in ``known``, and all
    their descendants; reap those that are gone. Returns the pids that still ran.

    Synchronous and quick (it reads the children lists, not all of /proc): called
    on the event loop, where no spawn is half-way when ``SPAWNED.starting`` is 0.
    """
    if not Path("/proc/self/task").exists():
        return []
    orphans = [pid for pid in _children(os.getpid()) if pid not in known]
    victims: list[int] = []
    todo = list(orphans)
    while todo:
        pid = todo.pop()
        victims.append(pid)
        todo += _children(pid)
    running = [pid for pid in victims if state(pid) not in ("Z", "X")]
    for pid in running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in orphans:  # ours to reap; their own children are re-parented to us as they die
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    if running:
        log.info("stopped %d process(es) left by ended cells: %s", len(running), running)
    return running


def reap() -> list[int]:
    """:func:`kill_orphans` with the processes :func:`child_output.spawn` started as
    the known children. While a spawn is half-way (its pid not known yet), it tries
    again shortly instead."""
    if not _STATE.subreaper:
        return []  # a process that is no subreaper may have children of its own
    if SPAWNED.starting:
        with contextlib.suppress(RuntimeError):  # no running loop: the next call will do
            asyncio.get_running_loop().call_later(0.2, reap)
        return []
    try:
        return kill_orphans(SPAWNED.pids)
    except Exception:  # never let cleanup stop the caller (answering the cell comes next)
        log.exception("could not stop the processes left by ended cells")
        return []


def reap_after_exit() -> None:
    """An executor or kernel just ended: its orphans are ours now. Again a little
    later, for their own children (re-parented as they die) and for zombies; the
    heartbeat's pass catches any later still."""
    reap()
    with contextlib.suppress(RuntimeError):
        loop = asyncio.get_running_loop()
        for delay in (0.5, 2.0):
            loop.call_later(delay, reap)


def reap_adopted_zombies(every: float = 5.0, after: float = 30.0) -> threading.Thread:
    """In an executor: reap adopted orphans that ended (a subreaper gets them as
    children, and nobody else waits for them). A zombie is reaped once it has been
    one for ``after`` seconds, so a child the cell itself waits for (``Popen.wait``)
    is left to the cell."""

    def run() -> None:
        first_seen: dict[int, float] = {}
        while True:
            time.sleep(every)
            now = time.monotonic()
            zombies = {pid for pid in _children(os.getpid()) if state(pid) == "Z"}
            first_seen = {pid: first_seen.get(pid, now) for pid in zombies}
            for pid, since in list(first_seen.items()):
                if now - since >= after:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                    del first_seen[pid]

    thread = threading.Thread(target=run, name="lan2gpu-zombies", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    """``python -m worker_kernel.reaper PROGRAM ARGS...``: become a subreaper, then
    exec the program (same pid; the setting survives exec). For hosted kernels."""
    args = sys.argv[1:] if argv is None else argv
    become_subreaper()
    os.execv(args[0], args)  # noqa: S606 - our own argv (the kernel launcher), no shell


if __name__ == "__main__":
    main()
