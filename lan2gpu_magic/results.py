"""Steps 6-7: turn a ``result`` message into values (or an error), then a namespace.

A result that is not ``ok`` becomes the matching :class:`WorkerError`. Outputs
are unpickled one name at a time: a value that cannot be loaded here (a module
that exists only on the worker, say) is skipped with a one-line warning unless
it was asked for with ``--out``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

from worker_kernel.protocol import rebuild
from worker_kernel.protocol.contents import ResultContent
from worker_kernel.protocol.errors import (
    Lan2GPUError,
    SerializationError,
)
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.serialize import load_values, loads

from .capture import CellPlan
from .replies import error_of


@dataclass
class RunResult:
    """What a cell produced on the worker."""

    worker: str
    outputs: dict[str, Any] = field(default_factory=dict)
    deleted: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    value: Any = None
    has_value: bool = False
    value_repr: dict[str, Any] | None = None  # MIME bundle of an unpicklable value
    stats: dict[str, Any] = field(default_factory=dict)
    error: Lan2GPUError | None = None  # the cell failed; outputs bound before it still count
    unloadable: tuple[str, ...] = ()  # came back, but cannot be loaded here: kept there
    # Functions with explicit signatures, compiled once the outputs are in place.
    deferred: list[tuple[Any, list[Any]]] = field(default_factory=list, repr=False)

    @property
    def warnings(self) -> list[str]:
        return [
            f"lan2gpu: `{name}` stays on the worker: {reason}"
            for name, reason in self.skipped.items()
        ]


def parse_result(
    msg: Message,
    plan: CellPlan,
    timeout: float | None = None,
    namespace: dict[str, Any] | None = None,
) -> RunResult:
    """The values a cell produced; ``.error`` is set if it failed after binding some.

    Functions and kernels the cell defined get ``namespace`` (the notebook's) as
    their globals. A cell that produced nothing (cancelled, executor died) raises
    at once.
    """
    c = cast(ResultContent, msg.content)  # read defensively: a peer's JSON
    worker = str(c.get("worker", "?"))
    status = c.get("status")
    error: Lan2GPUError | None = None
    if status != "ok":
        error = error_of(msg, worker, "", timeout)
        if "outputs" not in c:
            raise error
    entries = list(c.get("outputs", []))
    used = sum(int(e["nframes"]) for e in entries)
    with rebuild.deferring() as deferred:
        outputs, failed = load_values(entries, msg.buffers[:used], namespace=namespace)
    result = RunResult(
        worker=worker,
        outputs=outputs,
        deleted=tuple(str(n) for n in c.get("deleted", [])),
        skipped={str(k): str(v) for k, v in dict(c.get("skipped", {})).items()},
        stats=dict(c.get("stats", {})),
        error=error,
        deferred=deferred,
    )
    for name, reason in failed.items():
        if name in plan.required:
            raise SerializationError(
                f"output `{name}` came back from worker {worker} but cannot be loaded here: "
                f"{reason}. Install what it needs in this environment, or leave it out of --out.",
                name,
            )
        result.skipped[name] = f"it cannot be loaded here: {reason}"
        result.unloadable += (name,)
    value = c.get("value")
    if value:
        try:
            result.value = loads(msg.buffers[used : used + int(value["nframes"])])
            result.has_value = True
        except Exception as exc:  # unpickling imports modules; show the repr instead
            result.skipped["<cell value>"] = f"{type(exc).__name__}: {exc}"
    elif c.get("value_repr"):
        result.value_repr = dict(c["value_repr"])
    return result


def apply(
    result: RunResult,
    namespace: MutableMapping[str, Any],
    warn: Callable[[str], None] | None = None,
) -> None:
    """Put the outputs into ``namespace`` as if the cell had run locally; then raise
    the cell's error, if it had one (what it bound before failing is kept, as in IPython).
    """
    namespace.update(result.outputs)
    for name in result.deleted:
        namespace.pop(name, None)
    # Eager signatures compile now, with the globals the cell bound in place.
    rebuild.compile_deferred(result.deferred)
    if warn is not None:
        for line in result.warnings:
            warn(line)
    if result.error is not None:
        raise result.error
