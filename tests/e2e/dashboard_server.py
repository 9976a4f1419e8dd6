"""A real ``jupyter server`` (or ``jupyter lab``) subprocess for the browser tests,
HTTP helpers, and headless Chromium.

The server gets its own config, data and runtime directories (nothing of the
user's), finds workers through ``$LAN2GPU_WORKERS`` and nothing else (no mDNS),
and loads the dashboard the way an installed one is loaded: through the
``jupyter_server_config.d`` file the package installs, with no extra flag.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN = secrets.token_hex(16)  # this test run's server token
START_DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # report 302 as it is


class JupyterServer:
    """Owns the server process; :meth:`stop` terminates it (idempotent)."""

    def __init__(
        self,
        tmp: Path,
        workers: list[str],
        key_file: Path,
        app: str = "jupyter_server",  # or "jupyterlab"
        extra: tuple[str, ...] = (),
    ) -> None:
        for sub in ("config", "data", "runtime"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "jupyter-server.log"
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_DATA_DIR": str(tmp / "data"),
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
            "LAN2GPU_WORKERS": ",".join(workers),
            "LAN2GPU_KEY_FILE": str(key_file),
            "LAN2GPU_DISCOVERY": "0",
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    app,
                    "--allow-root",
                    "--no-browser",
                    "--ip=127.0.0.1",
                    f"--port={self.port}",
                    "--port-retries=0",
                    f"--IdentityProvider.token={TOKEN}",
                    f"--ServerApp.root_dir={tmp}",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=tmp,
            )
        deadline = time.monotonic() + START_DEADLINE
        while True:
            try:
                if self.get("/api/status")[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"jupyter server did not start:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(
        self, path: str, token: str | None = TOKEN, timeout: float = 30.0
    ) -> tuple[int, bytes, dict[str, str]]:
        """Status, body and headers of a GET (redirects are not followed)."""
        headers = {"Authorization": f"token {token}"} if token else {}
        url = self.url + path  # always http://127.0.0.1:PORT/...
        request = urllib.request.Request(url, headers=headers)  # noqa: S310
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(), dict(exc.headers)

    def api(self, part: str) -> dict[str, Any]:
        status, body, _ = self.get(f"/lan2gpu/api/{part}")
        if status != 200:
            raise AssertionError(f"/lan2gpu/api/{part}: HTTP {status}: {body[:500]!r}")
        document: dict[str, Any] = json.loads(body)
        return document

    def wait_for(
        self, part: str, check: Callable[[dict[str, Any]], Any], deadline: float = 30.0
    ) -> Any:
        """Poll an endpoint until ``check`` returns something truthy; return it."""
        end = time.monotonic() + deadline
        document: dict[str, Any] = {}
        while time.monotonic() < end:
            document = self.api(part)
            found = check(document)
            if found:
                return found
            time.sleep(0.3)
        raise AssertionError(f"/lan2gpu/api/{part} never satisfied the check; last:\n{document}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
