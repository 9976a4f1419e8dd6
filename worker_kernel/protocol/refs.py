"""Frames sent by reference: an unchanged array travels as its digest only.

Both sides keep arrays by their BLAKE3 digest (the one the wire computes for
integrity anyway, so one pass serves both). A sender replaces a frame the other
side is known to hold by ``refs[index] = digest``; the receiver puts its own
copy back in place. Small frames always travel: a reference would save nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final

from .messages import Buffer

MIN_BYTES: Final = 64 << 10


def split(
    frames: Sequence[Buffer], digests: Sequence[str], held: Callable[[str], bool]
) -> tuple[list[Buffer], list[str], dict[str, str]]:
    """``(frames to send, their digests, refs)`` where ``refs`` maps the index of
    each frame left out (as a string, for JSON) to its digest."""
    sent: list[Buffer] = []
    sent_digests: list[str] = []
    refs: dict[str, str] = {}
    for i, (frame, checksum) in enumerate(zip(frames, digests, strict=True)):
        if memoryview(frame).nbytes >= MIN_BYTES and held(checksum):
            refs[str(i)] = checksum
        else:
            sent.append(frame)
            sent_digests.append(checksum)
    return sent, sent_digests, refs


def join(
    received: Sequence[Buffer],
    received_digests: Sequence[str],
    refs: Mapping[str, str],
    resolve: Callable[[str], Buffer | None],
) -> tuple[list[Buffer], list[str], list[str]]:
    """``(all frames, all digests, missing digests)``: the inverse of :func:`split`.

    ``resolve(digest)`` returns a held buffer (verified) or None.
    """
    total = len(received) + len(refs)
    frames: list[Buffer] = []
    digests: list[str] = []
    missing: list[str] = []
    it = iter(zip(received, received_digests, strict=True))
    for i in range(total):
        checksum = refs.get(str(i))
        if checksum is None:
            frame, checksum = next(it)
            frames.append(frame)
        else:
            found = resolve(checksum)
            if found is None:
                missing.append(checksum)
                found = b""
            frames.append(found)
        digests.append(checksum)
    return frames, digests, missing
