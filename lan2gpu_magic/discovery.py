"""Find workers on the LAN: browse mDNS/DNS-SD for ``_lan2gpu._tcp.local.``.

The browser runs in zeroconf's own thread for as long as the notebook's worker
pool lives, so the list is current whenever a cell needs it; explicit
addresses always work without it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from worker_kernel.protocol.messages import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_lan2gpu._tcp.local."
_RESOLVE_MS = 2000


@dataclass(frozen=True)
class Found:
    """A worker that announced itself."""

    name: str
    address: str
    protocol: str
    encrypted: bool = False  # per-user keys (--encrypt)
    security: str = "shared-key"  # or "per-user", "plaintext" (see protocol.curve)

    @property
    def compatible(self) -> bool:
        return self.protocol == str(PROTOCOL_VERSION)


def _found(info: ServiceInfo) -> Found | None:
    props = {
        k.decode(errors="replace"): (v or b"").decode(errors="replace")
        for k, v in info.properties.items()
    }
    address = props.get("address", "")
    if not address:
        ips = info.parsed_addresses(IPVersion.V4Only)
        if not ips or info.port is None:
            return None
        address = f"tcp://{ips[0]}:{info.port}"
    name = props.get("name") or info.name.split(".")[0]
    return Found(
        name=name,
        address=address,
        protocol=props.get("protocol", "?"),
        encrypted=props.get("encrypted") == "1",
        security=props.get("security", "shared-key"),
    )


class Browser(ServiceListener):
    """Keeps the set of announced workers up to date. Close it when done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._found: dict[str, Found] = {}
        self._zc: Zeroconf | None = Zeroconf(ip_version=IPVersion.V4Only)
        self._browser: ServiceBrowser | None = ServiceBrowser(self._zc, SERVICE_TYPE, self)

    # ServiceListener callbacks run in zeroconf's thread.
    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self._resolve(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self._changed:
            self._found.pop(name, None)
            self._changed.notify_all()

    def _resolve(self, zc: Zeroconf, type_: str, name: str) -> None:
        info = zc.get_service_info(type_, name, timeout=_RESOLVE_MS)
        found = _found(info) if info is not None else None
        if found is None:
            log.debug("could not resolve announced worker %s", name)
            return
        with self._changed:
            self._found[name] = found
            self._changed.notify_all()

    def workers(self, wait: float = 0.0) -> list[Found]:
        """Announced workers; if none yet, wait up to ``wait`` seconds for the first."""
        deadline = time.monotonic() + wait
        with self._changed:
            while not self._found and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            return sorted(self._found.values(), key=lambda f: (f.name, f.address))

    def wait_for_change(self, seen: int, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the number of announced workers to
        differ from ``seen``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._found) == seen and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)

    def close(self) -> None:
        """Stop browsing and release zeroconf's sockets and thread. Idempotent."""
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._zc is not None:
            self._zc.close()
            self._zc = None
