"""The options of ``%%lan2gpu`` and ``%lan2gpu``: argparse, errors as UsageErrors."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from IPython.core.error import UsageError

from worker_kernel.protocol.errors import Lan2GPUError
from worker_kernel.protocol.units import parse_size

from .placement import parse_cc


class HelpShown(Exception):
    """``--help`` was asked for; ``text`` is the help of the (sub)command asked about,
    which the caller prints once."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as IPython UsageErrors instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage()}Try `{self.prog} --help`.")

    def print_help(self, file: Any = None) -> NoReturn:
        # argparse's --help prints, then exits: raise instead, with the text of the
        # parser that was asked (a subcommand's own help, not the top level's too).
        raise HelpShown(self.format_help())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise HelpShown(self.format_help())


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except Lan2GPUError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cell_parser() -> Parser:
    p = Parser(
        prog="%%lan2gpu",
        description="Run this cell on a LAN GPU worker; its outputs come back here.",
        add_help=True,
    )
    p.add_argument("--worker", metavar="NAME", help="run on this worker (name or address)")
    p.add_argument("--gpu", metavar="PATTERN", help='GPU name pattern, e.g. "A100|H100"')
    p.add_argument(
        "--min-memory", type=_size, metavar="SIZE", default=0, help="free GPU memory, e.g. 40G"
    )
    p.add_argument("--min-cc", type=parse_cc, metavar="X.Y", default=(0, 0))
    p.add_argument(
        "--gpus", type=int, metavar="N", default=1, help="GPUs of one host the cell sees"
    )
    p.add_argument("--cpu", action="store_true", help="a CPU cell (@njit code), no GPU")
    p.add_argument(
        "--simulate", action="store_true", help="allow workers running the CUDA simulator"
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop the cell after this long, time waiting in the worker's queue included",
    )
    p.add_argument(
        "--in", dest="inputs", metavar="A,B", help="send exactly these names (default: detected)"
    )
    p.add_argument(
        "--out",
        dest="outputs",
        metavar="C,D",
        help="bring back exactly these names; missing or unpicklable is an error",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="send every array, even ones the worker's session already holds",
    )
    p.add_argument(
        "--compress",
        choices=["auto", "on", "off"],
        help="compress large arrays with LZ4 (default auto: only when it pays on the link)",
    )
    p.add_argument(
        "--retry",
        type=int,
        default=0,
        metavar="N",
        help="if the worker is gone mid-cell (its connection dropped or it restarted), run "
        "the cell again on another matching worker, up to N times (default 0: raise "
        "WorkerLost). A worker that stalls but stays connected is waited for (its "
        "--stall-grace), never retried. A retried cell may have partly run on the lost "
        "worker; it ran there to the end too only if the network was cut while that worker "
        "kept running and the cell ended before the worker cancelled it (5 of its heartbeats "
        "after it last heard from this notebook)",
    )
    p.add_argument(
        "--session",
        metavar="NAME",
        help="run in this named session on the worker (its own namespace and kernels)",
    )
    split = p.add_argument_group("splitting one cell across workers")
    split.add_argument(
        "--split",
        metavar="X,Y:AXIS",
        help="run the cell once per chunk: these input arrays are cut along axis 0 (or "
        "AXIS) into one piece per slot; lan2gpu_rank and lan2gpu_size are defined",
    )
    split.add_argument(
        "--workers",
        metavar="N|all",
        type=_slots,
        default=None,
        help="slots to split over: N best matching (a GPU, or --gpus GPUs, of a worker "
        "each) or all (default: all)",
    )
    split.add_argument(
        "--gather",
        metavar="NAME:RULE,...",
        help="how each output is combined: concat (along the split axis), sum, min, max, "
        "list (default: concat for arrays as long as their chunk, else list)",
    )
    split.add_argument(
        "--balance",
        action="store_true",
        help="size the chunks by each slot's speed measured on earlier split cells",
    )
    p.add_argument(
        "--async",
        dest="async_name",
        metavar="NAME",
        help="return at once; NAME is a handle (NAME.done(), .result(), .cancel()); "
        "`%%lan2gpu wait NAME` assigns the outputs",
    )
    return p


ALL_SLOTS = 0  # --workers all (None: the option was not given)


def _slots(text: str) -> int:
    if text == "all":
        return ALL_SLOTS
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of slots (1 or more) or all")
    return n


def line_parser() -> Parser:
    p = Parser(prog="%lan2gpu", description="Manage lan2gpu workers.")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    c = sub.add_parser("connect", help="connect to a worker")
    c.add_argument("address", help="e.g. tcp://10.0.0.7:7340")
    c.add_argument("--key-file", metavar="PATH")
    c.add_argument(
        "--server-key",
        metavar="PATH",
        help="the worker's worker.key, for a worker run with --encrypt (CurveZMQ)",
    )
    c.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="connect without encryption, to a worker run with --insecure-plaintext",
    )
    c.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="wait this long for the worker's handshake (default: Lan2GPU.connect_timeout, 10)",
    )
    d = sub.add_parser("disconnect", help="forget a worker")
    d.add_argument("address")
    sub.add_parser("workers", help="list known workers")
    sub.add_parser("status", help="queues and sessions on each worker")
    w = sub.add_parser("wait", help="wait for background cells and assign their outputs")
    w.add_argument("jobs", nargs="*", metavar="NAME", help="default: every one not collected")
    w.add_argument("--timeout", type=float, metavar="SECONDS")
    sub.add_parser("jobs", help="list background cells (%%lan2gpu --async)")
    s = sub.add_parser("close-session", help="stop a session's executor on its worker")
    s.add_argument("session", nargs="?")
    s.add_argument("--worker", metavar="NAME")
    return p
