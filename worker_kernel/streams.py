"""Live stdout/stderr from a running cell.

Writes are batched (a chunk goes out at a newline once ``interval`` has passed,
when it grows past ``max_chunk``, or from a background flush every
``interval``) and kept in order across the two streams: switching stream
flushes the other one first.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

SendStream = Callable[[str, str], None]


class OutputChannel:
    """Ordered, batched stream output for one cell at a time."""

    def __init__(self, interval: float = 0.05, max_chunk: int = 64 * 1024) -> None:
        self.interval = interval
        self.max_chunk = max_chunk
        self._lock = threading.Lock()
        self._send: SendStream | None = None
        self._name = ""
        self._parts: list[str] = []
        self._size = 0
        self._last_flush = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="lan2gpu-flush", daemon=True)
        self._thread.start()

    def begin(self, send: SendStream) -> None:
        """Route output to ``send(stream_name, text)`` until :meth:`end`."""
        with self._lock:
            self._send = send

    def end(self) -> None:
        with self._lock:
            self._flush_locked()
            self._send = None

    def write(self, name: str, text: str) -> None:
        with self._lock:
            if self._name != name:
                self._flush_locked()
                self._name = name
            self._parts.append(text)
            self._size += len(text)
            due = time.monotonic() - self._last_flush >= self.interval
            if self._size >= self.max_chunk or (due and "\n" in text):
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.end()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if not self._parts:
            return
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        if self._send is not None:
            self._send(self._name, text)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()


class RemoteStream(io.TextIOBase):
    """A text stream (``sys.stdout``/``sys.stderr``) that feeds an OutputChannel."""

    def __init__(self, channel: OutputChannel, name: str) -> None:
        super().__init__()
        self._channel = channel
        self._name = name

    encoding = "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            self._channel.write(self._name, text)
        return len(text)

    def flush(self) -> None:
        self._channel.flush()
