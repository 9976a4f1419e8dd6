"""Announce the worker on the LAN with mDNS/DNS-SD (service ``_lan2gpu._tcp.local.``).

Notebooks browsing for that service find the worker without being given an
address. The TXT record carries the worker's name, its ZeroMQ address and the
protocol version. Loopback addresses are never announced: nobody else could
reach them.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

import ifaddr
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from .protocol.curve import PER_USER
from .protocol.messages import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_lan2gpu._tcp.local."


def _host_ipv4_addresses() -> list[str]:
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and not ipaddress.ip_address(str(ip.ip)).is_loopback:
                found.append(str(ip.ip))
    return found


class Advertiser:
    """Registers the service while the worker runs; :meth:`close` withdraws it."""

    def __init__(self, name: str, address: str, instance: str, security: str) -> None:
        self.name = name
        self.security = security  # see protocol.curve
        self.address = address
        self.instance = instance
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> bool:
        """Announce; False (and a log line) when the address cannot be announced."""
        parts = urlsplit(self.address)
        host, port = parts.hostname or "", parts.port
        if parts.scheme != "tcp" or port is None:
            log.info("not announcing %s on the LAN: only tcp:// addresses are", self.address)
            return False
        if host in ("*", "0.0.0.0", ""):  # noqa: S104 - reading the bind address, not binding
            ips = _host_ipv4_addresses()
            interfaces: list[str] = ips
            announced = f"tcp://{ips[0]}:{port}" if ips else ""
        else:
            try:
                if ipaddress.ip_address(host).is_loopback:
                    log.info("not announcing %s on the LAN: it is a loopback address", host)
                    return False
            except ValueError:
                host = socket.gethostbyname(host)
            ips, interfaces, announced = [host], [host], self.address
        if not ips:
            log.info("not announcing on the LAN: no non-loopback IPv4 address")
            return False
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip in ips],
            port=port,
            properties={
                "name": self.name,
                "address": announced,
                "protocol": str(PROTOCOL_VERSION),
                "instance": self.instance,
                "encrypted": "1" if self.security == PER_USER else "0",  # older notebooks
                "security": self.security,
            },
            server=f"{socket.gethostname()}.local.",
        )
        await self._zc.async_register_service(self._info, allow_name_change=True)
        log.info("announced as %s on %s", self._info.name, ", ".join(ips))
        return True

    async def close(self) -> None:
        if self._zc is None:
            return
        if self._info is not None:
            await self._zc.async_unregister_service(self._info)
        await self._zc.async_close()
        self._zc = None
