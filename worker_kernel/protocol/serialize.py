"""Values <-> frames: cloudpickle, protocol 5, numpy data out of band.

``dumps(value)`` returns ``[pickle, *buffers]``: the data of every contiguous
numpy array from :data:`OUT_OF_BAND_BYTES` up is a separate raw buffer (sent
with ``copy=False``, received as a writable view of the frame), so large arrays
are never copied into the pickle. Smaller ones stay in the pickle: a dict of
thirty thousand tiny arrays is then one frame, not thirty thousand. Numba
dispatchers are reduced by :mod:`rebuild`; device arrays (real or simulated)
are copied to the host first.

Named values are pickled one name at a time (:func:`dump_values`), so an error
names the variable, and one value that cannot be loaded on the other side does
not take the others with it. Identity shared *between* names is not kept.

Functions defined in the notebook keep the notebook's namespace as their
globals: when ``dump_values`` is given that namespace, it travels as a
placeholder that the loader (:func:`load_values` with ``namespace=``) replaces
by the session's namespace on the worker. So a helper reads the global the cell
just set, and ``global x; x += 1`` in a helper changes the session's ``x``, as
they would locally. Numba kernels, device functions and ``@njit`` functions
get the same (their Python function is pickled with the placeholder), so Numba
compiles them on the worker with the session's values. The way back is the
same: functions the cell defined get the notebook's namespace as globals.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import pickle
import sys
import types
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import cloudpickle

from . import rebuild
from .errors import SerializationError
from .messages import Buffer

OUT_OF_BAND_BYTES: Final = 16 << 10  # arrays from this size up travel as their own buffers

PROTOCOL: Final = 5

# Per-type answer to "does this type need special handling?"; weak so classes
# defined in a session can be collected.
_special: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()
_DEVICE_ARRAY: Final = "device-array"
_CUDA_ARRAY_INTERFACE: Final = "cuda-array-interface"
_OPEN_FILE: Final = "open-file"


def _strided(obj: Any) -> bool:
    """A numpy array that is neither C- nor Fortran-contiguous (e.g. ``a[:, ::2]``)."""
    numpy = sys.modules.get("numpy")  # no numpy imported: no arrays to look at
    if numpy is None or type(obj) is not numpy.ndarray:
        return False
    flags = obj.flags
    return not (flags.c_contiguous or flags.f_contiguous)


def _special_kind(cls: type) -> str | None:
    try:
        return _special[cls]
    except (KeyError, TypeError):
        pass
    kind = rebuild.dispatcher_kind(cls)
    if kind is None and issubclass(cls, io.IOBase):
        kind = _OPEN_FILE
    elif kind is None and getattr(cls, "__cuda_ndarray__", False):
        kind = _DEVICE_ARRAY  # numba device arrays, real and simulated
    elif kind is None and hasattr(cls, "__cuda_array_interface__"):
        kind = _CUDA_ARRAY_INTERFACE  # CuPy, torch, ... (real GPUs only)
    with contextlib.suppress(TypeError):  # a type that cannot be weakly referenced
        _special[cls] = kind
    return kind


_session: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "lan2gpu_session_namespace", default=None
)


class _NamespacePlaceholder(dict):  # type: ignore[type-arg]
    """Pickled in place of the notebook's namespace, as functions' globals."""


def session_namespace() -> dict[str, Any]:
    """Unpickling entry point: the namespace :func:`load_values` loads into."""
    namespace = _session.get()
    return namespace if namespace is not None else {}


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle with numba dispatchers and device arrays made portable."""

    def __init__(
        self,
        file: io.BytesIO,
        buffer_callback: Any = None,
        namespace: dict[str, Any] | None = None,
        keep_existing: bool = False,
    ) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self._blobs: dict[int, bytes] = {}
        self._namespace = namespace
        self._keep = keep_existing and namespace is not None
        if namespace is not None:
            # cloudpickle keys the globals of functions it pickles by value on
            # id(func.__globals__): functions of the notebook get the placeholder.
            self.globals_ref[id(namespace)] = _NamespacePlaceholder()

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is _NamespacePlaceholder:
            return session_namespace, ()
        if _strided(obj):
            # numpy pickles a strided view in band, and the receiver gets a
            # contiguous array: send that contiguous copy out of band instead (one
            # copy either way), so both sides pickle the array alike and an
            # unchanged input is not taken for one the cell changed.
            return obj.copy().__reduce_ex__(PROTOCOL)
        kind = _special_kind(type(obj))
        if kind is None:
            if isinstance(obj, types.FunctionType) and rebuild.simulated_reduce_functor(obj):
                return self._dispatcher(obj, rebuild.REDUCE)
            return super().reducer_override(obj)
        if kind == _OPEN_FILE:
            # cloudpickle would read a file's whole content (forever, for a pipe or
            # /dev/zero); an open file means nothing on another machine anyway.
            raise pickle.PicklingError(
                f"an open file ({getattr(obj, 'name', type(obj).__name__)!r}) cannot travel; "
                "it stays where it was opened"
            )
        if kind == _DEVICE_ARRAY:
            return obj.copy_to_host().__reduce_ex__(PROTOCOL)
        if kind == _CUDA_ARRAY_INTERFACE:
            from numba import cuda  # only reached on a machine with a real GPU

            return cuda.as_cuda_array(obj).copy_to_host().__reduce_ex__(PROTOCOL)
        return self._dispatcher(obj, kind)

    def _dynamic_function_reduce(self, func: types.FunctionType) -> Any:
        reduced = super()._dynamic_function_reduce(func)
        if self._keep and func.__globals__ is self._namespace:
            # Loaded with a state setter that leaves the names the loader's namespace
            # already holds alone (see keep_existing).
            reduced = (*reduced[:5], _set_function_state_keeping_globals)
        return reduced

    def _dispatcher(self, obj: Any, kind: str) -> Any:
        where = rebuild.importable_as(obj)
        if where is not None:
            return rebuild.import_attribute, where
        blob = self._blobs.get(id(obj))
        if blob is None:
            py_func, options = rebuild.portable_parts(obj, kind)
            sigs = rebuild.signatures(obj, kind)
            # The function's globals are the notebook's namespace, like a helper's.
            blob = dumps_inband((py_func, options, sigs), self._namespace, self._keep)
            self._blobs[id(obj)] = blob
        return rebuild.rebuild_dispatcher, (kind, rebuild.token_of(obj, kind), blob)


_cloudpickle_setstate: Any = cloudpickle.cloudpickle._function_setstate


def _set_function_state_keeping_globals(func: types.FunctionType, state: Any) -> None:
    """Unpickling entry point: cloudpickle's state setter for a function, except that
    a global the namespace already holds keeps its value (the notebook's own)."""
    func_state, slotstate = state
    present = func.__globals__
    carried = slotstate["__globals__"]
    slotstate = {**slotstate, "__globals__": {k: v for k, v in carried.items() if k not in present}}
    _cloudpickle_setstate(func, (func_state, slotstate))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def dumps(
    value: Any, namespace: dict[str, Any] | None = None, keep_existing: bool = False
) -> list[Buffer]:
    """``[pickle, *out_of_band_buffers]`` for one value (see the module doc for
    ``namespace``). With ``keep_existing``, functions of ``namespace`` write the
    globals they read into the loader's namespace only where it lacks them (the way
    back, see the module doc)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        """``False`` (out of band) for large buffers, which are collected."""
        if buffer.raw().nbytes < OUT_OF_BAND_BYTES:
            return True
        buffers.append(buffer)
        return False

    out = io.BytesIO()
    _Pickler(out, out_of_band, namespace, keep_existing).dump(value)
    frames: list[Buffer] = [out.getbuffer()]
    frames.extend(b.raw() for b in buffers)
    return frames


def dumps_inband(
    value: Any, namespace: dict[str, Any] | None = None, keep_existing: bool = False
) -> bytes:
    """One self-contained pickle (used for the small dispatcher payloads)."""
    out = io.BytesIO()
    _Pickler(out, namespace=namespace, keep_existing=keep_existing).dump(value)
    return out.getvalue()


# Test instrumentation: with LAN2GPU_UNPICKLE_LOG set, every unpickling is
# recorded there, so tests can assert that rejected messages were never loaded.
_UNPICKLE_LOG: Final = os.environ.get("LAN2GPU_UNPICKLE_LOG")


def loads(frames: Sequence[Buffer]) -> Any:
    """Inverse of :func:`dumps`; buffers become (writable, if the frames are) arrays."""
    if _UNPICKLE_LOG:
        with open(_UNPICKLE_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {memoryview(frames[0]).nbytes}\n")
    return pickle.loads(frames[0], buffers=frames[1:])


def loads_inband(blob: bytes) -> Any:
    return pickle.loads(blob)


@dataclass
class Payload:
    """Named values as frames: ``entries`` say which frames belong to which name."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    frames: list[Buffer] = field(default_factory=list)

    def add(self, name: str, frames: list[Buffer]) -> None:
        self.entries.append({"name": name, "nframes": len(frames)})
        self.frames.extend(frames)

    @property
    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames)

    def copied(self) -> Payload:
        """The same payload in memory of its own: later changes to the arrays it
        was made from do not show in it."""
        return Payload(list(self.entries), [bytes(memoryview(f)) for f in self.frames])


_HINTS: Final = {
    "input": "Leave it out with --in, or create it inside the cell.",
    "output": "Drop it from --out, or turn it into something picklable in the cell.",
}


def dump_values(
    values: Mapping[str, Any],
    *,
    strict: Iterable[str] | None = None,
    role: str = "input",
    namespace: dict[str, Any] | None = None,
    keep_existing: bool = False,
) -> tuple[Payload, dict[str, str]]:
    """Pickle each name separately.

    Returns the payload and ``{name: reason}`` for the names that could not be
    pickled. Names in ``strict`` (default: all) raise :class:`SerializationError`
    instead of being skipped; ``role`` ("input"/"output") words its message.
    """
    must = set(values) if strict is None else set(strict)
    payload = Payload()
    skipped: dict[str, str] = {}
    for name, value in values.items():
        try:
            frames = dumps(value, namespace, keep_existing)
        except SerializationError as exc:
            if name in must:
                raise
            skipped[name] = str(exc)
            continue
        except Exception as exc:  # pickling runs arbitrary __reduce__ code
            if name in must:
                raise SerializationError(
                    f"{role} `{name}` ({type(value).__name__}) cannot be pickled: "
                    f"{_describe(exc)}. {_HINTS.get(role, '')}",
                    name,
                ) from exc
            skipped[name] = _describe(exc)
            continue
        payload.add(name, frames)
    return payload, skipped


def load_values(
    entries: Sequence[Mapping[str, Any]],
    frames: Sequence[Buffer],
    namespace: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Inverse of :func:`dump_values`: ``(values, {name: reason it failed to load})``.

    With ``namespace``, notebook functions get it as their globals (and the
    globals they reference are written into it; with ``keep_existing``, only
    where it lacks them).
    """
    token = _session.set(namespace)
    # cloudpickle sets __builtins__ in the globals of every function it loads.
    own_builtins = namespace.get("__builtins__") if namespace is not None else None
    try:
        return _load_values(entries, frames)
    finally:
        _session.reset(token)
        if own_builtins is not None and namespace is not None:
            namespace["__builtins__"] = own_builtins


def _load_values(
    entries: Sequence[Mapping[str, Any]], frames: Sequence[Buffer]
) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    failed: dict[str, str] = {}
    pos = 0
    for entry in entries:
        name, count = str(entry["name"]), int(entry["nframes"])
        if count < 1 or pos + count > len(frames):
            raise SerializationError(f"payload entry for `{name}` points past the frames", name)
        try:
            values[name] = loads(frames[pos : pos + count])
        except Exception as exc:  # unpickling imports modules and runs reducers
            failed[name] = _describe(exc)
        pos += count
    return values, failed
