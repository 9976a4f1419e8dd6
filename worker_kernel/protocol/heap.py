"""The C heap's freed memory: keep it for the next message, or give it back.

libzmq receives every frame into memory it gets from ``malloc``. glibc hands freed
memory back to the system as soon as enough of it is free at once (its trim
threshold) and then faults fresh pages in for the next message: in a VM that costs
more than the copy. A process that moves large arrays message after message keeps
freed memory up to a budget (:func:`keep_freed`) and gives back only what is above
it (:func:`release_above`); after a rejected message, everything (:func:`release`).
Not glibc (macOS, musl): nothing to tune, every call is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
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


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed(nbytes: int, *, large: bool = False) -> None:
    """Let glibc keep up to ``nbytes`` of freed memory instead of trimming it.

    ``large``: large allocations too (a cell's arrays: NumPy asks ``malloc``), which
    glibc otherwise maps afresh each time and unmaps when freed. The process should
    then call :func:`release_above` now and then (the executor does after each
    cell): freed memory between live allocations is not trimmed by itself."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            if large:
                libc.mallopt(_M_MMAP_MAX, 0)  # glibc still maps when the heap cannot grow
            else:
                libc.mallopt(_M_MMAP_THRESHOLD, _FRAMES_UP_TO)
            libc.mallopt(_M_TRIM_THRESHOLD, min(nbytes, 2**31 - 1))
            # One arena: libzmq's I/O thread would otherwise get its own, whose
            # heaps (64 MiB each) are unmapped when they empty, whatever the threshold.
            libc.mallopt(_M_ARENA_MAX, 1)


def free_bytes() -> int | None:
    """Freed memory the heap holds (``mallinfo2().fordblks``), or None if unknown."""
    libc = _libc()
    try:
        mallinfo2 = libc.mallinfo2 if libc is not None else None
    except AttributeError:  # glibc before 2.33
        return None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _Mallinfo2
    return int(mallinfo2().fordblks)


def release() -> None:
    """Return all freed heap pages to the system."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)


def release_above(keep: int) -> bool:
    """Return freed heap pages if more than ``keep`` bytes are free; whether it did."""
    free = free_bytes()
    if free is not None and free <= keep:
        return False
    release()
    return True
