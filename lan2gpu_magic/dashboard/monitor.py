"""Polls every known worker for the dashboard, in one thread of its own.

The :class:`~lan2gpu_magic.pool.WorkerPool` it owns is blocking and not
thread-safe, so it lives in that thread from creation to close; the server's
event loop only reads the latest :class:`Snapshot`. Polling starts with the
first request and stops after ``idle_after`` seconds without one, so a Jupyter
server nobody looks at does not keep asking the LAN.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from worker_kernel.protocol.contents import StatusDocument

from ..pool import WorkerPool
from .model import Snapshot, snapshot

log = logging.getLogger("lan2gpu.dashboard")


class Monitor:
    """Owns the polling thread and, through it, the pool and its sockets."""

    def __init__(
        self,
        make_pool: Callable[[], WorkerPool],
        *,
        interval: float = 2.0,
        idle_after: float = 600.0,
    ) -> None:
        self._make_pool = make_pool
        self.interval = interval
        self.idle_after = idle_after
        self._latest: Snapshot | None = None
        self._last: dict[str, StatusDocument] = {}  # address -> last status, for gone workers
        self._wanted = threading.Event()  # someone asked recently
        self._fresh = threading.Condition()
        self._stop = threading.Event()
        self._last_request = float("-inf")
        self._thread: threading.Thread | None = None
        self.error = ""  # why the last poll failed, if it did

    def latest(self) -> Snapshot | None:
        return self._latest

    def touch(self) -> None:
        """A viewer asked: poll (again) if idle, starting the thread the first time."""
        self._last_request = time.monotonic()
        self._wanted.set()
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="lan2gpu-dashboard", daemon=True)
            self._thread.start()

    async def snapshot(self, wait: float = 5.0) -> Snapshot:
        """The latest snapshot; the first time, wait (up to ``wait`` s) for the first poll."""
        self.touch()
        if self._latest is None:
            await asyncio.get_running_loop().run_in_executor(None, self._wait_first, wait)
        return self._latest or Snapshot(time.time())

    def _wait_first(self, wait: float) -> None:
        with self._fresh:
            self._fresh.wait_for(
                lambda: self._latest is not None or bool(self.error) or not self._alive(), wait
            )

    def _alive(self) -> bool:
        return not self._stop.is_set() and self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        pool: WorkerPool | None = None
        try:
            while not self._stop.is_set():
                if time.monotonic() - self._last_request > self.idle_after:
                    self._wanted.clear()
                    self._wanted.wait()  # until a request (or close) sets it
                    continue
                t0 = time.monotonic()
                try:
                    pool = pool or self._make_pool()
                    self._poll(pool)
                    self.error = ""
                except Exception as exc:  # e.g. a bad key file, mDNS failing: say so, go on
                    log.warning("lan2gpu dashboard: poll failed: %s", exc, exc_info=True)
                    self.error = f"poll failed: {exc}"
                    with self._fresh:
                        self._fresh.notify_all()  # a first request gets the error at once
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        finally:
            if pool is not None:
                pool.close()
            with self._fresh:
                self._fresh.notify_all()

    def _poll(self, pool: WorkerPool) -> None:
        rows = pool.rows(detail=True)
        known = {row.address for row in rows}
        self._last = {a: s for a, s in self._last.items() if a in known}  # forgotten: gone
        self._last.update({row.address: row.status for row in rows if row.status is not None})
        new = snapshot(rows, time.time(), self._last)
        with self._fresh:
            self._latest = new
            self._fresh.notify_all()

    def close(self) -> None:
        """Stop polling and close the pool's sockets (waits for the thread). Idempotent."""
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
