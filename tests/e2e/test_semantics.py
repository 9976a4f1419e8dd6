"""A ``%%lan2gpu`` cell means on the worker what it means in the notebook.

Each test is a notebook in small: definitions in a normal cell, the launch in a
``%%lan2gpu`` cell, a numpy check in a normal cell after, all in a real Jupyter
kernel (no CUDA driver, no simulator on the notebook side) against a simulator
worker. The expected values are what the same code gives run locally in Numba's
CUDA simulator.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .kernel_driver import Kernel, notebook_on, ok, value


@pytest.fixture(scope="module")
def nb(shared_worker) -> Iterator[Kernel]:
    with notebook_on(shared_worker, "import numpy as np\nfrom numba import cuda, njit") as k:
        yield k


def error_text(k: Kernel, code: str) -> str:
    """The error a cell that must fail shows (name, value and traceback)."""
    run = k.run(code)
    assert run.reply["status"] == "error", f"the cell did not fail: {run.stream()}"
    err = run.error()
    assert err is not None
    return f"{err['ename']}: {err['evalue']}\n" + "\n".join(err["traceback"])


# -- the three cases of the issue ------------------------------------------------


def test_a_global_the_cell_sets_before_the_first_launch_is_seen(nb):
    ok(
        nb,
        "SCALE = 1.0\n"
        "@cuda.jit\n"
        "def scaled(out):\n"
        "    i = cuda.grid(1)\n"
        "    if i < out.size:\n"
        "        out[i] = SCALE * i\n",
    )
    ok(nb, "%%lan2gpu\nSCALE = 3.0\nout = np.zeros(4)\nscaled[1, 4](out)")
    assert value(nb, "out.tolist(), SCALE") == "([0.0, 3.0, 6.0, 9.0], 3.0)"


def test_a_global_only_the_cell_defines_is_found(nb):
    ok(
        nb,
        "@cuda.jit\n"
        "def clip(out):\n"
        "    i = cuda.grid(1)\n"
        "    if i < out.size:\n"
        "        out[i] = min(i, THRESH)\n",
    )
    ok(nb, "%%lan2gpu\nTHRESH = 2\nclipped = np.zeros(4)\nclip[1, 4](clipped)")
    assert value(nb, "clipped.tolist()") == "[0.0, 1.0, 2.0, 2.0]"


def test_no_value_of_an_earlier_cell_leaks_into_a_later_one(nb):
    ok(nb, "%%lan2gpu\nTAX_RATE = 0.10")
    ok(nb, "del TAX_RATE")
    ok(
        nb,
        "@cuda.jit\n"
        "def taxed(prices, out):\n"
        "    i = cuda.grid(1)\n"
        "    if i < out.size:\n"
        "        out[i] = prices[i] * (1 + TAX_RATE)\n"
        "prices = np.array([100.0, 200.0])\n",
    )
    ok(nb, "%%lan2gpu\nTAX_RATE = 0.08\ntotal = np.zeros(2)\ntaxed[1, 2](prices, total)")
    assert value(nb, "np.round(total, 6).tolist()") == "[108.0, 216.0]"
    # Deleted in the notebook and not set by the cell: an error naming it, as locally.
    ok(nb, "del TAX_RATE")
    text = error_text(nb, "%%lan2gpu\nagain = np.zeros(2)\ntaxed[1, 2](prices, again)")
    assert "TAX_RATE" in text
    # The same for a plain read, and after %reset the worker holds nothing either.
    ok(nb, "%%lan2gpu\nleft_over = 7")
    ok(nb, "%reset -f\nimport numpy as np\nfrom numba import cuda, njit")
    assert "name 'left_over' is not defined" in error_text(nb, "%%lan2gpu\nprint(left_over)")


def test_a_named_session_keeps_what_an_earlier_cell_bound(nb):
    ok(nb, "%%lan2gpu --session kept-values\nOFFSET = 5.0")
    ok(nb, "del OFFSET")
    ok(
        nb,
        "@cuda.jit\n"
        "def shifted(out):\n"
        "    i = cuda.grid(1)\n"
        "    if i < out.size:\n"
        "        out[i] = i + OFFSET\n",
    )
    ok(nb, "%%lan2gpu --session kept-values\nres = np.zeros(3)\nshifted[1, 3](res)")
    assert value(nb, "res.tolist()") == "[5.0, 6.0, 7.0]"
    # The notebook's own session did not keep it.
    text = error_text(nb, "%%lan2gpu\nres2 = np.zeros(3)\nshifted[1, 3](res2)")
    assert "OFFSET" in text
    ok(nb, "%lan2gpu close-session kept-values")


def test_device_functions_and_njit_helpers_read_the_sessions_globals(nb):
    ok(
        nb,
        "GAIN = 1.0\n"
        "@cuda.jit(device=True)\n"
        "def amplify(x):\n"
        "    return x * GAIN\n"
        "@cuda.jit\n"
        "def amp_kernel(out):\n"
        "    i = cuda.grid(1)\n"
        "    if i < out.size:\n"
        "        out[i] = amplify(i)\n"
        "@njit\n"
        "def bias(x):\n"
        "    return x + BIAS\n",
    )
    ok(
        nb,
        "%%lan2gpu\nGAIN = 10.0\nBIAS = 0.5\namped = np.zeros(3)\namp_kernel[1, 3](amped)\nb = bias(1.0)",
    )
    assert value(nb, "amped.tolist(), b") == "([0.0, 10.0, 20.0], 1.5)"


def test_compiled_njit_keeps_its_globals_and_a_redefinition_recompiles(nb):
    ok(nb, "LEVEL = 1\n@njit\ndef level():\n    return LEVEL\n")
    ok(nb, "%%lan2gpu\nfirst = level()")
    # Numba's rule: a compiled function keeps the globals it was compiled with.
    ok(nb, "LEVEL = 2")
    ok(nb, "%%lan2gpu\nsecond = level()")
    # Redefined in the notebook: a new function, compiled with today's value.
    ok(nb, "@njit\ndef level():\n    return LEVEL\n")
    ok(nb, "%%lan2gpu\nthird = level()")
    assert value(nb, "first, second, third") == "(1, 1, 2)"


def test_an_unchanged_kernel_is_the_same_dispatcher_in_every_cell(nb):
    ok(nb, "@cuda.jit\ndef noop(out):\n    out[0] = 1\n")
    first = ok(nb, "%%lan2gpu\nprint(id(noop))")
    second = ok(nb, "%%lan2gpu\nprint(id(noop))")
    assert first == second


def test_an_explicit_signature_is_kept_where_numba_would_convert(nb):
    # Declared int64: Numba converts 2.5 to 2 instead of compiling for floats.
    ok(nb, '@njit("int64(int64)")\ndef as_int(x):\n    return x\n')
    ok(nb, "%%lan2gpu\nconverted = as_int(2.5)")
    assert value(nb, "converted") == "2"


def test_a_cuda_signature_in_the_notebook_says_what_to_do(nb):
    run = nb.run('@cuda.jit("void(float32[:])")\ndef eager(a):\n    a[0] = 1\n')
    assert run.reply["status"] == "error"
    hint = run.stream()
    assert "define it inside a %%lan2gpu cell" in hint
    assert "leave the signature out" in hint


def test_a_kernel_with_a_signature_defined_in_a_cell_is_used_by_later_cells(nb):
    ok(
        nb,
        '%%lan2gpu\n@cuda.jit("void(float32[:])")\n'
        "def fill(a):\n"
        "    i = cuda.grid(1)\n"
        "    if i < a.size:\n"
        "        a[i] = i * FACTOR\n",
    )
    ok(nb, "FACTOR = 4")
    ok(nb, "%%lan2gpu\nfilled = np.zeros(3, dtype=np.float32)\nfill[1, 3](filled)")
    assert value(nb, "filled.tolist()") == "[0.0, 4.0, 8.0]"


def test_remote_tracebacks_name_the_cell_the_user_sees(nb):
    run = nb.run("%%lan2gpu\nx = 1\nraise ValueError('boom')")
    assert run.reply["status"] == "error"
    count = run.reply["execution_count"]
    text = "\n".join(run.error()["traceback"])  # type: ignore[index]
    assert f"<lan2gpu In[{count}]>" in text


def test_a_signature_function_from_a_cell_compiles_with_the_cells_globals(nb):
    ok(nb, "C_SIG = 1")
    ok(
        nb,
        '%%lan2gpu\nC_SIG = 5\nD_SIG = 7\n@njit("int64(int64)")\n'
        "def plus_c(x):\n    return x + C_SIG\n"
        '@njit("int64(int64)")\n'
        "def plus_d(x):\n    return x + D_SIG\n",
    )
    # Compiled here too, with the values the cell bound; and it still converts (2.9 -> 2).
    assert value(nb, "plus_c(1), plus_d(1), plus_c(2.9), C_SIG") == "(6, 8, 7, 5)"


def test_a_function_brought_back_with_out_finds_its_globals(nb):
    ok(nb, "%%lan2gpu --out triple_k\nK_OUT = 3\ndef triple_k():\n    return K_OUT * 2\n")
    assert value(nb, "triple_k()") == "6"


def test_what_only_the_worker_can_hold_stays_there_for_later_cells(nb):
    # A star import binds names the notebook never sees; a module only the worker
    # has cannot be loaded here: both stay in the worker's session.
    ok(nb, "%%lan2gpu\nfrom math import *")
    assert ok(nb, "%%lan2gpu\nprint(sqrt(16))").strip() == "4.0"
    run = nb.run(
        "%%lan2gpu\nimport sys, types\n"
        "sys.modules['worker_only'] = types.ModuleType('worker_only')\n"
        "exec('def triple(v):\\n    return 3 * v', sys.modules['worker_only'].__dict__)\n"
        "import worker_only\n"
    )
    assert run.reply["status"] == "ok", run.error()
    assert "`worker_only` stays on the worker" in run.stream()  # news, on stdout
    assert ok(nb, "%%lan2gpu\nprint(worker_only.triple(4))").strip() == "12"
