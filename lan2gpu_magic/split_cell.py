"""A ``--split`` cell from start to end: slots, chunks, the fan-out, the gathering.

:func:`prepare` does everything that reads the notebook (the split arrays, the
inputs, placement) in the calling thread; :meth:`SplitCell.run` then only talks
to workers, so it can also run in the background (``--async``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from worker_kernel.protocol.serialize import Payload, dump_values

from .backend import Backend
from .errors import ConfigurationError
from .fanout import Chunk, FanOut, slot_key
from .pipeline import Cell
from .placement import Requirements
from .results import RunResult
from .split import (
    RANK,
    SIZE,
    SplitSpec,
    bounds,
    combine,
    parse_gather,
    parse_split,
    split_length,
    take,
)

_SPEED_MEMORY = 0.5  # weight of the newest measurement in a slot's speed


@dataclass(frozen=True)
class SplitOptions:
    """How a ``--split`` cell is cut and put together again."""

    split: str  # --split: the arrays (and axes) cut into chunks
    gather: str | None = None  # --gather: how outputs are put together
    slots: int | None = None  # --workers N; None: every matching slot
    balance: bool = False  # --balance: chunks sized by each slot's measured speed


@dataclass
class SplitCell:
    fanout: FanOut
    specs: list[SplitSpec]
    rules: dict[str, str]
    chunks: list[Chunk]
    speeds: MutableMapping[str, float] = field(default_factory=dict)

    def run(self) -> RunResult:
        """Run every chunk and gather their outputs (raises SplitError on failure)."""
        results = self.fanout.run()
        self._learn_speeds()
        outputs = combine(
            [r.outputs for r in results],
            [c.rows for c in self.chunks],
            self.rules,
            sorted({s.axis for s in self.specs}),
        )
        deleted = {n for r in results for n in r.deleted if n not in outputs}
        has_value = any(r.has_value for r in results)
        return RunResult(
            worker=", ".join(dict.fromkeys(r.worker for r in results)),
            outputs=outputs,
            deleted=tuple(sorted(deleted)),
            skipped={name: why for r in results for name, why in r.skipped.items()},
            value=[r.value for r in results] if has_value else None,
            has_value=has_value,
        )

    def _learn_speeds(self) -> None:
        for chunk in self.chunks:
            seconds = float(chunk.result.stats.get("seconds", 0.0)) if chunk.result else 0.0
            if chunk.slot is None or seconds <= 0 or not chunk.rows:
                continue
            key, speed = slot_key(chunk.slot), chunk.rows / seconds
            old = self.speeds.get(key)
            self.speeds[key] = speed if old is None else old + _SPEED_MEMORY * (speed - old)


def prepare(
    pool: Backend,
    cell: Cell,
    spec: SplitOptions,
    namespace: dict[str, Any],
    req: Requirements,
    *,
    speeds: MutableMapping[str, float],
    write: Callable[[str, str], None],
    display: Callable[[dict[str, Any], dict[str, Any]], None],
    progress: Callable[[str], None],
    cancel: threading.Event | None = None,
    copy: bool = False,
) -> SplitCell:
    """Choose slots, cut the split arrays and serialize every chunk's inputs.

    ``copy``: copy the inputs now (a background cell must not see later changes).
    """
    specs = parse_split(spec.split)
    rules = parse_gather(spec.gather)
    length = split_length(specs, namespace)
    # Negative axes counted from the end, as numpy does; gathering needs them positive.
    specs = [SplitSpec(s.name, s.axis % namespace[s.name].ndim) for s in specs]
    cancel = cancel or threading.Event()  # Ctrl-C in the calling thread sets it
    unread = [s.name for s in specs if s.name not in cell.plan.inputs]
    if unread:
        raise ConfigurationError(
            f"--split {', '.join(unread)}: the cell does not read it, so there is nothing "
            "to split; split the arrays the cell works on"
        )
    slots = pool.slots(req, spec.slots, cell.session)
    if spec.balance:
        known = [speeds[slot_key(s)] for s in slots if slot_key(s) in speeds]
        guess = sum(known) / len(known) if known else 1.0  # unmeasured slots: the mean
        weights = [speeds.get(slot_key(s), guess) for s in slots]
    else:
        weights = [1.0] * len(slots)
    pieces = bounds(length, weights)
    slots = slots[: len(pieces)]  # no more chunks than rows
    split_names = {s.name for s in specs}
    # The inputs every chunk shares are serialized (and, for --async, copied) once.
    shared, _ = dump_values(
        {n: namespace[n] for n in cell.plan.inputs if n not in split_names | {RANK, SIZE}},
        namespace=namespace,
    )
    if copy:
        shared = shared.copied()
    chunks = []
    for rank, piece in enumerate(pieces):
        # The rank and size always go: a function the cell calls may read them.
        own: dict[str, Any] = {s.name: take(namespace[s.name], s.axis, piece) for s in specs}
        own[RANK], own[SIZE] = rank, len(pieces)
        payload, _ = dump_values(own, namespace=namespace)
        if copy:
            payload = payload.copied()
        both = Payload(shared.entries + payload.entries, shared.frames + payload.frames)
        chunks.append(Chunk(rank, piece, {}, both))

    fanout = FanOut(
        pool,
        slots,
        chunks,
        cell,
        write=write,
        display=display,
        progress=progress,
        cancel=cancel,
    )
    return SplitCell(fanout, specs, rules, chunks, speeds)
