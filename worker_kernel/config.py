"""Worker settings: a frozen dataclass built from argparse and ``LAN2GPU_*``.

Precedence: command line > environment > defaults. ``--help`` lists every
option with its environment variable.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from .protocol.errors import ConfigurationError
from .protocol.keys import default_key_file

FAULTS = {
    "drop-first-result": "the first result is not sent (the client must fetch it again)",
    "poison-hook": "cells get lan2gpu_poison_context(), which acts like a CUDA error "
    "that leaves the GPU context unusable",
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"1000"`` -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigurationError(f"{text!r} is not a size; write e.g. 512M, 4G or 1.5GiB")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit.lower() or "_"))


@dataclass(frozen=True)
class WorkerConfig:
    bind: str
    key_file: Path
    name: str
    simulate: str = "off"  # "on", "off" or "auto" (simulate when no GPU is found)
    gpus: list[int] | None = None  # --gpus 0,2: serve only these
    simulated_gpus: int = 1
    advertise: bool = True
    heartbeat: float = 1.0
    replay_window: float = 120.0
    max_message_bytes: int = 16 << 30
    executor_start_timeout: float = 120.0
    cancel_grace: float = 1.0
    session_idle: float = 3600.0
    ready_file: Path | None = None
    parent_pid: int | None = None
    log_level: str = "INFO"
    faults: tuple[str, ...] = ()  # test hooks, see --fault
    memory_limit: int = 0  # per executor, bytes; 0: none
    cache_memory: int = 0  # per executor: arrays kept by digest; 0: no cache
    max_kernels: int = 8  # whole Jupyter kernels hosted for IDEs
    max_executors: int = 16  # session executors kept; the longest idle goes first
    kernel_grace: float = 30.0  # a kernel outlives its silent forwarder this long
    encrypt: bool = False  # per-user CurveZMQ keys instead of keys from the shared key
    authorized_keys: Path | None = None  # CURVE client keys accepted (--encrypt)
    plaintext: bool = False  # --insecure-plaintext: no encryption at all
    handshake_timeout: float = 5.0  # a connection that has not finished it is dropped


# (flag, env var, help) for every option; the parser and --help come from this.
_ENV_HELP = """
environment variables (the command line wins over them):
  LAN2GPU_BIND, LAN2GPU_KEY_FILE, LAN2GPU_NAME, LAN2GPU_SIMULATE (on|off|auto),
  LAN2GPU_GPUS, LAN2GPU_SIMULATED_GPUS, LAN2GPU_ADVERTISE (1|0),
  LAN2GPU_HEARTBEAT, LAN2GPU_REPLAY_WINDOW, LAN2GPU_MAX_MESSAGE_BYTES,
  LAN2GPU_EXECUTOR_START_TIMEOUT, LAN2GPU_CANCEL_GRACE, LAN2GPU_SESSION_IDLE,
  LAN2GPU_MEMORY_LIMIT, LAN2GPU_CACHE_MEMORY, LAN2GPU_ENCRYPT, LAN2GPU_AUTHORIZED_KEYS,
  LAN2GPU_INSECURE_PLAINTEXT, LAN2GPU_HANDSHAKE_TIMEOUT,
  LAN2GPU_MAX_KERNELS, LAN2GPU_KERNEL_GRACE,
  LAN2GPU_LOG_LEVEL

create a key first (mode 0600; copy it to every notebook machine):
  python -m worker_kernel keygen --key-file ~/.config/lan2gpu/key
"""


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m worker_kernel",
        description=(
            "Serve this machine's GPUs to lan2gpu notebooks on the LAN. Every message is "
            "signed with the shared key; whoever holds it can run code here."
        ),
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--bind",
        default=env("LAN2GPU_BIND"),
        metavar="ADDR",
        help="ZeroMQ address to listen on, e.g. tcp://10.0.0.7:7340 or tcp://127.0.0.1:* "
        "(random port) [LAN2GPU_BIND; required]",
    )
    parser.add_argument(
        "--key-file",
        default=env("LAN2GPU_KEY_FILE") or str(default_key_file()),
        metavar="PATH",
        help="shared key written by `keygen` [LAN2GPU_KEY_FILE; default %(default)s]",
    )
    parser.add_argument(
        "--name",
        default=env("LAN2GPU_NAME") or socket.gethostname(),
        help="worker name shown to clients and used by --worker [LAN2GPU_NAME; default: host name]",
    )
    parser.add_argument(
        "--simulate",
        nargs="?",
        const="on",
        default=env("LAN2GPU_SIMULATE", "off"),
        choices=["on", "off", "auto"],
        help="run CUDA kernels in Numba's CUDA simulator (for tests and demos; `auto`: "
        "only when no GPU is found) [LAN2GPU_SIMULATE; default off]",
    )
    parser.add_argument(
        "--gpus",
        type=_gpu_list,
        default=_gpu_list(env("LAN2GPU_GPUS", "")),
        metavar="LIST",
        help="serve only these GPUs, e.g. 0,2 (nvidia-smi numbering) [LAN2GPU_GPUS; default: all]",
    )
    parser.add_argument(
        "--simulated-gpus",
        type=int,
        default=int(env("LAN2GPU_SIMULATED_GPUS", "1")),
        metavar="N",
        help="with --simulate, how many GPUs to pretend to have (each runs the "
        "simulator; for trying multi-GPU placement) [default %(default)s]",
    )
    parser.add_argument(
        "--advertise",
        action=argparse.BooleanOptionalAction,
        default=env("LAN2GPU_ADVERTISE", "1") not in ("0", "false", "no"),
        help="announce this worker on the LAN with mDNS/DNS-SD (_lan2gpu._tcp) so "
        "notebooks find it without an address; never for loopback addresses "
        "[LAN2GPU_ADVERTISE; default on]",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=float(env("LAN2GPU_HEARTBEAT", "1.0")),
        metavar="SECONDS",
        help="heartbeat interval; a peer silent for 3 intervals is lost "
        "[LAN2GPU_HEARTBEAT; default %(default)s]",
    )
    parser.add_argument(
        "--replay-window",
        type=float,
        default=float(env("LAN2GPU_REPLAY_WINDOW", "120")),
        metavar="SECONDS",
        help="accept messages sent at most this far from now (clocks must agree this "
        "well) [LAN2GPU_REPLAY_WINDOW; default %(default)s]",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=parse_size,
        default=parse_size(env("LAN2GPU_MAX_MESSAGE_BYTES", "16G")),
        metavar="SIZE",
        help="largest message accepted [LAN2GPU_MAX_MESSAGE_BYTES; default 16G]",
    )
    parser.add_argument(
        "--executor-start-timeout",
        type=float,
        default=float(env("LAN2GPU_EXECUTOR_START_TIMEOUT", "120")),
        metavar="SECONDS",
        help="how long an executor may take to start [default %(default)s]",
    )
    parser.add_argument(
        "--cancel-grace",
        type=float,
        default=float(env("LAN2GPU_CANCEL_GRACE", "1.0")),
        metavar="SECONDS",
        help="after an interrupt or timeout, how long a cell gets to stop before its "
        "executor is killed and replaced [LAN2GPU_CANCEL_GRACE; default %(default)s]",
    )
    parser.add_argument(
        "--session-idle",
        type=float,
        default=float(env("LAN2GPU_SESSION_IDLE", "3600")),
        metavar="SECONDS",
        help="stop a session's executor (and free its GPU memory) after this long "
        "without a cell [LAN2GPU_SESSION_IDLE; default %(default)s]",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="write {address, pid, name} as JSON here once listening (for launchers)",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="exit when this process exits (used by the notebook's embedded worker)",
    )
    parser.add_argument(
        "--encrypt",
        action=argparse.BooleanOptionalAction,
        default=env("LAN2GPU_ENCRYPT", "0") in ("1", "true", "yes"),
        help="encrypt every connection with CurveZMQ: clients pin this worker's public key "
        "(worker.key next to the key file, made on first use) and only clients whose public "
        "key is in --authorized-keys may connect [LAN2GPU_ENCRYPT; default off]",
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=env("LAN2GPU_INSECURE_PLAINTEXT", "0") in ("1", "true", "yes"),
        help="turn encryption off: cells, arrays and remote kernels then cross the network "
        "readable by anyone on the path, and a peer without the key can make this worker "
        "hold its bytes until their signature is checked. By default every connection is "
        "encrypted with CurveZMQ keys derived from the shared key; notebooks must then "
        "connect with --insecure-plaintext too [LAN2GPU_INSECURE_PLAINTEXT; default off]",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=float(env("LAN2GPU_HANDSHAKE_TIMEOUT", "5")),
        metavar="S",
        help="drop a connection that has not finished its ZeroMQ/CurveZMQ handshake within "
        "S seconds, so idle or slow peers cannot use up file descriptors "
        "[LAN2GPU_HANDSHAKE_TIMEOUT; default 5]",
    )
    parser.add_argument(
        "--authorized-keys",
        type=Path,
        default=env("LAN2GPU_AUTHORIZED_KEYS"),
        metavar="DIR",
        help="with --encrypt: client public keys (*.key) allowed to connect; re-read when it "
        "changes [LAN2GPU_AUTHORIZED_KEYS; default: authorized_keys/ next to the key file]",
    )
    parser.add_argument(
        "--memory-limit",
        type=_memory_limit,
        default=_memory_limit(env("LAN2GPU_MEMORY_LIMIT", "75%")),
        metavar="SIZE",
        help="memory each executor may allocate (RLIMIT_DATA), e.g. 16G, 50%% of RAM, or "
        "none; a cell going past it gets a MemoryError [LAN2GPU_MEMORY_LIMIT; default 75%%]",
    )
    parser.add_argument(
        "--cache-memory",
        type=_memory_limit,
        default=_memory_limit(env("LAN2GPU_CACHE_MEMORY", "25%")),
        metavar="SIZE",
        help="memory each session may use to keep arrays by content, so an unchanged "
        "array is not sent again (e.g. 4G, 25%%, or none) [LAN2GPU_CACHE_MEMORY; "
        "default 25%%]",
    )
    parser.add_argument(
        "--max-executors",
        type=int,
        default=int(env("LAN2GPU_MAX_EXECUTORS", "16")),
        metavar="N",
        help="most session executors kept at once (each holds its namespace, arrays and "
        "GPU memory); to start another, the one idle longest is stopped "
        "[LAN2GPU_MAX_EXECUTORS; default %(default)s]",
    )
    parser.add_argument(
        "--max-kernels",
        type=int,
        default=int(env("LAN2GPU_MAX_KERNELS", "8")),
        metavar="N",
        help="most Jupyter kernels this worker hosts for IDEs at once [LAN2GPU_MAX_KERNELS; "
        "default %(default)s]",
    )
    parser.add_argument(
        "--kernel-grace",
        type=float,
        default=float(env("LAN2GPU_KERNEL_GRACE", "30")),
        metavar="SECONDS",
        help="shut a hosted kernel down when its notebook machine has been silent this long "
        "[LAN2GPU_KERNEL_GRACE; default %(default)s]",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        choices=list(FAULTS),
        help="inject a fault, to test recovery: "
        + "; ".join(f"{k}: {v}" for k, v in FAULTS.items()),
    )
    parser.add_argument(
        "--log-level",
        default=env("LAN2GPU_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="[LAN2GPU_LOG_LEVEL; default %(default)s]",
    )
    return parser


def _memory_limit(text: str) -> int:
    text = text.strip().lower()
    if text in ("none", "0", "off"):
        return 0
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * share)
    try:
        return parse_size(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gpu_list(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of GPU numbers; write e.g. 0,2"
        ) from None


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    if not args.bind:
        raise ConfigurationError(
            "no address to listen on: pass --bind, e.g. --bind tcp://127.0.0.1:7340 "
            "(this machine only) or --bind tcp://10.0.0.7:7340 (its LAN address)"
        )
    if args.simulate not in ("on", "off", "auto"):
        raise ConfigurationError(f"LAN2GPU_SIMULATE={args.simulate!r}: use on, off or auto")
    if args.heartbeat <= 0 or args.cancel_grace < 0:
        raise ConfigurationError("--heartbeat must be positive and --cancel-grace >= 0")
    if args.encrypt and args.insecure_plaintext:
        raise ConfigurationError(
            "--encrypt and --insecure-plaintext contradict each other; pick one (or neither: "
            "connections are then encrypted with keys derived from the shared key)"
        )
    if not args.handshake_timeout > 0:
        raise ConfigurationError("--handshake-timeout must be a positive number of seconds")
    return WorkerConfig(
        bind=args.bind,
        key_file=Path(args.key_file).expanduser(),
        name=args.name,
        simulate=args.simulate,
        gpus=args.gpus,
        simulated_gpus=max(1, args.simulated_gpus),
        advertise=args.advertise,
        heartbeat=args.heartbeat,
        replay_window=args.replay_window,
        max_message_bytes=args.max_message_bytes,
        executor_start_timeout=args.executor_start_timeout,
        cancel_grace=args.cancel_grace,
        session_idle=args.session_idle,
        ready_file=args.ready_file,
        parent_pid=args.parent_pid,
        log_level=args.log_level,
        faults=tuple(args.fault),
        memory_limit=args.memory_limit,
        cache_memory=args.cache_memory,
        max_kernels=args.max_kernels,
        max_executors=args.max_executors,
        kernel_grace=args.kernel_grace,
        encrypt=args.encrypt,
        authorized_keys=Path(args.authorized_keys).expanduser() if args.authorized_keys else None,
        plaintext=args.insecure_plaintext,
        handshake_timeout=args.handshake_timeout,
    )
