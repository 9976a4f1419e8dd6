"""What a worker remembers for dashboards: recent GPU samples and finished cells.

Kept by the worker rather than by each dashboard, so a page opened now still
shows the last few minutes, and several dashboards share one history. Both are
small, bounded rings; they are sent only in a detailed status request.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from .capabilities import Capabilities
from .protocol.outcomes import CellStatus
from .scheduler import Cell, gpu_slot

SPAN = 300.0  # seconds of GPU history kept
EVERY = 2.0  # seconds between GPU samples
RECENT = 200  # finished cells kept

# Results that are not the end of a cell: the client resends it with the missing arrays.
_NOT_FINAL = {CellStatus.CACHE_MISS}


class GpuHistory:
    """Per GPU: ``[wall time, utilization %, memory used bytes, cells running]``."""

    def __init__(self, span: float = SPAN, every: float = EVERY) -> None:
        self.every = every
        self._samples: dict[int, deque[list[float | None]]] = {}
        self._size = max(1, int(span / every))
        self._last = float("-inf")

    def sample(self, caps: Capabilities, busy: Iterable[str], now: float | None = None) -> None:
        """Record one sample per GPU, at most one every ``every`` seconds.

        ``now``: the sample's wall time (default: now); spacing goes by the
        monotonic clock when it is not given, so a clock step cannot stall it.
        """
        tick = time.monotonic() if now is None else now
        if tick - self._last < self.every:
            return
        self._last = tick
        now = time.time() if now is None else now
        busy = set(busy)
        for gpu in caps.gpus:
            ring = self._samples.setdefault(gpu.index, deque(maxlen=self._size))
            used = gpu.memory_total - gpu.memory_free
            running = 1.0 if gpu_slot(gpu.index) in busy else 0.0
            ring.append([round(now, 3), gpu.utilization, float(used), running])

    def to_json(self) -> dict[str, list[list[float | None]]]:
        return {str(index): list(ring) for index, ring in self._samples.items()}


class JobLog:
    """The last finished cells, newest last, with outcome, timings and bytes moved."""

    def __init__(self, size: int = RECENT) -> None:
        self._jobs: deque[dict[str, Any]] = deque(maxlen=size)

    def record(
        self, cell: Cell, status: str, stats: dict[str, Any], now: float | None = None
    ) -> None:
        if status in _NOT_FINAL:
            return
        now = time.monotonic() if now is None else now
        started = cell.started
        self._jobs.append(
            {
                "id": cell.id,
                "session": cell.session,
                "user": cell.user,
                "client": cell.client,
                "resources": list(cell.resources),
                "status": status,
                "bytes_in": cell.nbytes,
                "bytes_out": int(stats.get("bytes_out", 0)),
                "waited": (started if started is not None else now) - cell.received,
                "duration": now - started if started is not None else 0.0,
                "finished": time.time() - (time.monotonic() - now),
            }
        )

    def to_json(self) -> list[dict[str, Any]]:
        return list(self._jobs)
