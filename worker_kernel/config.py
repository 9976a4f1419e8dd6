"""Worker settings: a frozen dataclass built from the command line (:mod:`.options`).

Precedence: command line > ``LAN2GPU_*`` environment > defaults.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from .protocol.errors import ConfigurationError
from .protocol.units import memory_size

FAULTS = {
    "drop-first-result": "the first result is not sent (the client must fetch it again)",
    "closed-data-port": "executors name a closed port as their data endpoint (as behind "
    "a firewall: the client must send the arrays through the worker's port)",
    "poison-hook": "cells get lan2gpu_poison_context(), which acts like a CUDA error "
    "that leaves the GPU context unusable",
}


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
    cleanup_dir: Path | None = None  # removed when the worker stops (embedded worker)
    log_level: str = "INFO"
    faults: tuple[str, ...] = ()  # test hooks, see --fault
    memory_limit: int = 0  # all executors together, bytes; 0: none
    session_memory: int = 0  # at most this per session's executor; 0: up to memory_limit
    cache_memory: int = 0  # per executor: arrays kept by digest; 0: no cache
    pool_memory: int = 0  # per executor: kept memory arrays are received into
    pool_prefault: bool = False  # fault it in when the executor starts
    direct_data: bool = True  # large inputs go straight to the executor (datapath.py)
    max_kernels: int = 8  # whole Jupyter kernels hosted for IDEs
    max_executors: int = 16  # session executors kept; the longest idle goes first
    kernel_grace: float = 30.0  # a kernel outlives its silent forwarder this long
    stall_grace: float = 60.0  # notebooks wait this long for a connected, silent worker
    encrypt: bool = False  # per-user CurveZMQ keys instead of keys from the shared key
    authorized_keys: Path | None = None  # CURVE client keys accepted (--encrypt)
    plaintext: bool = False  # --insecure-plaintext: no encryption at all
    handshake_timeout: float = 5.0  # a connection that has not finished it is dropped


def memory_limit(text: str) -> int:
    try:
        return memory_size(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def gpu_list(text: str) -> list[int] | None:
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
    finite = all(math.isfinite(v) for v in (args.heartbeat, args.cancel_grace, args.stall_grace))
    if not finite or args.heartbeat <= 0 or args.cancel_grace < 0 or args.stall_grace < 0:
        raise ConfigurationError(
            "--heartbeat must be positive, --cancel-grace and --stall-grace >= 0"
        )
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
        cleanup_dir=args.cleanup_dir,
        log_level=args.log_level,
        faults=tuple(args.fault),
        memory_limit=args.memory_limit,
        session_memory=args.session_memory,
        cache_memory=args.cache_memory,
        pool_memory=args.pool_memory,
        pool_prefault=args.pool_prefault,
        direct_data=args.direct_data,
        max_kernels=args.max_kernels,
        max_executors=args.max_executors,
        kernel_grace=args.kernel_grace,
        stall_grace=args.stall_grace,
        encrypt=args.encrypt,
        authorized_keys=Path(args.authorized_keys).expanduser() if args.authorized_keys else None,
        plaintext=args.insecure_plaintext,
        handshake_timeout=args.handshake_timeout,
    )
