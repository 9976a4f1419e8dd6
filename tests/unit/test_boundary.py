"""The package boundary and the public API, pinned: a change to either is deliberate."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import lan2gpu_magic
import lan2gpu_magic.errors
import worker_kernel
from worker_kernel.protocol import errors as protocol_errors
from worker_kernel.protocol.versions import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_every_worker_internal_is_banned_from_the_notebook_side():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    banned = set(config["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"])
    internals = {
        f"worker_kernel.{p.stem}"
        for p in (ROOT / "worker_kernel").glob("*.py")
        if p.stem != "__init__"
    } | {f"worker_kernel.{p.name}" for p in (ROOT / "worker_kernel").iterdir()
         if p.is_dir() and p.name not in ("protocol", "__pycache__")}  # fmt: skip
    assert internals == banned, "list new worker modules under banned-api in pyproject.toml"


def test_the_public_api():
    assert lan2gpu_magic.__all__ == [
        "Client", "ConfigurationError", "EmbeddedWorker", "ExecuteRequest",
        "ExecutionCancelled", "ExecutionTimeout", "ExecutorDied", "Lan2GPUError",
        "MemoryBudgetExceeded", "NoWorkerAvailable", "OutputHandlers", "RemoteExecutionError",
        "RunResult", "SerializationError", "WorkerError", "WorkerInfo", "WorkerLost",
        "WorkerUnreachable", "connect",
    ]  # fmt: skip
    for name in lan2gpu_magic.__all__:
        assert getattr(lan2gpu_magic, name) is not None


def test_the_error_tree():
    def tree(cls: type) -> dict[str, object]:
        return {sub.__name__: tree(sub) for sub in cls.__subclasses__()}

    assert tree(lan2gpu_magic.Lan2GPUError) == {
        "ConfigurationError": {},
        "CellSyntaxError": {},
        "NoWorkerAvailable": {},
        "TransportError": {"WorkerUnreachable": {}, "WorkerLost": {}, "ConnectionClosed": {}},
        "ProtocolError": {"AuthenticationError": {}, "VersionMismatch": {}, "MessageRejected": {}},
        "SerializationError": {},
        "WorkerError": {
            "RemoteExecutionError": {},
            "ExecutionTimeout": {},
            "ExecutionCancelled": {},
            "ExecutorDied": {},
            "MemoryBudgetExceeded": {},
            "SplitError": {},
        },
    }
    # One tree: the notebook side's names are the protocol's classes.
    for name in lan2gpu_magic.errors.__all__:
        assert getattr(lan2gpu_magic.errors, name) is getattr(protocol_errors, name)


def test_one_version_everywhere():
    package = json.loads((ROOT / "labextension" / "package.json").read_text())
    assert lan2gpu_magic.__version__ == worker_kernel.__version__ == __version__
    assert package["version"] == __version__
