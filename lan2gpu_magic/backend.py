"""What the magic, split cells, async jobs and the fleet table need of the workers.

Two backends implement it, chosen by the address scheme:

- :class:`~.pool.WorkerPool`: lan2gpu workers on the LAN (``tcp://``), configured,
  discovered by mDNS, or the embedded one; a :class:`~.client.Client` runs cells on each.
- :class:`~.dask_backend.DaskCluster`: the workers of a Dask cluster (``dask://``,
  ``dask+tls://``, a scheduler file), each running ``worker_kernel.dask_plugin``; a
  :class:`~.dask_backend.DaskRunner` runs cells on each.

Both place cells with the same pure policy (:mod:`.placement`) over the same worker
views, and run them through the same pipeline (:mod:`.pipeline`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

from worker_kernel.protocol.serialize import Payload

if TYPE_CHECKING:
    from .connection import WorkerInfo
    from .placement import Placement, Requirements
    from .pool import WorkerRow
    from .request import ExecuteRequest, OutputHandlers
    from .results import RunResult


class Runner(Protocol):
    """Runs cells on one worker, for one thread at a time."""

    @property
    def address(self) -> str: ...

    @property
    def session(self) -> str:
        """This notebook's default session on the worker."""
        ...

    @property
    def name(self) -> str: ...

    @property
    def info(self) -> WorkerInfo: ...

    @property
    def closed(self) -> bool: ...

    def execute(
        self, request: ExecuteRequest, payload: Payload, handlers: OutputHandlers | None = None
    ) -> RunResult: ...

    def adopt_session(self) -> str:
        """The default session, for runs on other runners; closed with this one."""
        ...

    def close_session(self, session: str | None = None, timeout: float = 10.0) -> int: ...


class Backend(Protocol):
    """The workers one notebook can use (see the module docstring)."""

    def rows(
        self, session: str | None = None, detail: bool = False, max_age: float | None = None
    ) -> list[WorkerRow]:
        """Every worker with its live status, or why it is unusable."""
        ...

    def choose(
        self, req: Requirements, exclude: Collection[str] = (), session: str | None = None
    ) -> tuple[Runner, Placement]:
        """The best worker for ``req`` (not one in ``exclude``), and where on it."""
        ...

    def slots(
        self, req: Requirements, count: int | None, session: str | None = None
    ) -> list[Placement]:
        """Up to ``count`` slots (None: all) for the chunks of a split cell."""
        ...

    def session_for(self, address: str) -> str: ...

    def lease(self, address: str) -> Runner:
        """A runner for one run in another thread; hand it back with :meth:`give_back`."""
        ...

    def give_back(self, runner: Runner, healthy: bool = True) -> None: ...

    def wait_for_probes(self) -> None:
        """Wait for workers still being tried, so a listing shows what they are."""
        ...

    def close(self) -> None: ...


__all__ = ["Backend", "Runner"]
