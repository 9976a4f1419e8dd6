"""``python -m worker_kernel.probe``: print the GPUs numba sees, as JSON.

Order matters without a GPU: ``cuda.is_available()`` is False, while
``cuda.gpus`` and ``cuda.detect()`` raise, so they are only touched after it.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def probe() -> dict[str, Any]:
    try:
        from numba import cuda
    except Exception as exc:  # numba-cuda missing or broken
        return {"gpus": [], "error": f"cannot import numba.cuda: {exc}"}
    try:
        if not cuda.is_available():
            return {"gpus": [], "error": "numba.cuda.is_available() is False"}
        gpus = []
        for index, gpu in enumerate(cuda.gpus):
            with gpu:
                free, total = cuda.current_context().get_memory_info()
                uuid = getattr(gpu, "uuid", "")
                gpus.append(
                    {
                        "index": index,
                        "name": gpu.name.decode() if isinstance(gpu.name, bytes) else gpu.name,
                        "cc": list(gpu.compute_capability),
                        "memory_total": int(total),
                        "memory_free": int(free),
                        "uuid": uuid if isinstance(uuid, str) else "",
                    }
                )
        return {"gpus": gpus}
    except Exception as exc:  # driver present but unusable
        return {"gpus": [], "error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    json.dump(probe(), sys.stdout)
