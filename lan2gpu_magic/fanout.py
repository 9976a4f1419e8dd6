"""Run the chunks of a split cell on several slots at once.

One thread per slot in use, each with a connection of its own leased from the
pool (a :class:`~lan2gpu_magic.client.Client` is used by one thread at a time).
The calling thread only schedules: chunk *i* starts on slot *i*; a chunk that
fails is tried once more on another slot (the first one free that it has not
tried); a slot whose worker was lost takes no more chunks. Ctrl-C in the calling
thread cancels every running chunk on its worker before it returns.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker_kernel.protocol.errors import (
    ExecutionCancelled,
    Lan2GPUError,
    ProtocolError,
    SplitError,
    TransportError,
    WorkerLost,
)
from worker_kernel.protocol.serialize import Payload

from . import pipeline
from .backend import Backend
from .placement import Placement
from .request import OutputHandlers
from .results import RunResult

_TICK = 0.2  # seconds between looks at the running chunks (and Ctrl-C)
_LINES = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+")  # pieces, each with its end


def _where(slot: Placement) -> str:
    return "+".join(f"gpu{g.index}" for g in slot.gpus) or "cpu"


def slot_label(slot: Placement) -> str:
    """``"w1 gpu0"``, ``"w1 gpu0+gpu1"``, ``"w1 cpu"``: for people."""
    return f"{slot.worker.name} {_where(slot)}"


def slot_key(slot: Placement) -> str:
    """``"tcp://10.0.0.7:7340 gpu0"``: tells slots apart (two workers may share a name)."""
    return f"{slot.worker.address} {_where(slot)}"


@dataclass(eq=False)
class Chunk:
    """One run of the cell: its rank, its rows, and what it sends."""

    rank: int
    piece: tuple[int, int]  # rows [start, stop) of the split arrays
    namespace: dict[str, Any]  # the cell's namespace as this chunk sees it
    payload: Payload
    tried: list[Placement] = field(default_factory=list)  # in order
    errors: list[Exception] = field(default_factory=list)
    result: RunResult | None = None
    slot: Placement | None = None  # where it succeeded

    @property
    def rows(self) -> int:
        return self.piece[1] - self.piece[0]


class PrefixedOutput:
    """A chunk's live output with ``[rank]`` at the start of every line."""

    def __init__(self, rank: int, write: Callable[[str, str], None]) -> None:
        self.prefix = f"[{rank}] "
        self._write = write
        self._line_start = {"stdout": True, "stderr": True}

    def stream(self, name: str, text: str) -> None:
        out = []
        for line in _LINES.findall(text):
            if self._line_start.get(name, True):
                out.append(self.prefix)
            out.append(line)
            # A bare \r starts the line over (progress bars): its prefix goes again.
            self._line_start[name] = line.endswith(("\n", "\r"))
        self._write(name, "".join(out))


class FanOut:
    """Schedules chunks on slots; :meth:`run` returns the results in chunk order."""

    def __init__(
        self,
        pool: Backend,
        slots: Sequence[Placement],
        chunks: Sequence[Chunk],
        cell: pipeline.Cell,
        *,
        write: Callable[[str, str], None],
        display: Callable[[dict[str, Any], dict[str, Any]], None],
        progress: Callable[[str], None],
        cancel: threading.Event | None = None,
        attempts: int = 2,
    ) -> None:
        self.pool = pool
        self.slots = list(slots)
        self.chunks = list(chunks)
        self.cell = cell
        self.write = write
        self.display = display
        self.progress = progress
        self.cancel = cancel or threading.Event()
        self.attempts = attempts
        self.sessions = {s.worker.address: pool.session_for(s.worker.address) for s in slots}

    def run(self) -> list[RunResult]:
        """Run every chunk; raise :class:`SplitError` if one failed on every try.

        A first Ctrl-C cancels the running chunks on their workers and waits for
        them to confirm (a few seconds); a second one stops waiting.
        """
        pending = deque(self.chunks)
        free = list(self.slots)
        failed: list[Chunk] = []
        running = 0
        # Daemon threads: a kernel shutting down must not wait for chunks.
        finished: queue.Queue[tuple[Chunk, Placement, RunResult | BaseException]] = queue.Queue()
        interrupted = False
        t0 = time.monotonic()
        try:
            while pending or running:
                for chunk in list(pending):
                    tried = {slot_key(s) for s in chunk.tried}
                    slot = next((s for s in free if slot_key(s) not in tried), None)
                    if slot is None or self.cancel.is_set():
                        continue
                    pending.remove(chunk)
                    free.remove(slot)
                    chunk.tried.append(slot)
                    running += 1
                    threading.Thread(
                        target=self._one,
                        args=(chunk, slot, finished),
                        name=f"lan2gpu-chunk-{chunk.rank}",
                        daemon=True,
                    ).start()
                if not running:  # nothing left that these chunks have not failed on
                    failed += pending
                    break
                self._show(len(failed), running)
                try:
                    chunk, slot, outcome = finished.get(timeout=_TICK)
                except queue.Empty:
                    continue
                except KeyboardInterrupt:
                    if interrupted:  # a second Ctrl-C: stop waiting for the workers
                        self.progress(
                            f"stopped waiting after {time.monotonic() - t0:.1f} s; {running} "
                            "chunk(s) may still be running on their workers; nothing was assigned"
                        )
                        raise
                    interrupted = True
                    self.cancel.set()  # each chunk asks its worker to stop, then reports
                    continue
                running -= 1
                if isinstance(outcome, RunResult):
                    chunk.result, chunk.slot = outcome, slot
                    free.append(slot)
                    continue
                if not isinstance(outcome, Exception):
                    raise outcome
                chunk.errors.append(outcome)
                if isinstance(outcome, TransportError):  # that host takes no more chunks
                    address = slot.worker.address
                    free = [s for s in free if s.worker.address != address]
                else:
                    free.append(slot)
                cancelled = isinstance(outcome, ExecutionCancelled) or self.cancel.is_set()
                # A worker silent past its stall grace may still finish the chunk.
                maybe_running = isinstance(outcome, WorkerLost) and not outcome.gone
                if len(chunk.errors) < self.attempts and not (cancelled or maybe_running):
                    pending.appendleft(chunk)
                else:
                    failed.append(chunk)
        except BaseException:
            self.cancel.set()  # whatever stops this loop, no chunk goes on running
            raise
        if interrupted:
            done = sum(c.result is not None for c in self.chunks)
            lost = any(getattr(e, "session_lost", False) for c in self.chunks for e in c.errors)
            sessions = "a worker's session is lost" if lost else "the sessions are intact"
            self.progress(
                f"cancelled after {time.monotonic() - t0:.1f} s: {done}/{len(self.chunks)} "
                f"chunks had finished; nothing was assigned, {sessions}"
            )
            raise KeyboardInterrupt
        self._show(len(failed), 0)
        if failed:
            raise self._error(failed)
        return [c.result for c in self.chunks if c.result is not None]

    def _one(self, chunk: Chunk, slot: Placement, finished: queue.Queue[Any]) -> None:
        """One try of one chunk on one slot (in a thread of its own); reports to ``finished``."""
        try:
            finished.put((chunk, slot, self._try(chunk, slot)))
        except BaseException as exc:  # reported, and raised there if not an Exception
            finished.put((chunk, slot, exc))

    def _try(self, chunk: Chunk, slot: Placement) -> RunResult:
        client = self.pool.lease(slot.worker.address)
        healthy = True
        try:
            out = PrefixedOutput(chunk.rank, self.write)
            handlers = OutputHandlers(stream=out.stream, display=self.display)
            result = pipeline.execute(
                self.cell,
                chunk.payload,
                lambda lost: (client, slot),
                lambda _: handlers,
                session=lambda c: self.sessions[slot.worker.address],
                cancel=self.cancel,
            )
            if result.error is not None:  # the cell raised (after binding some names)
                raise result.error
            return result
        except (TransportError, ProtocolError):
            healthy = False  # the connection is in doubt: do not reuse it
            raise
        finally:
            self.pool.give_back(client, healthy)

    def _show(self, failed: int, running: int) -> None:
        done = sum(c.result is not None for c in self.chunks)
        text = f"{done}/{len(self.chunks)} chunks done on {len(self.slots)} slot(s)"
        if running:
            text += f", {running} running"
        retried = sum(len(c.tried) > 1 for c in self.chunks)
        if retried:
            text += f", {retried} retried"
        if failed:
            text += f", {failed} failed"
        self.progress(text)

    def _error(self, failed: list[Chunk]) -> SplitError:
        first = failed[0]
        if first.errors:
            last: Exception = first.errors[-1]
        elif self.cancel.is_set():
            last = ExecutionCancelled("cancelled before it started")
        else:
            last = Lan2GPUError("no working slot left that it had not failed on")
        tries = ", then ".join(map(slot_label, first.tried)) or "no slot"
        others = len(failed) - 1
        group = ExceptionGroup(
            f"{len(failed)} of {len(self.chunks)} chunk(s) failed",
            [c.errors[-1] for c in failed if c.errors] or [last],
        )
        worker = first.tried[-1].worker.name if first.tried else ""
        message = (
            f"chunk {first.rank} of {len(self.chunks)} (rows {first.piece[0]}:{first.piece[1]}) "
            f"failed on {tries}: {type(last).__name__}: {(str(last).splitlines() or [''])[0]}"
        )
        if others:
            message += f" ({others} other chunk(s) failed too; see the errors below)"
        if self.cancel.is_set():
            message += ". The cell was cancelled; nothing was assigned in the notebook."
        else:
            message += (
                ". Nothing was assigned in the notebook; fix the cell or the worker and run it "
                "again."
            )
        return SplitError(message, worker, first.rank, group)
