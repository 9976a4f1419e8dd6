"""CurveZMQ key files for ``--encrypt``: where they live and how they are made.

Next to the shared key (``~/.config/lan2gpu/``) a worker keeps ``worker.key``
(public: copy it to every notebook machine, which pins it) and
``worker.key_secret`` (mode 0600); a notebook machine keeps ``client.key`` and
``client.key_secret``. A worker accepts only clients whose public key file is in
its ``authorized_keys/`` directory, like SSH's authorized_keys. Files use
ZeroMQ's certificate format (``zmq.auth``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq.auth

from .errors import ConfigurationError

log = logging.getLogger(__name__)

WORKER = "worker"
CLIENT = "client"


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
    """``(public, secret)`` from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(Path(secret_path).expanduser())
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
