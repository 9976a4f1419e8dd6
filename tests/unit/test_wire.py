"""Framing, signing and verification without sockets."""

from __future__ import annotations

import json
import secrets

import numpy as np
import pytest

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import AuthenticationError, MessageRejected, VersionMismatch
from worker_kernel.protocol.messages import PROTOCOL_VERSION, Message
from worker_kernel.protocol.serialize import dumps
from worker_kernel.protocol.wire import Limits, ReplayGuard, Wire

VERSION = str(PROTOCOL_VERSION).encode()

KEY = secrets.token_bytes(32)


def _frames(buffers: list[bytes | memoryview] | None = None) -> list[bytes]:
    msg = Message(kind=m.EXECUTE, content={"code": "x = 1"}, buffers=buffers or [], to="w")
    return [bytes(f) for f in Wire(KEY).encode(msg)]


def _flip(frame: bytes, bit: int = 0) -> bytes:
    data = bytearray(frame)
    data[bit // 8 % len(data)] ^= 1 << (bit % 8)
    return bytes(data)


def test_roundtrip_keeps_content_and_buffers():
    array = np.arange(10_000, dtype=np.float32)
    frames = _frames(dumps(array))
    msg = Wire(KEY).decode(frames)
    assert msg.kind == m.EXECUTE
    assert msg.content == {"code": "x = 1"}
    assert msg.to == "w"
    assert len(msg.buffers) == 2
    assert bytes(msg.buffers[1]) == array.tobytes()


@pytest.mark.parametrize("index", range(7))
def test_a_flipped_bit_in_any_frame_is_rejected(index):
    frames = _frames(dumps(np.arange(4096, dtype=np.float64)))
    assert len(frames) == 7  # magic, version, kind, header, signature, pickle, array
    frames[index] = _flip(frames[index], bit=8 * (len(frames[index]) // 2) + 3)
    with pytest.raises((AuthenticationError, MessageRejected, VersionMismatch)):
        Wire(KEY).decode(frames)


def test_wrong_key_is_an_authentication_error():
    frames = _frames()
    with pytest.raises(AuthenticationError, match="different key"):
        Wire(secrets.token_bytes(32)).decode(frames)


def test_replay_is_rejected_once_seen():
    wire = Wire(KEY)
    frames = _frames()
    wire.decode(frames)
    with pytest.raises(MessageRejected, match="replay"):
        wire.decode(frames)


def test_a_rejected_tampered_copy_does_not_burn_the_id():
    wire = Wire(KEY)
    good = _frames([b"payload"])
    bad = list(good)
    bad[5] = b"pbyload"
    with pytest.raises(AuthenticationError):
        wire.decode(bad)
    assert wire.decode(good).buffers[0] == b"payload"


def test_messages_outside_the_window_are_rejected():
    now = [1_000_000.0]
    wire = Wire(KEY, window=120, clock=lambda: now[0])
    old = Message(kind=m.PING, sent=now[0] - 121)
    future = Message(kind=m.PING, sent=now[0] + 121)
    for msg in (old, future):
        with pytest.raises(MessageRejected, match="clock"):
            wire.decode(Wire(KEY).encode(msg))
    assert wire.decode(Wire(KEY).encode(Message(kind=m.PING, sent=now[0] - 119))).kind == m.PING


def test_heartbeats_and_cancels_queued_behind_an_upload_may_arrive_late_not_twice():
    now = [1_000_000.0]
    wire = Wire(KEY, window=120, clock=lambda: now[0])
    # Sent while a large upload was still on its way over the same connection.
    for kind in (m.HEARTBEAT, m.CANCEL):
        frames = Wire(KEY).encode(Message(kind=kind, sent=now[0] - 600))
        assert wire.decode(frames).kind == kind
        with pytest.raises(MessageRejected, match="already received"):
            wire.decode(frames)  # a replay is still one
        future = Message(kind=kind, sent=now[0] + 121)
        with pytest.raises(MessageRejected, match="clock"):
            wire.decode(Wire(KEY).encode(future))
    with pytest.raises(MessageRejected, match="clock"):  # anything else: the window holds
        wire.decode(Wire(KEY).encode(Message(kind=m.EXECUTE, sent=now[0] - 600)))


def test_replay_cache_forgets_ids_older_than_two_windows():
    now = [0.0]
    guard = ReplayGuard(window=10, clock=lambda: now[0])
    for i in range(100):
        now[0] = float(i)
        guard.check(f"id{i}", now[0])
        guard.record(f"id{i}")
    assert len(guard._seen) <= 21


def test_other_protocol_version_names_both_versions():
    frames = _frames()
    frames[1] = str(PROTOCOL_VERSION + 1).encode()
    with pytest.raises(
        VersionMismatch, match=rf"version {PROTOCOL_VERSION + 1}.*speaks {PROTOCOL_VERSION}"
    ):
        Wire(KEY).decode(frames)


def test_header_lying_about_buffer_length_is_rejected():
    # Re-sign a header that declares 3 bytes for a 7-byte buffer: still refused.
    frames = _frames([b"payload"])
    header = json.loads(frames[3])
    header["buffers"][0][0] = 3
    frames[3] = json.dumps(header).encode()
    from worker_kernel.protocol.wire import _mac

    frames[4] = _mac(KEY, frames[:4])
    with pytest.raises(MessageRejected, match="buffer 0 does not match the 3 bytes declared"):
        Wire(KEY).decode(frames)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_frames_are_rejected(change):
    frames = _frames([b"a", b"b"])
    frames = frames[:-1] if change == "missing" else [*frames, b"c"]
    with pytest.raises(MessageRejected, match="declares 2 buffers in 2 frames"):
        Wire(KEY).decode(frames)


def test_too_few_frames_and_bad_magic():
    with pytest.raises(MessageRejected, match="not a lan2gpu message"):
        Wire(KEY).decode([b"L2G", VERSION])
    frames = _frames()
    frames[0] = b"XYZ"
    with pytest.raises(MessageRejected, match="not a lan2gpu message"):
        Wire(KEY).decode(frames)


def test_size_limits_are_checked_from_the_header():
    wire = Wire(KEY, limits=Limits(max_bytes=100, max_frames=2))
    with pytest.raises(MessageRejected, match="over the limit of 100"):
        wire.decode(_frames([b"x" * 101]))
    with pytest.raises(MessageRejected, match="more than the limit of 2"):
        wire.decode(_frames([b"a", b"b", b"c"]))


def test_unsigned_notice_is_marked_unauthenticated_and_only_for_reject():
    notice = Wire.encode_notice("bad signature", code="AuthenticationError")
    msg = Wire(KEY).decode(notice)
    assert msg.kind == m.REJECT
    assert not msg.authenticated
    assert msg.content["code"] == "AuthenticationError"
    unsigned = _frames()
    unsigned[4] = b""
    with pytest.raises(AuthenticationError):
        Wire(KEY).decode(unsigned)


def test_short_keys_are_refused():
    with pytest.raises(ValueError, match="16 bytes"):
        Wire(b"short")


def test_large_buffers_travel_as_chunks_and_come_back_whole_and_writable():
    from worker_kernel.protocol.wire import CHUNK

    data = np.random.default_rng(1).integers(0, 255, CHUNK * 2 + 123, dtype=np.uint8)
    frames = Wire(KEY).encode(Message(kind=m.PING, buffers=[b"small", data]))
    assert len(frames) == 5 + 1 + 3  # small buffer: one frame; large: three chunks
    assert all(memoryview(f).nbytes <= CHUNK for f in frames[5:])
    msg = Wire(KEY).decode([bytes(f) for f in frames])
    assert bytes(msg.buffers[0]) == b"small"
    assert bytes(msg.buffers[1]) == data.tobytes()
    assert not memoryview(msg.buffers[1]).readonly


def test_a_flipped_bit_in_a_middle_chunk_is_caught():
    from worker_kernel.protocol.wire import CHUNK

    frames = [bytes(f) for f in Wire(KEY).encode(Message(kind=m.PING, buffers=[bytes(CHUNK * 3)]))]
    frames[6] = _flip(frames[6], bit=12345)
    with pytest.raises(AuthenticationError, match="buffer 0 does not match its signed digest"):
        Wire(KEY).decode(frames)


def test_verify_only_decoding_checks_everything_but_returns_no_buffers():
    frames = _frames([b"payload"])
    msg = Wire(KEY).decode(frames, assemble=False)
    assert msg.buffers == [] and msg.nbytes == 7
    bad = list(frames)
    bad[5] = b"pbyload"
    with pytest.raises(AuthenticationError):
        Wire(KEY).decode(bad, assemble=False)


def test_large_messages_get_a_longer_window_for_their_transfer():
    now = [1_000_000.0]
    wire = Wire(KEY, window=120, clock=lambda: now[0], limits=Limits(min_bandwidth=1e6))
    # 100 MB at 1 MB/s may take 100 s on top of the window.
    late = Message(kind=m.PING, sent=now[0] - 200, buffers=[bytes(100_000_000)])
    wire.decode([bytes(f) for f in Wire(KEY).encode(late)])
    too_late = Message(kind=m.PING, sent=now[0] - 200, buffers=[b"tiny"])
    with pytest.raises(MessageRejected, match="replay window"):
        wire.decode(Wire(KEY).encode(too_late))


def test_a_signed_header_with_a_nan_time_or_odd_digest_is_rejected():
    import math

    for sent, digest_text in ((math.nan, None), (None, "é" * 10)):
        msg = Message(kind=m.PING, buffers=[b"x"])
        if sent is not None:
            msg.sent = sent
        frames = [bytes(f) for f in Wire(KEY).encode(msg)]
        if digest_text is not None:
            header = json.loads(frames[3])
            header["buffers"][0][1] = digest_text
            frames[3] = json.dumps(header).encode()
            from worker_kernel.protocol.wire import _mac

            frames[4] = _mac(KEY, frames[:4])
        with pytest.raises(MessageRejected):
            Wire(KEY).decode(frames)
