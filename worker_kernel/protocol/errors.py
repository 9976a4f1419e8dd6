"""One error hierarchy for lan2gpu, split by whose fault it is.

::

    Lan2GPUError
    ├── ConfigurationError        your setup: a bad option, key file or address
    ├── CellSyntaxError           the cell does not parse (found before sending it)
    ├── NoWorkerAvailable         nothing known matches what the cell asked for
    ├── TransportError            the network path
    │   ├── WorkerUnreachable     no answer to the handshake
    │   ├── WorkerLost            heartbeats stopped while waiting ("it broke")
    │   └── ConnectionClosed      the client was closed ("you closed it")
    ├── ProtocolError             a message failed a check
    │   ├── AuthenticationError   wrong key / bad signature
    │   ├── VersionMismatch       the two sides cannot understand each other
    │   └── MessageRejected       malformed, replayed, stale, too large, misaddressed
    ├── SerializationError        a value could not be pickled or unpickled (names it)
    └── WorkerError               the worker answered, but the cell did not complete
        ├── RemoteExecutionError  the cell raised; carries the remote traceback
        ├── ExecutionTimeout      --timeout passed
        ├── ExecutionCancelled    interrupted or cancelled
        ├── ExecutorDied          the executor process died; session state is lost
        ├── MemoryBudgetExceeded  the cell's inputs do not fit the worker's memory budget
        └── SplitError            a chunk of a --split cell failed twice (all errors inside)

Every message says what happened, where, and what to do.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any


class Lan2GPUError(Exception):
    """Root of every error lan2gpu raises on purpose."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback through lan2gpu's internals:
        # the message already says what happened and what to do.
        return [f"\x1b[1;31m{type(self).__name__}\x1b[0m: {self}"]


class ConfigurationError(Lan2GPUError):
    """A setting, option, key file or address is wrong; fix the configuration."""


class CellSyntaxError(Lan2GPUError):
    """The cell is not valid Python; nothing was sent.

    Not a ``SyntaxError`` subclass on purpose: IPython would show one with a
    traceback through lan2gpu's internals instead of just the cell's line.
    """

    def __init__(self, error: SyntaxError) -> None:
        super().__init__(f"{error.msg} ({error.filename}, line {error.lineno})")
        self.lineno = error.lineno
        self.filename = error.filename
        self._lines = tuple(
            line.rstrip("\n")
            for chunk in traceback.format_exception_only(SyntaxError, error)
            for line in chunk.splitlines()
        )

    def _render_traceback_(self) -> list[str]:
        return list(self._lines)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_syntax_error, (str(self), self.filename, self.lineno, self._lines))


def _rebuild_syntax_error(
    message: str, filename: str | None, lineno: int | None, lines: tuple[str, ...]
) -> CellSyntaxError:
    error = CellSyntaxError.__new__(CellSyntaxError)
    Lan2GPUError.__init__(error, message)
    error.filename, error.lineno, error._lines = filename, lineno, lines
    return error


class NoWorkerAvailable(Lan2GPUError):
    """No known worker satisfies the cell's requirements."""


class TransportError(Lan2GPUError):
    """Something went wrong between client and worker."""


class WorkerUnreachable(TransportError):
    """The worker did not answer (not running, wrong address, firewall)."""


class WorkerLost(TransportError):
    """The worker stopped answering while a request was in flight.

    ``gone`` says whether the cell cannot still be running there: True when the
    connection dropped (the worker was killed, its host went down, the network was cut
    for longer than the link timeout) or the worker restarted; False when the worker kept
    its connection but stayed silent past its ``--stall-grace``, or never reported the end
    of a cell, so the cell may yet finish there. ``%%lan2gpu --retry`` runs a cell again
    elsewhere only when ``gone``.
    """

    def __init__(self, message: str, *, gone: bool = True) -> None:
        super().__init__(message)
        self.gone = gone

    def __reduce__(self) -> tuple[Any, ...]:
        return (_worker_lost, (str(self), self.gone))


def _worker_lost(message: str, gone: bool) -> WorkerLost:
    return WorkerLost(message, gone=gone)


class ConnectionClosed(TransportError):
    """The client was closed before or during the request."""


class ProtocolError(Lan2GPUError):
    """A message failed a protocol check; it was dropped without being unpickled."""


class AuthenticationError(ProtocolError):
    """The message signature did not verify: the two sides hold different keys."""


class VersionMismatch(ProtocolError):
    """The two sides speak incompatible versions (protocol or Python)."""


class MessageRejected(ProtocolError):
    """A message was malformed, replayed, outside the time window, or too large."""


class SerializationError(Lan2GPUError):
    """A value could not be pickled or unpickled.

    ``name`` is the variable the value was bound to (when known).
    """

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.name))


class WorkerError(Lan2GPUError):
    """The worker answered, but the cell did not complete."""

    def __init__(self, message: str, worker: str = "", session_lost: bool = False) -> None:
        super().__init__(message)
        self.worker = worker
        self.session_lost = session_lost

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.worker, self.session_lost))


class ExecutionTimeout(WorkerError):
    """The cell ran past its ``--timeout``."""


class ExecutionCancelled(WorkerError):
    """The cell was cancelled (kernel interrupt, or the client went away)."""


class ExecutorDied(WorkerError):
    """The executor process died while running the cell; its session state is gone."""


class MemoryBudgetExceeded(WorkerError, MemoryError):
    """The worker's memory budget (``--memory-limit``, shared by its sessions) has no
    room for the cell's inputs; the cell did not run, and its session is intact.
    (Allocating past the budget inside a cell is a ``MemoryError`` in the cell.)"""


class SplitError(WorkerError):
    """A chunk of a split cell (``--split``) failed on every slot it was tried on.

    ``chunk`` is its rank. ``errors`` is an :class:`ExceptionGroup` of the last
    error of every chunk that failed (this one first); it is also the
    ``__cause__``, so the traceback shows them all.
    """

    def __init__(
        self,
        message: str,
        worker: str = "",
        chunk: int = -1,
        errors: ExceptionGroup[Exception] | None = None,
    ) -> None:
        super().__init__(message, worker)
        self.chunk = chunk
        self.errors = errors
        self.__cause__ = errors

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.worker, self.chunk))


@dataclass(frozen=True)
class RemoteFrame:
    """One frame of a remote traceback, as sent over the wire."""

    filename: str
    lineno: int
    name: str
    line: str = ""


@dataclass(frozen=True)
class RemoteTraceback:
    """A remote exception as plain data.

    ``ename``/``evalue``: type name and message; ``frames``: the stack from the
    cell down; ``text``: Python's exception-only lines (carets for syntax
    errors); ``cause``: the chained exception, ``cause_is_direct`` for
    ``raise ... from``.
    """

    ename: str
    evalue: str
    frames: tuple[RemoteFrame, ...] = ()
    text: str = ""
    notes: tuple[str, ...] = field(default=())
    cause: RemoteTraceback | None = None
    cause_is_direct: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "ename": self.ename,
            "evalue": self.evalue,
            "frames": [[f.filename, f.lineno, f.name, f.line] for f in self.frames],
            "text": self.text,
            "notes": list(self.notes),
            "cause": self.cause.to_json() if self.cause is not None else None,
            "cause_is_direct": self.cause_is_direct,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], depth: int = 0) -> RemoteTraceback:
        frames = tuple(
            RemoteFrame(str(fn), int(ln), str(name), str(line))
            for fn, ln, name, line in data.get("frames", [])
        )
        cause_data = data.get("cause")
        # Bound the chain: it comes from the network.
        cause = cls.from_json(cause_data, depth + 1) if cause_data and depth < 32 else None
        return cls(
            ename=str(data.get("ename", "Exception")),
            evalue=str(data.get("evalue", "")),
            frames=frames,
            text=str(data.get("text", "")),
            notes=tuple(str(n) for n in data.get("notes", [])),
            cause=cause,
            cause_is_direct=bool(data.get("cause_is_direct", False)),
        )


class RemoteExecutionError(WorkerError):
    """The cell raised on the worker.

    ``ename`` and ``evalue`` are the remote exception's type name and message;
    ``traceback_lines`` is the remote traceback rendered for display, with the
    cell's own line numbers and source lines. IPython shows it through
    ``_render_traceback_`` like a local error.
    """

    def __init__(
        self,
        message: str,
        worker: str = "",
        remote: RemoteTraceback | None = None,
        traceback_lines: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, worker)
        self.remote = remote or RemoteTraceback(ename="Exception", evalue=message)
        self.traceback_lines = traceback_lines

    @property
    def ename(self) -> str:
        return self.remote.ename

    @property
    def evalue(self) -> str:
        return self.remote.evalue

    def _render_traceback_(self) -> list[str]:
        return list(self.traceback_lines) or [str(self)]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.worker, self.remote, self.traceback_lines))
