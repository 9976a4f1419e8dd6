"""Every option of ``python -m worker_kernel``, from one table.

The parser, ``--help`` (each option with its environment variable and default)
and the environment-variable list at its end are generated from ``OPTIONS``, so
an option cannot be added without its variable, or documented without existing.
"""

from __future__ import annotations

import argparse
import os
import socket
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import FAULTS, gpu_list, memory_limit
from .protocol.errors import ConfigurationError, Lan2GPUError
from .protocol.keys import default_key_file
from .protocol.units import parse_size

Kind = Literal["value", "switch", "flag", "append"]
# switch: --x/--no-x; flag: --x only (on when given); append: may be given many times


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    env: str | None = None  # LAN2GPU_*; None: command line only
    default: str | Callable[[], str] | None = None  # as written on the command line
    shown: str | None = None  # how --help writes the default, when not `default` itself
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    kind: Kind = "value"
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def raw_default(self, environ: Mapping[str, str]) -> str | None:
        if self.env and environ.get(self.env, "").strip():  # set but empty: unset
            return environ[self.env]
        return self.default() if callable(self.default) else self.default

    def parse_default(self, raw: str) -> Any:
        try:
            return self.parse(raw)
        except (ValueError, argparse.ArgumentTypeError, Lan2GPUError) as exc:
            where = f"${self.env}" if self.env else self.flag
            raise ConfigurationError(f"{where}={raw!r}: {exc}") from None

    def help_text(self) -> str:
        shown = self.shown or (self.default if isinstance(self.default, str) else None)
        if self.kind == "switch":
            shown = self.shown or ("on" if _truthy(str(self.default)) else "off")
        notes = [n for n in (self.env, f"default {shown}" if shown else None) if n]
        text = f"{self.help} [{'; '.join(notes)}]" if notes else self.help
        return text.replace("%", "%%")  # argparse formats help with %


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _simulate_mode(text: str) -> str:
    """on/off/auto; ``LAN2GPU_SIMULATE=1`` (or true, yes) means on, 0 (false, no) off."""
    text = text.strip().lower()
    if text in ("1", "true", "yes"):
        return "on"
    return "off" if text in ("0", "false", "no") else text


def _hostname() -> str:
    return socket.gethostname()


def _key_file() -> str:
    return str(default_key_file())


OPTIONS: tuple[Option, ...] = (
    Option("--bind", "ZeroMQ address to listen on, e.g. tcp://10.0.0.7:7340 or tcp://127.0.0.1:* "
           "(random port); required", "LAN2GPU_BIND", metavar="ADDR"),
    Option("--key-file", "shared key written by `keygen`", "LAN2GPU_KEY_FILE", _key_file,
           shown=str(default_key_file()), metavar="PATH"),
    Option("--name", "worker name shown to clients and used by --worker", "LAN2GPU_NAME",
           _hostname, shown="this host's name"),
    Option("--simulate", "run CUDA kernels in Numba's CUDA simulator (for tests and demos; "
           "auto: only when no GPU is found; --simulate alone: on)", "LAN2GPU_SIMULATE",
           "off", parse=_simulate_mode, choices=("on", "off", "auto")),
    Option("--gpus", "serve only these GPUs, e.g. 0,2 (nvidia-smi numbering)", "LAN2GPU_GPUS",
           "", shown="all", parse=gpu_list, metavar="LIST"),
    Option("--simulated-gpus", "with --simulate, how many GPUs to pretend to have (each runs "
           "the simulator; for trying multi-GPU placement)", "LAN2GPU_SIMULATED_GPUS", "1",
           parse=int, metavar="N"),
    Option("--advertise", "announce this worker on the LAN with mDNS/DNS-SD (_lan2gpu._tcp) "
           "so notebooks find it without an address; never for loopback addresses",
           "LAN2GPU_ADVERTISE", "1", kind="switch"),
    Option("--heartbeat", "heartbeat interval; a peer silent for 3 intervals is lost",
           "LAN2GPU_HEARTBEAT", "1.0", parse=float, metavar="SECONDS"),
    Option("--stall-grace", "how long a notebook waits for this worker when it stops "
           "answering but its connection stays up (an overloaded or swapping host, a stopped "
           "process): results of cells that finished are delivered when it comes back; past "
           "this, a cell in flight fails with WorkerLost and --retry does not run it again, "
           "as it may still finish here", "LAN2GPU_STALL_GRACE", "60", parse=float,
           metavar="SECONDS"),
    Option("--replay-window", "accept messages sent at most this far from now (clocks must "
           "agree this well)", "LAN2GPU_REPLAY_WINDOW", "120", parse=float, metavar="SECONDS"),
    Option("--max-message-bytes", "largest message accepted", "LAN2GPU_MAX_MESSAGE_BYTES",
           "16G", parse=parse_size, metavar="SIZE"),
    Option("--executor-start-timeout", "how long an executor may take to start",
           "LAN2GPU_EXECUTOR_START_TIMEOUT", "120", parse=float, metavar="SECONDS"),
    Option("--cancel-grace", "after an interrupt or timeout, how long a cell gets to stop "
           "before its executor is killed and replaced", "LAN2GPU_CANCEL_GRACE", "1.0",
           parse=float, metavar="SECONDS"),
    Option("--session-idle", "stop a session's executor (and free its GPU memory) after this "
           "long without a cell", "LAN2GPU_SESSION_IDLE", "3600", parse=float,
           metavar="SECONDS"),
    Option("--encrypt", "per-user keys: encrypt every connection with CurveZMQ keys of this "
           "worker (worker.key next to the key file, made on first use), which clients pin, "
           "and accept only clients whose public key is in --authorized-keys",
           "LAN2GPU_ENCRYPT", "0", kind="switch"),
    Option("--authorized-keys", "with --encrypt: client public keys (*.key) allowed to "
           "connect; re-read when it changes", "LAN2GPU_AUTHORIZED_KEYS",
           shown="authorized_keys/ next to the key file", parse=Path, metavar="DIR"),
    Option("--insecure-plaintext", "turn encryption off: cells, arrays and remote kernels "
           "then cross the network readable by anyone on the path, and a peer without the "
           "key can make this worker hold its bytes until their signature is checked. By "
           "default every connection is encrypted with CurveZMQ keys derived from the shared "
           "key; notebooks must then connect with --insecure-plaintext too",
           "LAN2GPU_INSECURE_PLAINTEXT", "0", shown="off", kind="flag"),
    Option("--handshake-timeout", "drop a connection that has not finished its "
           "ZeroMQ/CurveZMQ handshake within this long, so idle or slow peers cannot use up "
           "file descriptors", "LAN2GPU_HANDSHAKE_TIMEOUT", "5", parse=float,
           metavar="SECONDS"),
    Option("--memory-limit", "memory all executors together may hold, e.g. 16G, 50% of RAM, "
           "or none; a cell that would push the worker past it gets a MemoryError, and the "
           "other sessions go on", "LAN2GPU_MEMORY_LIMIT", "75%", parse=memory_limit,
           metavar="SIZE"),
    Option("--session-memory", "at most this much of --memory-limit for one session's "
           "executor, e.g. 8G or 25%", "LAN2GPU_SESSION_MEMORY", "none",
           shown="none (up to --memory-limit)", parse=memory_limit, metavar="SIZE"),
    Option("--cache-memory", "memory each session may use to keep arrays by content, so an "
           "unchanged array is not sent again (e.g. 4G, 25%, or none)",
           "LAN2GPU_CACHE_MEMORY", "25%", parse=memory_limit, metavar="SIZE"),
    Option("--pool-memory", "memory each session's executor receives arrays into and "
           "keeps, reused cell after cell so large arrays do not land in fresh pages (at "
           "most a quarter of what the session may hold, and --memory-limit divided by "
           "--max-executors; given back after 60 s idle; e.g. 2G, 5%, or none)",
           "LAN2GPU_POOL_MEMORY", "5%", parse=memory_limit, metavar="SIZE"),
    Option("--pool-prefault", "fault each executor's pool in when it starts, so its first "
           "cell does not (the pool then counts as held from the start)",
           "LAN2GPU_POOL_PREFAULT", "0", shown="off", kind="flag"),
    Option("--direct-data", "a large cell's arrays go on a connection of their own, straight "
           "between the notebook and the executor that runs it, sealed with AES-256-GCM (on "
           "a port the system picks, on the interface this worker listens on: a firewall "
           "must let notebooks reach it). --no-direct-data sends everything through this "
           "worker's own port", "LAN2GPU_DIRECT_DATA", "1", kind="switch"),
    Option("--max-executors", "most session executors kept at once (each holds its "
           "namespace, arrays and GPU memory). To start another, the one idle longest is "
           "stopped, but never one that is busy, was used in the last 5 s, or whose session "
           "has cells waiting: a cell then waits in the queue (after 30 s it may take any "
           "idle one)", "LAN2GPU_MAX_EXECUTORS", "16", parse=int, metavar="N"),
    Option("--max-kernels", "most Jupyter kernels this worker hosts for IDEs at once",
           "LAN2GPU_MAX_KERNELS", "8", parse=int, metavar="N"),
    Option("--kernel-grace", "shut a hosted kernel down when its notebook machine has been "
           "silent this long", "LAN2GPU_KERNEL_GRACE", "30", parse=float, metavar="SECONDS"),
    Option("--log-level", "how much the log says", "LAN2GPU_LOG_LEVEL", "INFO",
           choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("--ready-file", "write {address, pid, name} as JSON here once listening (for "
           "launchers)", parse=Path, metavar="PATH"),
    Option("--parent-pid", "exit when this process exits (used by the notebook's embedded "
           "worker)", parse=int, metavar="PID"),
    Option("--cleanup-dir", "remove this folder when the worker stops, however it stops "
           "(the embedded worker's throwaway key and log)", parse=Path, metavar="DIR"),
    Option("--fault", "inject a fault, to test recovery (may be repeated): "
           + "; ".join(f"{k}: {v}" for k, v in FAULTS.items()), kind="append",
           choices=tuple(FAULTS)),
)  # fmt: skip

# The subcommands, for --help and for their own parsers (:mod:`worker_kernel.__main__`).
COMMANDS: dict[str, str] = {
    "keygen": "create a new shared key (mode 0600); copy it to every notebook machine and "
    "worker that should talk to each other (never overwrites a file)",
    "curve-keygen": "create this worker's CurveZMQ key pair for --encrypt (kept if it "
    "exists) next to the shared key, and the authorized_keys folder for client keys",
    "authorized-keys": "list the client public keys an --encrypt worker accepts",
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``python -m worker_kernel NAME`` (one of ``COMMANDS``)."""
    text = COMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"python -m worker_kernel {name}", description=text[0].upper() + text[1:] + "."
    )
    parser.add_argument(
        "--key-file", default=str(default_key_file()), metavar="PATH", help="the shared key"
    )
    if name == "authorized-keys":
        parser.add_argument(
            "--authorized-keys",
            type=Path,
            metavar="DIR",
            help="default: authorized_keys/ next to the key file",
        )
    return parser


def _epilog() -> str:
    names = ", ".join(o.env for o in OPTIONS if o.env)
    env = textwrap.fill(names, 88, initial_indent="  ", subsequent_indent="  ")
    commands = "\n".join(
        f"  python -m worker_kernel {name}\n"
        + textwrap.fill(text, 88, initial_indent="      ", subsequent_indent="      ")
        for name, text in COMMANDS.items()
    )
    return (
        "environment variables (each option above names its own; the command line wins):\n"
        f"{env}\n\nother commands (each has --help):\n{commands}\n\n"
        "start here: make a key (mode 0600), copy it to every notebook machine, serve:\n"
        "  python -m worker_kernel keygen --key-file ~/.config/lan2gpu/key\n"
        "  python -m worker_kernel --bind tcp://0.0.0.0:7340\n"
    )


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The worker's parser; defaults come from ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m worker_kernel",
        description=textwrap.fill(
            "Serve this machine's GPUs to lan2gpu notebooks on the LAN. Every message is "
            "signed with the shared key; whoever holds it can run code here.",
            88,
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option in OPTIONS:
        raw = option.raw_default(environ)
        common: dict[str, Any] = {"help": option.help_text(), "dest": option.dest}
        if option.kind == "switch":
            parser.add_argument(
                option.flag,
                action=argparse.BooleanOptionalAction,
                default=_truthy(raw or "0"),
                **common,
            )
        elif option.kind == "flag":
            parser.add_argument(
                option.flag, action="store_true", default=_truthy(raw or "0"), **common
            )
        elif option.kind == "append":
            parser.add_argument(
                option.flag, action="append", default=[], choices=option.choices, **common
            )
        else:
            extra: dict[str, Any] = {}
            if option.flag == "--simulate":
                extra = {"nargs": "?", "const": "on"}
            parser.add_argument(
                option.flag,
                type=option.parse,
                default=None if raw is None else option.parse_default(raw),
                metavar=option.metavar,
                choices=option.choices,
                **common,
                **extra,
            )
    return parser
