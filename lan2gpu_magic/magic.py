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
from IPython.display import publish_display_data

from worker_kernel.protocol.serialize import dump_values

from . import capture, results
from .client import ExecuteRequest, OutputHandlers
from .config import Lan2GPU
from .placement import Requirements
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


def _cell_parser() -> _Parser:
    p = _Parser(
        prog="%%lan2gpu",
        description="Run this cell on a LAN GPU worker; its outputs come back here.",
        add_help=True,
    )
    p.add_argument("--worker", metavar="NAME", help="run on this worker (name or address)")
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
    d = sub.add_parser("disconnect", help="forget a worker")
    d.add_argument("address")
    sub.add_parser("workers", help="list known workers")
    sub.add_parser("status", help="queues and sessions on each worker")
    s = sub.add_parser("close-session", help="stop a session's executor on its worker")
    s.add_argument("session", nargs="?")
    s.add_argument("--worker", metavar="NAME")
    return p


@magics_class
class Lan2GPUMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.settings = Lan2GPU(parent=shell)
        self.pool = WorkerPool(
            addresses=self.settings.workers,
            key_file=self.settings.key_file or None,
            embedded=self.settings.embedded_worker,
            connect_timeout=self.settings.connect_timeout,
            announce=self._say,
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
        payload, _ = dump_values({name: shell.user_ns[name] for name in plan.inputs})
        client = self.pool.choose(Requirements(worker=args.worker))
        request = ExecuteRequest(
            code=cell,
            plan=plan,
            session=args.session or client.session,
            timeout=args.timeout or self.settings.default_timeout or None,
            filename=filename,
            line_offset=1,
        )
        result = client.execute(request, payload, self._handlers(client.name))
        results.apply(result, shell.user_ns, warn=self._say)
        if result.value_repr:
            _publish(result.value_repr, {})
        return result.value if result.has_value else None

    def _handlers(self, worker: str) -> OutputHandlers:
        def stream(name: str, text: str) -> None:
            out = sys.stderr if name == "stderr" else sys.stdout
            out.write(text)
            out.flush()

        def display(data: dict[str, Any], metadata: dict[str, Any]) -> None:
            _publish(data, metadata)

        def status(kind: str, content: dict[str, Any]) -> None:
            if kind == "queued" and int(content.get("position", 0)) > 0:
                self._say(f"lan2gpu: queued on {worker}, {content['position']} cell(s) ahead")
            elif kind == "transfer":
                mb = float(content.get("bytes", 0)) / 1e6
                self._say(f"lan2gpu: receiving {mb:.0f} MB of results from {worker}")

        return OutputHandlers(stream=stream, display=display, status=status)

    # -- %lan2gpu ---------------------------------------------------------------

    def _line(self, line: str) -> Any:
        args = self._line_args.parse_args(shlex.split(line))
        if args.command == "connect":
            connected = self.pool.connect(args.address, args.key_file)
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
            chosen = self.pool.choose(Requirements(worker=args.worker))
            closed = chosen.close_session(args.session)
            self._say(f"lan2gpu: stopped {closed} executor(s) on {chosen.name}")
        else:
            print(self._line_args.format_help())
        return None

    def _print_status(self) -> None:
        for address, client, problem in self.pool.entries():
            if client is None:
                print(f"{address}: unusable: {problem}")
                continue
            status = client.status()
            print(f"{client.name} ({address}): sessions {', '.join(status['sessions']) or '-'}")
            for gpu, queue in status["gpus"].items():
                cell = queue["running"]
                now = "idle"
                if cell:
                    now = f"running {cell['id'][:8]} ({cell['session']}, {cell['running']:.1f} s)"
                print(f"  GPU{gpu}: {now}; {len(queue['queued'])} waiting")

    def _print_workers(self) -> None:
        rows = [("NAME", "ADDRESS", "GPUS", "SIMULATOR", "STATE")]
        for address, client, problem in self.pool.entries():
            if client is None:
                rows.append(("?", address, "", "", f"unusable: {problem.splitlines()[0]}"))
                continue
            gpus = ", ".join(f"{g['index']}:{g['name']}" for g in client.info.gpus)
            sim = "yes" if client.info.simulator else "no"
            rows.append((client.name, address, gpus, sim, "connected"))
        if len(rows) == 1:
            print("no workers configured; a local one starts with the first %%lan2gpu cell")
            return
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


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
