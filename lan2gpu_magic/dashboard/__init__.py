"""The lan2gpu dashboard: a jupyter_server extension at ``<server>/lan2gpu/``.

Enabled on install (``jupyter-config/jupyter_server_config.d/lan2gpu_magic.json``
in the wheel's data), or by hand with
``jupyter server extension enable lan2gpu_magic.dashboard``. It shows every
worker this server knows (the ``Lan2GPU`` settings in
``jupyter_server_config.py``, ``$LAN2GPU_WORKERS``, and mDNS discovery), their
GPUs with a few minutes of history, running and waiting cells, hosted kernels
and recently finished cells; ``/lan2gpu/api/{workers,gpus,jobs}`` serves the
same as JSON.
"""

from __future__ import annotations

import asyncio
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join

from ..config import Lan2GPU
from ..pool import WorkerPool
from .handlers import PARTS, ApiHandler, KernelspecHandler, PageHandler, StaticHandler
from .monitor import Monitor

__all__ = ["DashboardApp", "Monitor", "pool_from_settings"]

_POLL = 2.0  # seconds between polls while someone looks
_STATUS_TIMEOUT = 2.0  # a worker silent this long shows as unreachable
_RETRY = 4.0  # first wait before asking an unreachable worker again (doubles, up to 15 s)


def pool_from_settings(settings: Lan2GPU) -> WorkerPool:
    """A pool that never starts a worker of its own and retries lost workers soon."""
    return WorkerPool(
        addresses=settings.workers,
        key_file=settings.key_file or None,
        embedded=False,
        discovery=settings.discovery,
        discovery_wait=settings.discovery_wait,
        connect_timeout=min(settings.connect_timeout, 3.0),
        status_timeout=_STATUS_TIMEOUT,
        announce=lambda _text: None,
        server_keys=settings.server_keys,
        plaintext=settings.insecure_plaintext,
        retry_after=_RETRY,
        max_backoff=15.0,
    )


class DashboardApp(ExtensionApp):
    """Owns the :class:`Monitor` (its thread and sockets) for the server's lifetime."""

    name = "lan2gpu_dashboard"
    load_other_extensions = True
    monitor: Monitor | None = None

    def initialize_settings(self) -> None:
        config = self.serverapp.config if self.serverapp is not None else None
        settings = Lan2GPU(config=config)
        self.monitor = Monitor(lambda: pool_from_settings(settings), interval=_POLL)
        self.settings["lan2gpu_monitor"] = self.monitor

    def initialize_handlers(self) -> None:
        parts = "|".join(PARTS)
        self.handlers.extend(
            [
                ("lan2gpu/?", PageHandler),
                ("lan2gpu/static/([a-z.]+)", StaticHandler),
                ("lan2gpu/api/?", ApiHandler),
                ("lan2gpu/api/kernelspecs/?", KernelspecHandler),
                (url_path_join("lan2gpu/api", f"({parts})") + "/?", ApiHandler),
            ]
        )

    async def stop_extension(self) -> None:
        if self.monitor is not None:  # joining its thread must not block the event loop
            await asyncio.to_thread(self.monitor.close)


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "lan2gpu_magic.dashboard", "app": DashboardApp}]
