"""``%lan2gpu`` and ``%%lan2gpu``: the IPython face of the pipeline.

The cell magic reads like the data flow: capture -> serialize -> choose a
worker -> submit (live output) -> apply the outputs. Everything else here is
option parsing and presentation.
"""

from __future__ import annotations

import argparse
import atexit
import shlex
import sys
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import DisplayHandle, publish_display_data

from worker_kernel.config import parse_size
from worker_kernel.protocol.errors import Lan2GPUError, WorkerLost
from worker_kernel.protocol.serialize import dump_values

from . import capture, results, tables
from .client import ExecuteRequest, OutputHandlers
from .config import Lan2GPU
from .placement import Placement, Requirements, parse_cc
from .pool import WorkerPool
from .tracebacks import register_source


def _publish(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    publish_display_data(data=data, metadata=metadata)  # type: ignore[no-untyped-call]


class _HelpShown(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as IPython UsageErrors instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage()}Try `{self.prog} --help`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _HelpShown


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except Lan2GPUError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cell_parser() -> _Parser:
    p = _Parser(
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
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the cell after this long")
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
        help="if the worker is lost mid-cell, run the cell again on another matching "
        "worker, up to N times (default 0: raise WorkerLost)",
    )
    p.add_argument(
        "--session",
        metavar="NAME",
        help="run in this named session on the worker (its own namespace and kernels)",
    )
    return p


def _line_parser() -> _Parser:
    p = _Parser(prog="%lan2gpu", description="Manage lan2gpu workers.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    c = sub.add_parser("connect", help="connect to a worker")
    c.add_argument("address", help="e.g. tcp://10.0.0.7:7340")
    c.add_argument("--key-file", metavar="PATH")
    c.add_argument(
        "--server-key",
        metavar="PATH",
        help="the worker's worker.key, for a worker run with --encrypt (CurveZMQ)",
    )
    d = sub.add_parser("disconnect", help="forget a worker")
    d.add_argument("address")
    sub.add_parser("workers", help="list known workers")
    sub.add_parser("status", help="queues and sessions on each worker")
    s = sub.add_parser("close-session", help="stop a session's executor on its worker")
    s.add_argument("session", nargs="?")
    s.add_argument("--worker", metavar="NAME")
    return p


class _Progress:
    """One line per cell that says where it runs, updated in place as it moves along."""

    def __init__(self, placement: Placement) -> None:
        self.where = placement.describe().rsplit(", queue", 1)[0]
        self.handle = DisplayHandle()  # type: ignore[no-untyped-call]
        self.handle.display(  # type: ignore[no-untyped-call]
            self._bundle(f"running on {placement.describe()}"), raw=True
        )

    @staticmethod
    def _bundle(text: str) -> dict[str, str]:
        return {"text/plain": f"lan2gpu: {text}"}

    def status(self, kind: str, content: dict[str, Any]) -> None:
        if kind == "queued":
            ahead = int(content.get("position", 0))
            text = f"waiting for {self.where}: {ahead} cell(s) ahead" if ahead else None
        elif kind == "started":
            text = f"running on {self.where}"
        elif kind == "transfer":
            mb = float(content.get("bytes", 0)) / 1e6
            text = f"running on {self.where}; receiving {mb:.0f} MB of results"
        else:
            text = None
        if text:
            self._show(text)

    def finished(self, seconds: float) -> None:
        self._show(f"ran on {self.where} in {seconds:.2f} s")

    def _show(self, text: str) -> None:
        self.handle.update(self._bundle(text), raw=True)  # type: ignore[no-untyped-call]


@magics_class
class Lan2GPUMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.settings = Lan2GPU(parent=shell)
        self.pool = WorkerPool(
            addresses=self.settings.workers,
            key_file=self.settings.key_file or None,
            embedded=self.settings.embedded_worker,
            discovery=self.settings.discovery,
            discovery_wait=self.settings.discovery_wait,
            connect_timeout=self.settings.connect_timeout,
            announce=self._say,
            server_keys=self.settings.server_keys,
        )
        self._cell_args = _cell_parser()
        self._line_args = _line_parser()
        atexit.register(self.close)

    def _shell(self) -> InteractiveShell:
        if self.shell is None:
            raise UsageError("lan2gpu magics need a running IPython shell")
        return self.shell

    @staticmethod
    def _say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _sync_settings(self) -> None:
        # `%config Lan2GPU.x = ...` changes the settings object; apply it each call.
        self.pool.connect_timeout = self.settings.connect_timeout
        self.pool.key_file = self.settings.key_file or None
        self.pool.allow_embedded = self.settings.embedded_worker
        self.pool.discovery = self.settings.discovery
        self.pool.discovery_wait = self.settings.discovery_wait

    def close(self) -> None:
        self.pool.close()
        atexit.unregister(self.close)

    # -- %%lan2gpu --------------------------------------------------------------

    @line_cell_magic
    def lan2gpu(self, line: str, cell: str | None = None) -> Any:
        """Run a cell on a LAN GPU worker (``%%lan2gpu --help``), or manage
        workers (``%lan2gpu connect|disconnect|workers|status|close-session``)."""
        self._sync_settings()
        try:
            if cell is None:
                return self._line(line)
            return self._cell(line, cell)
        except _HelpShown:
            parser = self._cell_args if cell is not None else self._line_args
            print(parser.format_help())
            return None

    def _cell(self, line: str, cell: str) -> Any:
        args = self._cell_args.parse_args(shlex.split(line))
        shell = self._shell()
        filename = f"<lan2gpu In[{shell.execution_count}]>"
        register_source(filename, f"%%lan2gpu {line}\n{cell}")
        plan = capture.plan_cell(
            cell,
            shell.user_ns,
            hidden=shell.user_ns_hidden,
            inputs=args.inputs,
            outputs=args.outputs,
            filename=filename,
            line_offset=1,
        )
        ns = shell.user_ns
        payload, _ = dump_values({name: ns[name] for name in plan.inputs}, namespace=ns)
        requirements = self._requirements(args)
        lost: set[str] = set()  # workers lost during this cell, for --retry
        while True:
            client, placement = self.pool.choose(requirements, exclude=lost, session=args.session)
            request = ExecuteRequest(
                code=cell,
                plan=plan,
                session=args.session or client.session,
                timeout=args.timeout or self.settings.default_timeout or None,
                filename=filename,
                line_offset=1,
                gpus=tuple(g.index for g in placement.gpus),
                cpu=placement.cpu,
                local=ns,
                cache=not args.no_cache,
                compress=args.compress,
            )
            progress = _Progress(placement)
            try:
                result = client.execute(request, payload, self._handlers(progress))
                break
            except WorkerLost as exc:
                if len(lost) >= args.retry:
                    raise
                lost.add(placement.worker.address)
                self._say(
                    f"lan2gpu: {exc.args[0].split('.')[0]}; running the cell again on another "
                    f"worker (retry {len(lost)} of {args.retry})"
                )
        progress.finished(float(result.stats.get("total_seconds", 0.0)))
        results.apply(result, shell.user_ns, warn=self._say)
        if result.value_repr:
            _publish(result.value_repr, {})
        return result.value if result.has_value else None

    def _requirements(self, args: argparse.Namespace) -> Requirements:
        if args.gpus < 1:
            raise UsageError("--gpus must be at least 1")
        return Requirements(
            worker=args.worker,
            gpu=args.gpu,
            min_memory=args.min_memory,
            min_cc=args.min_cc,
            gpus=args.gpus,
            cpu=args.cpu,
            allow_simulator=args.simulate or self.settings.allow_simulator,
        )

    def _handlers(self, progress: _Progress) -> OutputHandlers:
        def stream(name: str, text: str) -> None:
            out = sys.stderr if name == "stderr" else sys.stdout
            out.write(text)
            out.flush()

        def display(data: dict[str, Any], metadata: dict[str, Any]) -> None:
            _publish(data, metadata)

        return OutputHandlers(stream=stream, display=display, status=progress.status)

    # -- %lan2gpu ---------------------------------------------------------------

    def _line(self, line: str) -> Any:
        args = self._line_args.parse_args(shlex.split(line))
        if args.command == "connect":
            connected = self.pool.connect(args.address, args.key_file, args.server_key)
            self._say(f"lan2gpu: connected to {connected.info.describe()}")
            for warning in connected.info.warnings:
                self._say(f"lan2gpu: warning: {warning}")
        elif args.command == "disconnect":
            if not self.pool.disconnect(args.address):
                raise UsageError(f"not connected to {args.address}")
        elif args.command == "workers":
            self._print_workers()
        elif args.command == "status":
            self._print_status()
        elif args.command == "close-session":
            chosen, _ = self.pool.choose(Requirements(worker=args.worker, cpu=True))
            closed = chosen.close_session(args.session)
            self._say(f"lan2gpu: stopped {closed} executor(s) on {chosen.name}")
        else:
            print(self._line_args.format_help())
        return None

    def _print_status(self) -> None:
        for row in self.pool.rows():
            if row.status is None:
                print(f"{row.address}: unusable: {row.problem}")
                continue
            status = row.status
            sessions = ", ".join(status["sessions"]) or "-"
            print(f"{status['worker']} ({row.address}): sessions {sessions}")
            for state, cells, clock in (
                ("running on", status["running"], "running"),
                ("waiting for", status["queued"], "waiting"),
            ):
                for cell in cells:
                    where = "+".join(cell["resources"])
                    what = f"{cell['id'][:8]} ({cell['session']}, {cell[clock]:.1f} s)"
                    print(f"  {state} {where}: {what}")
            if not status["running"] and not status["queued"]:
                print("  idle")

    def _print_workers(self) -> None:
        rows = self.pool.rows()
        if not rows:
            print(
                "no workers configured or found; a local one starts with the first %%lan2gpu cell"
            )
            return
        _publish({"text/plain": tables.as_text(rows), "text/html": tables.as_html(rows)}, {})


def register(shell: Any) -> None:
    magics = Lan2GPUMagics(shell)
    shell.register_magics(magics)
    shell.configurables.append(magics.settings)  # so %config Lan2GPU works


def unregister(shell: Any) -> None:
    magics = shell.magics_manager.registry.pop("Lan2GPUMagics", None)
    if magics is not None:
        magics.close()
        if magics.settings in shell.configurables:
            shell.configurables.remove(magics.settings)
