"""One memory budget per worker, shared by its executors (``--memory-limit``).

Each executor's private writable memory is capped (``RLIMIT_DATA``): allocating
past the cap raises ``MemoryError`` in the cell, and the session goes on. A fixed
cap per executor let a few sessions add up past the host's RAM, so the service
moves the caps as the executors grow: after each cell and every heartbeat, each
executor may grow by what the budget has left, measured in resident memory
(anonymous and shared-memory pages: what the executors really hold, not the
address space libraries reserve, nor library pages every process shares), and by
no more than its session's share (``--session-memory``). A
session that would push the worker past the budget gets the ``MemoryError``; the
others keep what they hold.

Two executors allocating at the very same moment may each take what is left, so
the budget can be passed by that much until the next heartbeat. It guards against
accidents, not against a cell's own code: the service moves the soft limit, and a
cell could raise it again up to its hard limit (the session's share, or the whole
budget).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
from collections.abc import Iterable
from dataclasses import dataclass

SLACK = 64 << 20  # an executor may always allocate this much (to answer its cell)
_FIELD = re.compile(rb"^(VmData|RssAnon|RssShmem):\s+(\d+) kB", re.MULTILINE)


@dataclass(frozen=True)
class Usage:
    data: int  # VmData: what RLIMIT_DATA counts
    resident: int  # RssAnon + RssShmem: memory it really holds (not shared library pages)


def usage(pid: int) -> Usage | None:
    # Read after every cell: os.read, not Path.read_text (5x slower, measured).
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
    except OSError:
        return None  # ended, or no /proc
    try:
        text = os.read(fd, 16384)
    except OSError:
        return None
    finally:
        os.close(fd)
    fields = {name.decode(): int(kb) * 1024 for name, kb in _FIELD.findall(text)}
    if "VmData" not in fields or "RssAnon" not in fields:
        return None
    return Usage(fields["VmData"], fields["RssAnon"] + fields.get("RssShmem", 0))


@dataclass
class MemoryBudget:
    limit: int  # bytes for all executors together; 0: no budget
    share: int = 0  # at most this much per session's executor; 0: up to the budget

    def headroom(
        self, pids: Iterable[int], also: Iterable[int] = ()
    ) -> dict[int, tuple[Usage, int]]:
        """Each executor's use, and how much more it may allocate now (``also``: more
        executors that hold memory, but whose caps are not moved)."""
        seen = {pid: u for pid in pids if (u := usage(pid)) is not None}
        others = [u for pid in also if (u := usage(pid)) is not None]
        free = self.limit - sum(u.resident for u in [*seen.values(), *others])
        out = {}
        for pid, u in seen.items():
            room = free if not self.share else min(free, self.share - u.resident)
            out[pid] = u, max(0, room)
        return out

    def apply(self, pids: Iterable[int], also: Iterable[int] = ()) -> dict[int, int]:
        """Move each executor's cap to its current use plus its headroom; the headroom."""
        if not self.limit or not hasattr(resource, "prlimit"):
            return {}
        room = self.headroom(pids, also)
        for pid, (u, more) in room.items():
            with contextlib.suppress(OSError):  # it ended meanwhile
                # The soft limit only: raising another process's hard limit takes a
                # privilege, so the hard one stays at the executor's first cap.
                _, hard = resource.prlimit(pid, resource.RLIMIT_DATA)
                cap = u.data + max(more, SLACK)
                if hard != resource.RLIM_INFINITY:
                    cap = min(cap, hard)
                resource.prlimit(pid, resource.RLIMIT_DATA, (cap, hard))
        return {pid: more for pid, (_, more) in room.items()}

    def describe(self) -> str:
        share = f", at most {_gib(self.share)} per session" if self.share else ""
        return f"the worker's memory budget of {_gib(self.limit)} (--memory-limit){share}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
