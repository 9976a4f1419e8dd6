"""Cells that run in the background: ``%%lan2gpu --async NAME``.

The cell's inputs are captured and serialized when it is started (later changes
in the notebook do not reach it); it then runs in a thread of its own with its
own connection. Its handle, bound to ``NAME``, reports progress, buffers the
cell's printed output, and can be cancelled. Outputs are never put into the
notebook behind the user's back: ``%lan2gpu wait NAME`` (or
``NAME.result()``, which returns them without assigning) collects them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .results import RunResult

WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"


Body = Callable[["Job"], RunResult]


class Job:
    """The handle of a background cell. Thread-safe; every method returns at once
    except :meth:`wait` and :meth:`result`."""

    def __init__(self, name: str, where: str, body: Body) -> None:
        self.name = name
        self.where = where
        self.cancel_event = threading.Event()
        self.state = WAITING
        self.detail = ""  # the latest progress, e.g. "2 cell(s) ahead" or "3/4 chunks done"
        self.started_at = time.time()  # wall clock, when the cell was started
        self.running_at: float | None = None  # when the worker started running it
        self.finished_at: float | None = None
        self.collected = False  # its outputs went into the notebook (%lan2gpu wait)
        self._body: Body | None = body
        self._lock = threading.Lock()
        self._output: list[tuple[str, str]] = []
        self._displays: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._live: tuple[Callable[[str, str], None], Callable[..., None]] | None = None
        self._finished: RunResult | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._watchers: list[Callable[[Job], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"lan2gpu-job-{name}", daemon=True)

    # -- the background side --------------------------------------------------------

    def start(self) -> Job:
        self._thread.start()
        return self

    def _run(self) -> None:
        body, self._body = self._body, None  # its copied inputs go once it has run
        try:
            finished = body(self) if body is not None else RunResult(worker="")
        except BaseException as exc:  # reported to whoever collects the job
            self._end(None, exc)
        else:
            self._end(finished, finished.error)
        finally:
            del body

    def _end(self, finished: RunResult | None, error: BaseException | None) -> None:
        with self._lock:
            self._finished, self._error = finished, error
            self.finished_at = time.time()
            if error is None:
                self.state = DONE
            elif self.cancel_event.is_set():
                self.state = CANCELLED
            else:
                self.state = FAILED
        self._done.set()
        self._notify()

    def stream(self, name: str, text: str) -> None:
        """Live output of the cell: buffered, or written if someone is waiting."""
        with self._lock:
            if self._live is None:
                self._output.append((name, text))
                return
            write = self._live[0]
        write(name, text)

    def display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        with self._lock:
            if self._live is None:
                self._displays.append((data, metadata))
                return
            show = self._live[1]
        show(data, metadata)

    def status(self, kind: str, content: dict[str, Any]) -> None:
        """Worker progress (queued, started, transfer) for the status line."""
        if kind == "queued":
            ahead = int(content.get("position", 0))
            self.progress(f"{ahead} cell(s) ahead" if ahead else "")
        elif kind == "started":
            self.running()

    def running(self) -> None:
        with self._lock:
            if self.state == WAITING:
                self.state, self.running_at, self.detail = RUNNING, time.time(), ""
        self._notify()

    def progress(self, text: str) -> None:
        self.detail = text
        self._notify()

    def watch(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` on every change of state or progress (any thread)."""
        self._watchers.append(callback)

    def _notify(self) -> None:
        for callback in list(self._watchers):
            callback(self)

    # -- the notebook side -------------------------------------------------------------

    def done(self) -> bool:
        """Whether the cell has finished (successfully or not)."""
        return self._done.is_set()

    def cancel(self) -> bool:
        """Ask the worker to stop the cell. False if it had already finished."""
        if self.done():
            return False
        self.cancel_event.set()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the cell finishes (or ``timeout`` s pass); True if it finished."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The names the cell bound and their values, without assigning them anywhere.

        Blocks until the cell finishes; raises its error if it failed, or
        ``TimeoutError`` if ``timeout`` passes first.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"lan2gpu job {self.name} is still {self.state}")
        if self._error is not None:
            raise self._error
        return dict(self._finished.outputs) if self._finished is not None else {}

    def outcome(self) -> tuple[RunResult | None, BaseException | None]:
        """What :meth:`result` is made of: the outputs (if any) and the error (if any)."""
        return self._finished, self._error

    def attach(self, write: Callable[[str, str], None], show: Callable[..., None]) -> None:
        """Replay the buffered output, then pass live output straight through."""
        with self._lock:
            output, self._output = self._output, []
            displays, self._displays = self._displays, []
            for name, text in output:
                write(name, text)
            for data, metadata in displays:
                show(data, metadata)
            self._live = (write, show)

    def detach(self) -> None:
        with self._lock:
            self._live = None

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.time()) - self.started_at

    def describe(self) -> str:
        """One line: state, where, how long, and the latest progress."""
        if self.state == WAITING:
            text = f"waiting for {self.where}"
        elif self.state == RUNNING:
            text = f"running on {self.where}"
        else:
            text = f"{self.state} on {self.where}"
        text += f", {self.elapsed:.1f} s"
        if self.detail and not self.done():
            text += f" ({self.detail})"
        if self.state == FAILED and self._error is not None:
            text += f": {type(self._error).__name__}"
        lines = sum(t.count("\n") for _, t in self._output)
        if lines:
            text += f", {lines} line(s) of output waiting"
        if self.done() and not self.collected:
            text += f"; collect with %lan2gpu wait {self.name}"
        return text

    def __repr__(self) -> str:
        return f"<lan2gpu job {self.name}: {self.describe()}>"
