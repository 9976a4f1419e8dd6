"""Numba dispatchers travel as ``(py_func, portable jit options)``.

Numba's own pickling of a CUDA dispatcher bakes in the target it was made for: a
kernel pickled without the simulator fails to load in a simulator process, and
the other way round it silently runs the simulator on a real GPU. So
:mod:`serialize` reduces ``CUDADispatcher``, the simulator's ``FakeCUDAKernel``
and ``CPUDispatcher`` (``@njit``) to a kind plus a small pickle of the Python
function and its options, and :func:`rebuild_dispatcher` re-applies the
*loading* process's own ``numba.cuda.jit`` / ``numba.jit``.

The Python function keeps the notebook's namespace as its globals (see
:mod:`serialize`): on the worker they are the session's namespace, so Numba
compiles a kernel with the values the session holds at its first launch, and a
global that only the cell defines is found, as in the notebook. Once compiled,
a kernel keeps the values it was compiled with (Numba's rule).

Each dispatcher carries a token that names the notebook's object: the loader
keeps one rebuilt dispatcher per token, so the same kernel sent again is the
same, already compiled dispatcher (no recompilation), and a kernel redefined in
the notebook is a new object, compiled afresh with the globals of its time, as
it would be locally. A dispatcher rebuilt from a token pickles with that token
again, so a kernel that comes back from the worker and is sent again finds its
compiled original.

Explicit signatures (``@njit("int64(int64)")``, ``@cuda.jit("void(float32[:])")``)
travel too and are compiled eagerly where that is possible: Numba then converts
arguments to the declared types instead of compiling new ones, which changes
results. A loader that cannot compile CUDA code (a notebook without a driver)
rebuilds the kernel lazily and remembers its signatures for the way back.

A dispatcher that an importable module defines (``numba.cuda.random``'s
generators, a package of the user's kernels) travels by reference instead, and
the loader imports its *own* version: under the simulator some of numba's own
device functions are CPU functions, so shipping the notebook's copy would break.
``cuda.reduce`` objects (and the simulator's stand-in for them) are rebuilt from
their binary function the same way.

This module imports numba only inside :func:`rebuild_dispatcher`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import sys
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final

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

# (kind, token) -> the dispatcher rebuilt (or first pickled) here. Strong
# references: a kernel that left the namespace and comes back is found compiled.
_cache: dict[tuple[str, str], Any] = {}
# dispatcher -> its token; signatures a lazily rebuilt CUDA kernel must carry back.
_tokens: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_remembered: weakref.WeakKeyDictionary[Any, list[tuple[Any, Any]]] = weakref.WeakKeyDictionary()
# Signatures as (argument types, return type), numba type objects.
Signatures = list[tuple[Any, Any]] | None
# While set: dispatchers with signatures are built lazily and listed here, to be
# compiled once the namespace holds the values they read (compile_deferred).
_deferred: contextvars.ContextVar[list[tuple[Any, list[Any]]] | None] = contextvars.ContextVar(
    "lan2gpu_deferred_signatures", default=None
)


@contextlib.contextmanager
def deferring() -> Iterator[list[tuple[Any, list[Any]]]]:
    """Build dispatchers with explicit signatures lazily inside the block; the list
    it yields goes to :func:`compile_deferred` once their globals are in place."""
    pending: list[tuple[Any, list[Any]]] = []
    token = _deferred.set(pending)
    try:
        yield pending
    finally:
        _deferred.reset(token)


def compile_deferred(pending: list[tuple[Any, list[Any]]]) -> None:
    """Compile the signatures :func:`deferring` put off, as Numba's eager decorators
    do (then no other types are compiled). Where that cannot be done here (no CUDA
    driver), the dispatcher stays lazy and keeps its signatures for the way back."""
    while pending:
        dispatcher, declared = pending.pop()
        if dispatcher_kind(type(dispatcher)) == CUDA and not _can_compile_cuda():
            continue
        try:
            for signature in declared:
                dispatcher.compile(signature)
        except Exception:  # noqa: S112 - it stays lazy; a call shows the error where it is made
            continue
        dispatcher.disable_compile()
        _remembered.pop(dispatcher, None)


def _can_compile_cuda() -> bool:
    from numba import config, cuda

    return bool(config.ENABLE_CUDASIM or cuda.is_available())


def token_of(obj: Any, kind: str) -> str:
    """The token naming ``obj`` (made on first use; see the module doc)."""
    try:
        token = _tokens.get(obj)
    except TypeError:  # not weakly referenceable: a token per pickling
        return uuid.uuid4().hex
    if token is None:
        token = uuid.uuid4().hex
        _tokens[obj] = token
        _cache[(kind, token)] = obj
    return token


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


def signatures(obj: Any, kind: str) -> Signatures:
    """The signatures a dispatcher was declared with, if compiling more is off."""
    if obj in _remembered:
        return list(_remembered[obj])
    if kind == CPU:
        if getattr(obj, "_can_compile", True):
            return None
        return [(tuple(s.args), s.return_type) for s in obj.nopython_signatures]
    if kind != CUDA or not hasattr(obj, "targetoptions"):  # the simulator keeps none
        return None
    if getattr(obj, "_can_compile", True):
        return None
    from numba.core import types

    found: list[tuple[Any, Any]] = []
    for args, compiled in obj.overloads.items():
        signature = getattr(compiled, "signature", None)
        found.append((tuple(args), signature.return_type if signature else types.void))
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


def rebuild_dispatcher(kind: str, token: str, blob: bytes) -> Any:
    """Unpickling entry point: the dispatcher named ``token``, built with this
    process's numba the first time it arrives."""
    from .serialize import loads_inband  # late: serialize imports this module

    # Loaded even when the dispatcher is known: loading writes the globals the
    # function reads into the session's namespace, for kernels compiled later.
    py_func, options, sigs = loads_inband(blob)
    key = (kind, token)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    dispatcher = _build(kind, py_func, options, sigs)
    _cache[key] = dispatcher
    _tokens[dispatcher] = token
    return dispatcher


def _build(
    kind: str, py_func: Callable[..., Any], options: dict[str, Any], sigs: Signatures
) -> Any:
    if kind == REDUCE:
        from numba import cuda

        return cuda.reduce(py_func)
    jit, kwargs = _jit(kind, options)
    if not sigs:
        return jit(**kwargs)(py_func)
    declared = [ret(*args) for args, ret in sigs]
    pending = _deferred.get()
    if pending is None and (kind == CPU or _can_compile_cuda()):
        return jit(declared, **kwargs)(py_func)
    dispatcher = jit(**kwargs)(py_func)  # compiled later, or (no driver) kept for the way back
    _remembered[dispatcher] = list(sigs)
    if pending is not None:
        pending.append((dispatcher, declared))
    return dispatcher


def _jit(kind: str, options: dict[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """This process's ``jit`` decorator for ``kind``, and the options it accepts."""
    if kind == CPU:
        import numba

        return numba.jit, options
    from numba import config, cuda

    accepted = inspect.signature(cuda.jit).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in options.items() if takes_any or k in accepted}
    if config.ENABLE_CUDASIM:
        # The simulator treats these as "unsupported" rather than ignoring them.
        kwargs = {k: v for k, v in kwargs.items() if k in ("device", "fastmath", "debug")}
    return cuda.jit, kwargs


def clear_cache() -> None:
    """Forget rebuilt dispatchers (tests; an executor's cache lives as long as it does)."""
    _cache.clear()
    _tokens.clear()
    _remembered.clear()
