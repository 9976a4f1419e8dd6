"""``%lan2gpu`` and ``%%lan2gpu``: the IPython face of the pipeline.

The cell magic reads like the data flow: capture -> serialize -> choose a
worker -> submit (live output) -> apply the outputs. Everything else here is
option parsing and presentation.
"""

from __future__ import annotations

import argparse
import atexit
import shlex
import threading
import time
from dataclasses import dataclass
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class

from worker_kernel.protocol.errors import ProtocolError, TransportError, WorkerLost
from worker_kernel.protocol.serialize import Payload, dump_values

from . import capture, fanout, hints, options, results, split_cell, tables
from .client import ExecuteRequest, Interrupted, OutputHandlers
from .config import Lan2GPU
from .jobs import CANCELLED, Finished, Job
from .placement import Placement, Requirements
from .pool import WorkerPool
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


@dataclass(frozen=True)
class _Cell:
    """One ``%%lan2gpu`` invocation, parsed and planned."""

    args: argparse.Namespace
    code: str
    plan: capture.CellPlan
    filename: str
    requirements: Requirements


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
            plaintext=self.settings.insecure_plaintext,
        )
        self.jobs: dict[str, Job] = {}  # background cells, by handle name
        self._speeds: dict[str, float] = {}  # rows/s per slot, measured by split cells
        self._cell_args = options.cell_parser()
        self._line_args = options.line_parser()
        atexit.register(self.close)

    def _shell(self) -> InteractiveShell:
        if self.shell is None:
            raise UsageError("lan2gpu magics need a running IPython shell")
        return self.shell

    _say = staticmethod(say)
    _warn = staticmethod(warn)

    def _sync_settings(self) -> None:
        # `%config Lan2GPU.x = ...` changes the settings object; apply it each call.
        self.pool.connect_timeout = self.settings.connect_timeout
        self.pool.key_file = self.settings.key_file or None
        self.pool.plaintext = self.settings.insecure_plaintext
        self.pool.allow_embedded = self.settings.embedded_worker
        self.pool.discovery = self.settings.discovery
        self.pool.discovery_wait = self.settings.discovery_wait

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel()
        deadline = time.monotonic() + 10  # cancelled cells confirm within seconds
        for job in self.jobs.values():
            job.wait(max(0.0, deadline - time.monotonic()))
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

    def _cell(self, line: str, cell: str) -> Any:
        args = self._cell_args.parse_args(shlex.split(line))
        self._check_combination(args)
        shell = self._shell()
        filename = f"<lan2gpu In[{_cell_number(shell)}]>"
        register_source(filename, f"%%lan2gpu {line}\n{cell}")
        ns = shell.user_ns
        # Planned against the namespace itself: functions of the notebook that
        # assign globals are recognised by their __globals__ being this very dict.
        # (A split cell's rank and size are sent to every chunk regardless.)
        plan = capture.plan_cell(
            cell,
            ns,
            hidden=shell.user_ns_hidden,
            inputs=args.inputs,
            outputs=args.outputs,
            filename=filename,
            line_offset=1,
        )
        requirements = self._requirements(args)
        c = _Cell(args, cell, plan, filename, requirements)
        if args.split:
            return self._split(c)
        payload, _ = dump_values({name: ns[name] for name in plan.inputs}, namespace=ns)
        if args.async_name:
            return self._start_async(c, payload)
        lost: set[str] = set()  # workers lost during this cell, for --retry
        while True:
            client, placement = self.pool.choose(requirements, exclude=lost, session=args.session)
            request = self._request(c, placement, client.session, ns)
            progress = Progress(placement)
            try:
                result = client.execute(request, payload, self._handlers(progress))
                break
            except WorkerLost as exc:
                progress.failed(exc)
                if len(lost) >= args.retry or not exc.gone:  # never run a cell twice
                    raise
                lost.add(placement.worker.address)
                self._warn(
                    f"lan2gpu: {exc.args[0].split('.')[0]}; running the cell again on another "
                    f"worker (retry {len(lost)} of {args.retry})"
                )
            except Interrupted as exc:
                progress.interrupted(exc.session_lost)
                raise short_interrupt(f"cancelled on {progress.worker}") from None
            except KeyboardInterrupt:  # a second Ctrl-C, or no confirmation in time
                progress.interrupted(None)
                raise short_interrupt(f"stopped waiting for {progress.worker}") from None
            except Exception as exc:
                progress.failed(exc)
                raise
        if result.error is not None:
            progress.failed(result.error)
        else:
            progress.finished(float(result.stats.get("total_seconds", 0.0)))
        results.apply(result, shell.user_ns, warn=self._say)
        if result.value_repr:
            publish(result.value_repr, {})
        return result.value if result.has_value else None

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

    def _request(
        self,
        c: _Cell,
        placement: Placement,
        session: str,
        local: dict[str, Any],
        cancel: threading.Event | None = None,
    ) -> ExecuteRequest:
        args = c.args
        return ExecuteRequest(
            code=c.code,
            plan=c.plan,
            session=args.session or session,
            timeout=args.timeout or self.settings.default_timeout or None,
            filename=c.filename,
            line_offset=1,
            gpus=tuple(g.index for g in placement.gpus),
            cpu=placement.cpu,
            local=local,
            namespace=self._shell().user_ns,
            keep_namespace=bool(args.session),
            cache=not args.no_cache,
            compress=args.compress,
            cancel=cancel,
        )

    # -- --split ------------------------------------------------------------------

    def _split(self, c: _Cell) -> Any:
        args, requirements = c.args, c.requirements
        spec = split_cell.CellSpec(
            code=c.code,
            plan=c.plan,
            filename=c.filename,
            split=args.split,
            gather=args.gather,
            slots=args.workers or None,  # all (0) or not given (None): every slot
            balance=args.balance,
            timeout=args.timeout or self.settings.default_timeout or None,
            cache=not args.no_cache,
            compress=args.compress,
            session=args.session,
        )
        job: Job | None = None
        if args.async_name:

            def body(job: Job) -> Finished:
                job.running()  # the chunks' own queues show in the progress
                return prepared.run()

            job = Job(args.async_name, "", body)
            shown = (job.stream, job.display, job.progress)
        else:
            line = StatusLine()
            shown = (write, publish, line.show)  # shown once the chunks start
        prepared = split_cell.prepare(
            self.pool,
            spec,
            self._shell().user_ns,
            requirements,
            self._speeds,
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
        return self._launch(job)

    # -- --async --------------------------------------------------------------------

    def _start_async(self, c: _Cell, payload: Payload) -> None:
        args = c.args
        client, placement = self.pool.choose(c.requirements, session=args.session)
        address = placement.worker.address
        session = client.adopt_session()  # the notebook's session there, closed with it
        # The cell's inputs as they are now: later changes here must not reach it.
        payload = payload.copied()

        def body(job: Job) -> Finished:
            request = self._request(c, placement, session, {}, job.cancel_event)
            handlers = OutputHandlers(stream=job.stream, display=job.display, status=job.status)
            leased = self.pool.lease(address)
            healthy = True
            try:
                return Finished.of(leased.execute(request, payload, handlers))
            except (TransportError, ProtocolError):
                healthy = False
                raise
            finally:
                self.pool.give_back(leased, healthy)

        where = placement.describe().rsplit(", queue", 1)[0]
        return self._launch(Job(args.async_name, where, body))

    def _launch(self, job: Job) -> None:
        ns = self._shell().user_ns
        old = self.jobs.get(job.name)
        if old is not None and not old.done():
            raise UsageError(
                f"--async {job.name}: a background cell of that name is still running; "
                f"wait for it (%lan2gpu wait {job.name}), cancel it ({job.name}.cancel()), "
                "or pick another name"
            )
        if old is not None and not old.collected and old.state != CANCELLED:
            # Replacing it would drop what it produced without a word.
            raise UsageError(
                f"--async {job.name}: the background cell of that name finished ({old.state}) "
                f"and was never collected; collect it first (%lan2gpu wait {job.name}), or "
                "pick another name"
            )
        line = StatusLine(f"job {job.name}: {job.describe()}")

        def update(j: Job) -> None:
            text = f"job {j.name}: {j.state} on {j.where}" + (f" ({j.detail})" if j.detail else "")
            if j.done():
                text = f"job {j.name}: {j.state} in {j.elapsed:.1f} s; %lan2gpu wait {j.name}"
            line.show(text)  # only when the text changed

        job.watch(update)
        line.close()  # later updates come from the job's thread; the cell is over
        self.jobs[job.name] = job
        ns[job.name] = job
        job.start()

    def _assign(self, finished: Finished) -> Any:
        """Outputs into the namespace as if the cell had run here; then its error."""
        ns = self._shell().user_ns
        ns.update(finished.outputs)
        for name in finished.deleted:
            ns.pop(name, None)
        for warning in finished.warnings:
            self._say(warning)
        if finished.error is not None:
            raise finished.error
        if finished.value_repr:
            publish(finished.value_repr, {})
        return finished.value if finished.has_value else None

    def _wait(self, names: list[str], timeout: float | None) -> Any:
        jobs = [self._job(n) for n in names] or [j for j in self.jobs.values() if not j.collected]
        if not jobs:
            self._say("lan2gpu: no background cell to wait for")
            return None
        value: Any = None
        deadline = None if timeout is None else time.monotonic() + timeout
        failure: Exception | None = None
        for job in jobs:
            try:
                value = self._collect(job, deadline, timeout)
            except UsageError:
                raise  # still running past the deadline: stop waiting here
            except Exception as exc:  # the job's own error: the others are collected first
                failure = failure or exc
        if failure is not None:
            raise failure
        return value

    def _collect(self, job: Job, deadline: float | None, timeout: float | None) -> Any:
        """Wait for one job, show its output, assign its outputs; raise its error."""
        line = StatusLine(f"job {job.name}: {job.describe()}")
        job.attach(write, publish)
        try:
            while not job.wait(0.25):
                if deadline is not None and time.monotonic() > deadline:
                    raise UsageError(
                        f"job {job.name} is still {job.state} after {timeout:g} s; "
                        f"%lan2gpu wait {job.name} again later, or {job.name}.cancel()"
                    )
                line.show(f"job {job.name}: {job.describe()}")
        except KeyboardInterrupt:
            raise short_interrupt(
                f"stopped waiting; job {job.name} goes on "
                f"(%lan2gpu wait {job.name} again, or {job.name}.cancel())"
            ) from None
        finally:
            job.detach()
            line.close()
        line.show(f"job {job.name}: {job.state} in {job.elapsed:.1f} s")
        line.close()
        job.collected = True
        finished, error = job.outcome()
        if finished is None:
            raise error if error is not None else UsageError(f"job {job.name} gave nothing")
        if error is not None and finished.error is None:
            raise error
        return self._assign(finished)

    def _job(self, name: str) -> Job:
        job = self.jobs.get(name)
        if job is None:
            known = ", ".join(self.jobs) or "none"
            raise UsageError(f"no background cell named {name!r} (known: {known})")
        return job

    def _print_jobs(self) -> None:
        if not self.jobs:
            print("no background cells (start one with %%lan2gpu --async NAME)")
        for job in self.jobs.values():
            if not job.collected:
                print(f"{job.name}: {job.describe()}")

    def _requirements(self, args: argparse.Namespace) -> Requirements:
        if args.gpus < 1:
            raise UsageError("--gpus must be at least 1")
        return Requirements.from_args(args, allow_simulator=self.settings.allow_simulator)

    def _handlers(self, progress: Progress) -> OutputHandlers:
        return OutputHandlers(stream=write, display=publish, status=progress.status)

    # -- %lan2gpu ---------------------------------------------------------------

    def _line(self, line: str) -> Any:
        args = self._line_args.parse_args(shlex.split(line))
        if args.command == "connect":
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
        elif args.command == "disconnect":
            if not self.pool.disconnect(args.address):
                raise UsageError(f"not connected to {args.address}")
        elif args.command == "workers":
            self._print_workers()
        elif args.command == "status":
            self._print_status()
        elif args.command == "wait":
            return self._wait(args.jobs, args.timeout)
        elif args.command == "jobs":
            self._print_jobs()
        elif args.command == "close-session":
            chosen, _ = self.pool.choose(Requirements(worker=args.worker, cpu=True))
            closed = chosen.close_session(args.session)
            self._say(f"lan2gpu: stopped {closed} executor(s) on {chosen.name}")
        else:
            print(self._line_args.format_help())
        return None

    def _print_status(self) -> None:
        self.pool.wait_for_probes()
        for row in self.pool.rows(max_age=0):
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
                    who = f"{cell['user']}, " if cell.get("user") else ""
                    what = f"{cell['id'][:8]} ({who}{cell['session']}, {cell[clock]:.1f} s)"
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
