"""Kernelspecs that start :mod:`lan2gpu_magic.kernel`: ``install-kernel``,
``list-kernels``, ``remove-kernel`` (through jupyter_client's KernelSpecManager,
so every frontend that lists local kernelspecs sees them)."""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from worker_kernel.protocol.errors import ConfigurationError
from worker_kernel.protocol.units import parse_size

from .placement import parse_cc

MODULE = "lan2gpu_magic.kernel"
# The kernel's placement options (lan2gpu_magic/kernel.py), each with its check.
_VALUED: dict[str, Any] = {
    "worker": str,
    "gpu": str,
    "min_memory": parse_size,
    "min_cc": parse_cc,
    "gpus": int,
    "key_file": str,
    "server_key": str,
    "workers": str,
}
_SWITCHES = ("cpu", "simulate")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_VALUE = 512  # a worker address list fits; a kernel.json stays small


def placement(values: Mapping[str, Any]) -> list[str]:
    """The kernel's command-line placement options for ``values`` (``install-kernel``'s
    option names with ``_``; empty and None ones left out); a bad value raises
    :class:`ConfigurationError` now rather than when a frontend starts the kernel."""
    unknown = set(values) - set(_VALUED) - set(_SWITCHES)
    if unknown:
        raise ConfigurationError(
            f"unknown placement option(s) {sorted(unknown)}; use {sorted(_VALUED)} or "
            f"{list(_SWITCHES)}"
        )
    argv: list[str] = []
    for name, check in _VALUED.items():
        value = values.get(name)
        if value is None or str(value).strip() == "":
            continue
        text = str(value).strip()
        flag = f"--{name.replace('_', '-')}"
        if text.startswith("-") or not text.isprintable() or len(text) > _MAX_VALUE:
            raise ConfigurationError(
                f"{flag} {text[:40]!r}: give a plain value (no leading '-', no control "
                f"characters, at most {_MAX_VALUE} characters)"
            )
        try:
            checked = check(text)
        except (ValueError, ConfigurationError) as exc:
            raise ConfigurationError(f"{flag} {text!r}: {exc}") from None
        if name == "gpus" and checked < 1:
            raise ConfigurationError(f"{flag} {text!r}: give 1 or more GPUs")
        argv += [flag, text]
    for name in _SWITCHES:
        if values.get(name) not in (None, True, False):
            raise ConfigurationError(f"--{name}: true or false, not {values.get(name)!r}")
    argv += [f"--{name}" for name in _SWITCHES if values.get(name) is True]
    return argv


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
    """Install the kernelspec ``name`` (Jupyter lowercases it); return its directory.
    An existing lan2gpu kernel of that name is replaced; any other kernel is kept."""
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"{name!r} is not a kernel name: 1 to 64 ASCII letters, digits, - _ ."
        )
    try:
        existing = KernelSpecManager().get_kernel_spec(name.lower())
    except NoSuchKernel:
        existing = None
    if existing is not None and MODULE not in existing.argv:
        raise ConfigurationError(
            f"a kernel named {name.lower()!r} is already installed and is not a lan2gpu "
            "kernel; pick another name"
        )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(
            json.dumps(spec(display_name, placement, env or {}), indent=2)
        )
        where = KernelSpecManager().install_kernel_spec(
            tmp, kernel_name=name, user=user, prefix=prefix
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
