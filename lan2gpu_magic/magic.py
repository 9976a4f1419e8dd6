"""``%lan2gpu`` and ``%%lan2gpu``: the IPython face of the pipeline.

The cell magic reads like the data flow: capture -> serialize -> choose a
worker -> submit (live output) -> apply the outputs. Everything else here is
option parsing and presentation.
"""

from __future__ import annotations

import argparse
import atexit
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class

from worker_kernel.protocol.errors import ProtocolError, TransportError, WorkerLost
from worker_kernel.protocol.serialize import Payload

from . import fanout, hints, options, pipeline, results, split_cell, tables
from .backend import Backend
from .background import BackgroundCells
from .client import Interrupted
from .config import Lan2GPU
from .dask_backend import DaskCluster, is_cluster_address
from .jobs import Job
from .placement import Placement, Requirements
from .pool import WorkerPool
from .request import OutputHandlers
from .results import RunResult
from .status import (
    Progress,
    StatusLine,
    cell_ended,
    cell_started,
    publish,
    say,
    short_interrupt,
    warn,
    write,
)
from .tracebacks import register_source


@magics_class
class Lan2GPUMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.settings = Lan2GPU(parent=shell)
        # LAN workers by default; a Dask cluster once connected to one (dask://...).
        self.pool: Backend = self._lan_pool()
        self.cluster = ""  # the Dask cluster's address, when self.pool is one
        self.jobs = BackgroundCells(self._assign)  # --async cells, by handle name
        self._speeds: dict[str, float] = {}  # rows/s per slot, measured by split cells
        self._cell_args = options.cell_parser()
        self._line_args = options.line_parser()
        atexit.register(self.close)

    def _lan_pool(self) -> WorkerPool:
        return WorkerPool(
            addresses=self.settings.workers,
            key_file=self.settings.key_file or None,
            embedded=self.settings.embedded_worker,
            discovery=self.settings.discovery,
            discovery_wait=self.settings.discovery_wait,
            connect_timeout=self.settings.connect_timeout,
            announce=self._say,
            server_keys=self.settings.server_keys,
            plaintext=self.settings.insecure_plaintext,
        )

    def _shell(self) -> InteractiveShell:
        if self.shell is None:
            raise UsageError("lan2gpu magics need a running IPython shell")
        return self.shell

    _say = staticmethod(say)
    _warn = staticmethod(warn)

    def _sync_settings(self) -> None:
        # `%config Lan2GPU.x = ...` changes the settings object; apply it each call.
        if self.settings.cluster and not self.cluster:
            self._use_cluster(self.settings.cluster)
        if not isinstance(self.pool, WorkerPool):
            return
        self.pool.connect_timeout = self.settings.connect_timeout
        self.pool.key_file = self.settings.key_file or None
        self.pool.plaintext = self.settings.insecure_plaintext
        self.pool.allow_embedded = self.settings.embedded_worker
        self.pool.discovery = self.settings.discovery
        self.pool.discovery_wait = self.settings.discovery_wait

    def _use_cluster(self, address: str, timeout: float | None = None) -> DaskCluster:
        """Run cells on the Dask cluster at ``address`` from now on (instead of the
        LAN's workers, or another cluster)."""
        cluster = DaskCluster(
            address, connect_timeout=timeout or max(self.settings.connect_timeout, 30.0)
        )
        self.jobs.close()  # background cells run on the backend they started on
        self.pool.close()
        self.pool, self.cluster = cluster, address
        self.settings.cluster = address
        return cluster

    def close(self) -> None:
        self.jobs.close()
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
        except options.HelpShown as shown:
            print(shown.text)
            return None

    def _cell(self, line: str, code: str) -> Any:
        args = self._cell_args.parse_args(shlex.split(line))
        self._check_combination(args)
        shell = self._shell()
        filename = f"<lan2gpu In[{_cell_number(shell)}]>"
        register_source(filename, f"%%lan2gpu {line}\n{code}")
        ns = shell.user_ns
        # Planned against the namespace itself: functions of the notebook that
        # assign globals are recognised by their __globals__ being this very dict.
        # (A split cell's rank and size are sent to every chunk regardless.)
        plan = pipeline.plan(
            code,
            ns,
            filename=filename,
            hidden=shell.user_ns_hidden,
            inputs=args.inputs,
            outputs=args.outputs,
            line_offset=1,
        )
        cell = pipeline.Cell(
            code=code,
            plan=plan,
            filename=filename,
            line_offset=1,
            session=args.session,
            timeout=args.timeout or self.settings.default_timeout or None,
            cache=not args.no_cache,
            compress=args.compress,
            namespace=ns,
        )
        requirements = self._requirements(args)
        if args.split:
            return self._split(args, cell, requirements)
        payload = pipeline.serialize(plan.inputs, ns, globals_=ns)
        if args.async_name:
            return self._start_async(args, cell, requirements, payload)
        progress: list[Progress] = []  # the try in progress

        def handlers(placement: Placement | None) -> OutputHandlers:
            assert placement is not None  # noqa: S101 - the pool always places
            progress.append(Progress(placement))
            return OutputHandlers(stream=write, display=publish, status=progress[-1].status)

        def retried(exc: WorkerLost, n: int) -> None:
            progress.pop().failed(exc)
            self._warn(
                f"lan2gpu: {exc.args[0].split('.')[0]}; running the cell again on another "
                f"worker (retry {n} of {args.retry})"
            )

        try:
            result = pipeline.execute(
                cell,
                payload,
                lambda lost: self.pool.choose(requirements, exclude=lost, session=args.session),
                handlers,
                local=ns,
                retry=args.retry,
                retried=retried,
            )
        except Interrupted as exc:
            progress[-1].interrupted(exc.session_lost)
            raise short_interrupt(f"cancelled on {progress[-1].worker}") from None
        except KeyboardInterrupt:  # a second Ctrl-C, or no confirmation in time
            if not progress:
                raise
            progress[-1].interrupted(None)
            raise short_interrupt(f"stopped waiting for {progress[-1].worker}") from None
        except Exception as exc:
            if progress:
                progress[-1].failed(exc)
            raise
        if result.error is not None:
            progress[-1].failed(result.error)
        else:
            progress[-1].finished(float(result.stats.get("total_seconds", 0.0)))
        return self._assign(result)

    @staticmethod
    def _check_combination(args: argparse.Namespace) -> None:
        if not args.split and (args.workers is not None or args.gather or args.balance):
            raise UsageError("--workers, --gather and --balance go with --split NAMES")
        if args.async_name is not None and not args.async_name.isidentifier():
            raise UsageError(f"--async {args.async_name!r}: give a Python name for the handle")
        if args.async_name and args.retry:
            raise UsageError("--retry does not combine with --async; run the cell again instead")
        if args.split and args.retry:
            raise UsageError("--split retries a failed chunk once by itself; leave out --retry")

    # -- --split ------------------------------------------------------------------

    def _split(self, args: argparse.Namespace, cell: pipeline.Cell, req: Requirements) -> Any:
        spec = split_cell.SplitOptions(
            split=args.split,
            gather=args.gather,
            slots=args.workers or None,  # all (0) or not given (None): every slot
            balance=args.balance,
        )
        job: Job | None = None
        if args.async_name:

            def body(job: Job) -> RunResult:
                job.running()  # the chunks' own queues show in the progress
                return prepared.run()

            job = Job(args.async_name, "", body)
            shown = (job.stream, job.display, job.progress)
        else:
            line = StatusLine()
            shown = (write, publish, line.show)  # shown once the chunks start
        prepared = split_cell.prepare(
            self.pool,
            cell,
            spec,
            self._shell().user_ns,
            req,
            speeds=self._speeds,
            write=shown[0],
            display=shown[1],
            progress=shown[2],
            cancel=job.cancel_event if job else None,
            copy=job is not None,  # a background cell must not see later changes
        )
        if job is None:
            try:
                finished = prepared.run()
            except KeyboardInterrupt:  # the status line says what became of the chunks
                raise short_interrupt("split cell cancelled") from None
            finally:
                line.close()
            return self._assign(finished)
        slots = [fanout.slot_label(s) for s in prepared.fanout.slots]
        job.where = f"{', '.join(slots)} ({len(prepared.chunks)} chunks)"
        return self.jobs.launch(job, self._shell().user_ns)

    # -- --async --------------------------------------------------------------------

    def _start_async(
        self, args: argparse.Namespace, cell: pipeline.Cell, req: Requirements, payload: Payload
    ) -> None:
        client, placement = self.pool.choose(req, session=args.session)
        address = placement.worker.address
        session = client.adopt_session()  # the notebook's session there, closed with it
        # The cell's inputs as they are now: later changes here must not reach it.
        payload = payload.copied()

        def body(job: Job) -> RunResult:
            handlers = OutputHandlers(stream=job.stream, display=job.display, status=job.status)
            leased = self.pool.lease(address)
            healthy = True
            try:
                return pipeline.execute(
                    cell,
                    payload,
                    lambda lost: (leased, placement),
                    lambda _: handlers,
                    session=lambda _: session,
                    cancel=job.cancel_event,
                )
            except (TransportError, ProtocolError):
                healthy = False
                raise
            finally:
                self.pool.give_back(leased, healthy)

        where = placement.describe().rsplit(", queue", 1)[0]
        return self.jobs.launch(Job(args.async_name, where, body), self._shell().user_ns)

    def _assign(self, result: RunResult) -> Any:
        """Outputs into the namespace as if the cell had run here; then its error, or
        its value."""
        results.apply(result, self._shell().user_ns, warn=self._say)
        if result.value_repr:
            publish(result.value_repr, {})
        return result.value if result.has_value else None

    def _requirements(self, args: argparse.Namespace) -> Requirements:
        if args.gpus < 1:
            raise UsageError("--gpus must be at least 1")
        return Requirements.from_args(args, allow_simulator=self.settings.allow_simulator)

    # -- %lan2gpu ---------------------------------------------------------------

    def _line(self, line: str) -> Any:
        args = self._line_args.parse_args(shlex.split(line))
        if args.command == "connect" and is_cluster_address(args.address):
            cluster = self._use_cluster(args.address, args.timeout)
            cluster.wait_for_probes()  # workers whose plugin is still starting its service
            rows = cluster.rows(max_age=0)
            ready = sum(r.view is not None for r in rows)
            self._say(
                f"lan2gpu: connected to the Dask cluster at {args.address}: {len(rows)} "
                f"worker(s), {ready} with lan2gpu; dashboard {cluster.dashboard_link()}"
            )
        elif args.command == "connect":
            if not isinstance(self.pool, WorkerPool):
                self._leave_cluster()
            assert isinstance(self.pool, WorkerPool)  # noqa: S101 - narrowing for mypy
            connected = self.pool.connect(
                args.address,
                args.key_file,
                args.server_key,
                plaintext=args.insecure_plaintext,
                timeout=args.timeout,
            )
            self._say(f"lan2gpu: connected to {connected.info.describe()}")
            for warning in connected.info.warnings:
                self._warn(f"lan2gpu: warning: {warning}")
        elif args.command == "disconnect" and self.cluster and args.address == self.cluster:
            self._leave_cluster()
        elif args.command == "disconnect":
            if not isinstance(self.pool, WorkerPool) or not self.pool.disconnect(args.address):
                raise UsageError(f"not connected to {args.address}")
        elif args.command == "workers":
            self._print_workers()
        elif args.command == "status":
            self._print_status()
        elif args.command == "wait":
            return self.jobs.wait(args.jobs, args.timeout)
        elif args.command == "jobs":
            self.jobs.print()
        elif args.command == "close-session":
            chosen, _ = self.pool.choose(Requirements(worker=args.worker, cpu=True))
            closed = chosen.close_session(args.session)
            self._say(f"lan2gpu: stopped {closed} executor(s) on {chosen.name}")
        else:
            print(self._line_args.format_help())
        return None

    def _leave_cluster(self) -> None:
        """Back to the LAN's workers."""
        self.jobs.close()
        self.pool.close()
        self.pool, self.cluster = self._lan_pool(), ""
        self.settings.cluster = ""

    def _print_status(self) -> None:
        self.pool.wait_for_probes()
        for row in self.pool.rows(max_age=0):
            if row.status is None:
                print(f"{row.address}: unusable: {row.problem}")
                continue
            status = row.status
            sessions = ", ".join(status["sessions"]) or "-"
            print(f"{status['worker']} ({row.address}): sessions {sessions}")
            running, queued = status["running"], status["queued"]
            for state, cells in (("running on", running), ("waiting for", queued)):
                for cell in cells:
                    where = "+".join(cell["resources"])
                    who = f"{cell['user']}, " if cell.get("user") else ""
                    took = cell["running"] or cell["waiting"]
                    what = f"{cell['id'][:8]} ({who}{cell['session']}, {took:.1f} s)"
                    print(f"  {state} {where}: {what}")
            if not status["running"] and not status["queued"]:
                print("  idle")

    def _print_workers(self) -> None:
        self.pool.wait_for_probes()
        rows = self.pool.rows(max_age=0)
        if not rows:
            print(
                "no workers configured or found; a local one starts with the first %%lan2gpu cell"
            )
            return
        publish({"text/plain": tables.as_text(rows), "text/html": tables.as_html(rows)}, {})
        if isinstance(self.pool, DaskCluster):
            print(f"Dask cluster {self.cluster}; dashboard: {self.pool.dashboard_link()}")


def _cell_number(shell: InteractiveShell) -> int:
    """The number the running cell shows (``In [12]``): IPython 9 counts the next
    cell already while one runs; the running cell's result knows its own."""
    running = getattr(shell.displayhook, "exec_result", None)
    count = getattr(running, "execution_count", None)
    return int(count) if isinstance(count, int) else int(shell.execution_count)


def register(shell: Any) -> None:
    magics = Lan2GPUMagics(shell)
    shell.register_magics(magics)
    shell.configurables.append(magics.settings)  # so %config Lan2GPU works
    if hints.after_cell not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", hints.after_cell)
    for event, callback in (("pre_run_cell", cell_started), ("post_run_cell", cell_ended)):
        if callback not in shell.events.callbacks[event]:
            shell.events.register(event, callback)


def unregister(shell: Any) -> None:
    if hints.after_cell in shell.events.callbacks["post_run_cell"]:
        shell.events.unregister("post_run_cell", hints.after_cell)
    for event, callback in (("pre_run_cell", cell_started), ("post_run_cell", cell_ended)):
        if callback in shell.events.callbacks[event]:
            shell.events.unregister(event, callback)
    magics = shell.magics_manager.registry.pop("Lan2GPUMagics", None)
    if magics is not None:
        magics.close()
        if magics.settings in shell.configurables:
            shell.configurables.remove(magics.settings)
