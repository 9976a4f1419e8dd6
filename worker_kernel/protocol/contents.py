"""The content of the messages both sides build and read, declared.

Each ``TypedDict`` is the JSON ``content`` of one message kind: what the sender
must put there, under which key, with which type. Builders annotate with them
(mypy checks every key); readers on the other side go through these names
too, and treat a missing or mistyped key of a peer as the peer's error.
"""

from __future__ import annotations

from typing import Any, Final, TypedDict


class Hello(TypedDict):
    """``hello``: a client introduces itself."""

    client: str  # its id: every message for it is addressed to this
    host: str
    versions: dict[str, str]


class Welcome(TypedDict, total=False):
    """``welcome``: who the worker is (``worker``, ``instance``, ``versions`` and
    ``capabilities`` always come)."""

    worker: str  # its name
    instance: str  # this run of the worker: a restarted one has another
    address: str  # where it listens, as it sees it
    versions: dict[str, str]
    capabilities: dict[str, Any]  # GPUs, simulator, CPU cells, ...
    heartbeat: float  # seconds between its heartbeats
    stall_grace: float  # how long a client waits for it while connected but silent
    warnings: list[str]
    direct_data: bool  # large inputs may come on a direct data connection (datapath.py)


class Link(TypedDict):
    bandwidth: float  # bytes/s as the client measured it; 0: unknown
    compress: str  # "auto", "on" or "off"


class Entry(TypedDict):
    """One named value: how many of the message's buffers are its frames."""

    name: str
    nframes: int


RECEIVED_MAX: Final = 256  # result ids one execute acknowledges, at most


class ExecuteContent(TypedDict):
    """``execute``: one cell, with its inputs as the message's buffers."""

    code: str
    filename: str  # for tracebacks; the client registers the source under it
    line_offset: int  # lines above the cell's code in the notebook cell (the magic line)
    inputs: list[dict[str, Any]]  # Entry per input, in buffer order
    outputs: list[str]  # names the cell may bind that come back
    required: list[str]  # outputs asked for with --out: missing is an error
    always: list[str]  # outputs sent back even when unchanged
    deletes: list[str]  # names the cell deletes
    timeout: float | None
    gpus: list[int]  # the worker's GPU numbers; []: the worker picks one
    cpu: bool  # a CPU cell: no GPU is visible to it
    keep_namespace: bool  # a named session: names of earlier cells stay
    kept: list[str]  # came back before but cannot be loaded in the notebook
    refs: dict[str, str]  # input frames sent by reference: index -> digest
    have: list[str]  # digests the client can supply for outputs
    link: Link
    request: str  # the request's id: a resent request is run at most once
    received: list[str]  # cells whose results arrived since: the worker forgets them


class ResultContent(TypedDict, total=False):
    """``result``: how a cell ended and what it bound, as the message's buffers.

    ``status`` and ``worker`` always come; the rest when the cell ran (or as the
    status needs: ``error`` for an error, ``missing`` for a cache miss)."""

    status: str  # a CellStatus
    worker: str
    error: dict[str, Any]  # a RemoteTraceback, as JSON
    serialization_error: str  # the output that could not be pickled
    reason: str  # why it was stopped or failed, for people
    poisoned: bool  # it left its GPU context unusable: the executor is replaced
    session_lost: bool  # the session's namespace on the worker is gone
    outputs: list[dict[str, Any]]  # an Entry per output, in buffer order
    skipped: dict[str, str]  # outputs that could not travel back, and why
    deleted: list[str]
    value: dict[str, int]  # the last expression's value: {"nframes": n}, after the outputs
    value_repr: dict[str, Any]  # its MIME bundle, when it cannot be pickled
    refs: dict[str, str]  # output frames sent by reference: index -> digest
    stats: dict[str, Any]  # seconds, bytes in and out, cache hits
    missing: list[str]  # for a cache miss: the digests to send again


class Queue(TypedDict, total=False):
    """One resource's queue (``gpu0``, ``gpu1``, ..., ``cpu``)."""

    running: int
    waiting: int
    kernels: int  # whole Jupyter kernels that hold it


class GpuLoad(TypedDict):
    index: int
    memory_free: int
    utilization: float | None


class Load(TypedDict):
    """The live numbers: in every heartbeat, and in the status document."""

    queues: dict[str, Queue]
    gpus: list[GpuLoad]
    load_average: float
    memory_available: int


class CellInfo(TypedDict):
    id: str
    session: str
    user: str  # with per-user keys (--encrypt), else ""
    client: str
    resources: list[str]
    bytes: int
    waiting: float  # seconds in the queue so far (0 once it started)
    running: float  # seconds since it started (0 while queued)


class ExecutorInfo(TypedDict):
    session: str
    resources: list[str]  # the slots its session's cells run on: placement's "sticky"
    pid: int | None


class StatusDocument(TypedDict, total=False):
    """``status_reply`` to a ``status`` request: everything about a worker.

    Always there: ``worker`` to ``kernels``; ``history`` and ``recent`` only
    when the request asked for ``detail``."""

    worker: str
    instance: str
    versions: dict[str, str]
    capabilities: dict[str, Any]  # as in the handshake's welcome
    load: Load
    running: list[CellInfo]
    queued: list[CellInfo]
    sessions: list[str]
    executors: list[ExecutorInfo]
    kernels: list[dict[str, Any]]
    history: dict[str, Any]  # GPU utilization and memory over the last minutes
    recent: list[dict[str, Any]]  # cells that finished lately


__all__ = [
    "CellInfo",
    "Entry",
    "ExecuteContent",
    "ExecutorInfo",
    "GpuLoad",
    "Hello",
    "Link",
    "Load",
    "Queue",
    "ResultContent",
    "StatusDocument",
    "Welcome",
]
