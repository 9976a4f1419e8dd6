"""What each package drags in at import time, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(out.split())


def test_worker_kernel_imports_neither_ipython_nor_jupyter_server():
    loaded = _modules_after("import worker_kernel, worker_kernel.protocol, worker_kernel.service")
    assert not {m for m in loaded if m.split(".")[0] in ("IPython", "jupyter_server")}


def test_protocol_imports_no_numba():
    loaded = _modules_after("import worker_kernel.protocol.serialize, worker_kernel.protocol.wire")
    assert not {m for m in loaded if m.split(".")[0] == "numba"}


def test_lan2gpu_magic_imports_no_numba():
    loaded = _modules_after("import lan2gpu_magic, lan2gpu_magic.magic")
    assert not {m for m in loaded if m.split(".")[0] == "numba"}


def test_lan2gpu_magic_api_does_not_need_ipython():
    loaded = _modules_after("import lan2gpu_magic")
    assert "IPython" not in loaded
