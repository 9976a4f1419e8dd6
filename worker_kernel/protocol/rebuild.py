"""Numba dispatchers travel as ``(py_func, portable jit options)``.

Numba's own pickling of a CUDA dispatcher bakes in the target it was made for: a
kernel pickled without the simulator fails to load in a simulator process, and
the other way round it silently runs the simulator on a real GPU. So
:mod:`serialize` reduces ``CUDADispatcher``, the simulator's ``FakeCUDAKernel``
and ``CPUDispatcher`` (``@njit``) to a kind plus a small pickle of the Python
function and its options, and :func:`rebuild_dispatcher` re-applies the
*loading* process's own ``numba.cuda.jit`` / ``numba.jit``.

Rebuilt dispatchers are cached per process by the digest of that pickle, so a
kernel whose code, globals and options did not change is the same dispatcher
next time and is not compiled again.

A dispatcher that an importable module defines (``numba.cuda.random``'s
generators, a package of the user's kernels) travels by reference instead, and
the loader imports its *own* version: under the simulator some of numba's own
device functions are CPU functions, so shipping the notebook's copy would break.
``cuda.reduce`` objects (and the simulator's stand-in for them) are rebuilt from
their binary function the same way.

This module imports numba only inside :func:`rebuild_dispatcher`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any, Final

import blake3
import cloudpickle

from .errors import SerializationError

CUDA: Final = "cuda"
CPU: Final = "cpu"
REDUCE: Final = "reduce"

# (module, class) of the dispatcher types, matched along the MRO so numba never
# has to be imported to recognise them.
_DISPATCHER_CLASSES: Final = {
    ("numba.cuda.dispatcher", "CUDADispatcher"): CUDA,
    ("numba.cuda.simulator.kernel", "FakeCUDAKernel"): CUDA,
    ("numba.core.registry", "CPUDispatcher"): CPU,
    ("numba.cuda.kernels.reduction", "Reduce"): REDUCE,
}
_SIMULATED_REDUCE_MODULE: Final = "numba.cuda.simulator.reduction"

# jit options that mean the same thing on every CUDA target. ``link`` and
# ``extensions`` name local files/objects and are refused instead.
_CUDA_PORTABLE: Final = (
    "device",
    "fastmath",
    "debug",
    "lineinfo",
    "opt",
    "inline",
    "forceinline",
    "launch_bounds",
    "lto",
    "max_registers",
    "shared_memory_carveout",
)
_CPU_DROPPED: Final = ("cache",)  # needs a source file; the loader has none

_cache: dict[tuple[str, str], Any] = {}


def dispatcher_kind(cls: type) -> str | None:
    """``"cuda"``, ``"cpu"`` or None for a class (subclasses count)."""
    for base in cls.__mro__:
        kind = _DISPATCHER_CLASSES.get((base.__module__, base.__qualname__))
        if kind is not None:
            return kind
    return None


def simulated_reduce_functor(func: Any) -> Callable[..., Any] | None:
    """The binary function inside the simulator's ``cuda.reduce`` result, if ``func`` is one."""
    if getattr(func, "__module__", None) != _SIMULATED_REDUCE_MODULE or not func.__closure__:
        return None
    try:
        cell = func.__closure__[func.__code__.co_freevars.index("func")]
    except ValueError:
        return None
    functor: Callable[..., Any] = cell.cell_contents
    return functor


def importable_as(obj: Any) -> tuple[str, str] | None:
    """``(module, qualname)`` if ``obj`` is importable from a module the loader can import.

    Functions of ``__main__`` and of modules registered with
    ``cloudpickle.register_pickle_by_value`` are not: they travel by value.
    """
    py_func = getattr(obj, "py_func", None)
    module = getattr(py_func, "__module__", None)
    qualname = getattr(py_func, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname:
        return None
    if module in cloudpickle.list_registry_pickle_by_value():
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return (module, qualname) if found is obj else None


def import_attribute(module: str, qualname: str) -> Any:
    """Unpickling entry point for dispatchers that travel by reference."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def portable_parts(obj: Any, kind: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The Python function behind a dispatcher and the options to rebuild it."""
    name = getattr(obj, "__name__", type(obj).__name__)
    if kind == REDUCE:
        functor = simulated_reduce_functor(obj) or getattr(obj, "_functor", None)
        if functor is None:
            raise SerializationError(f"cannot find the function inside reduction {name!r}", name)
        return functor, {}
    if kind == CPU:
        options = {k: v for k, v in obj.targetoptions.items() if k not in _CPU_DROPPED}
        return obj.py_func, options
    if hasattr(obj, "targetoptions"):  # real CUDADispatcher
        opts = obj.targetoptions
        if opts.get("link"):
            raise SerializationError(
                f"CUDA kernel {name!r} links external code (link={list(opts['link'])!r}); "
                "those files exist only on this machine, so the kernel cannot be rebuilt "
                "on a worker. Define the kernel without link= or in a module installed "
                "on the worker.",
                name,
            )
        if opts.get("extensions"):
            raise SerializationError(
                f"CUDA kernel {name!r} uses jit extensions, which are local objects and "
                "cannot be rebuilt on a worker; remove extensions= from @cuda.jit",
                name,
            )
        return obj.py_func, {k: opts[k] for k in _CUDA_PORTABLE if k in opts}
    # The simulator's FakeCUDAKernel.
    return obj.fn, {"device": obj._device, "fastmath": obj._fastmath, "debug": obj._debug}


def rebuild_dispatcher(kind: str, blob: bytes) -> Any:
    """Unpickling entry point: rebuild a dispatcher with this process's numba."""
    key = (kind, blake3.blake3(blob).hexdigest())
    cached = _cache.get(key)
    if cached is not None:
        return cached
    from .serialize import loads_inband  # late: serialize imports this module

    py_func, options = loads_inband(blob)
    dispatcher = _jit(kind, options)(py_func)
    _cache[key] = dispatcher
    return dispatcher


def _jit(kind: str, options: dict[str, Any]) -> Callable[[Callable[..., Any]], Any]:
    if kind == REDUCE:
        from numba import cuda

        return cuda.reduce  # type: ignore[no-any-return]
    if kind == CPU:
        import numba

        return numba.jit(**options)  # type: ignore[no-any-return]
    from numba import config, cuda

    accepted = inspect.signature(cuda.jit).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in options.items() if takes_any or k in accepted}
    if config.ENABLE_CUDASIM:
        # The simulator treats these as "unsupported" rather than ignoring them.
        kwargs = {k: v for k, v in kwargs.items() if k in ("device", "fastmath", "debug")}
    return cuda.jit(**kwargs)  # type: ignore[no-any-return]


def clear_cache() -> None:
    """Forget rebuilt dispatchers (tests; an executor's cache lives as long as it does)."""
    _cache.clear()
