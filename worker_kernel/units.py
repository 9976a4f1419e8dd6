"""Sizes as people read them, in binary units everywhere (as nvidia-smi shows MiB):
the magic, the worker's log and the dashboard all say GiB for the same memory."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def binary_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``, ``80 * 2**30`` -> ``"80 GiB"``; bytes stay whole."""
    i = 0
    while abs(n) >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    if i == 0:
        return f"{n:.0f} B"
    return f"{n:.1f} {_UNITS[i]}" if abs(n) < 10 else f"{n:.0f} {_UNITS[i]}"
