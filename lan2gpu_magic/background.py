"""Background cells (``%%lan2gpu --async NAME``) of one notebook: started, listed,
collected.

:class:`BackgroundCells` keeps the notebook's jobs by handle name (each one a
:class:`~.jobs.Job`, running in its own thread); ``%lan2gpu wait`` collects them
into the namespace through the magic's ``assign`` (:func:`.results.apply`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from .jobs import CANCELLED, Job
from .results import RunResult
from .status import StatusLine, publish, say, short_interrupt, write


class BackgroundCells:
    """The notebook's background cells, by handle name."""

    def __init__(self, assign: Callable[[RunResult], Any]) -> None:
        self._assign = assign
        self.jobs: dict[str, Job] = {}

    def close(self, grace: float = 10.0) -> None:
        """Cancel every job and wait up to ``grace`` seconds for their workers to confirm."""
        for job in self.jobs.values():
            job.cancel()
        deadline = time.monotonic() + grace  # cancelled cells confirm within seconds
        for job in self.jobs.values():
            job.wait(max(0.0, deadline - time.monotonic()))

    def launch(self, job: Job, ns: dict[str, Any]) -> None:
        """Start ``job`` and bind its handle in ``ns``, unless a job of that name still
        runs or was never collected."""
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

    def wait(self, names: list[str], timeout: float | None) -> Any:
        """``%lan2gpu wait``: collect the named jobs (default: every uncollected one),
        showing their output; the value of the last; the first error after all."""
        jobs = [self._job(n) for n in names] or [j for j in self.jobs.values() if not j.collected]
        if not jobs:
            say("lan2gpu: no background cell to wait for")
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

    def print(self) -> None:
        """``%lan2gpu jobs``: every job not collected yet, one line each."""
        if not self.jobs:
            print("no background cells (start one with %%lan2gpu --async NAME)")
        for job in self.jobs.values():
            if not job.collected:
                print(f"{job.name}: {job.describe()}")


__all__ = ["BackgroundCells"]
