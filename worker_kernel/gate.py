"""What the worker lets in: client keys, rejection logging, request checks.

Kept apart from the service loop: these are the pieces that face untrusted
input (an unknown peer, a malformed but signed request).
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from .protocol.curve import (
    CLIENT,
    WORKER,
    authorized,
    authorized_keys_dir,
    derived_keypair,
    ensure_keypair,
    key_dir,
    load_keypair,
)

log = logging.getLogger(__name__)

_ANSWERED_PER_BURST = 20  # rejection notices sent to one peer per quiet period


class AllowList:
    """ZAP credentials check: is the client's public key in the allow-list directory?

    Read again whenever a key file is added, removed or rewritten, so changes take
    effect at the next connection, without a restart. Any error denies.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self._keys: dict[bytes, str] = {}  # z85 public key -> user (its file's name)
        self._refusals = RejectionLog(log)

    def user(self, user_id: str) -> str:
        """The user a connection's ZAP ``User-Id`` (its z85 public key) belongs to:
        the name of its file in the allow-list (``alice`` for ``alice.key``)."""
        return self._keys.get(user_id.encode(), f"key {user_id[:8]}")

    def _current(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        for path in sorted(self.folder.glob("*.key")):
            info = path.stat()
            entries.append((path.name, info.st_mtime_ns, info.st_size))
        return tuple(entries)

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            stamp = self._current()
            if stamp != self._stamp:
                self._stamp = stamp
                self._keys = {public: name[:-4] for name, public in authorized(self.folder)}
            allowed = key in self._keys
        except Exception:  # a broken key file must not take ZAP down: deny, log
            log.exception("cannot read the authorized keys in %s", self.folder)
            allowed = False
        if not allowed:
            self._refusals.note(f"client key {key[:10]!r}...", f"not in {self.folder}")
        return allowed


class SharedKey:
    """ZAP credentials check of the default mode: the client's public key is the one
    derived from the shared key, so only key holders finish the handshake."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public
        self._refusals = RejectionLog(log)

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key == self.client_public
        if not allowed:
            self._refusals.note(f"client key {key[:10]!r}...", "not derived from the shared key")
        return allowed


def peer_address(frame: Any) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except (zmq.ZMQError, AttributeError):
        return "?"


_MAX_REASON = 300  # characters of a rejection's reason that reach the log


class RejectionLog:
    """Logs the first rejected message of a peer, then at most one summary a minute;
    at most one line a second in all (many peers at once are one summary line), each
    truncated, so a misconfigured client or a flood cannot fill the log."""

    def __init__(self, logger: logging.Logger, quiet: float = 60.0, per_second: int = 1) -> None:
        self._log = logger
        self._quiet = quiet
        self._peers: dict[str, tuple[float, int]] = {}  # peer -> (last logged, suppressed)
        self._second = (float("-inf"), 0)  # (start of the current second, lines logged)
        self._per_second = per_second
        self._held = 0  # rejections of this second not logged for the global limit

    def note(self, peer: str, reason: str) -> bool:
        """Log a rejection; False when it was one of a burst (then do not answer it)."""
        now = time.monotonic()
        logged, suppressed = self._peers.get(peer, (float("-inf"), 0))
        if now - logged < self._quiet:
            self._peers[peer] = (logged, suppressed + 1)
            return suppressed < _ANSWERED_PER_BURST
        start, lines = self._second
        if now - start >= 1.0:
            start, lines = now, 0
        self._peers[peer] = (now, 0)
        if lines >= self._per_second:  # not logged, but answered: its sender learns why
            self._held += 1
            self._second = (start, lines)
            return True
        if len(reason) > _MAX_REASON:
            reason = reason[:_MAX_REASON] + f"... ({len(reason)} characters)"
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        if self._held:
            more += f"; {self._held} rejections from other peers were not logged"
            self._held = 0
        self._log.warning("rejected a message from %s: %s%s", peer[:200], reason, more)
        self._second = (start, lines + 1)
        self._peers[peer] = (now, 0)
        if len(self._peers) > 4096:  # forget the quietest peers
            for old in sorted(self._peers, key=lambda p: self._peers[p][0])[:2048]:
                del self._peers[old]
        return True


class BadRequest(Exception):
    """A signed message whose content makes no sense; answered with an error."""


def number(content: dict[str, Any], key: str) -> float:
    value = content.get(key)
    if value is None:
        return 0.0
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise BadRequest(f"{key}={value!r} is not a non-negative number")
    return float(value)


def encrypt_shared(
    ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket, key: bytes
) -> AsyncioAuthenticator:
    """The default: CurveZMQ with the key pairs derived from the shared key."""
    public, secret = derived_keypair(key, WORKER)
    auth = _curve_server(ctx, sock, public, secret, SharedKey(derived_keypair(key, CLIENT)[0]))
    log.info("encrypting with CurveZMQ keys derived from the shared key")
    return auth


def _curve_server(
    ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket, public: bytes, secret: bytes, check: Any
) -> AsyncioAuthenticator:
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=check)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def encrypt(
    ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket, key_file: Path, allowed: Path | None
) -> tuple[AsyncioAuthenticator, AllowList]:
    """``--encrypt``: CurveZMQ with this worker's own key pair, and a ZAP allow-list
    of client keys (returned too: it names the user of each connection)."""
    public, secret = load_keypair(ensure_keypair(key_dir(key_file), WORKER)[1])
    folder = allowed or authorized_keys_dir(key_file)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    users = AllowList(folder)
    auth = _curve_server(ctx, sock, public, secret, users)
    log.info(
        "encrypting with CurveZMQ; clients pin %s and must be listed in %s (%d now)",
        key_dir(key_file) / f"{WORKER}.key",
        folder,
        len(authorized(folder)),
    )
    return auth, users


def zap_user(frame: Any) -> str:
    """The ZAP ``User-Id`` of the connection a frame came on ("" if none)."""
    try:
        return str(frame.get("User-Id") or "")
    except (zmq.ZMQError, AttributeError):
        return ""


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one (each connection is a file
    descriptor; the usual soft limit of 1024 is soon reached); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
