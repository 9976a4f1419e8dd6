"""Whether a process still runs, for processes that watch their parent."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    if not Path("/proc/self/stat").exists():
        return True  # no /proc (not Linux): signal 0 is all there is
    return state(pid) not in ("Z", "X")


def state(pid: int) -> str:
    """The process's state letter from /proc (``R``, ``S``, ``Z`` ...); ``X``: gone."""
    try:
        # /proc/PID/stat: "pid (comm) state ...": comm may hold spaces and parentheses.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"
