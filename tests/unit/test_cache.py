"""Content-addressed cache pieces and link-aware compression, without sockets."""

from __future__ import annotations

import numpy as np
import pytest

from lan2gpu_magic.cache import HeldArrays, copy_of, local_buffers
from worker_kernel.array_cache import ArrayCache
from worker_kernel.protocol import compress, refs
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import MessageRejected
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.wire import CHUNK, Wire, digest

KEY = b"k" * 32
BIG = refs.MIN_BYTES


def test_refs_split_and_join_restore_every_frame():
    frames = [b"pickle", bytes(BIG), b"x" * BIG, b"small"]
    digests = [digest(f) for f in frames]
    held = {digests[1]}
    sent, sent_digests, found = refs.split(frames, digests, held.__contains__)
    assert found == {"1": digests[1]} and sent == [frames[0], frames[2], frames[3]]
    back, back_digests, missing = refs.join(sent, sent_digests, found, {digests[1]: frames[1]}.get)
    assert back == frames and back_digests == digests and missing == []
    _, _, missing = refs.join(sent, sent_digests, found, lambda d: None)
    assert missing == [digests[1]]


def test_array_cache_is_lru_within_budget_and_checks_content():
    cache = ArrayCache(budget=3 * BIG)
    blobs = [bytearray([i]) * BIG for i in range(4)]
    for blob in blobs:
        cache.put(digest(blob), blob)
    assert len(cache) == 3 and cache.get(digest(blobs[0])) is None  # evicted first
    assert cache.get(digest(blobs[3])) is blobs[3]
    blobs[3][0] = 99  # changed in place by a cell: no longer what the digest says
    assert cache.get(digest(bytes([3]) * BIG)) is None
    assert len(cache) == 2
    cache.put(digest(b"tiny"), b"tiny")  # small frames are never kept
    assert len(cache) == 2


def test_held_arrays_learn_large_frames_and_forget():
    held = HeldArrays()
    frames = [b"p", bytes(BIG)]
    digests = [digest(f) for f in frames]
    held.learn("s", frames, digests)
    assert held.holds("s")(digests[1]) and not held.holds("s")(digests[0])
    assert not held.holds("other")(digests[1])
    held.forget("s", [digests[1]])
    assert not held.holds("s")(digests[1])


def test_local_buffers_and_copies_do_not_alias():
    a = np.arange(BIG // 8, dtype=np.float64)
    found = local_buffers(["a", "missing", "tiny"], {"a": a, "tiny": np.zeros(3)})
    (checksum,) = found
    copy = copy_of(found)(checksum)
    assert copy is not None and bytes(copy) == a.tobytes()
    copy[0] = 255
    assert a[0] == 0


def test_compression_pays_on_a_slow_link_for_compressible_data_only():
    smooth = np.zeros(4 << 20, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8)
    gigabit, loopback = 120e6, 5e9
    assert compress.choose([smooth, noise], gigabit) == ["lz4", ""]
    assert compress.choose([smooth, noise], loopback) == ["", ""]
    assert compress.choose([smooth, b"x"], loopback, "on") == ["lz4", ""]
    assert compress.choose([smooth], gigabit, "off") == [""]


def test_compressed_buffers_roundtrip_smaller_and_verified():
    data = np.tile(np.arange(1000, dtype=np.float32), 1000)  # 4 MB, repetitive
    msg = Message(kind=m.PING, buffers=[data], codecs=["lz4"])
    frames = [bytes(f) for f in Wire(KEY).encode(msg)]
    assert sum(len(f) for f in frames[5:]) < data.nbytes // 4
    back = Wire(KEY).decode(frames)
    assert bytes(back.buffers[0]) == data.tobytes()
    frames[6] = frames[6][:100] + bytes(50) + frames[6][150:]  # corrupt a compressed chunk
    with pytest.raises((MessageRejected, Exception)) as info:
        Wire(KEY).decode(frames)
    assert "decompress" in str(info.value) or "digest" in str(info.value)


def test_incompressible_chunks_still_fit_under_the_frame_cap():
    noise = np.random.default_rng(1).integers(0, 255, 3 * CHUNK, dtype=np.uint8)
    frames = Wire(KEY).encode(Message(kind=m.PING, buffers=[noise], codecs=["lz4"]))
    limit = Wire(KEY).limits.max_frame_bytes
    assert all(memoryview(f).nbytes <= limit for f in frames)


def test_copies_of_unchanged_outputs_land_in_the_pool(monkeypatch):
    # An unchanged 512 MiB output used to be copied into a fresh bytearray: 131,000
    # page faults on every run. The copy goes to the pool's resident pages instead.
    from worker_kernel.protocol import buffer_pool

    pool = buffer_pool.BufferPool(4 * max(BIG, buffer_pool.POOLED_FROM))
    monkeypatch.setattr(buffer_pool._Installed, "pool", pool)
    a = np.random.default_rng(1).random(max(BIG, buffer_pool.POOLED_FROM) // 8)
    found = local_buffers(["a"], {"a": a})
    (checksum,) = found
    copy = copy_of(found)(checksum)
    assert copy is not None and pool.holds(copy) and bytes(copy) == a.tobytes()
    copy[0] ^= 0xFF  # a copy, not a view of the notebook's array
    assert bytes(copy) != a.tobytes()
    held = [copy_of(found)(checksum) for _ in range(3)]  # the pool is full after these
    assert all(c is not None and pool.holds(c) for c in held)
    spill = copy_of(found)(checksum)
    assert isinstance(spill, bytearray) and bytes(spill) == a.tobytes()
