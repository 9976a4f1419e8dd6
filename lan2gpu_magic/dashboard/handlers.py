"""Tornado handlers: the page, its two static files, the JSON API, and the one
endpoint that changes something, ``POST /lan2gpu/api/kernelspecs`` (JupyterLab's
"Install a lan2gpu kernel…" form).

All of them go through jupyter_server's authentication (token or cookie) and
authorization like the server's own handlers: an API request without
credentials gets 403, the page redirects to the login page. The reading ones only
read the :class:`~.monitor.Monitor`'s latest snapshot; nothing here talks to a worker.
Running and waiting cells started by this server's own kernels carry ``"mine": true``.
"""

from __future__ import annotations

import json
import socket
from importlib import resources
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

from worker_kernel.protocol.errors import ConfigurationError

from .. import kernelspec
from .monitor import Monitor

PARTS = ("workers", "gpus", "jobs")
RESOURCE = "lan2gpu"  # the authorization resource these handlers belong to
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page loads nothing from elsewhere (labs without internet; no CDN).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'self'"
)


def _asset(name: str) -> str:
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


class _Handler(JupyterHandler):
    auth_resource = RESOURCE

    @property
    def monitor(self) -> Monitor:
        monitor: Monitor = self.settings["lan2gpu_monitor"]
        return monitor

    @property
    def content_security_policy(self) -> str:
        return _CSP


class PageHandler(_Handler):
    """``/lan2gpu/``: the dashboard page."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        if not self.request.path.endswith("/"):  # the page's links are relative to it
            query = f"?{self.request.query}" if self.request.query else ""
            self.redirect(self.request.path + "/" + query)
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(_asset("index.html"))


class StaticHandler(_Handler):
    """``/lan2gpu/static/NAME``: the page's script and style sheet."""

    @web.authenticated
    @authorized
    def get(self, name: str) -> None:
        if name not in _STATIC:
            raise web.HTTPError(404)
        self.set_header("Content-Type", _STATIC[name])
        self.set_header("Cache-Control", "no-cache")
        self.finish(_asset(name))


class _Api(APIHandler):
    auth_resource = RESOURCE
    _track_activity = False  # a dashboard left open must not keep an idle server alive

    @property
    def monitor(self) -> Monitor:
        monitor: Monitor = self.settings["lan2gpu_monitor"]
        return monitor

    async def _document(self, part: str) -> dict[str, Any]:
        snap = await self.monitor.snapshot()
        body: dict[str, Any] = {"updated": snap.updated, "error": self.monitor.error}
        if part == "jobs":
            body.update(snap.jobs)
            mine = self._own_sessions()
            for key in ("running", "waiting"):
                body[key] = [{**j, "mine": _origin(j) in mine} for j in body.get(key, [])]
        else:
            body[part] = getattr(snap, part)
        return body

    def _own_sessions(self) -> set[str]:
        """``host:pid`` of this server's kernels: the prefix of their default session."""
        manager = self.settings.get("kernel_manager")
        if manager is None:
            return set()
        host = socket.gethostname()
        pids = set()
        for kernel_id in manager.list_kernel_ids():
            provisioner = getattr(manager.get_kernel(kernel_id), "provisioner", None)
            pid = getattr(provisioner, "pid", None)
            if pid is not None:
                pids.add(f"{host}:{pid}")
        return pids


def _origin(job: dict[str, Any]) -> str:
    """``host:pid`` of the kernel that sent a cell (from its default session name)."""
    return ":".join(str(job.get("session", "")).split(":")[:2])


class ApiHandler(_Api):
    """``/lan2gpu/api/{workers,gpus,jobs}``; ``/lan2gpu/api/`` lists them."""

    @web.authenticated
    @authorized
    async def get(self, part: str = "") -> None:
        if not part:
            base = url_path_join(self.base_url, "lan2gpu", "api")
            self.finish({"endpoints": [url_path_join(base, p) for p in PARTS]})
            return
        self.finish(await self._document(part))


class KernelspecHandler(_Api):
    """``POST /lan2gpu/api/kernelspecs``: install a LAN kernelspec for this user, as
    ``python -m lan2gpu_magic install-kernel --user`` does. The body: ``name``,
    ``display_name``, and the placement options (``gpu``, ``min_memory``, ...)."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body must be JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        name, display = body.pop("name", ""), body.pop("display_name", None) or ""
        try:
            if not isinstance(name, str) or not name.strip():
                raise ConfigurationError("give the kernel a name (letters, digits, - _ .)")
            if not isinstance(display, str) or not display.isprintable() or len(display) > 200:
                raise ConfigurationError("the display name: one line of at most 200 characters")
            name = name.strip()
            display = display.strip() or f"Python (LAN {name})"
            folder = kernelspec.install(name, display, kernelspec.placement(body), user=True)
        except ConfigurationError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.set_status(201)
        self.finish({"name": folder.name, "display_name": display, "path": str(folder)})
