"""Step 6: what a worker's answer means, when it is not the values of a cell.

:func:`error_of` is the one place a reply turns into an exception: an unsigned
rejection notice (the worker refused our message: wrong key, stale, malformed),
a signed ``error`` (a request it cannot serve), or a ``result`` whose cell did
not end well. Each message says what happened and what to do.
"""

from __future__ import annotations

from typing import cast

from worker_kernel.protocol import messages as m
from worker_kernel.protocol.contents import ResultContent
from worker_kernel.protocol.errors import (
    AuthenticationError,
    ExecutionCancelled,
    ExecutionTimeout,
    ExecutorDied,
    Lan2GPUError,
    MemoryBudgetExceeded,
    MessageRejected,
    ProtocolError,
    RemoteExecutionError,
    RemoteTraceback,
    SerializationError,
    VersionMismatch,
    WorkerError,
)
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.outcomes import CellStatus

from .tracebacks import render

_NOTICE_ERRORS: dict[str, type[ProtocolError]] = {
    "AuthenticationError": AuthenticationError,
    "VersionMismatch": VersionMismatch,
}


def error_of(
    reply: Message, worker: str, address: str, timeout: float | None = None
) -> Lan2GPUError:
    """The exception ``reply`` from ``worker`` (at ``address``) stands for.

    ``timeout`` is the cell's ``--timeout``, for the text of a timed-out result.
    """
    if not reply.authenticated:
        return _notice(reply, address)
    if reply.kind == m.RESULT:
        return _cell_error(reply, str(reply.content.get("worker", worker)), timeout)
    code = str(reply.content.get("code", ""))
    reason = str(reply.content.get("reason", "unknown error"))
    if code == "version":
        return VersionMismatch(reason)
    if code == "kernel":
        return WorkerError(f"worker {worker} ({address}): {reason}", worker)
    return MessageRejected(f"worker at {address}: {reason}")


def _notice(notice: Message, address: str) -> ProtocolError:
    reason = str(notice.content.get("reason", ""))
    code = str(notice.content.get("code", ""))
    error = _NOTICE_ERRORS.get(code, MessageRejected)
    hint = ""
    if error is AuthenticationError or "signature" in reason:
        error = AuthenticationError
        hint = (
            " This notebook's key file differs from the worker's: copy the worker's key "
            "file (see `python -m worker_kernel keygen --help`) and pass it with "
            "--key-file or LAN2GPU_KEY_FILE."
        )
    return error(f"{reason}\nThe worker at {address} refused our message.{hint}")


def _cell_error(msg: Message, worker: str, timeout: float | None) -> Lan2GPUError:
    c = cast(ResultContent, msg.content)  # read defensively: a peer's JSON
    status = str(c.get("status"))
    lost = bool(c.get("session_lost"))
    state = (
        "The session's variables on the worker are lost (the next cell starts a fresh "
        "executor); the notebook's variables are untouched."
        if lost
        else "The session on the worker is intact."
    )
    reason = str(c.get("reason") or "")
    if status == CellStatus.ERROR and c.get("serialization_error") is not None:
        evalue = str(dict(c.get("error", {})).get("evalue", "cannot pickle an output"))
        return SerializationError(evalue, str(c["serialization_error"]))
    if status == CellStatus.ERROR and "error" in c:
        remote = RemoteTraceback.from_json(dict(c["error"]))
        lines = tuple(render(remote, worker))
        message = f"{remote.ename}: {remote.evalue} (raised on worker {worker})"
        error = RemoteExecutionError(message, worker, remote, lines)
        error.session_lost = lost
        return error
    if status == CellStatus.TIMEOUT:
        limit = f" of {timeout:g} s" if timeout else ""
        if "never started" in reason:
            return ExecutionTimeout(
                f"the cell did not start within its --timeout{limit} on worker {worker}: "
                f"{reason}. Raise --timeout, or pick a less busy worker (--worker).",
                worker,
                lost,
            )
        return ExecutionTimeout(
            f"the cell ran past its --timeout{limit} on worker {worker} and was stopped"
            f"{'; ' + reason if reason else ''}. {state} Raise --timeout if it needs longer.",
            worker,
            lost,
        )
    if status == CellStatus.MEMORY:
        return MemoryBudgetExceeded(f"worker {worker}: {reason}. {state}", worker, lost)
    if status == CellStatus.CANCELLED:
        return ExecutionCancelled(
            f"the cell was cancelled on worker {worker}{'; ' + reason if reason else ''}. {state}",
            worker,
            lost,
        )
    return ExecutorDied(
        f"worker {worker}: {reason or 'the executor failed'}. {state} If this repeats, "
        "the cell may be crashing the process (a segfault or running out of memory); "
        "the worker's log has details.",
        worker,
        True,
    )


__all__ = ["error_of"]
