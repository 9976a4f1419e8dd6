"""Tornado handlers: the page, its two static files, and the JSON API.

All of them go through jupyter_server's authentication (token or cookie) and
authorization like the server's own handlers: an API request without
credentials gets 403, the page redirects to the login page. They only read the
:class:`~.monitor.Monitor`'s latest snapshot; nothing here talks to a worker.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

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
        else:
            body[part] = getattr(snap, part)
        return body


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
