"""What a cell's request to one worker is, and where its live output goes.

:class:`ExecuteRequest` is a cell ready to send (built by :class:`.pipeline.Cell`);
:class:`OutputHandlers` receive what the worker says while it runs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker_kernel.protocol import messages as m

from .capture import CellPlan


def _write(stream_name: str, text: str) -> None:
    stream = sys.stderr if stream_name == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()


def _print_display(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    print(data.get("text/plain", "<display>"))


@dataclass
class OutputHandlers:
    """Where a running cell's live output goes (defaults: this process's stdout)."""

    stream: Callable[[str, str], None] = _write
    display: Callable[[dict[str, Any], dict[str, Any]], None] = _print_display
    status: Callable[[str, dict[str, Any]], None] = field(default=lambda kind, content: None)

    def show(self, kind: str, content: dict[str, Any]) -> None:
        """One thing the worker (or the wait) said about the running cell."""
        if kind == m.STREAM:
            self.stream(str(content.get("name", "stdout")), str(content.get("text", "")))
        elif kind == m.DISPLAY:
            self.display(dict(content.get("data", {})), dict(content.get("metadata", {})))
        else:
            self.status(kind, content)


@dataclass(frozen=True)
class ExecuteRequest:
    """A cell ready to send: its code, what to send and bring back, where it runs."""

    code: str
    plan: CellPlan
    session: str
    timeout: float | None = None
    local: Mapping[str, Any] = field(default_factory=dict)  # the namespace, for the cache
    cache: bool = True  # False: send every array, even ones the session holds
    compress: str | None = None  # "auto", "on", "off"; None: the client's setting
    filename: str = ""
    line_offset: int = 0
    gpus: tuple[int, ...] = ()  # the worker's GPU numbers; () lets the worker pick one
    cpu: bool = False  # a CPU cell: no GPU is visible to it
    # The namespace functions and kernels coming back get as their globals.
    namespace: dict[str, Any] | None = field(default=None, compare=False)
    # A named session keeps its namespace between cells; the notebook's own session
    # mirrors the notebook (a name the notebook does not send is not there).
    keep_namespace: bool = False
    # Set from another thread to cancel the cell (split chunks, async cells); the run
    # then raises ExecutionCancelled. In the main thread, Ctrl-C does the same.
    cancel: threading.Event | None = field(default=None, compare=False)


__all__ = ["ExecuteRequest", "OutputHandlers"]
