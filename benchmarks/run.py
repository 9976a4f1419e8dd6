"""``python -m benchmarks.run``: lan2gpu, ipyparallel, Dask and raw pyzmq, side by side.

One run, one process tree: each system is started, measured (trivial call, then
array round trips at every size) and stopped before the next starts, so idle
systems do not steal the two cores. Then the lan2gpu-only sections: the same cell
twice, an unchanged @njit kernel, peak memory in fresh processes, and the
emulated 1 and 10 Gbit/s LANs (encrypted and plain text). Progress goes to stderr;
the tables go to stdout at the end.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # `python benchmarks/run.py`: import as the package
    _ROOT = Path(__file__).resolve().parent.parent
    sys.path[0] = str(_ROOT)
    __package__ = "benchmarks"  # lets the relative imports below resolve

from . import crowd, faults, lan, limits, memory, placement, sections
from .measure import MiB, parse_size, size_label
from .report import Table, machine, short_error
from .sections import Failed
from .systems import NAMES, Options, System, starters
from .systems.lan2gpu import ClientOptions, Lan2GPUApi, Lan2GPUMagic, client_options
from .targets import Results, targets

DEFAULT_SIZES = "1M,64M,512M"
LIMITS_BYTES = 256 * MiB  # the largest buffer the limits section copies and hashes
FAULT_BYTES = 64 * MiB  # the round trip the page-fault table explains


@dataclass(frozen=True)
class Plan:
    """What to run, from the command line."""

    sizes: tuple[int, ...]
    repeat: int
    trivial_calls: int
    kernel_sessions: int
    memory_bytes: int
    lan_bytes: int
    lan_repeat: int
    lan_probe_bytes: int
    systems: tuple[str, ...]
    skip_lan: bool
    crowds: tuple[int, ...]  # clients at once against one worker, one row each
    crowd_cells: int
    crowd_executors: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark lan2gpu against ipyparallel, Dask distributed and raw pyzmq "
        "on this machine; prints markdown tables (median, min, max over repetitions).",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, 1-2 repetitions (the smoke run)"
    )
    p.add_argument("--sizes", help=f"array sizes, binary units (default {DEFAULT_SIZES})")
    p.add_argument(
        "--repeat",
        type=int,
        help="timed repetitions per case, after one warm-up (default 7; --quick 2); "
        "arrays of 4 MiB or less get 4 times as many",
    )
    p.add_argument("--skip-lan", action="store_true", help="skip the emulated LANs")
    p.add_argument(
        "--crowds",
        metavar="N,...",
        help="the many-clients section: this many clients at once against one worker "
        "(default 10,15,20,30 with --max-executors 16; --quick 2,4 with 3; 0: skip it)",
    )
    p.add_argument(
        "--only",
        metavar="SYSTEM,...",
        help=f"run only these systems ({', '.join(NAMES)}); the lan2gpu-only sections run "
        "when lan2gpu is one of them",
    )
    p.add_argument(
        "--memory-size", help="input size for the peak-memory section (default: the largest size)"
    )
    p.add_argument("--lan-size", help="input size on the emulated LAN (default 256M; --quick 4M)")
    p.add_argument(
        "--compression",
        metavar="VALUE",
        help="lan2gpu compression (auto, on, off), passed to its client and %%%%lan2gpu if "
        "they take that option (default: lan2gpu's own default)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="turn lan2gpu's array cache off (if it has one) for every lan2gpu measurement",
    )
    p.add_argument(
        "--work-dir", type=Path, help="keys, ready files and logs (default: a temporary directory)"
    )
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    sizes = tuple(
        parse_size(s)
        for s in (args.sizes or ("64K,1M" if args.quick else DEFAULT_SIZES)).split(",")
    )
    times = args.repeat or (2 if args.quick else 7)
    systems = tuple(args.only.split(",")) if args.only else NAMES
    unknown = [s for s in systems if s not in NAMES]
    if unknown:
        raise SystemExit(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    memory_bytes = parse_size(args.memory_size) if args.memory_size else max(sizes)
    lan_bytes = parse_size(args.lan_size or ("4M" if args.quick else "256M"))
    return Plan(
        sizes=sizes,
        repeat=times,
        trivial_calls=times * (10 if args.quick else 40),
        kernel_sessions=1 if args.quick else min(times, 3),
        memory_bytes=memory_bytes,
        lan_bytes=lan_bytes,
        lan_repeat=1 if args.quick else min(times, 3),
        lan_probe_bytes=min(lan_bytes, 64 * MiB),
        systems=tuple(s for s in NAMES if s in systems),
        skip_lan=args.skip_lan,
        crowds=tuple(
            int(n)
            for n in (args.crowds or ("2,4" if args.quick else "10,15,20,30")).split(",")
            if int(n) > 0
        ),
        crowd_cells=3 if args.quick else 20,
        crowd_executors=3 if args.quick else 16,
    )


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_system(
    name: str, plan: Plan, options: Options, data: sections.Arrays, results: Results
) -> None:
    progress(f"{name}: starting")
    try:
        system: System = starters()[name](options)
    except Exception as exc:  # a system that cannot start gets an error row
        why = short_error(exc)
        if isinstance(exc, ModuleNotFoundError):
            why = f"{exc.name} is not installed; `pip install -e '.[bench]'` installs it"
        failed = Failed(f"did not start: {why}")
        results.trivial.append((name, "", failed))
        results.roundtrip[name] = dict.fromkeys(plan.sizes, failed)
        return
    try:
        if system.trivial_call:
            progress(f"{name}: trivial call x{plan.trivial_calls}")
            results.trivial.append(
                (
                    system.label,
                    system.trivial_call,
                    sections.measure_trivial(system.trivial, plan.trivial_calls),
                )
            )
        if isinstance(system, Lan2GPUMagic):
            reference = sections.measure_trivial(system.local_cell, plan.trivial_calls)
            results.trivial.append(("IPython alone (reference)", "empty local cell", reference))
        progress(f"{name}: round trips at {', '.join(size_label(n) for n in plan.sizes)}")
        results.roundtrip[system.label] = sections.measure_roundtrip(
            system.roundtrip, data, plan.repeat
        )
        processes = getattr(system, "processes", None)
        if processes is not None:
            size = fault_size(plan.sizes)
            progress(f"{name}: page faults and CPU per process at {size_label(size)}")
            try:
                results.faults[system.label] = faults.measure_faults(
                    system.roundtrip, processes, data[size], min(plan.repeat, 5)
                )
            except Exception as exc:  # shown in the table
                results.faults[system.label] = f"error ({short_error(exc)})"
        if type(system) is Lan2GPUApi:  # the lan2gpu-only sections, once
            progress(f"{name}: the same cell twice")
            results.second = sections.measure_second_run(system, data, plan.repeat)
            progress(f"{name}: unchanged @njit kernel")
            results.kernel = sections.measure_kernel(
                system, plan.kernel_sessions, max(plan.repeat, 3)
            )
    finally:
        progress(f"{name}: stopping")
        try:
            system.close()
        except Exception as exc:  # report, then go on with the next system
            progress(f"{name}: error while stopping: {short_error(exc)}")


def fault_size(sizes: Sequence[int]) -> int:
    """The round trip size the page-fault table is for: 64 MiB, or the nearest."""
    return min(sizes, key=lambda n: abs(n - FAULT_BYTES))


def run(plan: Plan, work: Path, client: ClientOptions) -> list[Table]:
    options = Options(work, client.kwargs, client.cell_flags)
    results = Results()
    progress("limits of this machine: copying, hashing, loopback TCP")
    machine_limits = limits.measure_limits(work, min(max(plan.sizes), LIMITS_BYTES), plan.repeat)
    progress(f"making payloads: {', '.join(size_label(n) for n in plan.sizes)}")
    data = sections.arrays(plan.sizes)
    for name in plan.systems:
        run_system(name, plan, options, data, results)
    del data
    if "lan2gpu-dask" in plan.systems:
        progress(f"placement over {placement.WORKERS} Dask workers' views")
        results.placement = placement.measure_placement(20 if plan.repeat <= 2 else 500)
    if "lan2gpu" in plan.systems:
        progress(f"peak memory with {size_label(plan.memory_bytes)}, fresh worker and client")
        try:
            results.memory = memory.measure_memory(work, plan.memory_bytes, client.kwargs)
        except Exception as exc:  # shown in the table
            results.memory = exc
        if plan.skip_lan:
            results.lan = "--skip-lan"
        else:
            progress(f"emulated 1 and 10 Gbit/s LANs with {size_label(plan.lan_bytes)}")
            try:
                results.lan = lan.measure_lan(
                    work, plan.lan_bytes, plan.lan_repeat, plan.lan_probe_bytes, client.kwargs
                )
            except lan.LanUnavailable as exc:
                results.lan = str(exc)
                progress(f"the LAN part is skipped: {exc}")
            except Exception as exc:  # shown in the table
                results.lan = exc
        if plan.crowds:
            progress(f"many clients on one worker: {', '.join(map(str, plan.crowds))}")
            results.crowd = crowd.measure_crowd(
                work, plan.crowds, plan.crowd_cells, plan.crowd_executors, client.kwargs
            )
    return [machine_limits, *tables(plan, results, client.note)]


def tables(plan: Plan, r: Results, client_note: str) -> list[Table]:
    out = [sections.table_trivial(r.trivial), sections.table_roundtrip(r.roundtrip, plan.sizes)]
    out[-1].notes.append(f"lan2gpu options: {client_note}")
    if r.faults:
        out.append(faults.table_faults(r.faults))
    if r.placement is not None:
        out.append(placement.table_placement(r.placement))
    if r.second is not None:
        out.append(sections.table_second_run(r.second))
    if r.kernel is not None:
        out.append(sections.table_kernel(r.kernel))
    if r.memory is not None:
        out.append(memory.table_memory(r.memory, plan.memory_bytes))
    if r.lan is not None:
        out.append(lan.table_lan(r.lan, plan.lan_bytes))
    if r.crowd is not None:
        out.append(crowd.table_crowd(r.crowd, plan.crowd_cells, plan.crowd_executors))
    if "lan2gpu" in plan.systems:
        out.append(targets(r, plan.sizes, plan.memory_bytes))
    return out


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup block


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, _terminate)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lan2gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    kind = "quick" if args.quick else "full"
    print(f"# lan2gpu benchmark ({kind} run, {time.strftime('%Y-%m-%d %H:%M')})\n")
    print(machine().markdown())
    ok = False
    try:
        for table in run(plan, work, client_options(args.compression, args.no_cache)):
            print(table.markdown())
        ok = True
    finally:
        print(f"Total wall time: {time.monotonic() - started:.0f} s.")
        if args.work_dir is None and ok:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"Logs are kept in {work}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
