"""What a cell shows while it runs: live output, and one status line updated in place."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from IPython.display import DisplayHandle, publish_display_data

from worker_kernel.protocol.errors import (
    ExecutionCancelled,
    ExecutionTimeout,
    RemoteExecutionError,
    WorkerError,
)
from worker_kernel.protocol.units import binary_size

from .placement import Placement


class _Screen:
    """The terminal's state: the status line printed last, if it still is the last line."""

    last: StatusLine | None = None


_screen = _Screen()
_lock = threading.RLock()  # chunk threads print while the main thread redraws
_in_cell = threading.Event()  # a cell runs: redraws from its threads may go to the terminal


def _terminal() -> bool:
    """Terminal IPython writing to a TTY: displays there are plain prints, so a
    status line is redrawn with ANSI codes instead of printed again."""
    from IPython import get_ipython

    shell = get_ipython()
    return type(shell).__name__ == "TerminalInteractiveShell" and sys.stdout.isatty()


_UP_AND_CLEAR = "\x1b[1A\r\x1b[2K"  # cursor one line up, clear that line


def _around_status(emit: Callable[[], None], whole_lines: bool) -> None:
    """Print something; in a terminal, keep the status line below it, as progress
    bars do: erase it, print, and draw it again under what was printed."""
    with _lock:
        line, _screen.last = _screen.last, None
        if line is not None:
            sys.stdout.write(_UP_AND_CLEAR)
        emit()
        if line is not None and whole_lines and line.text is not None:
            line.draw_below()


def cell_started(*_: Any) -> None:
    """IPython ``pre_run_cell``: output from now on belongs to a running cell."""
    _in_cell.set()


def cell_ended(*_: Any) -> None:
    """IPython ``post_run_cell``: whatever comes next (the prompt, a later cell) goes
    below every status line; background updates stay out of the terminal."""
    with _lock:
        _in_cell.clear()
        _screen.last = None


def publish(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    _around_status(
        lambda: publish_display_data(data=data, metadata=metadata),  # type: ignore[no-untyped-call]
        whole_lines=True,
    )


def write(name: str, text: str) -> None:
    out = sys.stderr if name == "stderr" else sys.stdout

    def emit() -> None:
        sys.stdout.flush()
        out.write(text)
        out.flush()

    _around_status(emit, whole_lines=text.endswith("\n"))


def say(text: str) -> None:
    """What lan2gpu did: stdout (frontends show stderr on red, like an error)."""
    write("stdout", f"{text}\n")


def warn(text: str) -> None:
    """Warnings only go to stderr."""
    write("stderr", f"{text}\n")


class StatusLine:
    """One line of output, replaced in place: a display with an id in Jupyter; in a
    terminal, redrawn over itself while nothing else was printed after it (else
    printed anew). An update from a background thread reaches Jupyter by that id; in
    a terminal it is left out (it would land in the middle of the prompt).

    Without a ``text``, nothing is shown until the first :meth:`show` (so a cell
    that fails before it starts leaves no line behind).
    """

    def __init__(self, text: str | None = None) -> None:
        self.handle = DisplayHandle()  # type: ignore[no-untyped-call]
        self.text: str | None = None
        self._terminal = _terminal()
        if text is not None:
            self.show(text)

    @staticmethod
    def _bundle(text: str) -> dict[str, str]:
        return {"text/plain": f"lan2gpu: {text}"}

    def show(self, text: str) -> None:
        if text == self.text:
            return  # each update is a message to the frontend
        shown, self.text = self.text is not None, text
        if self._terminal:
            self._redraw(text)
        elif shown:
            self.handle.update(self._bundle(text), raw=True)  # type: ignore[no-untyped-call]
        else:
            self.handle.display(self._bundle(text), raw=True)  # type: ignore[no-untyped-call]

    def _redraw(self, text: str) -> None:
        with _lock:
            main = threading.current_thread() is threading.main_thread()
            if not (main or _in_cell.is_set()):
                return  # a background job while the prompt waits: not into the prompt
            # One screen row, so that "up one line" erases all of it.
            width = max(20, shutil.get_terminal_size().columns - 1)
            shown = f"lan2gpu: {text}"
            if len(shown) > width:
                shown = shown[: width - 1] + "…"
            up = _UP_AND_CLEAR if _screen.last is self else ""
            sys.stdout.write(f"{up}{shown}\n")
            sys.stdout.flush()
            _screen.last = self

    def close(self) -> None:
        """The line has its final text: later output goes below it, never over it."""
        with _lock:
            if _screen.last is self:
                _screen.last = None

    def draw_below(self) -> None:
        """Draw the line again, after other output (terminal only)."""
        with _lock:
            _screen.last = None
            if self.text is not None:
                self._redraw(self.text)


def intact(session_lost: bool) -> str:
    return "its session there is lost" if session_lost else "the session is intact"


class Progress:
    """One line per cell that says where it runs, updated in place as it moves along,
    and at the end how it ended (ran, raised, cancelled, timed out, lost)."""

    def __init__(self, placement: Placement) -> None:
        self.where = placement.describe().rsplit(", queue", 1)[0]
        self.worker = placement.worker.name
        self.t0 = time.monotonic()
        ahead = placement.queue
        waiting = f"waiting for {self.where}: {ahead} cell(s) ahead"
        self.line = StatusLine(waiting if ahead else f"running on {self.where}")

    def status(self, kind: str, content: dict[str, Any]) -> None:
        text: str | None
        if kind == "queued" and content.get("waiting_for") == "executor":
            text = (
                f"waiting for {self.where}: every session executor there is in use "
                "(the worker's --max-executors); this cell starts when one is free"
            )
        elif kind == "queued":
            ahead = int(content.get("position", 0))
            text = f"waiting for {self.where}: {ahead} cell(s) ahead" if ahead else None
        elif kind == "started":
            text = f"running on {self.where}"
        elif kind == "transfer":
            size = binary_size(float(content.get("bytes", 0)))
            text = f"running on {self.where}; receiving {size} of results"
        elif kind == "stalled":
            silent, grace = float(content.get("silent", 0)), float(content.get("grace", 0))
            text = (
                f"{self.worker} has not answered for {silent:.0f} s, but its connection is "
                f"up (overloaded, swapping or stopped?): waiting up to {grace:g} s for the "
                "result; Ctrl-C stops waiting"
            )
        elif kind == "answering":
            silent = float(content.get("silent", 0))
            text = f"running on {self.where} (it answers again after {silent:.0f} s)"
        else:
            text = None
        if text:
            self.line.show(text)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def finished(self, seconds: float) -> None:
        self._final(f"ran on {self.where} in {seconds:.2f} s")

    def _final(self, text: str) -> None:
        self.line.show(text)
        self.line.close()

    def interrupted(self, session_lost: bool | None) -> None:
        """Ctrl-C; ``session_lost`` None: the worker did not confirm in time."""
        after = f"after {self.elapsed():.1f} s"
        if session_lost is None:
            self._final(
                f"stopped waiting for {self.where} {after}; the worker did not confirm the "
                "cancel, so the cell may still be running there"
            )
        else:
            self._final(f"cancelled on {self.where} {after}; {intact(session_lost)}")

    def failed(self, error: BaseException) -> None:
        """The line for a cell that ended in ``error`` (its traceback follows it)."""
        after = f"after {self.elapsed():.1f} s"
        lost = bool(getattr(error, "session_lost", False))
        if isinstance(error, RemoteExecutionError):
            text = f"raised {error.remote.ename} on {self.where} {after}"
        elif isinstance(error, ExecutionTimeout) and "did not start" in str(error):
            text = f"withdrawn from the queue of {self.where} {after}: past its --timeout"
        elif isinstance(error, ExecutionTimeout):
            text = f"stopped on {self.where} {after}: past its --timeout; {intact(lost)}"
        elif isinstance(error, ExecutionCancelled):
            text = f"cancelled on {self.where} {after}; {intact(lost)}"
        elif isinstance(error, WorkerError):
            text = f"failed on {self.where} {after}; {intact(lost)}"
        else:
            text = f"failed on {self.where} {after}: {type(error).__name__}"
        self._final(text)


def short_interrupt(text: str) -> KeyboardInterrupt:
    """A KeyboardInterrupt that IPython shows as one line, as short as a local cell's,
    instead of a traceback through lan2gpu's own frames."""
    exc = KeyboardInterrupt(text)
    lines = [f"KeyboardInterrupt: {text}"]
    exc._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
    return exc
