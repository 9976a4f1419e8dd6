"""Framing and signing: :class:`Message` <-> ``list`` of frames, without sockets.

Every frame is authenticated. The header lists each buffer's length, BLAKE3
digest and number of frames, and the signature is an HMAC-SHA256 (shared key)
over the magic, version, kind and header frames, so a flipped bit anywhere,
array data included, is caught. :meth:`Wire.decode` checks, in order: shape,
magic, version, size limits, signature (``hmac.compare_digest``), header, time
window and replay, then buffer lengths and digests. Nothing is unpickled here,
and the caller unpickles only what ``decode`` returned.

Buffers larger than :data:`CHUNK` travel as several frames (zero-copy slices on
the way out, reassembled on the way in). Small frames are faster through
libzmq than huge ones, and they let a receiver cap the size of any single frame
(``zmq.MAXMSGSIZE``), so an unauthenticated peer cannot make it allocate one
giant frame before the signature is checked. (It could still send frame after
frame of one never-ending message, which libzmq holds until the last one: the
CurveZMQ handshake, on by default, shuts such a peer out before its first
frame; ``--insecure-plaintext`` gives that up.)

A *direct* message (``"direct": true`` in the signed header: a large cell's request,
and its result) declares its buffers but does not carry them: its frames travel on the
cell's data connection, each sealed with AES-256-GCM (datapath.py), and are not hashed
again on arrival (the tag authenticates every byte). A direct message with buffer frames
on the socket is rejected, so no buffer ever skips both checks.

The header stays small whatever a message carries. When its content and buffer
list would pass :data:`SPILL_BYTES` (a cell that binds ten thousand names, or
returns thirty thousand arrays, or has megabytes of source), they travel in an
*extension*: frames right after the signature, declared in the signed header by
length, digest and frame count, together with the buffers' total bytes and
frames, so every limit is still checked before anything is allocated.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import math
import mmap
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import blake3

from . import buffer_pool, compress
from .errors import AuthenticationError, MessageRejected, ProtocolError, VersionMismatch
from .messages import CANCEL, HEARTBEAT, KINDS, MAGIC, PROTOCOL_VERSION, REJECT, Buffer, Message

CHUNK: Final = 1 << 20  # bytes per buffer frame
_LAZY_BYTES: Final = 1 << 20  # buffers from this size up get pages as they are written
_VERSION_FRAME: Final = str(PROTOCOL_VERSION).encode()
_PRELUDE: Final = 5  # magic, version, kind, header, signature
_PARALLEL_HASH_BYTES: Final = 1 << 20  # BLAKE3 uses threads past 1 MiB
_NOTICE_BYTES: Final = 8192
# Headers whose content and buffer list pass this move them to an extension.
SPILL_BYTES: Final = 64 << 10
# Kinds that may wait on a connection behind a large upload, so arrive late, and
# are harmless late or replayed: a heartbeat only says "alive", a cancel names
# one cell. A replayed one is still refused.
_LATE_OK: Final = frozenset({HEARTBEAT, CANCEL})


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; checked from the header before buffers are used."""

    max_frames: int = 100_000
    max_bytes: int = 16 << 30
    max_header_bytes: int = 1 << 20
    # Content and buffer list, when spilled: parsed JSON takes ~20x its size in memory.
    max_extension_bytes: int = 16 << 20
    # A message may arrive this long after it was sent, on top of the window:
    # hashing and moving N bytes at this rate (a slow link) takes time.
    min_bandwidth: float = 10e6

    @property
    def max_frame_bytes(self) -> int:
        """The largest single frame a valid message has (for ``zmq.MAXMSGSIZE``);
        an LZ4 chunk of incompressible data is a little larger than the chunk."""
        return max(CHUNK + CHUNK // 200, self.max_header_bytes) + 4096


@dataclass(frozen=True)
class Peek:
    """What a message's frames say about themselves, before (or without) verifying
    them: for routing and for labelling a rejection, never for trust."""

    kind: str  # "" if the frames do not have the shape of a message
    claimed_id: str  # the id its header claims, or ""


_CLAIMED_ID: Final = re.compile(rb'"id":"([0-9a-f]{8,64})"')


def peek(frames: Sequence[Any]) -> Peek:
    """The kind and claimed id of a message's frames (see :class:`Peek`).

    The only code outside :meth:`Wire.decode` that knows where they sit. The id
    is found by a regular expression over the header's first bytes, never by a
    JSON parse: the header is untrusted, and a deeply nested one would make
    ``json.loads`` recurse."""
    try:  # memoryview: bytes, memoryviews and zmq Frames alike, without a copy
        kind = bytes(memoryview(frames[2])[:64]).decode("ascii")
    except (IndexError, TypeError, ValueError):
        return Peek("", "")
    try:
        match = _CLAIMED_ID.search(bytes(memoryview(frames[3])[:512]))
    except (IndexError, TypeError, ValueError):
        match = None
    return Peek(kind if kind in KINDS else "", match.group(1).decode() if match else "")


def digest(buf: Buffer) -> str:
    """BLAKE3 hex digest of a buffer (threads for large ones; releases the GIL)."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # e.g. a float32 array: hash its bytes
    threads = blake3.blake3.AUTO if view.nbytes >= _PARALLEL_HASH_BYTES else 1
    return str(blake3.blake3(view, max_threads=threads).hexdigest())


def _mac(key: bytes, frames: Sequence[Buffer]) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for frame in frames:
        view = memoryview(frame)
        # Length-prefix each frame so frame boundaries are signed too.
        mac.update(view.nbytes.to_bytes(8, "big"))
        mac.update(view)
    return mac.digest()


def _chunks(buf: Buffer) -> list[memoryview]:
    view = memoryview(buf).cast("B")
    if view.nbytes <= CHUNK:
        return [view]
    return [view[i : i + CHUNK] for i in range(0, view.nbytes, CHUNK)]


class ReplayGuard:
    """Rejects a message id seen before, and any message outside the time window.

    A large message may legitimately arrive later than the window: the window is
    extended by the time its bytes take at ``min_bandwidth``, and its id is
    remembered for as long.
    """

    def __init__(
        self,
        window: float = 120.0,
        clock: Callable[[], float] = time.time,
        min_bandwidth: float = 10e6,
    ) -> None:
        self.window = window
        self.min_bandwidth = min_bandwidth
        self._clock = clock
        self._seen: set[str] = set()
        self._expiry: list[tuple[float, str]] = []  # heap of (forget at, id)

    def _allowance(self, nbytes: int) -> float:
        return nbytes / self.min_bandwidth

    def check(self, msg_id: str, sent: float, nbytes: int = 0, *, late_ok: bool = False) -> None:
        """Raise :class:`MessageRejected` if ``msg_id`` was seen or ``sent`` is stale
        (``late_ok``: only if it comes from the future)."""
        skew = self._clock() - sent
        late = math.inf if late_ok else self.window + self._allowance(nbytes)
        if skew > late or skew < -self.window:
            raise MessageRejected(
                f"message {msg_id[:8]} was sent {skew:+.0f} s from this machine's clock, "
                f"outside the replay window (-{self.window:.0f} s to +{late:.0f} s); a replayed "
                "message, or the two machines' clocks differ (sync them with NTP)"
            )
        if msg_id in self._seen:
            raise MessageRejected(f"message {msg_id[:8]} was already received (replay)")

    def record(self, msg_id: str, nbytes: int = 0) -> None:
        """Remember ``msg_id`` (after the whole message verified) and forget old ids."""
        now = self._clock()
        self._seen.add(msg_id)
        # Past this, the window check alone rejects the message.
        forget = now + 2 * self.window + self._allowance(nbytes)
        heapq.heappush(self._expiry, (forget, msg_id))
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])

    def __len__(self) -> int:
        return len(self._seen)


class Wire:
    """Encodes and decodes signed messages with one shared key.

    One instance per endpoint: it owns the replay cache of what it received.
    """

    def __init__(
        self,
        key: bytes,
        *,
        limits: Limits | None = None,
        window: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the shared key must be at least 16 bytes")
        self.key = key
        self.limits = limits or Limits()
        self.replay = ReplayGuard(window, clock, self.limits.min_bandwidth)
        self._clock = clock

    # -- encoding -------------------------------------------------------------

    def encode(self, msg: Message) -> list[Buffer]:
        """Frames for ``msg``, signature included (buffers are not copied unless
        compressed). ``msg.digests`` and ``msg.codecs``, if given, must match
        ``msg.buffers``: digests already computed are not computed again."""
        signed, data = self.encode_parts(msg)
        return signed + data

    def encode_parts(self, msg: Message) -> tuple[list[Buffer], list[Buffer]]:
        """The frames of ``msg`` for its socket, and those for its direct data
        connection: none unless ``msg.direct``, and then all its buffer frames, which
        the signed header declares (``"direct": true``) but the socket does not carry
        (datapath.py). A header that spills to an extension sends everything on the
        socket (the header then says nothing of a direct path)."""
        declared: list[list[Any]] = []
        frames: list[Buffer] = []
        given = len(msg.digests) == len(msg.buffers)
        for i, buf in enumerate(msg.buffers):
            chunks: list[Buffer] = list(_chunks(buf))
            codec = msg.codecs[i] if i < len(msg.codecs) else ""
            if codec == compress.LZ4:
                chunks = [compress.compress_chunk(c) for c in chunks]
            checksum = msg.digests[i] if given else digest(buf)
            declared.append([memoryview(buf).nbytes, checksum, len(chunks), codec])
            frames.extend(chunks)
        header: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "id": msg.id,
            "kind": msg.kind,
            "session": msg.session,
            "parent": msg.parent,
            "to": msg.to,
            "sent": msg.sent,
            "content": msg.content,
            "buffers": declared,
        }
        if msg.direct:
            header["direct"] = True
        encoded = json.dumps(header, separators=(",", ":")).encode()
        direct = msg.direct
        if len(encoded) > SPILL_BYTES:
            direct = False
            header.pop("direct", None)
            extension = json.dumps(
                {"content": msg.content, "buffers": declared}, separators=(",", ":")
            ).encode()
            ext_frames = _chunks(extension)
            header["content"], header["buffers"] = {}, []
            header["ext"] = [
                len(extension),
                digest(extension),
                len(ext_frames),
                sum(int(entry[0]) for entry in declared),
                sum(int(entry[2]) for entry in declared),
            ]
            encoded = json.dumps(header, separators=(",", ":")).encode()
            frames[:0] = ext_frames
        prelude: list[Buffer] = [MAGIC, _VERSION_FRAME, msg.kind.encode(), encoded]
        signed = [*prelude, _mac(self.key, prelude)]
        if direct:
            return signed, frames
        return signed + frames, []

    @staticmethod
    def encode_notice(
        reason: str, *, code: str = "", to: str = "", parent: str = ""
    ) -> list[Buffer]:
        """An unsigned ``reject`` notice: shown to the peer as text, never trusted.

        ``code`` names the error class (``AuthenticationError``, ...).
        """
        header = {
            "v": PROTOCOL_VERSION,
            "id": "",
            "kind": REJECT,
            "session": "",
            "parent": parent,
            "to": to,
            "sent": time.time(),
            "content": {"reason": reason, "code": code},
            "buffers": [],
        }
        return [MAGIC, _VERSION_FRAME, REJECT.encode(), json.dumps(header).encode(), b""]

    # -- decoding -------------------------------------------------------------

    def decode(
        self, frames: Sequence[Buffer], *, trusted_hop: bool = False, assemble: bool = True
    ) -> Message:
        """See :meth:`_decode`; any failure at all is a :class:`ProtocolError`."""
        try:
            return self._decode(frames, trusted_hop=trusted_hop, assemble=assemble)
        except ProtocolError:
            raise
        except Exception as exc:  # e.g. RecursionError on a hostile header
            raise MessageRejected(f"malformed message ({type(exc).__name__})") from None

    def _decode(self, frames: Sequence[Buffer], *, trusted_hop: bool, assemble: bool) -> Message:
        """Check and parse ``frames``; raise a :class:`ProtocolError` on any failure.

        ``trusted_hop=True`` is for a message that was already fully verified by
        this worker's service and handed to its executor over a private socket:
        the signature is still checked, but buffers are not re-hashed and the
        replay window is not applied (the cell may have waited in a queue).
        ``assemble=False`` verifies everything but returns no buffers (the
        service only relays them): chunked buffers are then not copied together.
        """
        views = [memoryview(f) for f in frames]
        opened = self._open(views[:_PRELUDE], len(views) - _PRELUDE, trusted_hop)
        if isinstance(opened, Message):  # an unsigned notice
            return opened
        header, declared, total = opened
        rest = views[_PRELUDE:]
        if "ext" in header:
            nbytes, count = int(header["ext"][0]), int(header["ext"][2])
            frames_in = rest[:count]
            if len(frames_in) != count or sum(v.nbytes for v in frames_in) != nbytes:
                raise MessageRejected(
                    f"header extension does not match the {nbytes} bytes declared"
                )
            declared = self._extend(header, b"".join(frames_in), verify=not trusted_hop)
            rest = rest[count:]
        if header.get("direct"):  # the buffers come on the data connection
            if rest:
                raise MessageRejected("a direct message carries buffer frames on the socket")
            return self._message(header, declared, total, [], trusted_hop)
        buffers = self._buffers(declared, rest, not trusted_hop, assemble)
        return self._message(header, declared, total, buffers, trusted_hop)

    def _extend(self, header: dict[str, Any], raw: Buffer, *, verify: bool) -> list[list[Any]]:
        """Read a spilled header's extension (``raw``, of the declared length) into
        ``header``; its buffer list.

        The extension is checked against the signed header (digest, unless the
        service already did: ``verify``; the buffers' total bytes and frames)
        before its buffer list is used."""
        _, expected, _, total, nframes = header["ext"]
        if verify and not hmac.compare_digest(digest(raw), str(expected)):
            raise AuthenticationError("header extension does not match its signed digest")
        try:
            extension = json.loads(raw if isinstance(raw, bytes | bytearray) else bytes(raw))
        except ValueError as exc:
            raise MessageRejected(f"header extension is not valid JSON: {exc}") from None
        if not isinstance(extension, dict) or not isinstance(extension.get("content"), dict):
            raise MessageRejected("header extension has no content")
        declared = _check_buffer_list(extension.get("buffers"))
        if sum(int(e[0]) for e in declared) != total or sum(int(e[2]) for e in declared) != nframes:
            raise MessageRejected("header extension's buffers do not match the signed header")
        header["content"], header["buffers"] = extension["content"], declared
        return declared

    def _message(
        self,
        header: dict[str, Any],
        declared: list[list[Any]],
        total: int,
        buffers: list[Buffer],
        trusted_hop: bool,
    ) -> Message:
        if not trusted_hop:
            self.replay.record(header["id"], total)
        return Message(
            kind=header["kind"],
            content=header["content"],
            buffers=buffers,
            session=header["session"],
            parent=header["parent"],
            to=header["to"],
            id=header["id"],
            sent=header["sent"],
            digests=[str(entry[1]) for entry in declared],
            declared_bytes=total,
            direct=bool(header.get("direct")),
        )

    def begin(self, prelude: Sequence[Buffer], *, trusted_hop: bool = False) -> Incoming | Message:
        """Start receiving a message frame by frame, from its first five frames.

        The signature is checked before anything is allocated; the result says
        where each buffer frame that follows goes (:meth:`Incoming.targets`),
        so a receiver can copy frames straight into their final place (no
        reassembly copy, half the peak memory). A notice comes back as is.
        Raises :class:`ProtocolError` like :meth:`decode`.
        """
        try:
            # How many buffer frames follow is known only from the (signed) header.
            opened = self._open([memoryview(f) for f in prelude], 0, trusted_hop, stream=True)
            if isinstance(opened, Message):
                return opened  # a notice: the receiver checks that no frame follows
            return Incoming(self, *opened, trusted_hop)
        except ProtocolError:
            raise
        except Exception as exc:  # e.g. RecursionError on a hostile header
            raise MessageRejected(f"malformed message ({type(exc).__name__})") from None

    def _open(
        self, views: list[memoryview], nbuffers: int, trusted_hop: bool, stream: bool = False
    ) -> tuple[dict[str, Any], list[list[Any]], int] | Message:
        """Check the prelude (magic, version, kind, header, signature) of a message
        with ``nbuffers`` buffer frames: the header, its buffer list and total bytes,
        or the notice it is. Nothing of the buffers is looked at."""
        if len(views) < _PRELUDE or bytes(views[0]) != MAGIC:
            raise MessageRejected("not a lan2gpu message (bad magic or too few frames)")
        version = bytes(views[1])
        if version != _VERSION_FRAME:
            raise VersionMismatch(
                f"peer speaks lan2gpu protocol version {version.decode(errors='replace')}, "
                f"this side speaks {PROTOCOL_VERSION}; install the same lan2gpu version "
                "on the notebook machine and the worker"
            )
        kind = bytes(views[2]).decode("ascii", errors="replace")
        if kind not in KINDS:
            raise MessageRejected(f"unknown message kind {kind!r}")
        if nbuffers > self.limits.max_frames:
            raise MessageRejected(
                f"message has {nbuffers} buffer frames, more than the limit of "
                f"{self.limits.max_frames}"
            )
        if views[3].nbytes > self.limits.max_header_bytes:
            raise MessageRejected(f"header of {views[3].nbytes} bytes is over the limit")
        signature = bytes(views[4])
        if not signature and kind == REJECT and nbuffers == 0:
            return self._notice(views[3])  # a streamed one must then have no more frames
        if not hmac.compare_digest(signature, _mac(self.key, views[:4])):
            raise AuthenticationError(
                "message signature does not verify: the sender uses a different key, or "
                "the message was altered in transit"
            )
        header = _parse_header(views[3])
        if header["kind"] != kind:
            raise MessageRejected("header kind does not match the kind frame")
        declared = header["buffers"]
        total = sum(int(entry[0]) for entry in declared)
        frames = sum(int(entry[2]) for entry in declared)
        if "ext" in header:
            ext_bytes, _, ext_frames, total, frames = header["ext"]
            if ext_bytes > min(self.limits.max_extension_bytes, self.limits.max_bytes):
                raise MessageRejected(
                    f"header extension of {ext_bytes} bytes is over the limit of "
                    f"{min(self.limits.max_extension_bytes, self.limits.max_bytes)}"
                )
            frames += ext_frames
            stream = True  # the declared frames are checked before the extension is read
        if stream and frames > self.limits.max_frames:
            raise MessageRejected("header declares more buffer frames than the limit")
        if total > self.limits.max_bytes:
            raise MessageRejected(
                f"message carries {total} bytes, over the limit of {self.limits.max_bytes}"
            )
        if not trusted_hop:
            self.replay.check(header["id"], header["sent"], total, late_ok=kind in _LATE_OK)
        return header, declared, total

    def _buffers(
        self, declared: list[list[Any]], frames: Sequence[memoryview], verify: bool, assemble: bool
    ) -> list[Buffer]:
        wanted = sum(int(entry[2]) for entry in declared)
        if wanted != len(frames):
            raise MessageRejected(
                f"header declares {len(declared)} buffers in {wanted} frames, but "
                f"{len(frames)} frames arrived"
            )
        out: list[Buffer] = []
        pos = 0
        for i, (nbytes, expected, count, codec) in enumerate(declared):
            chunks: Sequence[Buffer] = frames[pos : pos + count]
            pos += count
            if codec == compress.LZ4:
                chunks = _inflate(chunks, nbytes, i)
            elif codec:
                raise MessageRejected(f"buffer {i} uses an unknown codec {codec!r}")
            views = [memoryview(c) for c in chunks]
            if sum(v.nbytes for v in views) != nbytes or any(v.nbytes > CHUNK for v in views):
                raise MessageRejected(f"buffer {i} does not match the {nbytes} bytes declared")
            if verify:
                threads = blake3.blake3.AUTO if nbytes >= _PARALLEL_HASH_BYTES else 1
                hasher = blake3.blake3(max_threads=threads)
                for view in views:
                    hasher.update(view)
                if not hmac.compare_digest(hasher.hexdigest(), str(expected)):
                    raise AuthenticationError(f"buffer {i} does not match its signed digest")
            if assemble:
                out.append(views[0] if count == 1 else _join(views, nbytes))
        return out

    @staticmethod
    def _notice(header_frame: memoryview) -> Message:
        # Unsigned, so parsed defensively: small, and no nesting to recurse into.
        raw = bytes(header_frame[:_NOTICE_BYTES])
        try:
            if raw.count(b"{") + raw.count(b"[") > 8:
                raise ValueError("too deeply nested for a notice")
            header = json.loads(raw)
            content = header.get("content", {})
            reason = str(content.get("reason", "no reason given"))[:2000]
            code = str(content.get("code", ""))[:64]
            parent = str(header.get("parent", ""))[:64]
        except Exception:  # anything unparsable is just an unreadable notice
            reason, code, parent = "unreadable rejection notice", "", ""
        return Message(
            kind=REJECT,
            content={"reason": reason, "code": code},
            parent=parent,
            authenticated=False,
        )


class Incoming:
    """A signed message whose buffer frames are still to come (:meth:`Wire.begin`).

    For every buffer frame, in order, :meth:`targets` gives either a writable
    view to receive it into (raw buffers: each frame is a ``CHUNK``-sized slice
    of the buffer's final memory) or ``None`` (compressed: hand the frame to
    :meth:`put`). :meth:`finish` checks sizes and digests and returns the message.
    """

    def __init__(
        self,
        wire: Wire,
        header: dict[str, Any],
        declared: list[list[Any]],
        total: int,
        trusted_hop: bool,
    ) -> None:
        self._wire, self._header, self._declared = wire, header, declared
        self._total, self._trusted = total, trusted_hop
        self._buffers: list[Buffer] = []
        self._targets: list[memoryview | None] = []
        self._owner: list[int] = []  # buffer index of each frame (-1: the extension)
        self._frames: dict[int, list[Buffer]] = {}  # compressed buffers' frames
        self._extension: memoryview | None = None  # until it is in and read
        if "ext" in header:  # its buffers are planned once the extension is in
            self._extension = view = memoryview(fresh_memory(int(header["ext"][0])))
            self._targets += [view[k : k + CHUNK] for k in range(0, view.nbytes, CHUNK)] or [view]
            self._owner += [-1] * len(self._targets)
        else:
            self._plan()
        self.nbytes = total
        self.direct = bool(header.get("direct"))  # the frames come on the data connection
        self._next = 0

    def _plan(self) -> None:
        for i, entry in enumerate(self._declared):
            nbytes, count, codec = int(entry[0]), int(entry[2]), entry[3]
            self._owner += [i] * count
            if codec == compress.LZ4:
                self._buffers.append(b"")
                self._frames[i] = []
                self._targets += [None] * count
                continue
            if codec:
                raise MessageRejected(f"buffer {i} uses an unknown codec {codec!r}")
            if count != max(1, math.ceil(nbytes / CHUNK)):
                raise MessageRejected(f"buffer {i} does not match the {nbytes} bytes declared")
            memory = receive_buffer(nbytes)  # writable, so arrays built on it are
            self._buffers.append(memory)
            view = memoryview(memory)
            self._targets += [view[k : k + CHUNK] for k in range(0, nbytes, CHUNK)] or [view]

    def skeleton(self) -> Message:
        """The message without its buffers: a direct one's, or to answer a cell whose
        buffers never came. Its id counts as received (the signature checked out)."""
        return self._wire._message(self._header, self._declared, self._total, [], self._trusted)

    def targets(self) -> Iterator[memoryview | None]:
        """Where each frame goes, in order; each must be passed to :meth:`received`
        or :meth:`put` before the next is asked for (the buffers of a spilled
        header are known only once its extension frames are in)."""
        index = 0
        while index < len(self._targets):
            yield self._targets[index]
            index += 1
            if self._extension is not None and index == len(self._targets) == self._next:
                try:
                    self._declared = self._wire._extend(
                        self._header, self._extension, verify=not self._trusted
                    )
                    self._extension = None
                    self._plan()
                except ProtocolError:
                    raise
                except Exception as exc:  # e.g. RecursionError, as in Wire.decode
                    raise MessageRejected(f"malformed message ({type(exc).__name__})") from None

    def received(self, nbytes: int) -> None:
        """The next frame went into its target; it was ``nbytes`` long."""
        target = self._targets[self._next]
        if target is None or nbytes != target.nbytes:
            raise MessageRejected(f"buffer {self._owner[self._next]} has a frame of a wrong size")
        self._next += 1

    def put(self, frame: Buffer) -> None:
        """The next frame, for a compressed buffer."""
        if self._next >= len(self._targets) or self._targets[self._next] is not None:
            raise MessageRejected("a frame arrived where the header declares none")
        self._frames[self._owner[self._next]].append(frame)
        self._next += 1

    def finish(self) -> Message:
        """All frames are in: verify and return the message."""
        if self._extension is not None or self._next != len(self._targets):
            raise MessageRejected(
                f"header declares {len(self._targets)} buffer frames, but {self._next} arrived"
            )
        for i, frames in self._frames.items():
            nbytes = int(self._declared[i][0])
            chunks = [memoryview(c) for c in _inflate(frames, nbytes, i)]
            if sum(c.nbytes for c in chunks) != nbytes:
                raise MessageRejected(f"buffer {i} does not match the {nbytes} bytes declared")
            self._buffers[i] = chunks[0] if len(chunks) == 1 else _join(chunks, nbytes)
        # A direct message's bytes came sealed (datapath.py): every one already
        # authenticated, under a key only holders of the shared key derive.
        if not (self._trusted or self.direct):
            for i, (buffer, entry) in enumerate(zip(self._buffers, self._declared, strict=True)):
                nbytes = memoryview(buffer).nbytes
                threads = blake3.blake3.AUTO if nbytes >= _PARALLEL_HASH_BYTES else 1
                got = blake3.blake3(buffer, max_threads=threads).hexdigest()
                if not hmac.compare_digest(got, str(entry[1])):
                    raise AuthenticationError(f"buffer {i} does not match its signed digest")
        return self._wire._message(
            self._header, self._declared, self._total, self._buffers, self._trusted
        )


def _inflate(chunks: Sequence[Buffer], nbytes: int, index: int) -> list[Buffer]:
    sizes = [min(CHUNK, nbytes - start) for start in range(0, nbytes, CHUNK)] or [0]
    if len(sizes) != len(chunks):
        raise MessageRejected(
            f"buffer {index} has {len(chunks)} compressed chunks, not {len(sizes)}"
        )
    try:
        return [compress.decompress_chunk(c, size) for c, size in zip(chunks, sizes, strict=True)]
    except Exception as exc:  # LZ4Error and friends on corrupt data
        raise MessageRejected(f"buffer {index} does not decompress: {exc}") from None


def _join(chunks: Sequence[memoryview], nbytes: int) -> Buffer:
    # One copy into writable memory, so arrays built on it are writable.
    out = receive_buffer(nbytes)
    view = memoryview(out)
    pos = 0
    for chunk in chunks:
        view[pos : pos + chunk.nbytes] = chunk
        pos += chunk.nbytes
    return out


def receive_buffer(nbytes: int) -> Buffer:
    """Writable memory for a received buffer: from this process's pool of
    pre-faulted memory (:mod:`.buffer_pool`) when it has room, else fresh."""
    pooled = buffer_pool.take(nbytes)
    return pooled if pooled is not None else fresh_memory(nbytes)


def fresh_memory(nbytes: int) -> Buffer:
    """Writable memory that becomes resident only as it is written.

    ``bytearray(n)`` writes n zeros at once: a receiver would then hold a large
    buffer twice (the frames, and the zeroed copy) before the first byte is
    copied. Private anonymous pages are zero and free until touched.
    """
    private = getattr(mmap, "MAP_PRIVATE", None)  # POSIX
    if nbytes < _LAZY_BYTES or private is None:
        return bytearray(nbytes)
    return memoryview(mmap.mmap(-1, nbytes, flags=private))


def _parse_header(frame: memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(frame))
    except ValueError as exc:
        raise MessageRejected(f"header is not valid JSON: {exc}") from None
    fields: dict[str, type | tuple[type, ...]] = {
        "id": str,
        "kind": str,
        "session": str,
        "parent": str,
        "to": str,
        "sent": (int, float),
        "content": dict,
        "buffers": list,
    }
    if not isinstance(header, dict):
        raise MessageRejected("header is not a JSON object")
    for name, typ in fields.items():
        if not isinstance(header.get(name), typ):
            raise MessageRejected(f"header field {name!r} is missing or has the wrong type")
    _check_buffer_list(header["buffers"])
    header["sent"] = float(header["sent"])
    if not math.isfinite(header["sent"]):
        raise MessageRejected("header field 'sent' is not a time")
    if "ext" in header:
        ext = header["ext"]
        if not (
            isinstance(ext, list)
            and len(ext) == 5
            and all(_count(ext[i]) for i in (0, 2, 3, 4))
            and isinstance(ext[1], str)
            and ext[1].isascii()
            and len(ext[1]) <= 128
            and ext[2] == max(1, math.ceil(ext[0] / CHUNK))
            and not header["content"]
            and not header["buffers"]
        ):
            raise MessageRejected("header extension entry is malformed")
    if "direct" in header and (header["direct"] is not True or "ext" in header):
        raise MessageRejected("header field 'direct' is malformed")
    return header


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_buffer_list(declared: object) -> list[list[Any]]:
    if not isinstance(declared, list):
        raise MessageRejected("header buffer list is malformed")
    for entry in declared:
        if not (
            isinstance(entry, list)
            and len(entry) == 4
            and _count(entry[0])
            and _count(entry[2])
            and entry[2] >= 1
            and isinstance(entry[1], str)
            and isinstance(entry[3], str)
            and entry[1].isascii()
            and len(entry[1]) <= 128
        ):
            raise MessageRejected("header buffer list is malformed")
    return declared
