"""Kernelspecs that start :mod:`lan2gpu_magic.kernel`: ``install-kernel``,
``list-kernels``, ``remove-kernel`` (through jupyter_client's KernelSpecManager,
so every frontend that lists local kernelspecs sees them)."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from worker_kernel.protocol.errors import ConfigurationError

MODULE = "lan2gpu_magic.kernel"


def spec(display_name: str, placement: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    """The kernel.json of a LAN kernel with these placement options."""
    return {
        "argv": [sys.executable, "-m", MODULE, "-f", "{connection_file}", *placement],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "message",  # interrupts travel to the remote kernel as messages
        "env": env,
        "metadata": {"lan2gpu": {"placement": list(placement)}, "debugger": False},
    }


def install(
    name: str,
    display_name: str,
    placement: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    user: bool = False,
    prefix: str | None = None,
) -> Path:
    """Install the kernelspec ``name``; return the directory it went to."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigurationError(f"{name!r} is not a kernel name (letters, digits, - _ .)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(
            json.dumps(spec(display_name, placement, env or {}), indent=2)
        )
        where = KernelSpecManager().install_kernel_spec(
            tmp, kernel_name=name, user=user, prefix=prefix, replace=True
        )
    return Path(where)


def installed() -> list[tuple[str, Path, dict[str, Any]]]:
    """``(name, directory, kernel.json)`` of every installed LAN kernel."""
    found = []
    for name, info in sorted(KernelSpecManager().get_all_specs().items()):
        body = info.get("spec", {})
        if MODULE in body.get("argv", []):
            found.append((name, Path(info["resource_dir"]), body))
    return found


def remove(name: str) -> Path:
    ksm = KernelSpecManager()
    try:
        body = ksm.get_kernel_spec(name)
    except NoSuchKernel:
        raise ConfigurationError(
            f"no kernel named {name!r}; see `python -m lan2gpu_magic list-kernels`"
        ) from None
    if MODULE not in body.argv:
        raise ConfigurationError(f"{name!r} is not a lan2gpu kernel; leaving it alone")
    return Path(ksm.remove_kernel_spec(name))
