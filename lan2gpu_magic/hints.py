"""What to do when a normal cell meets the GPU this machine does not have.

A laptop without a CUDA driver can define kernels for a worker's GPU: Numba
compiles a ``@cuda.jit`` kernel at its first launch, which happens on the
worker. A kernel with an explicit signature (``@cuda.jit("void(float32[:])")``,
``@vectorize([...], target="cuda")``) is compiled at once instead, and Numba
raises ``CudaSupportError`` in the notebook. lan2gpu leaves Numba's behaviour
alone (a decorator that silently did not compile would hide real signature
errors until the worker) and, after such a cell, prints what to do.
"""

from __future__ import annotations

import traceback
from typing import Any

_NO_DRIVER = "CudaSupportError"

SIGNATURE_HINT = (
    "lan2gpu: this machine has no CUDA driver, and Numba compiles a kernel with an explicit "
    "signature at once, here. Either define it inside a %%lan2gpu cell (it is compiled on the "
    "worker, and later %%lan2gpu cells can use it), or leave the signature out (Numba then "
    "compiles it at its first launch, on the worker)."
)
GENERAL_HINT = (
    "lan2gpu: this machine has no CUDA driver; run the code that touches the GPU inside a "
    "%%lan2gpu cell, which runs on a worker's GPU."
)


def _is_no_driver(exc: BaseException) -> bool:
    return any(cls.__name__ == _NO_DRIVER for cls in type(exc).__mro__)


def hint_for(exc: BaseException) -> str | None:
    """The line to print after a cell that raised ``exc``, if it calls for one."""
    if not _is_no_driver(exc):
        return None
    files = [f.filename.replace("\\", "/") for f in traceback.extract_tb(exc.__traceback__)]
    eager = any(
        "/numba" in name and name.endswith(("/decorators.py", "/vectorizers.py")) for name in files
    )
    return SIGNATURE_HINT if eager else GENERAL_HINT


def after_cell(result: Any) -> None:
    """IPython ``post_run_cell`` callback."""
    exc = getattr(result, "error_in_exec", None)
    line = hint_for(exc) if isinstance(exc, BaseException) else None
    if line:
        print(line, flush=True)
