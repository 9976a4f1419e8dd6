"""What a cell shows while it runs: live output, and one status line updated in place."""

from __future__ import annotations

import sys
from typing import Any

from IPython.display import DisplayHandle, publish_display_data

from .placement import Placement


def publish(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    publish_display_data(data=data, metadata=metadata)  # type: ignore[no-untyped-call]


def write(name: str, text: str) -> None:
    out = sys.stderr if name == "stderr" else sys.stdout
    out.write(text)
    out.flush()


class StatusLine:
    """One line of output, replaced in place (a display with an id). Thread-safe
    enough: an update from a background thread reaches the frontend by that id.

    Without a ``text``, nothing is shown until the first :meth:`show` (so a cell
    that fails before it starts leaves no line behind).
    """

    def __init__(self, text: str | None = None) -> None:
        self.handle = DisplayHandle()  # type: ignore[no-untyped-call]
        self.text = text
        if text is not None:
            self.handle.display(self._bundle(text), raw=True)  # type: ignore[no-untyped-call]

    @staticmethod
    def _bundle(text: str) -> dict[str, str]:
        return {"text/plain": f"lan2gpu: {text}"}

    def show(self, text: str) -> None:
        if text == self.text:
            return  # each update is a message to the frontend
        shown, self.text = self.text is not None, text
        if shown:
            self.handle.update(self._bundle(text), raw=True)  # type: ignore[no-untyped-call]
        else:
            self.handle.display(self._bundle(text), raw=True)  # type: ignore[no-untyped-call]


class Progress:
    """One line per cell that says where it runs, updated in place as it moves along."""

    def __init__(self, placement: Placement) -> None:
        self.where = placement.describe().rsplit(", queue", 1)[0]
        ahead = placement.queue
        waiting = f"waiting for {self.where}: {ahead} cell(s) ahead"
        self.line = StatusLine(waiting if ahead else f"running on {self.where}")

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
            self.line.show(text)

    def finished(self, seconds: float) -> None:
        self.line.show(f"ran on {self.where} in {seconds:.2f} s")
