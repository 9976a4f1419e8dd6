"""``python -m worker_kernel``: serve this host's GPUs; ``... keygen``: make a key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import sys
from pathlib import Path

import zmq

from .capabilities import detect
from .config import config_from_args
from .options import build_parser, command_parser
from .protocol.curve import WORKER, authorized, authorized_keys_dir, ensure_keypair, key_dir
from .protocol.errors import ConfigurationError, Lan2GPUError
from .protocol.keys import generate_key_file, load_key
from .service import WorkerService

log = logging.getLogger(__name__)


def _keygen(argv: list[str]) -> int:
    args = command_parser("keygen").parse_args(argv)
    path = generate_key_file(args.key_file)
    print(f"wrote a new key to {path} (mode 0600)")
    return 0


MIN_LIBZMQ = (4, 3, 3)


def check_libzmq(version: tuple[int, int, int]) -> None:
    """Refuse libzmq releases with known remotely exploitable bugs."""
    if version < MIN_LIBZMQ:
        have = ".".join(map(str, version))
        raise ConfigurationError(
            f"libzmq {have} is older than 4.3.3, which fixed bugs a peer on the network "
            "can exploit; upgrade pyzmq (`pip install -U pyzmq` brings a current libzmq)"
        )


def _serve(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    check_libzmq(zmq.zmq_version_info())
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s [lan2gpu-worker %(process)d] %(message)s",
    )
    key = load_key(config.key_file)
    capabilities = detect(config.simulate, config.gpus, config.simulated_gpus)
    service = WorkerService(config, key, capabilities)
    asyncio.run(service.run())
    if config.cleanup_dir is not None and not service.failed:
        remove_own_folder(config.cleanup_dir)  # kept after a failure: its log says why
    return 1 if service.failed else 0


CLEANUP_FILES = ("key", "worker.log", "ready.json")  # what an embedded worker's folder holds


def remove_own_folder(folder: Path) -> None:
    """``--cleanup-dir``: remove the embedded worker's folder, and nothing else: only a
    real directory of this user, and only the files the embedded worker puts there (a
    folder holding anything more is left as it is)."""
    try:
        info = folder.lstat()
    except OSError:
        return
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        log.warning("--cleanup-dir %s is not a directory of this user; left alone", folder)
        return
    for name in CLEANUP_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    try:
        folder.rmdir()
    except OSError as exc:
        log.warning("--cleanup-dir %s: not removed (%s)", folder, exc)


def _curve_keygen(argv: list[str]) -> int:
    args = command_parser("curve-keygen").parse_args(argv)
    public, _ = ensure_keypair(key_dir(args.key_file), WORKER)
    allowed = authorized_keys_dir(args.key_file)
    allowed.mkdir(parents=True, exist_ok=True, mode=0o700)
    print(f"worker public key: {public}  (copy it to notebook machines: --server-key)")
    print(f"allowed clients:   {allowed}/*.key  (their client.key files)")
    return 0


def _authorized_keys(argv: list[str]) -> int:
    args = command_parser("authorized-keys").parse_args(argv)
    folder = args.authorized_keys or authorized_keys_dir(args.key_file)
    keys = authorized(folder)
    for name, public in keys:
        print(f"{name}  {public.decode()}")
    print(f"{len(keys)} client key(s) in {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "keygen": _keygen,
        "curve-keygen": _curve_keygen,
        "authorized-keys": _authorized_keys,
    }
    try:
        if argv[:1] and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return _serve(argv)
    except Lan2GPUError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
