"""The shared key: created once with ``python -m worker_kernel keygen``, mode 0600.

Whoever holds the key can run code on every worker that trusts it, so a key file
readable by other users is refused, and ``keygen`` never overwrites a file.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .errors import ConfigurationError

KEY_BYTES = 32
KEY_FILE_ENV = "LAN2GPU_KEY_FILE"


def default_key_file() -> Path:
    """``$LAN2GPU_KEY_FILE``, else ``$XDG_CONFIG_HOME/lan2gpu/key`` (``~/.config``)."""
    env = os.environ.get(KEY_FILE_ENV)
    if env:
        return Path(env).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "lan2gpu" / "key"


def generate_key_file(path: str | os.PathLike[str]) -> Path:
    """Write a new random key to ``path`` with mode 0600; refuse to overwrite."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: never clobber a key that workers already trust.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(
            f"key file {target} already exists; keygen never overwrites a key. Use it as "
            "it is, or delete it first (every worker and notebook must then get the new one)."
        ) from None
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(KEY_BYTES) + "\n")
    return target


def refuse_if_shared(path: Path, mode: int, what: str, risk: str) -> None:
    """Raise if a secret file with ``mode`` is accessible by group or others."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"{risk}. Run `chmod 600 {path}`."
        )


def load_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """Read a key file written by :func:`generate_key_file`.

    Raises :class:`ConfigurationError` if it is missing, malformed, or readable
    by group or others.
    """
    target = Path(path).expanduser() if path is not None else default_key_file()
    try:
        mode = target.stat().st_mode
        text = target.read_text().strip()
    except FileNotFoundError:
        raise ConfigurationError(
            f"key file {target} does not exist; create one with "
            f"`python -m worker_kernel keygen --key-file {target}` and copy it (mode 0600) "
            "to every notebook machine and worker that should talk to each other"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read key file {target}: {exc}") from None
    refuse_if_shared(
        target, mode, "key file", "anyone who can read it can run code on your workers"
    )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigurationError(
            f"key file {target} does not hold a hex key; recreate it with "
            "`python -m worker_kernel keygen`"
        ) from None
    if len(key) < 16:
        raise ConfigurationError(f"key in {target} is too short ({len(key)} bytes, need 16+)")
    return key
