"""Drive a real ipykernel through jupyter_client and record what it publishes."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager, start_new_kernel


@dataclass
class CellRun:
    reply: dict[str, Any]
    outputs: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (arrival, msg)
    idle_at: float = 0.0

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            m["content"]["text"]
            for _, m in self.outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    def error(self) -> dict[str, Any] | None:
        return next((m["content"] for _, m in self.outputs if m["msg_type"] == "error"), None)

    def results(self) -> list[dict[str, Any]]:
        """Displayed data and the cell's value, without lan2gpu's progress line."""
        kinds = ("execute_result", "display_data")
        return [
            m["content"]["data"]
            for _, m in self.outputs
            if m["msg_type"] in kinds and not _is_progress(m)
        ]

    def progress(self) -> list[str]:
        """Every state of lan2gpu's progress line, first to last."""
        kinds = ("display_data", "update_display_data")
        return [
            m["content"]["data"]["text/plain"]
            for _, m in self.outputs
            if m["msg_type"] in kinds and _is_progress(m)
        ]


def _is_progress(msg: dict[str, Any]) -> bool:
    text = msg["content"].get("data", {}).get("text/plain", "")
    return isinstance(text, str) and text.startswith("lan2gpu: ")


class Kernel:
    """A kernel process, started with ``env`` added to the test's environment."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LAN2GPU_")}
        full_env.pop("NUMBA_ENABLE_CUDASIM", None)  # the notebook side has no simulator
        full_env.update(env or {})
        self.km: KernelManager
        self.km, self.kc = start_new_kernel(kernel_name="python3", env=full_env)

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.pid)  # type: ignore[union-attr]

    def run(self, code: str, timeout: float = 120, interrupt_after: float | None = None) -> CellRun:
        msg_id = self.kc.execute(code)
        run = CellRun(reply={})
        deadline = time.monotonic() + timeout
        interrupt_at = time.monotonic() + interrupt_after if interrupt_after else None
        while True:
            if interrupt_at is not None and time.monotonic() >= interrupt_at:
                self.km.interrupt_kernel()
                interrupt_at = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish within {timeout} s: {code[:60]!r}")
            try:
                msg = self.kc.get_iopub_msg(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            now = time.monotonic()
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                run.idle_at = now
                break
            kinds = ("stream", "display_data", "update_display_data", "execute_result", "error")
            if msg["msg_type"] in kinds:
                run.outputs.append((now, msg))
        while True:
            reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                run.reply = reply["content"]
                return run

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
        self.km.cleanup_resources()


@contextlib.contextmanager
def kernel_with(workers: Sequence[Any]) -> Iterator[Kernel]:
    """A kernel that knows exactly these workers (no mDNS), lan2gpu_magic loaded."""
    k = Kernel(
        {
            "LAN2GPU_WORKERS": ",".join(w.address for w in workers),
            "LAN2GPU_KEY_FILE": str(workers[0].key_file),
            "LAN2GPU_DISCOVERY": "0",
        }
    )
    try:
        assert k.run("%load_ext lan2gpu_magic").reply["status"] == "ok"
        yield k
    finally:
        k.shutdown()


@contextlib.contextmanager
def notebook_on(
    worker: Any, setup: str = "import numpy as np\nfrom numba import cuda"
) -> Iterator[Kernel]:
    """A kernel like a laptop's (no simulator), connected to ``worker``, ``setup`` run."""
    k = Kernel()
    try:
        ok(k, "%load_ext lan2gpu_magic")
        ok(k, f"%lan2gpu connect {worker.address} --key-file {worker.key_file}")
        ok(k, setup)
        yield k
    finally:
        k.shutdown()


def ok(k: Kernel, code: str, timeout: float = 120) -> str:
    """Run ``code``, which must succeed; its stdout."""
    run = k.run(code, timeout=timeout)
    assert run.reply["status"] == "ok", run.error()
    return run.stream()


def value(k: Kernel, expression: str) -> str:
    """``repr`` of ``expression`` in the kernel."""
    return ok(k, f"print(repr(({expression})))").strip()
