"""Versions exchanged in the handshake, and what makes two sides incompatible.

Functions defined in a notebook travel as bytecode, so both sides must run the
same Python minor version; that and the protocol version are hard errors. Other
differences (cloudpickle, numpy, numba) are reported as warnings.
"""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata

from .errors import VersionMismatch
from .messages import PROTOCOL_VERSION

# lan2gpu's version, the one source: pyproject.toml reads it from here ([tool.hatch.version]),
# both packages' __version__ is this, and labextension/package.json must say the same.
__version__ = "0.1.0"

_PACKAGES = ("lan2gpu", "cloudpickle", "numpy", "numba", "numba-cuda", "pyzmq")


@cache
def local_versions() -> dict[str, str]:
    """Versions of this process's Python and key packages (without importing them)."""
    versions = {"protocol": str(PROTOCOL_VERSION), "python": platform.python_version()}
    for dist in _PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_compatible(mine: dict[str, str], theirs: dict[str, str], peer: str) -> list[str]:
    """Raise :class:`VersionMismatch` on a breaking difference; return warnings.

    ``peer`` names the other side in messages ("worker box1 (tcp://...)").
    """
    if theirs.get("protocol") != mine["protocol"]:
        raise VersionMismatch(
            f"{peer} speaks lan2gpu protocol {theirs.get('protocol')}, this side "
            f"{mine['protocol']}; install the same lan2gpu version on both "
            f"(here: lan2gpu {mine.get('lan2gpu')}, there: lan2gpu {theirs.get('lan2gpu')})"
        )
    here, there = _minor(mine["python"]), _minor(theirs.get("python", "?"))
    if here != there:
        raise VersionMismatch(
            f"{peer} runs Python {theirs.get('python')}, this side Python {mine['python']}; "
            "functions travel as bytecode, so both must run the same Python minor version "
            f"(switch one side to Python {there} or {here})"
        )
    warnings = []
    for dist in ("cloudpickle", "numpy", "numba"):
        a, b = mine.get(dist, "?"), theirs.get(dist, "?")
        if a.split(".")[0] != b.split(".")[0]:
            warnings.append(f"{dist} {a} here, {b} on {peer}: values may not unpickle")
    return warnings
