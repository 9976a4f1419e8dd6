"""The direct data connection's records, over real sockets (datapath.py)."""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker_kernel.array_cache import ArrayCache
from worker_kernel.protocol import datapath
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.buffer_pool import BufferPool
from worker_kernel.protocol.errors import AuthenticationError, MessageRejected, TransportError
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.wire import CHUNK, Incoming, Wire, digest

KEY = secrets.token_bytes(32)
MiB = 1 << 20


def _direct(buffers: list[bytes], codecs: list[str] | None = None) -> tuple[list, list]:
    msg = Message(kind=m.EXECUTE, content={"code": "x = 1"}, buffers=list(buffers), direct=True)
    msg.codecs = codecs or []
    return Wire(KEY).encode_parts(msg)


def _incoming(signed: list) -> Incoming:
    got = Wire(KEY).begin([bytes(f) for f in signed])
    assert isinstance(got, Incoming) and got.direct
    return got


def _records(aead: AESGCM, frames: list, direction: bytes = datapath.UP) -> list[bytes]:
    """The stream a notebook sends, record by record (length | ciphertext | tag)."""
    out = []
    for n, frame in enumerate(frames):
        data = bytes(frame)
        length = len(data).to_bytes(4, "big")
        out.append(length + aead.encrypt(direction + n.to_bytes(8, "big"), data, length))
    return out


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def _send_later(sock: socket.socket, chunks: list[bytes], *, end: bool = False) -> threading.Thread:
    def send() -> None:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                return
        if end:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_sealed_frames_land_in_their_buffers_raw_and_compressed(pair) -> None:
    rng = np.random.default_rng(0)
    raw = rng.bytes(3 * CHUNK + 5)
    squeezable = bytes(4 * CHUNK)
    signed, frames = _direct([raw, squeezable], codecs=["", "lz4"])
    assert len(signed) == 5 and len(frames) == 4 + 4  # the socket carries the prelude only
    aead = datapath.cell_key(KEY, "cell", b"t" * 32)
    sender = threading.Thread(target=datapath.send_frames, args=(pair[0], aead, frames))
    sender.start()
    incoming = _incoming(signed)
    datapath.receive_frames(pair[1], aead, incoming)
    sender.join()
    msg = incoming.finish()
    assert [bytes(b) for b in msg.buffers] == [raw, squeezable]
    assert msg.digests == [digest(raw), digest(squeezable)]  # the sender's, the cache key


@pytest.mark.parametrize("spoil", ["flip", "swap", "drop", "replay-other-cell", "down-for-up"])
def test_a_record_that_does_not_open_fails_the_stream(pair, spoil) -> None:
    data = np.random.default_rng(1).bytes(4 * CHUNK)
    signed, frames = _direct([data])
    aead = datapath.cell_key(KEY, "cell", b"t" * 32)
    records = _records(aead, frames)
    if spoil == "flip":
        spoiled = bytearray(records[2])
        spoiled[1000] ^= 1
        records[2] = bytes(spoiled)
    elif spoil == "swap":
        records[1], records[2] = records[2], records[1]
    elif spoil == "drop":
        del records[2]
    elif spoil == "replay-other-cell":  # the same bytes, sealed for another cell
        records[1:] = _records(datapath.cell_key(KEY, "other", b"t" * 32), frames)[1:]
    else:  # a result's record where an input's is due
        records[3] = _records(aead, frames, datapath.DOWN)[3]
    _send_later(pair[0], records)
    with pytest.raises(AuthenticationError, match=r"record .* failed authentication"):
        datapath.receive_frames(pair[1], aead, _incoming(signed))


def test_a_first_record_under_another_key_is_refused(pair) -> None:
    data = np.random.default_rng(2).bytes(2 * CHUNK)
    signed, frames = _direct([data])
    wrong = datapath.cell_key(secrets.token_bytes(32), "cell", b"t" * 32)  # another key
    _send_later(pair[0], _records(wrong, frames))
    with pytest.raises(AuthenticationError, match="record 0"):
        datapath.receive_frames(
            pair[1], datapath.cell_key(KEY, "cell", b"t" * 32), _incoming(signed)
        )


def test_a_record_of_another_length_than_declared_is_refused(pair) -> None:
    signed, frames = _direct([np.random.default_rng(3).bytes(2 * CHUNK)])
    aead = datapath.cell_key(KEY, "cell", b"t" * 32)
    records = _records(aead, [frames[0], bytes(frames[1])[:-1]])
    _send_later(pair[0], records)
    with pytest.raises(MessageRejected, match=r"record 1 .* declares"):
        datapath.receive_frames(pair[1], aead, _incoming(signed))


def test_a_stream_cut_short_says_so(pair) -> None:
    signed, frames = _direct([np.random.default_rng(4).bytes(3 * CHUNK)])
    aead = datapath.cell_key(KEY, "cell", b"t" * 32)
    records = _records(aead, frames)
    _send_later(pair[0], [*records[:2], records[2][:5000]], end=True)
    with pytest.raises(TransportError, match="closed after"):
        datapath.receive_frames(pair[1], aead, _incoming(signed))


def test_each_cell_and_ticket_has_its_own_key() -> None:
    ticket = datapath.new_ticket()
    assert len(ticket) == datapath.TICKET_BYTES and ticket != datapath.new_ticket()
    nonce, data = bytes(12), b"x" * 64
    one = datapath.cell_key(KEY, "a", ticket).encrypt(nonce, data, b"")
    assert one == datapath.cell_key(KEY, "a", ticket).encrypt(nonce, data, b"")
    assert one != datapath.cell_key(KEY, "b", ticket).encrypt(nonce, data, b"")
    assert one != datapath.cell_key(KEY, "a", datapath.new_ticket()).encrypt(nonce, data, b"")
    assert one != datapath.cell_key(secrets.token_bytes(32), "a", ticket).encrypt(nonce, data, b"")


def test_the_listener_admits_only_who_answers_its_challenge() -> None:
    data = np.random.default_rng(5).bytes(2 * CHUNK)
    signed, frames = _direct([data])
    ticket = datapath.new_ticket()
    aead = datapath.cell_key(KEY, "cell", ticket)
    listener = datapath.DataListener("tcp://127.0.0.1:0")
    endpoint = datapath.Endpoint(listener.address)
    verdicts: list[bool] = []

    def shut_out(sock: socket.socket) -> bool:
        try:
            while sock.recv(4096):  # the challenge, then nothing: closed
                pass
        except ConnectionResetError:  # closed with our bytes unread
            pass
        return True

    def peers() -> None:
        # Connects and idles: it holds up nobody, and is closed after HELLO_WAIT.
        idle = endpoint.connect(5)
        # Garbage instead of an answer: closed at once.
        with endpoint.connect(5) as stranger:
            stranger.sendall(b"GET / HTTP/1.1\r\n\r\n" * 3)
            verdicts.append(shut_out(stranger))
        # An answer recorded from another connection (another challenge): closed.
        with endpoint.connect(5) as replay:
            replay.recv(datapath.CHALLENGE_BYTES)
            replay.sendall(datapath.hello(ticket, bytes(datapath.CHALLENGE_BYTES)))
            verdicts.append(shut_out(replay))
        with endpoint.connect(5) as notebook:
            datapath.answer_challenge(notebook, ticket)
            datapath.send_frames(notebook, aead, frames)
            verdicts.append(shut_out(notebook))  # closed by the test when done
        verdicts.append(shut_out(idle))
        idle.close()

    thread = threading.Thread(target=peers, daemon=True)
    thread.start()
    incoming = _incoming(signed)
    try:
        conn = listener.receive("cell", ticket, aead, incoming, wait=20)
        conn.close()
    finally:
        listener.close()
    thread.join(20)
    assert verdicts == [True, True, True, True]
    assert bytes(incoming.finish().buffers[0]) == data


def test_the_listener_gives_up_when_no_notebook_comes() -> None:
    signed, _ = _direct([bytes(2 * CHUNK)])
    listener = datapath.DataListener("tcp://127.0.0.1:0")
    try:
        with pytest.raises(TransportError, match="did not send the inputs"):
            listener.receive(
                "cell", datapath.new_ticket(), datapath.cell_key(KEY, "c", b""), _incoming(signed),
                wait=0.3,
            )  # fmt: skip
    finally:
        listener.close()


def test_a_direct_header_never_comes_with_frames_on_the_socket() -> None:
    signed, frames = _direct([bytes(2 * CHUNK)])
    with pytest.raises(MessageRejected, match="direct message carries buffer frames"):
        Wire(KEY).decode([*signed, *frames])
    relayed = Wire(KEY).decode(signed, assemble=False)  # what the service sees
    assert relayed.direct and relayed.buffers == [] and relayed.nbytes == 2 * CHUNK


def test_a_header_that_spills_sends_everything_on_the_socket() -> None:
    names = {f"v{i}": i for i in range(20_000)}  # a content too large for the header
    msg = Message(kind=m.EXECUTE, content={"code": "", "names": names}, buffers=[bytes(CHUNK)])
    msg.direct = True
    signed, direct = Wire(KEY).encode_parts(msg)
    assert direct == []
    assert not Wire(KEY).decode(signed).direct


def test_a_superseded_value_gives_its_pool_piece_back() -> None:
    pool = BufferPool(16 * MiB)
    cache = ArrayCache(1 << 30)
    old = pool.take(4 * MiB)
    assert old is not None
    old[:] = b"x" * old.nbytes
    cache.put(digest(old), old)
    cache.bind({"a": [digest(old)]})
    address = np.frombuffer(old, np.uint8).ctypes.data
    del old
    assert pool.leased == 4 * MiB  # the cache keeps it for an unchanged `a`
    cache.bind({"a": ["another value"]})  # `a` changed: the old one goes...
    assert pool.leased == 0
    again = pool.take(4 * MiB)  # ...and its resident pages take the next array
    assert again is not None and np.frombuffer(again, np.uint8).ctypes.data == address


def test_a_value_its_name_no_longer_holds_leaves_the_cache() -> None:
    cache = ArrayCache(1 << 30)
    old, new, other = (bytes([i]) * MiB for i in (1, 2, 3))
    for buf in (old, new, other):
        cache.put(digest(buf), buf)
    cache.bind({"a": [digest(old)], "b": [digest(other)]})
    cache.bind({"a": [digest(new)]})  # a changed: its old value goes...
    assert cache.get(digest(old)) is None
    assert cache.get(digest(new)) is not None
    assert cache.get(digest(other)) is not None  # ...what b holds stays
    cache.bind({"c": [digest(other)]})
    cache.bind({"b": []})  # still held by c
    assert cache.get(digest(other)) is not None
