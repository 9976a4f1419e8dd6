"""Steps 1-7 of a cell, in the order they happen, for every way a cell is run.

The ``%%lan2gpu`` magic, :meth:`Client.run`, ``--split`` chunks and ``--async``
cells all go through here:

1. :func:`plan` reads the code and the namespace: what goes, what comes back
   (:mod:`.capture`);
2. :func:`serialize` turns the inputs into frames, before any worker is chosen
   (:mod:`worker_kernel.protocol.serialize`);
3. :func:`execute` places the cell (a callback: the pool's choice, a leased
   connection, or one fixed client), sends it and waits for its result
   (:mod:`.client`), and places it again elsewhere if the worker is lost, up to
   ``retry`` times;
4. :func:`results.apply <.results.apply>` puts what came back into the namespace,
   the only code that writes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from worker_kernel.protocol.errors import WorkerLost
from worker_kernel.protocol.serialize import Payload, dump_values

from . import capture
from .capture import CellPlan
from .placement import Placement
from .request import ExecuteRequest, OutputHandlers
from .results import RunResult

if TYPE_CHECKING:
    from .backend import Runner


@dataclass(frozen=True)
class Cell:
    """A planned cell and how it is to run, wherever it runs."""

    code: str
    plan: CellPlan
    filename: str
    line_offset: int = 0
    session: str | None = None  # a named session (keeps its namespace); None: the default
    timeout: float | None = None
    cache: bool = True  # False: send every array, even ones the session holds
    compress: str | None = None  # "auto", "on", "off"; None: the client's setting
    # The namespace functions and kernels coming back get as their globals.
    namespace: dict[str, Any] | None = field(default=None, compare=False)
    # The caller's namespace is the session's (Client.run without one of its own).
    keep_namespace: bool | None = None  # None: only a named session keeps it
    # Where on the worker, when no placement says: GPU numbers (() lets the worker
    # pick), or a CPU cell.
    gpus: tuple[int, ...] = ()
    cpu: bool = False

    def request(
        self,
        placement: Placement | None,
        session: str,
        *,
        local: Mapping[str, Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> ExecuteRequest:
        """The request for one worker: on ``placement``'s GPUs (None: the worker picks),
        in the cell's named session or else ``session`` (the notebook's there)."""
        keep = bool(self.session) if self.keep_namespace is None else self.keep_namespace
        return ExecuteRequest(
            code=self.code,
            plan=self.plan,
            session=self.session or session,
            timeout=self.timeout,
            local=local if local is not None else {},
            cache=self.cache,
            compress=self.compress,
            filename=self.filename,
            line_offset=self.line_offset,
            gpus=tuple(g.index for g in placement.gpus) if placement else self.gpus,
            cpu=placement.cpu if placement else self.cpu,
            namespace=self.namespace,
            keep_namespace=keep,
            cancel=cancel,
        )


def plan(
    code: str,
    namespace: Mapping[str, Any],
    *,
    filename: str,
    hidden: Mapping[str, Any] | None = None,
    inputs: str | list[str] | None = None,
    outputs: str | list[str] | None = None,
    line_offset: int = 0,
) -> CellPlan:
    """Step 1: what the cell reads from ``namespace`` and what it may bind."""
    return capture.plan_cell(
        code,
        namespace,
        hidden=hidden,
        inputs=inputs,
        outputs=outputs,
        filename=filename,
        line_offset=line_offset,
    )


def serialize(
    names: Any, namespace: Mapping[str, Any], *, globals_: dict[str, Any] | None = None
) -> Payload:
    """Step 2: the values of ``names`` as frames (functions and kernels by value,
    with ``globals_`` as the namespace their globals are looked up in)."""
    payload, _ = dump_values({name: namespace[name] for name in names}, namespace=globals_)
    return payload


# Where a try of the cell runs: given the workers already lost, a runner (a LAN client,
# a Dask worker's) and the placement on it (None: the worker picks its GPU).
Place: TypeAlias = "Callable[[set[str]], tuple[Runner, Placement | None]]"


def execute(
    cell: Cell,
    payload: Payload,
    place: Place,
    handlers: Callable[[Placement | None], OutputHandlers],
    *,
    session: Callable[[Runner], str] | None = None,
    local: Mapping[str, Any] | None = None,
    cancel: threading.Event | None = None,
    retry: int = 0,
    retried: Callable[[WorkerLost, int], None] = lambda exc, n: None,
) -> RunResult:
    """Step 3: run the cell where ``place`` says, with live output to ``handlers``.

    The cell runs in its named session, or else in ``session(client)`` (default:
    the client's own). A worker lost mid-cell with its connection gone (``WorkerLost.gone``) is left
    out and the cell placed again, up to ``retry`` times (``retried`` is told);
    one that may still be running it is never given up on that way, so a cell
    never runs twice.
    """
    lost: set[str] = set()
    while True:
        client, placement = place(lost)
        where = session(client) if session is not None else client.session
        request = cell.request(placement, where, local=local, cancel=cancel)
        try:
            return client.execute(request, payload, handlers(placement))
        except WorkerLost as exc:
            if len(lost) >= retry or not exc.gone:
                raise
            lost.add(client.address)
            retried(exc, len(lost))


__all__ = ["Cell", "Place", "execute", "plan", "serialize"]
