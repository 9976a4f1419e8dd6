"""Receiving a message frame by frame into its final memory, over a real socket pair."""

from __future__ import annotations

import json
import secrets
import time

import numpy as np
import pytest
import zmq

from worker_kernel.protocol import compress
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import AuthenticationError, MessageRejected
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.receive import recv_message
from worker_kernel.protocol.wire import CHUNK, Limits, Wire

KEY = secrets.token_bytes(32)


def _message(*buffers: bytes | memoryview, codecs: list[str] | None = None) -> list[bytes]:
    msg = Message(kind=m.RESULT, content={"n": len(buffers)}, buffers=list(buffers))
    msg.codecs = codecs or []
    return [bytes(f) for f in Wire(KEY).encode(msg)]


def _ping() -> list[bytes]:
    return [bytes(f) for f in Wire(KEY).encode(Message(kind=m.PING, content={"i": 1}))]


def test_buffers_land_whole_and_writable(pair) -> None:
    sender, receiver = pair
    big = np.arange((3 * CHUNK + 123) // 4, dtype=np.float32).tobytes()
    zeros = bytes(2 * CHUNK)  # compressible: sent as LZ4 chunks
    sender.send_multipart(_message(b"small", big, b"", zeros, codecs=["", "", "", compress.LZ4]))
    msg = recv_message(receiver, Wire(KEY))
    assert msg.content == {"n": 4}
    assert [bytes(b) for b in msg.buffers] == [b"small", big, b"", zeros]
    assert not memoryview(msg.buffers[1]).readonly  # arrays built on it are writable
    assert not receiver.getsockopt(zmq.RCVMORE)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda f: [*f[:6], f[6][:-1] + b"x", *f[7:]], id="a-flipped-byte"),
        pytest.param(lambda f: [*f[:6], f[6][:-5], *f[7:]], id="a-short-frame"),
        pytest.param(lambda f: [*f[:6], f[6] + b"12345", *f[7:]], id="a-long-frame"),
        pytest.param(lambda f: f[:-1], id="a-missing-frame"),
        pytest.param(lambda f: [*f, b"extra"], id="an-extra-frame"),
        pytest.param(lambda f: [*f[:4], b"0" * 32, *f[5:]], id="a-bad-signature"),
        pytest.param(lambda f: f[:3], id="too-few-frames"),
    ],
)
def test_a_bad_message_is_rejected_whole_and_the_next_one_arrives(pair, spoil) -> None:
    sender, receiver = pair
    frames = _message(b"head", bytes(range(256)) * (CHUNK // 128))  # 2 MiB: two frames
    sender.send_multipart(spoil(frames))
    sender.send_multipart(_ping())
    with pytest.raises((MessageRejected, AuthenticationError)):
        recv_message(receiver, Wire(KEY))
    assert recv_message(receiver, Wire(KEY)).content == {"i": 1}  # in step again


def test_a_notice_comes_back_unauthenticated_and_may_not_carry_buffers(pair) -> None:
    sender, receiver = pair
    sender.send_multipart(Wire.encode_notice("go away", code="AuthenticationError"))
    notice = recv_message(receiver, Wire(KEY))
    assert notice.authenticated is False and notice.content["reason"] == "go away"
    sender.send_multipart([*Wire.encode_notice("with a payload"), b"x" * 100])
    sender.send_multipart(_ping())
    with pytest.raises(MessageRejected, match="notice with buffer frames"):
        recv_message(receiver, Wire(KEY))
    assert recv_message(receiver, Wire(KEY)).kind == m.PING


def test_nothing_is_allocated_for_a_message_with_a_wrong_key(pair) -> None:
    sender, receiver = pair
    other = Wire(secrets.token_bytes(32))
    huge = Message(kind=m.RESULT, buffers=[bytes(CHUNK)])
    sender.send_multipart(other.encode(huge))
    with pytest.raises(AuthenticationError):
        Wire(KEY).begin([receiver.recv() for _ in range(5)])
    receiver.recv()  # the buffer frame was never asked for


def _spilled() -> tuple[Message, list[bytes]]:
    # Content and buffer list far larger than a header frame may be.
    content = {"names": [f"v{i}" for i in range(300_000)]}
    buffers = [bytes([i % 251]) * 10 for i in range(20_000)] + [bytes(3 * CHUNK)]
    msg = Message(kind=m.RESULT, content=content, buffers=buffers)
    return msg, [bytes(f) for f in Wire(KEY).encode(msg)]


def test_a_spilled_header_stays_small_and_arrives_whole(pair) -> None:
    sender, receiver = pair
    msg, frames = _spilled()
    assert len(frames[3]) < 1024  # the header frame itself
    assert max(len(f) for f in frames) <= Wire(KEY).limits.max_frame_bytes
    for _ in range(2):  # streamed, and decoded whole
        sender.send_multipart(frames)
        got = recv_message(receiver, Wire(KEY)) if _ == 0 else Wire(KEY).decode(frames)
        assert got.content == msg.content
        assert [bytes(b) for b in got.buffers] == msg.buffers


@pytest.mark.parametrize("where", ["extension", "signed-totals"])
def test_a_spilled_header_that_was_tampered_with_is_refused(pair, where) -> None:
    sender, receiver = pair
    _, frames = _spilled()
    if where == "extension":
        frames[5] = frames[5][:-1] + b" "  # inside the extension's JSON
    else:  # an extension of another message: its totals differ from the signed ones
        other = Message(kind=m.RESULT, content={"names": ["x"] * 100_000}, buffers=[b"a"])
        foreign = [bytes(f) for f in Wire(KEY).encode(other)]
        count = json.loads(foreign[3])["ext"][2]
        frames[5 : 5 + json.loads(frames[3])["ext"][2]] = foreign[5 : 5 + count]
    sender.send_multipart(frames)
    with pytest.raises((AuthenticationError, MessageRejected)):
        recv_message(receiver, Wire(KEY))
    sender.send_multipart(_ping())  # the socket is still in step
    assert recv_message(receiver, Wire(KEY)).content == {"i": 1}


def test_an_extension_over_the_limit_is_refused_before_it_is_read() -> None:
    _, frames = _spilled()
    with pytest.raises(MessageRejected, match=r"extension of .* over the limit"):
        Wire(KEY, limits=Limits(max_extension_bytes=1 << 20)).begin(frames[:5])


def test_a_signed_extension_too_deep_to_parse_is_refused_alike_streamed_or_whole(pair) -> None:
    from worker_kernel.protocol.wire import _mac, digest

    sender, receiver = pair
    raw = b"[" * 100_000 + b"]" * 100_000  # a key holder's JSON bomb
    header = {
        "v": m.PROTOCOL_VERSION, "id": "ab" * 16, "kind": m.RESULT, "session": "", "parent": "",
        "to": "", "sent": time.time(), "content": {}, "buffers": [],
        "ext": [len(raw), digest(raw), 1, 0, 0],
    }  # fmt: skip
    prelude = [
        b"L2G",
        str(m.PROTOCOL_VERSION).encode(),
        m.RESULT.encode(),
        json.dumps(header).encode(),
    ]
    frames = [*prelude, _mac(KEY, prelude), raw]
    with pytest.raises(MessageRejected, match="malformed"):
        Wire(KEY).decode(frames)
    sender.send_multipart(frames)
    with pytest.raises(MessageRejected, match="malformed"):
        recv_message(receiver, Wire(KEY))
