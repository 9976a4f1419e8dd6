"""When an executor must be replaced, and how much memory it may use.

After some CUDA errors the context is unusable for good ("sticky" errors: an
illegal address, a failed launch): CUDA requires the process to exit. Such a
cell's error is reported as usual, and the executor is then replaced. An
out-of-memory error is *not* one of them: the context survives it.
"""

from __future__ import annotations

import resource
from typing import Final, NoReturn

# CUDA driver error codes after which the context cannot be used again.
STICKY_CUDA_ERRORS: Final = frozenset(
    {
        214,  # ECC_UNCORRECTABLE
        700,  # ILLEGAL_ADDRESS
        702,  # LAUNCH_TIMEOUT
        714,  # HARDWARE_STACK_ERROR
        715,  # ILLEGAL_INSTRUCTION
        716,  # MISALIGNED_ADDRESS
        717,  # INVALID_ADDRESS_SPACE
        718,  # INVALID_PC
        719,  # LAUNCH_FAILED
    }
)

POISONED_NOTE: Final = (
    "lan2gpu: this error leaves the GPU context unusable, so the executor was replaced: "
    "the session's variables on the worker are lost (the notebook's are not)."
)


class PoisonedContextError(Exception):
    """Raised by the ``poison-hook`` test fault: behaves like a sticky CUDA error."""

    code = 700


def poison_hook() -> NoReturn:
    """``lan2gpu_poison_context()`` in cells of a worker run with ``--fault poison-hook``."""
    raise PoisonedContextError("[700] Call to cuLaunchKernel results in CUDA_ERROR_ILLEGAL_ADDRESS")


def poisons_context(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a sticky CUDA error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "code", None)
        named = type(current).__name__ in ("CudaAPIError", "PoisonedContextError")
        if named and code in STICKY_CUDA_ERRORS:
            return True
        current = current.__cause__ or current.__context__
    return False


def apply_memory_limit(limit: int) -> None:
    """Cap this process's private writable memory (RLIMIT_DATA): allocating past
    it raises MemoryError in the cell instead of endangering the host."""
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def memory_note(budget: int, share: int = 0) -> str:
    """After a MemoryError: the cap is the worker's budget, shared by its sessions."""
    cap = resource.getrlimit(resource.RLIMIT_DATA)[0]
    per = f" (at most {share / 2**30:.1f} GiB per session, --session-memory)" if share else ""
    if not budget:
        return (
            f"lan2gpu: this session may hold at most {share / 2**30:.1f} GiB "
            "(--session-memory). Use less memory per cell, or ask the worker's owner to "
            "raise it."
        )
    have = f"; this session could hold about {cap / 2**30:.1f} GiB" if cap > 0 else ""
    return (
        f"lan2gpu: the worker's memory budget is {budget / 2**30:.1f} GiB (--memory-limit), "
        f"shared by all its sessions{per}{have}. Use less memory per cell, free some "
        "(del, %lan2gpu close-session), or ask the worker's owner to raise it."
    )
