"""Serialization: out-of-band arrays, numba dispatchers rebuilt by the loader."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from worker_kernel.protocol import rebuild
from worker_kernel.protocol.errors import SerializationError
from worker_kernel.protocol.serialize import (
    OUT_OF_BAND_BYTES,
    dump_values,
    dumps,
    load_values,
    loads,
)

KERNEL_SOURCE = """
import numpy as np
from numba import cuda

@cuda.jit(device=True)
def scale(x, k):
    return x * k

@cuda.jit(fastmath=True)
def kern(a, out, k):
    i = cuda.grid(1)
    if i < a.size:
        out[i] = scale(a[i], k)
"""


def _python(code: str, *, simulate: bool, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulate:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_arrays_travel_out_of_band_and_load_writable():
    array = np.arange(12_000, dtype=np.float32).reshape(30, 400)
    frames = dumps({"a": array})
    assert len(frames) == 2
    assert memoryview(frames[1]).nbytes == array.nbytes
    assert memoryview(frames[0]).nbytes < 500  # the data is not in the pickle
    loaded = loads([bytearray(f) for f in frames])["a"]
    assert np.array_equal(loaded, array)
    assert loaded.flags.writeable
    loaded[0, 0] = 99  # a view of the received frame, not a copy
    assert loaded[0, 0] == 99


def test_small_arrays_stay_in_the_pickle_and_load_writable():
    arrays = {i: np.arange(3) + i for i in range(30_000)}
    frames = dumps(arrays)
    assert len(frames) == 1  # one frame, not thirty thousand buffers
    loaded = loads([bytearray(f) for f in frames])
    assert all(np.array_equal(loaded[i], arrays[i]) for i in (0, 29_999))
    assert loaded[5].flags.writeable
    assert len(dumps(np.zeros(OUT_OF_BAND_BYTES, dtype=np.uint8))) == 2


def test_non_contiguous_arrays_still_roundtrip():
    array = np.arange(100.0).reshape(10, 10)[::2, ::3]
    assert np.array_equal(loads(dumps(array)), array)


def test_a_strided_view_travels_out_of_band_and_pickles_alike_on_arrival():
    base = np.arange(48_000.0).reshape(40, 1200)
    view = base[:, ::3]
    frames = dumps(view)
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == view.nbytes  # not in band
    loaded = loads([bytearray(f) for f in frames])
    assert np.array_equal(loaded, view) and np.shares_memory(view, base)  # untouched
    # The receiver re-pickles what it got exactly as the sender pickled it: an
    # unchanged input is told from one a cell changed by comparing these.
    assert [bytes(f) for f in dumps(loaded)] == [bytes(f) for f in frames]
    fortran = np.asfortranarray(base)  # contiguous in its own order: left as it is
    assert loads(dumps(fortran)).flags.f_contiguous


def test_kernel_defined_without_simulator_runs_in_a_simulator_process(tmp_path):
    # The notebook has no GPU and no simulator; the worker simulates.
    _python(
        KERNEL_SOURCE
        + """
import pickle
from worker_kernel.protocol.serialize import dumps
frames = dumps({"kern": kern, "scale": scale})
open("frames.pkl", "wb").write(pickle.dumps([bytes(f) for f in frames]))
""",
        simulate=False,
        cwd=tmp_path,
    )
    out = _python(
        """
import pickle
import numpy as np
from numba import cuda
from worker_kernel.protocol.serialize import loads
ns = loads(pickle.load(open("frames.pkl", "rb")))
kern = ns["kern"]
a = np.arange(256, dtype=np.float32)
out = np.zeros_like(a)
kern[4, 64](a, out, 3.0)
print(type(kern).__name__, kern._fastmath, out.sum(), ns["scale"] is kern.fn.__globals__["scale"])
""",
        simulate=True,
        cwd=tmp_path,
    )
    assert out.split() == ["FakeCUDAKernel", "True", "97920.0", "True"]


def test_simulator_kernel_becomes_a_real_dispatcher_elsewhere(tmp_path):
    _python(
        KERNEL_SOURCE
        + """
import pickle
from worker_kernel.protocol.serialize import dumps
open("frames.pkl", "wb").write(pickle.dumps([bytes(f) for f in dumps(kern)]))
""",
        simulate=True,
        cwd=tmp_path,
    )
    out = _python(
        """
import pickle
from worker_kernel.protocol.serialize import loads
kern = loads(pickle.load(open("frames.pkl", "rb")))
print(type(kern).__name__, kern.targetoptions["fastmath"], type(kern.py_func.__globals__["scale"]).__name__)
""",
        simulate=False,
        cwd=tmp_path,
    )
    assert out.split() == ["CUDADispatcher", "True", "CUDADispatcher"]


def test_device_arrays_become_host_arrays(tmp_path):
    out = _python(
        """
import numpy as np
from numba import cuda
from worker_kernel.protocol.serialize import dumps, loads
d = cuda.to_device(np.arange(5, dtype=np.int64))
back = loads(dumps({"d": d}))["d"]
print(type(back).__name__, back.tolist())
""",
        simulate=True,
        cwd=tmp_path,
    )
    assert out.strip() == "ndarray [0, 1, 2, 3, 4]"


def test_njit_rebuilt_once_per_unchanged_function():
    numba = pytest.importorskip("numba")
    rebuild.clear_cache()

    @numba.njit(fastmath=True)
    def add1(x):
        return x + 1

    first = loads(dumps(add1))
    again = loads(dumps(add1))
    assert first(41) == 42
    assert again is first  # unchanged code and options: the same dispatcher
    assert first.targetoptions["fastmath"] is True
    assert len(first.overloads) == 1

    @numba.njit(fastmath=True)
    def add1(x):  # same name, new code
        return x + 2

    changed = loads(dumps(add1))
    assert changed is not first
    assert changed(40) == 42


def test_cuda_link_is_refused_with_the_kernels_name():
    cuda = pytest.importorskip("numba.cuda")

    @cuda.jit(link=["helpers.ptx"])
    def linked(a):
        pass

    with pytest.raises(SerializationError, match="'linked' links external code"):
        dumps(linked)


def test_unpicklable_input_is_named_with_the_reason(tmp_path):
    with (
        open(tmp_path / "f.txt", "w") as fh,
        pytest.raises(SerializationError, match=r"input `fh` .*TextIOWrapper") as info,
    ):
        dump_values({"ok": 1, "fh": fh})
    assert info.value.name == "fh"


def test_unpicklable_values_are_skipped_unless_strict():
    lock = threading.Lock()
    payload, skipped = dump_values({"lock": lock, "n": 3}, strict=[], role="output")
    assert list(skipped) == ["lock"]
    assert "cannot pickle" in skipped["lock"]
    values, failed = load_values(payload.entries, payload.frames)
    assert values == {"n": 3}
    assert failed == {}


def test_a_value_that_fails_to_load_does_not_take_others_with_it():
    payload, _ = dump_values({"a": 1, "b": 2})
    frames = list(payload.frames)
    frames[0] = b"not a pickle"
    values, failed = load_values(payload.entries, frames)
    assert values == {"b": 2}
    assert list(failed) == ["a"]


def test_library_dispatchers_travel_by_reference(tmp_path):
    # numba.cuda.random's generators are CUDA device functions here, but CPU
    # functions under the simulator: the loader must get its own.
    _python(
        """
import pickle
from numba.cuda.random import xoroshiro128p_uniform_float32 as u
from worker_kernel.protocol.serialize import dumps
frames = dumps(u)
assert len(frames[0]) < 300, len(frames[0])  # a reference, not a function body
open("frames.pkl", "wb").write(pickle.dumps([bytes(f) for f in frames]))
print(type(u).__name__)
""",
        simulate=False,
        cwd=tmp_path,
    )
    out = _python(
        """
import pickle
import numba.cuda.random as r
from worker_kernel.protocol.serialize import loads
u = loads(pickle.load(open("frames.pkl", "rb")))
print(u is r.xoroshiro128p_uniform_float32, type(u).__name__)
""",
        simulate=True,
        cwd=tmp_path,
    )
    assert out.split() == ["True", "CPUDispatcher"]


@pytest.mark.parametrize(("here", "there"), [(False, True), (True, False)])
def test_cuda_reduce_is_rebuilt_for_the_loaders_target(tmp_path, here, there):
    _python(
        """
import pickle
from numba import cuda
from worker_kernel.protocol.serialize import dumps
r = cuda.reduce(lambda a, b: max(a, b))
open("frames.pkl", "wb").write(pickle.dumps([bytes(f) for f in dumps(r)]))
""",
        simulate=here,
        cwd=tmp_path,
    )
    check = "r(np.arange(10.0))" if there else "type(r).__name__"
    out = _python(
        f"""
import pickle
import numpy as np
from worker_kernel.protocol.serialize import loads
r = loads(pickle.load(open("frames.pkl", "rb")))
print({check})
""",
        simulate=there,
        cwd=tmp_path,
    )
    assert out.strip() == ("9.0" if there else "Reduce")
