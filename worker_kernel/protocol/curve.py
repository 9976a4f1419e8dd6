"""CurveZMQ keys: derived from the shared key (the default), or per user (``--encrypt``).

By default every connection is encrypted and authenticated with CurveZMQ keys
that each holder of the shared key derives from it (:func:`derived_keypair`):
one pair for workers, one for clients. A peer without the shared key cannot
complete the handshake, so a worker holds none of its bytes, and nothing of a
session (cells, arrays, a remote kernel's key) crosses the network in the clear.

With ``--encrypt`` a worker uses key pairs of its own and of each user instead:

Next to the shared key (``~/.config/lan2gpu/``) a worker keeps ``worker.key``
(public: copy it to every notebook machine, which pins it) and
``worker.key_secret`` (mode 0600); a notebook machine keeps ``client.key`` and
``client.key_secret``. A worker accepts only clients whose public key file is in
its ``authorized_keys/`` directory, like SSH's authorized_keys. Files use
ZeroMQ's certificate format (``zmq.auth``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from .errors import ConfigurationError
from .keys import refuse_if_shared

log = logging.getLogger(__name__)

WORKER = "worker"
CLIENT = "client"

# How a worker protects its connections (announced over mDNS, shown in status).
SHARED_KEY = "shared-key"  # the default: CurveZMQ keys derived from the shared key
PER_USER = "per-user"  # --encrypt: the worker's own key pair, an allow-list of user keys
PLAINTEXT = "plaintext"  # --insecure-plaintext


def derived_keypair(key: bytes, role: str) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 CurveZMQ keys for ``role`` (``WORKER``/``CLIENT``),
    the same for every holder of the shared ``key`` and useless without it."""
    seed = hmac.new(key, f"lan2gpu curve {role} v1".encode(), hashlib.sha256).digest()
    secret = z85.encode(seed)
    return zmq.curve_public(secret), secret


def key_dir(key_file: str | os.PathLike[str]) -> Path:
    return Path(key_file).expanduser().parent


def authorized_keys_dir(key_file: str | os.PathLike[str]) -> Path:
    return key_dir(key_file) / "authorized_keys"


def ensure_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """``(public, secret)`` key files for ``name`` in ``directory``, made if missing."""
    folder = Path(directory).expanduser()
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not secret.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        zmq.auth.create_certificates(folder, name)
        secret.chmod(0o600)
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """A public key from a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(Path(path).expanduser())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read the CurveZMQ public key {path}: {exc}. Copy the worker's "
            "worker.key file (see `python -m worker_kernel curve-keygen`)."
        ) from None
    return public


def load_keypair(secret_path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a ``.key_secret`` file (refused if others can read it)."""
    path = Path(secret_path).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigurationError(f"cannot read the CurveZMQ key {secret_path}: {exc}") from None
    refuse_if_shared(path, mode, "CurveZMQ secret key", "whoever reads it can pose as its owner")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the CurveZMQ key {secret_path}: {exc}") from None
    if secret is None:
        raise ConfigurationError(f"{secret_path} holds no secret key (use the .key_secret file)")
    return public, secret


def authorized(directory: str | os.PathLike[str]) -> list[tuple[str, bytes]]:
    """``(file name, public key)`` of every client key the worker accepts."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        return []
    keys = []
    for path in sorted(folder.glob("*.key")):
        try:
            keys.append((path.name, zmq.auth.load_certificate(path)[0]))
        except Exception as exc:  # a malformed file is skipped, never fatal
            log.warning("ignoring %s: not a CurveZMQ public key file (%s)", path, exc)
    return keys
