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
from collections.abc import Collection
from pathlib import Path

from .child_output import SPAWNED

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


def _parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state), for every process (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(entry.name)] = int(fields[1]), fields[0]
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
    return found


def kill_orphans(known: Collection[int]) -> list[int]:
    """Kill (SIGKILL) this process's children that are not in ``known``, and all
    their descendants; reap those that are gone. Returns the pids killed.

    Synchronous and quick (one pass over /proc): called on the event loop, so no
    spawn can be half-way through (see :data:`child_output.spawning`).
    """
    if not Path("/proc/self/stat").exists():
        return []
    me = os.getpid()
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in parents.items():
        children.setdefault(parent, []).append(pid)
    orphans = [pid for pid in children.get(me, []) if pid not in known]
    victims: list[int] = []
    todo = list(orphans)
    while todo:
        pid = todo.pop()
        victims.append(pid)
        todo += children.get(pid, [])
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in orphans:  # ours to reap; the others are reaped by their parents first
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    running = [pid for pid in victims if parents[pid][1] not in ("Z", "X")]
    if running:
        log.info("stopped %d process(es) left by ended cells: %s", len(running), running)
    return victims


def reap() -> list[int]:
    """:func:`kill_orphans` with the processes :func:`child_output.spawn` started as
    the known children; nothing while a spawn is half-way (its pid is not known yet)."""
    if SPAWNED.starting or not _STATE.subreaper:
        return []  # a process that is no subreaper may have children of its own
    return kill_orphans(SPAWNED.pids)


def reap_after_exit() -> None:
    """An executor or kernel just ended: its orphans are ours now. Again a little
    later, for their own children (re-parented as they die) and for zombies."""
    reap()
    loop = asyncio.get_running_loop()
    for delay in (0.5, 2.0):
        loop.call_later(delay, reap)


def main(argv: list[str] | None = None) -> None:
    """``python -m worker_kernel.reaper PROGRAM ARGS...``: become a subreaper, then
    exec the program (same pid; the setting survives exec). For hosted kernels."""
    args = sys.argv[1:] if argv is None else argv
    become_subreaper()
    os.execv(args[0], args)  # noqa: S606 - our own argv (the kernel launcher), no shell


if __name__ == "__main__":
    main()
