"""The pool of pre-faulted memory that received arrays land in (buffer_pool.py)."""

from __future__ import annotations

import gc
import re
import secrets
from pathlib import Path

import numpy as np
import pytest

from worker_kernel.array_cache import ArrayCache
from worker_kernel.config import WorkerConfig
from worker_kernel.protocol import buffer_pool
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.buffer_pool import BufferPool, pool_memory_from_env
from worker_kernel.protocol.errors import (
    AuthenticationError,
    ConfigurationError,
    MessageRejected,
)
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.receive import recv_message
from worker_kernel.protocol.wire import CHUNK, Wire, digest
from worker_kernel.service import executor_pool

MiB = 1 << 20
KEY = secrets.token_bytes(32)


def _resident_anon() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def test_a_piece_goes_back_when_the_last_array_on_it_is_dropped() -> None:
    pool = BufferPool(8 * MiB, prefault=False)
    view = pool.take(3 * MiB)
    assert view is not None and view.nbytes == 3 * MiB and not view.readonly
    array = np.frombuffer(view, dtype=np.float64)
    array[:] = 7.0
    del view
    gc.collect()
    assert pool.leased == 3 * MiB  # the array still uses it
    assert pool.largest_free() == 5 * MiB
    del array
    assert pool.leased == 0 and pool.largest_free() == 8 * MiB


def test_freed_pieces_merge_whatever_the_order() -> None:
    pool = BufferPool(8 * MiB, prefault=False)
    views = [pool.take(2 * MiB) for _ in range(4)]
    assert pool.take(1) is None  # full
    for i in (1, 3, 0, 2):
        views[i] = None
    assert pool.largest_free() == 8 * MiB
    again = pool.take(8 * MiB)
    assert again is not None


def test_a_piece_is_never_handed_out_twice() -> None:
    pool = BufferPool(16 * MiB, prefault=False)
    rng = np.random.default_rng(5)
    live: dict[int, np.ndarray] = {}  # value written -> the array holding it
    for step in range(200):  # takes and drops in random order, sizes that do not align
        if live and (len(live) > 4 or rng.random() < 0.4):
            del live[int(rng.choice(list(live)))]
            continue
        view = pool.take(int(rng.integers(1, 5 * MiB)))
        if view is not None:
            live[step] = np.frombuffer(view, dtype=np.uint8)
            live[step][:] = step % 251
        for value, array in live.items():  # no other piece overlapped it
            assert int(array.min()) == int(array.max()) == value % 251
    del view, array
    live.clear()
    assert pool.leased == 0 and pool.largest_free() == 16 * MiB


def test_views_of_an_array_keep_its_piece() -> None:
    pool = BufferPool(4 * MiB, prefault=False)
    view = pool.take(2 * MiB)
    assert view is not None
    part = np.frombuffer(view, dtype=np.uint8)[100:200].view(np.int16)[::2]
    del view
    gc.collect()
    assert pool.leased == 2 * MiB
    assert pool.take(3 * MiB) is None  # the piece is still in use
    del part
    assert pool.leased == 0


def test_an_idle_pool_gives_its_free_pages_back() -> None:
    pool = BufferPool(64 * MiB, prefault=True)
    assert pool.faulted.wait(30)
    before = _resident_anon()
    assert pool.release_free() == 64 * MiB
    assert before - _resident_anon() > 48 * MiB


def test_what_does_not_fit_is_refused_not_squeezed() -> None:
    pool = BufferPool(4 * MiB, prefault=False)
    assert pool.take(5 * MiB) is None
    assert BufferPool(0).take(MiB) is None  # the pool turned off


def test_a_reclaimer_makes_room_when_the_pool_is_full() -> None:
    pool = BufferPool(4 * MiB, prefault=False)
    cache = ArrayCache(1 << 30)
    kept = pool.take(3 * MiB)
    assert kept is not None
    kept[:] = b"x" * kept.nbytes
    cache.put(digest(kept), kept)
    del kept
    pool.reclaimers.append(lambda nbytes: cache.shed(pool, nbytes))
    again = pool.take(3 * MiB)  # only the cache held the old piece: it lets go
    assert again is not None and len(cache) == 0


def test_the_pool_is_resident_once_faulted_in() -> None:
    before = _resident_anon()
    pool = BufferPool(64 * MiB, prefault=True)
    assert pool.faulted.wait(30)
    assert _resident_anon() - before > 48 * MiB


def test_sizes_and_settings(monkeypatch) -> None:
    def pool(**kw: int) -> int:
        return executor_pool(WorkerConfig("tcp://127.0.0.1:0", Path("key"), "w", **kw))

    # A quarter of the session's cap, and the budget's share per executor.
    assert pool(pool_memory=4 << 30, session_memory=8 << 30) == 2 << 30
    assert pool(pool_memory=4 << 30, memory_limit=8 << 30, max_executors=1) == 2 << 30
    assert pool(pool_memory=4 << 30, memory_limit=64 << 30, max_executors=32) == 2 << 30
    assert pool(pool_memory=1 << 30, memory_limit=0) == 1 << 30
    monkeypatch.delenv("LAN2GPU_POOL_MEMORY", raising=False)
    assert pool_memory_from_env() > 0


def test_a_bad_setting_says_what_to_write(monkeypatch) -> None:
    monkeypatch.setenv("LAN2GPU_POOL_MEMORY", "lots")
    with pytest.raises(ConfigurationError, match=r"LAN2GPU_POOL_MEMORY.*e\.g\."):
        pool_memory_from_env()
    monkeypatch.setenv("LAN2GPU_POOL_MEMORY", "none")
    assert pool_memory_from_env() == 0


@pytest.fixture
def pooled(monkeypatch) -> BufferPool:
    pool = BufferPool(16 * MiB, prefault=False)
    monkeypatch.setattr(buffer_pool._Installed, "pool", pool)
    return pool


def _frames(data: bytes) -> list[bytes]:
    return [bytes(f) for f in Wire(KEY).encode(Message(kind=m.RESULT, buffers=[data]))]


def test_received_arrays_land_in_the_pool_and_give_it_back(pooled, pair) -> None:
    sender, receiver = pair
    data = np.random.default_rng(0).bytes(3 * CHUNK + 17)
    for _ in range(3):  # the same piece, message after message
        sender.send_multipart(_frames(data))
        msg = recv_message(receiver, Wire(KEY))
        assert bytes(msg.buffers[0]) == data
        assert pooled.holds(msg.buffers[0])
        del msg
        assert pooled.leased == 0


def test_a_message_cut_short_is_refused_and_its_piece_comes_back(pooled, pair) -> None:
    sender, receiver = pair
    frames = _frames(np.random.default_rng(2).bytes(3 * CHUNK))
    sender.send_multipart([*frames[:-2], frames[-1][:1000]])  # a frame missing, one short
    with pytest.raises(MessageRejected):
        recv_message(receiver, Wire(KEY))
    gc.collect()
    assert pooled.leased == 0
    sender.send_multipart(frames)  # the socket is in step: the next one arrives whole
    assert pooled.holds(recv_message(receiver, Wire(KEY)).buffers[0])


def test_a_tampered_chunk_is_refused_and_its_piece_comes_back(pooled, pair) -> None:
    sender, receiver = pair
    frames = _frames(np.random.default_rng(1).bytes(2 * CHUNK))
    spoiled = bytearray(frames[-1])
    spoiled[100] ^= 1
    sender.send_multipart([*frames[:-1], bytes(spoiled)])
    with pytest.raises(AuthenticationError, match="digest"):
        recv_message(receiver, Wire(KEY))
    gc.collect()
    assert pooled.leased == 0
