"""Sizes as people read and write them, in binary units everywhere (as nvidia-smi shows
MiB): the magic, the worker's log and the dashboard all say GiB for the same memory, and
``4G`` means the same on both sides."""

from __future__ import annotations

import os
import re

from .errors import ConfigurationError

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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"1000"`` -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigurationError(f"{text!r} is not a size; write e.g. 512M, 4G or 1.5GiB")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit.lower() or "_"))


def memory_size(text: str) -> int:
    """A memory setting: a size (``4G``), a share of this machine's RAM (``25%``), or
    ``none``/``0``/``off`` (0)."""
    text = text.strip().lower()
    if text in ("none", "0", "off"):
        return 0
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise ConfigurationError(f"{text!r} is not a percentage; write e.g. 25%") from None
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * share)
    return parse_size(text)
