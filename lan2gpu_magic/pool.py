"""The workers this notebook knows: connected lazily, the embedded one as a fallback.

Addresses come from ``%lan2gpu connect``, the ``Lan2GPU.workers`` setting and
``$LAN2GPU_WORKERS``. Only when none is configured does the pool start a local
worker, so a configured but unreachable worker is an error, never silently
replaced by a simulator.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker_kernel.protocol.errors import Lan2GPUError

from .client import Client
from .embedded import EmbeddedWorker
from .placement import Candidate, Requirements, choose_worker


@dataclass
class _Entry:
    address: str
    key_file: str | None
    client: Client | None = None
    problem: str = ""


class WorkerPool:
    """Owns a :class:`Client` per known worker and the embedded worker, if started."""

    def __init__(
        self,
        *,
        addresses: Sequence[str] = (),
        key_file: str | None = None,
        embedded: bool = True,
        connect_timeout: float = 10.0,
        announce: Callable[[str], None] = print,
    ) -> None:
        self.key_file = key_file
        self.connect_timeout = connect_timeout
        self.allow_embedded = embedded
        self._announce = announce
        self._entries: dict[str, _Entry] = {}
        self.embedded: EmbeddedWorker | None = None
        for address in addresses:
            self._entries[address] = _Entry(address, key_file)

    def connect(self, address: str, key_file: str | None = None) -> Client:
        """Add a worker and connect now (errors are raised, not recorded)."""
        entry = self._entries.get(address)
        if entry is not None and entry.client is not None:
            entry.client.close()
        entry = self._entries[address] = _Entry(address, key_file or self.key_file)
        entry.client = Client(
            address, key_file=entry.key_file, connect_timeout=self.connect_timeout
        )
        return entry.client

    def disconnect(self, address: str) -> bool:
        entry = self._entries.pop(address, None)
        if entry is None:
            return False
        if entry.client is not None:
            entry.client.close()
        return True

    def entries(self) -> list[tuple[str, Client | None, str]]:
        """(address, client or None, problem) for every known worker."""
        self._connect_pending()
        return [(e.address, e.client, e.problem) for e in self._entries.values()]

    def _connect_pending(self) -> None:
        for entry in self._entries.values():
            if entry.client is None:
                try:
                    entry.client = Client(
                        entry.address, key_file=entry.key_file, connect_timeout=self.connect_timeout
                    )
                    entry.problem = ""
                except Lan2GPUError as exc:
                    entry.problem = str(exc)

    def _start_embedded(self) -> None:
        self.embedded = EmbeddedWorker()
        address = self.embedded.start()
        client = Client(address, key_file=self.embedded.key_file, connect_timeout=60.0)
        self._entries[address] = _Entry(address, str(self.embedded.key_file), client)
        kind = "CUDA simulator" if client.info.simulator else client.info.describe()
        self._announce(
            f"lan2gpu: no worker configured; started a local worker on {address} ({kind}); "
            "it stops with this kernel."
        )

    def choose(self, req: Requirements) -> Client:
        """The client of the best worker for ``req`` (see :mod:`placement`)."""
        if not self._entries and self.allow_embedded:
            self._start_embedded()
        self._connect_pending()
        clients = {e.address: e.client for e in self._entries.values() if e.client is not None}
        candidates = [
            Candidate(
                name=c.info.name,
                address=address,
                simulator=c.info.simulator,
                gpus=tuple(str(g["name"]) for g in c.info.gpus),
            )
            for address, c in clients.items()
        ]
        try:
            choice = choose_worker(req, candidates)
        except Lan2GPUError as exc:
            problems = [f"{e.address}: {e.problem}" for e in self._entries.values() if e.problem]
            if problems:
                raise type(exc)(f"{exc}\nUnusable workers:\n  " + "\n  ".join(problems)) from None
            raise
        return clients[choice.address]

    def close(self) -> None:
        """Close every connection and stop the embedded worker. Idempotent."""
        for entry in self._entries.values():
            if entry.client is not None:
                entry.client.close()
                entry.client = None
        self._entries.clear()
        if self.embedded is not None:
            self.embedded.close()
            self.embedded = None


def workers_from_env() -> list[str]:
    """``$LAN2GPU_WORKERS``: a comma-separated list of addresses."""
    return [a.strip() for a in os.environ.get("LAN2GPU_WORKERS", "").split(",") if a.strip()]
