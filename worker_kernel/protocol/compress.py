"""Compress large buffers only when it pays on the link at hand.

The sender knows (from a probe during the handshake) how fast the link is. For
each large buffer it compresses a sample with LZ4 and compares: sending it as is
takes ``n / bandwidth``; compressed it takes the compression time plus
``n / (ratio * bandwidth)`` plus the receiver's decompression. On loopback (GB/s)
compression never pays; on a 1 Gbit/s LAN it pays for data that shrinks by a
quarter or more. ``mode`` forces it: ``"on"``, ``"off"`` or ``"auto"``.

Buffers are compressed chunk by chunk (see :mod:`wire`), each with LZ4 block
format; the digest always covers the uncompressed bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

import lz4.block

from .messages import Buffer

LZ4: Final = "lz4"
MIN_BYTES: Final = 256 << 10  # smaller buffers are never worth it
_SAMPLE: Final = 256 << 10
_DECOMPRESS_SPEED: Final = 2e9  # bytes/s, LZ4 is this fast or faster on any CPU
_MARGIN: Final = 0.85  # compress only if that takes at most this share of the time
MODES: Final = ("auto", "on", "off")


def compress_chunk(chunk: Buffer) -> bytes:
    return bytes(lz4.block.compress(chunk, store_size=False, mode="fast"))


def decompress_chunk(data: Buffer, size: int) -> bytes:
    return bytes(lz4.block.decompress(data, uncompressed_size=size))


def pays(buf: Buffer, bandwidth: float) -> bool:
    """Whether LZ4 makes sending ``buf`` over a ``bandwidth`` (bytes/s) link faster."""
    view = memoryview(buf).cast("B")
    n = view.nbytes
    if n < MIN_BYTES or bandwidth <= 0:
        return False
    # A sample from the middle: headers at the start are often unrepresentative.
    start = max(0, n // 2 - _SAMPLE // 2)
    sample = view[start : start + _SAMPLE]
    seconds = float("inf")
    for _ in range(2):  # the best of two: a first call pays for cold caches and page faults
        t0 = time.perf_counter()
        packed = compress_chunk(sample)
        seconds = min(seconds, max(time.perf_counter() - t0, 1e-6))
    ratio = sample.nbytes / max(1, len(packed))
    speed = sample.nbytes / seconds
    plain = n / bandwidth
    squeezed = n / speed + n / (ratio * bandwidth) + n / _DECOMPRESS_SPEED
    return squeezed < _MARGIN * plain


def choose(buffers: Sequence[Buffer], bandwidth: float, mode: str = "auto") -> list[str]:
    """A codec ("" or "lz4") for each buffer."""
    if mode == "off":
        return [""] * len(buffers)
    if mode == "on":
        return [LZ4 if memoryview(b).nbytes >= MIN_BYTES else "" for b in buffers]
    return [LZ4 if pays(b, bandwidth) else "" for b in buffers]
