"""The lan2gpu error tree (defined with the protocol, shared by both sides).

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
"""

from __future__ import annotations

from worker_kernel.protocol.errors import (
    AuthenticationError,
    CellSyntaxError,
    ConfigurationError,
    ConnectionClosed,
    ExecutionCancelled,
    ExecutionTimeout,
    ExecutorDied,
    Lan2GPUError,
    MemoryBudgetExceeded,
    MessageRejected,
    NoWorkerAvailable,
    ProtocolError,
    RemoteExecutionError,
    RemoteFrame,
    RemoteTraceback,
    SerializationError,
    SplitError,
    TransportError,
    VersionMismatch,
    WorkerError,
    WorkerLost,
    WorkerUnreachable,
)

__all__ = [
    "AuthenticationError",
    "CellSyntaxError",
    "ConfigurationError",
    "ConnectionClosed",
    "ExecutionCancelled",
    "ExecutionTimeout",
    "ExecutorDied",
    "Lan2GPUError",
    "MemoryBudgetExceeded",
    "MessageRejected",
    "NoWorkerAvailable",
    "ProtocolError",
    "RemoteExecutionError",
    "RemoteFrame",
    "RemoteTraceback",
    "SerializationError",
    "SplitError",
    "TransportError",
    "VersionMismatch",
    "WorkerError",
    "WorkerLost",
    "WorkerUnreachable",
]
