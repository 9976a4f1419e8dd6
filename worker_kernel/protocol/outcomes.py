"""How a cell ended (the ``status`` of a ``result``), and why a request was refused
(the ``code`` of an ``error``), on both sides."""

from __future__ import annotations

from enum import StrEnum


class CellStatus(StrEnum):
    """A ``result``'s status. A str, so it goes into JSON content as is."""

    OK = "ok"
    ERROR = "error"  # the cell raised (``error``), or an output cannot be pickled
    TIMEOUT = "timeout"  # past its --timeout (or it never started within it)
    CANCELLED = "cancelled"  # Ctrl-C, or withdrawn
    MEMORY = "memory"  # past the worker's memory budget
    DIED = "died"  # the executor died, or could not start
    CACHE_MISS = "cache-miss"  # the session lacks arrays sent by digest: send them again


# Codes of ``error`` replies a client acts on (others are only shown).
WRONG_RECIPIENT = "wrong-recipient"  # addressed to another run of the worker: it restarted
UNKNOWN_CLIENT = "unknown-client"  # a connection that has not said hello: shake hands again
UNKNOWN_CELL = "unknown-cell"  # a fetch of a cell the worker neither runs nor remembers


__all__ = ["UNKNOWN_CELL", "UNKNOWN_CLIENT", "WRONG_RECIPIENT", "CellStatus"]
