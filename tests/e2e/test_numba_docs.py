"""The examples of Numba CUDA's documentation, written as a notebook user would.

Each example is three cells in a real Jupyter kernel without a CUDA driver:
the definitions in a normal cell, the launch in a ``%%lan2gpu`` cell (run on a
simulator worker), and a numpy check in a normal cell after. Sizes are the
documentation's shapes at tiny grids (the simulator costs ~100 µs a thread);
tests/gpu runs them at their documented sizes on a real GPU.

Not here: ufuncs on the GPU (``@vectorize``/``@guvectorize`` with
``target="cuda"``), which Numba's simulator itself cannot run (``vectorize``
fails at decoration, a ``guvectorize`` ufunc at its call); tests/e2e/test_gpu.py
runs them on a real GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .kernel_driver import Kernel, notebook_on, ok


@dataclass(frozen=True)
class Example:
    define: str  # a normal notebook cell
    launch: str  # the body of a %%lan2gpu cell
    check: str  # a normal cell that raises if the result is wrong


EXAMPLES = {
    "vector add (grid-stride loop)": Example(
        define="""
@cuda.jit
def add_kernel(x, y, out):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        out[i] = x[i] + y[i]

x = np.arange(100, dtype=np.float32)
y = 2 * x
""",
        launch="""
d_x, d_y = cuda.to_device(x), cuda.to_device(y)
d_out = cuda.device_array_like(d_x)
add_kernel[2, 16](d_x, d_y, d_out)
out = d_out.copy_to_host()
""",
        check="assert np.array_equal(out, x + y)",
    ),
    "matrix multiply with shared memory": Example(
        define="""
from numba import float32
TPB = 4

@cuda.jit
def fast_matmul(A, B, C):
    sA = cuda.shared.array(shape=(TPB, TPB), dtype=float32)
    sB = cuda.shared.array(shape=(TPB, TPB), dtype=float32)
    x, y = cuda.grid(2)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    bpg = cuda.gridDim.x
    tmp = float32(0.0)
    for i in range(bpg):
        sA[ty, tx] = 0
        sB[ty, tx] = 0
        if y < A.shape[0] and (tx + i * TPB) < A.shape[1]:
            sA[ty, tx] = A[y, tx + i * TPB]
        if x < B.shape[1] and (ty + i * TPB) < B.shape[0]:
            sB[ty, tx] = B[ty + i * TPB, x]
        cuda.syncthreads()
        for j in range(TPB):
            tmp += sA[ty, j] * sB[j, tx]
        cuda.syncthreads()
    if y < C.shape[0] and x < C.shape[1]:
        C[y, x] = tmp

A = np.arange(64, dtype=np.float32).reshape(8, 8) / 10
B = np.ones((8, 8), dtype=np.float32) * 0.5
""",
        launch="""
C = np.zeros((8, 8), dtype=np.float32)
fast_matmul[(2, 2), (TPB, TPB)](A, B, C)
""",
        check="assert np.allclose(C, A @ B, rtol=1e-5)",
    ),
    "reduction with cuda.reduce": Example(
        define="""
@cuda.reduce
def sum_reduce(a, b):
    return a + b

values = np.arange(1, 65, dtype=np.float64)
""",
        launch="got = sum_reduce(values)",
        check="assert got == values.sum() == 2080",
    ),
    "reduction in shared memory": Example(
        define="""
from numba import int32
NELEM = 16

@cuda.jit
def array_sum(data):
    tid = cuda.threadIdx.x
    if tid < len(data):
        i = cuda.grid(1)
        shr = cuda.shared.array(NELEM, int32)
        shr[tid] = data[i]
        cuda.syncthreads()
        s = 1
        while s < cuda.blockDim.x:
            if tid % (2 * s) == 0:
                shr[tid] += shr[tid + s]
            s *= 2
            cuda.syncthreads()
        if tid == 0:
            data[tid] = shr[tid]

data = np.arange(NELEM, dtype=np.int32)
""",
        launch="array_sum[1, NELEM](data)",
        check="assert data[0] == sum(range(16)) == 120",
    ),
    "atomics: max and a histogram": Example(
        define="""
@cuda.jit
def max_example(result, values):
    tid = cuda.threadIdx.x
    bid = cuda.blockIdx.x
    bdim = cuda.blockDim.x
    i = (bid * bdim) + tid
    cuda.atomic.max(result, 0, values[i])

@cuda.jit
def histogram(x, bins, hist):
    i = cuda.grid(1)
    if i < x.size:
        cuda.atomic.add(hist, x[i] % bins, 1)

rng = np.random.default_rng(7)
arr = rng.random(32).astype(np.float32)
ints = rng.integers(0, 100, 48).astype(np.int64)
""",
        launch="""
result = np.zeros(1, dtype=np.float32)
max_example[4, 8](result, arr)
hist = np.zeros(5, dtype=np.int64)
histogram[3, 16](ints, 5, hist)
""",
        check="assert result[0] == arr.max() and (hist == np.bincount(ints % 5, minlength=5)).all()",
    ),
    "random numbers: Monte-Carlo pi": Example(
        define="""
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_uniform_float32

@cuda.jit
def compute_pi(rng_states, iterations, out):
    thread_id = cuda.grid(1)
    inside = 0
    for i in range(iterations):
        x = xoroshiro128p_uniform_float32(rng_states, thread_id)
        y = xoroshiro128p_uniform_float32(rng_states, thread_id)
        if x**2 + y**2 <= 1.0:
            inside += 1
    out[thread_id] = 4.0 * inside / iterations

threads_per_block, blocks = 16, 2
""",
        launch="""
rng_states = create_xoroshiro128p_states(threads_per_block * blocks, seed=1)
pis = np.zeros(threads_per_block * blocks, dtype=np.float32)
compute_pi[blocks, threads_per_block](rng_states, 200, pis)
del rng_states
""",
        check="assert abs(pis.mean() - np.pi) < 0.2, pis.mean()",
    ),
    "Monte-Carlo integration (device function, random, reduce, helper)": Example(
        define="""
from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_uniform_float32

@cuda.jit(device=True)
def func(x):
    return 1.0 / x

@cuda.jit
def mc_integrator_kernel(out, rng_states, lower_lim, upper_lim):
    gid = cuda.grid(1)
    if gid < out.size:
        samp = xoroshiro128p_uniform_float32(rng_states, gid)
        samp = samp * (upper_lim - lower_lim) + lower_lim
        out[gid] = func(samp)

@cuda.reduce
def sum_reduce(a, b):
    return a + b

def mc_integrate(lower_lim, upper_lim, nsamps):
    out = cuda.to_device(np.zeros(nsamps, dtype="float32"))
    rng_states = create_xoroshiro128p_states(nsamps, seed=42)
    mc_integrator_kernel.forall(nsamps)(out, rng_states, lower_lim, upper_lim)
    factor = (upper_lim - lower_lim) / (nsamps - 1)
    return sum_reduce(out) * factor
""",
        launch="integral = mc_integrate(1, 2, 128)",
        check="assert abs(integral - np.log(2)) < 0.05, integral",
    ),
    "streams": Example(
        define="""
@cuda.jit
def increment(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] += 1

host = np.arange(24, dtype=np.float64)
""",
        launch="""
stream = cuda.stream()
d_host = cuda.to_device(host, stream=stream)
increment[1, 24, stream](d_host)
bumped = d_host.copy_to_host(stream=stream)
stream.synchronize()
del stream, d_host
""",
        check="assert np.array_equal(bumped, host + 1)",
    ),
    "constant memory": Example(
        define="""
CONST_TABLE = np.arange(16, dtype=np.float32) * 1.5

@cuda.jit
def use_constant(out):
    table = cuda.const.array_like(CONST_TABLE)
    i = cuda.grid(1)
    if i < out.size:
        out[i] = table[i] * 2
""",
        launch="""
doubled = np.zeros(16, dtype=np.float32)
use_constant[1, 16](doubled)
""",
        check="assert np.array_equal(doubled, CONST_TABLE * 2)",
    ),
    "local memory": Example(
        define="""
from numba import float64

@cuda.jit
def window_sums(out):
    i = cuda.grid(1)
    tmp = cuda.local.array(4, float64)
    for j in range(4):
        tmp[j] = i + j
    s = 0.0
    for j in range(4):
        s += tmp[j]
    if i < out.size:
        out[i] = s
""",
        launch="""
sums = np.zeros(8)
window_sums[1, 8](sums)
""",
        check="assert sums.tolist() == [4 * i + 6 for i in range(8)]",
    ),
    "device functions": Example(
        define="""
@cuda.jit(device=True)
def a_device_function(a, b):
    return a + b

@cuda.jit
def uses_device_function(x, out):
    i = cuda.grid(1)
    if i < x.size:
        out[i] = a_device_function(x[i], i)

xs = np.ones(10)
""",
        launch="""
added = np.zeros(10)
uses_device_function[1, 10](xs, added)
""",
        check="assert added.tolist() == [1.0 + i for i in range(10)]",
    ),
    "global capture: a global array read in a kernel": Example(
        define="""
LOOKUP = np.array([10.0, 20.0, 30.0, 40.0])

@cuda.jit
def gather(idx, out):
    i = cuda.grid(1)
    if i < idx.size:
        out[i] = LOOKUP[idx[i]]

idx = np.array([3, 0, 2, 1, 3])
""",
        launch="""
gathered = np.zeros(5)
gather[1, 5](idx, gathered)
""",
        check="assert gathered.tolist() == [40.0, 10.0, 30.0, 20.0, 40.0]",
    ),
}


@pytest.fixture(scope="module")
def nb(shared_worker) -> Iterator[Kernel]:
    with notebook_on(shared_worker) as k:
        yield k


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_documented_example_runs_as_in_the_notebook(nb, name):
    example = EXAMPLES[name]
    ok(nb, example.define)
    ok(nb, "%%lan2gpu --timeout 120\n" + example.launch.strip())
    ok(nb, example.check)
