"""The C heap's freed memory: keep it for the next message, or give it back.

libzmq receives every frame into memory it gets from ``malloc``. glibc hands freed
memory back to the system as soon as enough of it is free at once (its trim
threshold) and then faults fresh pages in for the next message: in a VM that costs
more than the copy. A process that moves large arrays message after message keeps
freed memory up to a budget (:func:`keep_freed`); once more than the budget is free,
:func:`release_above` gives all of it back, and after a rejected message, or when
the process is idle, :func:`release` does.
Not glibc (macOS, musl): nothing to tune, every call is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
import time
from typing import Final

# glibc's mallopt parameters
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_M_MMAP_MAX: Final = -4
_M_ARENA_MAX: Final = -8
_FRAMES_UP_TO: Final = 4 << 20  # libzmq's frames (1 MiB) come from the heap, not mmap


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library (glibc), loaded once with its prototypes set; None elsewhere."""
    try:
        lib = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with contextlib.suppress(AttributeError):  # glibc before 2.33
        lib.mallinfo2.restype = _Mallinfo2
    return lib


def keep_freed(nbytes: int, *, one_arena: bool = False, large: bool = False) -> None:
    """Let glibc keep up to ``nbytes`` of freed memory instead of trimming it, and
    serve libzmq's frames (1 MiB) from the heap.

    ``one_arena``: every thread allocates from the main heap (the service): libzmq's
    I/O thread would otherwise get an arena of its own, whose heaps (64 MiB each) are
    unmapped when they empty, whatever the threshold.

    ``large``: large allocations too (a cell's arrays: NumPy asks ``malloc``), which
    glibc otherwise maps afresh each time and unmaps when freed. Freed memory between
    live allocations is then not trimmed by itself: the process must call
    :func:`release_above` often (:func:`watch`)."""
    lib = libc()
    with contextlib.suppress(AttributeError):
        if lib is not None and nbytes > 0:
            if large:
                lib.mallopt(_M_MMAP_MAX, 0)  # glibc still maps when the heap cannot grow
            else:
                lib.mallopt(_M_MMAP_THRESHOLD, _FRAMES_UP_TO)
            lib.mallopt(_M_TRIM_THRESHOLD, min(nbytes, 2**31 - 1))
            if one_arena:
                lib.mallopt(_M_ARENA_MAX, 1)


def watch(keep: int, every: float = 1.0) -> threading.Thread:
    """A daemon thread that gives freed memory back whenever more than ``keep`` is
    free, checked every ``every`` seconds: a cell that frees 20 GB halfway does not
    hold them for the rest of its run."""

    def run() -> None:
        while True:
            time.sleep(every)
            release_above(keep)

    thread = threading.Thread(target=run, name="lan2gpu-heap", daemon=True)
    thread.start()
    return thread


def free_bytes() -> int | None:
    """Freed memory the heap holds (``mallinfo2().fordblks``), or None if unknown."""
    lib = libc()
    try:
        mallinfo2 = lib.mallinfo2 if lib is not None else None
    except AttributeError:  # glibc before 2.33
        return None
    if mallinfo2 is None:
        return None
    return int(mallinfo2().fordblks)


def release() -> None:
    """Return all freed heap pages to the system."""
    lib = libc()
    with contextlib.suppress(AttributeError):
        if lib is not None:
            lib.malloc_trim(0)


def release_above(keep: int) -> bool:
    """If more than ``keep`` bytes of the heap are free, return all freed pages to the
    system (glibc cannot keep a part); whether it did."""
    free = free_bytes()
    if free is not None and free <= keep:
        return False
    release()
    return True
