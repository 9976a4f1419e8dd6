"""Memory reused from message to message, for the arrays a process receives.

In a VM the first write to a fresh page costs far more than copying into it (here
~0.9 s per GiB against ~0.1 s: PERF-FACTS.md). A receiver that gets each large buffer
in fresh memory pays that on every cell. A :class:`BufferPool` maps one arena of its
budget and hands out pieces of it, lowest first; a piece goes back to the pool when
the last array built on it is dropped (a ``weakref.finalize`` on its lease), so the
next cell's buffers land in pages already resident. The pages stay once touched.

They are touched on first use by default: a notebook that connects, or a session
that never moves a large array, does not hold the budget (measured: 940 MiB more
resident in a notebook at its first cell when the default 5% of RAM was faulted in
at once). ``prefault=True`` (the worker's ``--pool-prefault``) faults the whole
arena in on a background thread when the process starts (huge pages where the
kernel gives them, ``MADV_POPULATE_WRITE``), so the first cell is as fast as the rest.

What does not fit (a buffer larger than the free space, or the pool turned off with
a budget of 0) gets fresh memory as before, so a receiver never fails for want of
pool. A piece is overwritten in full before anyone reads it
(:class:`~.wire.Incoming` rejects a message whose frames do not fill its buffers),
so nothing of an earlier message shows through.

One pool per process, installed with :func:`install` (client, executor); until
then :func:`take` hands out fresh memory.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import logging
import mmap
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Final

import numpy as np

from . import heap
from .errors import ConfigurationError
from .messages import Buffer
from .units import memory_size

log = logging.getLogger(__name__)

POOLED_FROM: Final = 1 << 20  # smaller buffers are cheap to allocate: bytearray
_ALIGN: Final = 1 << 12  # pieces start on page boundaries
_MADV_POPULATE_WRITE: Final = 23  # Linux 5.14
_MADV_DONTNEED: Final = 4


def _round(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class BufferPool:
    """An arena of ``budget`` bytes, cut into pieces on demand (first fit, merged
    again when freed). Thread-safe: leases come back from whichever thread drops the
    last array, through a queue, so a finalizer never waits for the lock (one may run
    inside a garbage collection that started while the lock was held)."""

    def __init__(self, budget: int, *, prefault: bool = False) -> None:
        self.budget = _round(max(0, budget))
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.budget)] if self.budget else []
        self._returned: deque[tuple[int, int]] = deque()  # appended by finalizers only
        self._leased = 0
        # Called with the bytes wanted when the pool has no room: each may let go of
        # pieces it keeps (the executor's array cache), and the pool tries again.
        self.reclaimers: list[Callable[[int], None]] = []
        self.faulted = threading.Event()
        self._arena: mmap.mmap | None = None
        self._base = 0  # the arena's address
        if not self.budget:
            self.faulted.set()
            return
        try:
            self._arena = mmap.mmap(-1, self.budget, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError) as exc:  # e.g. over RLIMIT_DATA
            log.warning("no buffer pool of %d bytes (%s); receiving into fresh memory", budget, exc)
            self.budget, self._free = 0, []
            self.faulted.set()
            return
        with contextlib.suppress(OSError, AttributeError):
            self._arena.madvise(mmap.MADV_HUGEPAGE)  # fewer, cheaper faults where allowed
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._arena))
        if prefault:
            threading.Thread(target=self._fault_in, name="lan2gpu-pool", daemon=True).start()
        else:
            self.faulted.set()

    def _fault_in(self) -> None:
        """Make every page of the arena resident now, off the caller's thread (ctypes
        releases the GIL for the system call). A kernel without
        ``MADV_POPULATE_WRITE`` (before 5.14) faults the pages on first use instead:
        writing them here could overwrite a piece already handed out."""
        try:
            if _madvise(self._base, self.budget, _MADV_POPULATE_WRITE) != 0:
                log.debug("cannot fault the buffer pool in ahead (errno %d)", ctypes.get_errno())
        finally:
            self.faulted.set()

    @property
    def leased(self) -> int:
        """Bytes handed out and not back yet."""
        with self._lock:
            self._take_returned()
            return self._leased

    def take(self, nbytes: int) -> memoryview | None:
        """A writable piece of ``nbytes`` from the pool, or None if none is free."""
        if self._arena is None or nbytes <= 0:
            return None
        size = _round(nbytes)
        if size > self.budget:
            return None
        start = self._carve(size)
        for reclaim in self.reclaimers:
            if start is not None:
                break
            reclaim(size)
            start = self._carve(size)
        if start is None:
            return None
        # A ctypes array as the lease: NumPy arrays and memoryviews built on it, and
        # their views, all keep it (not the arena) as their base.
        lease = (ctypes.c_char * nbytes).from_buffer(self._arena, start)
        weakref.finalize(lease, self._returned.append, (start, size)).atexit = False
        return memoryview(lease).cast("B")

    def _carve(self, size: int) -> int | None:
        with self._lock:
            self._take_returned()
            # First fit: the lowest free piece that is large enough.
            i = next((i for i, (_, length) in enumerate(self._free) if length >= size), -1)
            if i < 0:
                return None
            start, length = self._free[i]
            if length == size:
                del self._free[i]
            else:
                self._free[i] = (start + size, length - size)
            self._leased += size
            return start

    def _take_returned(self) -> None:
        """Put the pieces finalizers queued back in the free list (lock held)."""
        while self._returned:
            start, size = self._returned.popleft()
            self._leased -= size
            i = bisect.bisect(self._free, (start, size))
            # Merge with the free neighbours on either side.
            if i < len(self._free) and self._free[i][0] == start + size:
                size += self._free.pop(i)[1]
            if i > 0 and sum(self._free[i - 1]) == start:
                start, size = self._free[i - 1][0], self._free[i - 1][1] + size
                i -= 1
                del self._free[i]
            self._free.insert(i, (start, size))

    def holds(self, buf: Buffer) -> bool:
        """Whether ``buf``'s memory is a piece of this pool."""
        if self._arena is None:
            return False
        try:
            address = np.frombuffer(buf, dtype=np.uint8).ctypes.data
        except (TypeError, ValueError):
            return False
        return self._base <= address < self._base + self.budget

    def largest_free(self) -> int:
        """The largest buffer :meth:`take` can give now."""
        with self._lock:
            self._take_returned()
            return max((length for _, length in self._free), default=0)

    def release_free(self) -> int:
        """Give the pages of every free piece back to the system (an idle process);
        they fault in again when next used. The bytes released."""
        with self._lock:
            self._take_returned()
            released = 0
            for start, length in self._free:
                if _madvise(self._base + start, length, _MADV_DONTNEED) == 0:
                    released += length
            return released


def _madvise(address: int, length: int, advice: int) -> int:
    lib = heap.libc()
    return -1 if lib is None else int(lib.madvise(address, length, advice))


class _Installed:
    pool = BufferPool(0)  # until install(): no pool, fresh memory


def install(budget: int, *, prefault: bool = False) -> BufferPool:
    """Give this process a pool of ``budget`` bytes (once; later calls return it).

    Also asks the C heap to keep up to the budget of what is freed: libzmq receives
    every frame into memory of its own before it is copied into the pool, and glibc
    would give those pages back to the system after each message, to fault them in
    again for the next one (:mod:`.heap`)."""
    if not _Installed.pool.budget and budget > 0:
        _Installed.pool = BufferPool(budget, prefault=prefault)
        heap.keep_freed(budget)
    return _Installed.pool


def pool_memory_from_env(default: str = "5%") -> int:
    """The notebook's pool: ``$LAN2GPU_POOL_MEMORY`` (``2G``, ``5%`` of RAM, ``none``)."""
    text = os.environ.get("LAN2GPU_POOL_MEMORY", default)
    try:
        return memory_size(text)
    except ConfigurationError as exc:
        raise ConfigurationError(f"LAN2GPU_POOL_MEMORY: {exc}") from None


def current() -> BufferPool:
    return _Installed.pool


def take(nbytes: int) -> memoryview | None:
    """A piece of this process's pool for a buffer of ``nbytes``, or None (small, or
    the pool has no room): the caller then uses fresh memory."""
    if nbytes < POOLED_FROM:
        return None
    return _Installed.pool.take(nbytes)
