"""Step 3: choose a worker for a cell. Pure: data in, a choice (or an error) out.

Policy, in order:

1. Hard requirements filter: a requested worker (by name or address) must match.
2. Real GPUs before the CUDA simulator: a lab never sends work to a simulator
   when a real GPU worker fits.
3. Shorter queue first, then lower round-trip latency.
4. Name, then address: a stable tie-break, so the same cell lands on the same
   worker (and finds its session there) run after run.

No match raises :class:`NoWorkerAvailable` listing what was asked and what each
known worker offers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NoWorkerAvailable


@dataclass(frozen=True)
class Requirements:
    worker: str | None = None  # a worker name or address


@dataclass(frozen=True)
class Candidate:
    name: str
    address: str
    simulator: bool
    gpus: tuple[str, ...] = ()
    queue: int = 0
    latency: float = 0.0

    def describe(self) -> str:
        kind = "simulator" if self.simulator else ", ".join(self.gpus) or "no GPU"
        return f"{self.name} ({self.address}: {kind}, queue {self.queue})"


def _matches(req: Requirements, c: Candidate) -> bool:
    return req.worker is None or req.worker in (c.name, c.address)


def choose_worker(req: Requirements, workers: Sequence[Candidate]) -> Candidate:
    """The best candidate for ``req`` (policy above)."""
    fitting = [c for c in workers if _matches(req, c)]
    if not fitting:
        asked = f"worker {req.worker!r}" if req.worker else "any worker"
        known = "; ".join(c.describe() for c in workers) or "none"
        raise NoWorkerAvailable(
            f"no worker matches: asked for {asked}; known workers: {known}. "
            "Connect one with `%lan2gpu connect ADDRESS`, or list them with `%lan2gpu workers`."
        )
    return min(fitting, key=lambda c: (c.simulator, c.queue, c.latency, c.name, c.address))
