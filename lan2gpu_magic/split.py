"""Split a cell's input arrays into chunks, and gather the chunks' outputs. Pure.

``%%lan2gpu --split x,y:1 --gather out:concat,total:sum`` runs the cell once per
chunk: ``x`` is cut along axis 0 and ``y`` along axis 1 into consecutive,
near-equal (or weighted) pieces, one per slot. Each output is then combined by
its rule:

- ``concat``: along the split axis, in chunk order (the default for an array
  whose length along that axis is its chunk's length; when the split arrays are
  cut along different axes, along the one axis where every chunk's array has
  its chunk's length);
- ``sum``, ``min``, ``max``: element-wise over the chunks (numbers or arrays);
- ``list``: one value per chunk, in chunk order (the default otherwise).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigurationError, SerializationError

RULES = ("concat", "sum", "min", "max", "list")
_REDUCE: dict[str, Callable[[Any, Any], Any]] = {
    "sum": operator.add,
    "min": np.minimum,
    "max": np.maximum,
}


@dataclass(frozen=True)
class SplitSpec:
    name: str
    axis: int = 0


def parse_split(text: str) -> list[SplitSpec]:
    """``"x,y:1"`` -> ``[SplitSpec("x", 0), SplitSpec("y", 1)]``."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        name, _, axis = item.partition(":")
        try:
            number = int(axis or 0)
        except ValueError:
            number = None
        if not name.isidentifier() or number is None:
            raise ConfigurationError(
                f"--split {text!r}: write names, each optionally with an axis, like x,y:1"
            )
        specs.append(SplitSpec(name, number))
    if len({s.name for s in specs}) != len(specs):
        raise ConfigurationError(f"--split {text!r} names a variable twice")
    return specs


def parse_gather(text: str | None) -> dict[str, str]:
    """``"out:concat,total:sum"`` -> ``{"out": "concat", "total": "sum"}``."""
    rules: dict[str, str] = {}
    for item in (part.strip() for part in (text or "").split(",") if part.strip()):
        name, _, rule = item.partition(":")
        if not name.isidentifier() or rule not in RULES:
            raise ConfigurationError(
                f"--gather {text!r}: write NAME:RULE pairs, RULE one of {', '.join(RULES)}"
            )
        rules[name] = rule
    return rules


def split_length(specs: Sequence[SplitSpec], namespace: Mapping[str, Any]) -> int:
    """The common length of the split arrays along their axes (checked)."""
    lengths: dict[str, int] = {}
    for spec in specs:
        if spec.name not in namespace:
            raise ConfigurationError(f"--split {spec.name}: no variable of that name here")
        value = namespace[spec.name]
        shape = getattr(value, "shape", None)
        if not isinstance(value, np.ndarray) or shape is None:
            raise ConfigurationError(
                f"--split {spec.name}: it is a {type(value).__name__}, not a numpy array; "
                "split arrays only (other inputs are sent whole)"
            )
        if not shape:
            raise ConfigurationError(
                f"--split {spec.name}: it is a 0-dimensional array (one value), with no axis "
                "to split along; split arrays of one dimension or more"
            )
        if not -len(shape) <= spec.axis < len(shape):
            raise ConfigurationError(
                f"--split {spec.name}:{spec.axis}: the array has {len(shape)} dimension(s)"
            )
        lengths[spec.name] = int(shape[spec.axis])
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{n} has {k}" for n, k in lengths.items())
        raise ConfigurationError(
            f"--split: the arrays must have the same length along their split axes ({listed})"
        )
    return next(iter(lengths.values()))


def bounds(length: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` pieces of ``range(length)``, sized by ``weights``.

    Never more pieces than rows (one empty piece for an empty array), every piece
    non-empty, sizes proportional to the weights (largest remainders).
    """
    if not weights:
        raise ValueError("no chunks to split into")
    n = max(1, min(len(weights), length))
    w = [max(float(x), 0.0) for x in weights[:n]]
    if not sum(w):
        w = [1.0] * n
    exact = [length * x / sum(w) for x in w]
    sizes = [int(e) for e in exact]
    for i in sorted(range(n), key=lambda i: sizes[i] - exact[i])[: length - sum(sizes)]:
        sizes[i] += 1
    for i in range(n):
        if length and not sizes[i]:  # a tiny weight still gets a row, from the largest
            sizes[max(range(n), key=sizes.__getitem__)] -= 1
            sizes[i] += 1
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def take(value: np.ndarray, axis: int, piece: tuple[int, int]) -> np.ndarray:
    """The piece of ``value`` along ``axis`` (a view, no copy)."""
    index: list[slice] = [slice(None)] * value.ndim
    index[axis] = slice(*piece)
    return value[tuple(index)]


def _fitting_axes(values: Sequence[Any], lengths: Sequence[int], axes: Sequence[int]) -> list[int]:
    """The split axes along which every chunk's value is an array as long as its chunk."""
    return [
        axis
        for axis in axes
        if all(
            isinstance(v, np.ndarray) and v.ndim > axis and v.shape[axis] == n
            for v, n in zip(values, lengths, strict=True)
        )
    ]


def default_rule(values: Sequence[Any], lengths: Sequence[int], axes: Sequence[int]) -> str:
    """``concat`` when every chunk's value is an array as long as its chunk along
    one of the split ``axes`` (exactly one), else ``list``."""
    return "concat" if len(_fitting_axes(values, lengths, axes)) == 1 else "list"


def concat_axis(
    name: str, values: Sequence[Any], lengths: Sequence[int], axes: Sequence[int]
) -> int:
    """The axis to join ``name``'s chunks along: the split axis, or, when the split
    arrays were cut along different axes, the one where the chunks fit."""
    if len(axes) == 1:
        return axes[0]
    fits = _fitting_axes(values, lengths, axes)
    if len(fits) != 1:
        which = "more than one" if fits else "none"
        raise SerializationError(
            f"--gather {name}:concat: the split arrays are cut along axes "
            f"{', '.join(map(str, axes))}, and {which} of them is one along which every "
            f"chunk's `{name}` is as long as its chunk; gather it with {name}:list and join "
            "the pieces in the notebook",
            name,
        )
    return fits[0]


def gather(name: str, rule: str, values: Sequence[Any], axis: int) -> Any:
    """Combine one output's per-chunk values by ``rule``."""
    if rule == "list":
        return list(values)
    if rule == "concat":
        if not all(isinstance(v, np.ndarray) and v.ndim > axis for v in values):
            kinds = ", ".join(sorted({type(v).__name__ for v in values}))
            raise SerializationError(
                f"--gather {name}:concat needs arrays with an axis {axis} from every chunk, "
                f"got {kinds}; use {name}:list (or sum, min, max)",
                name,
            )
        try:
            return np.concatenate(values, axis=axis)
        except ValueError as exc:
            raise SerializationError(
                f"--gather {name}:concat: the chunks' arrays do not fit together: {exc}", name
            ) from None
    try:
        return functools.reduce(_REDUCE[rule], values)
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"--gather {name}:{rule}: the chunks' values cannot be combined: {exc}", name
        ) from None


_MISSING = object()
RANK, SIZE = "lan2gpu_rank", "lan2gpu_size"  # defined in every chunk's namespace


def combine(
    outputs: Sequence[Mapping[str, Any]],
    lengths: Sequence[int],
    rules: Mapping[str, str],
    axes: Sequence[int],
) -> dict[str, Any]:
    """Every name the chunks bound, gathered by its rule (``rules``, else the default).

    ``outputs`` and ``lengths`` are per chunk, in chunk order; ``axes`` are the
    (distinct, non-negative) axes the split arrays were cut along.
    """
    names = list(dict.fromkeys(n for out in outputs for n in out if n not in (RANK, SIZE)))
    for name in rules:
        if name not in names:
            raise SerializationError(
                f"--gather {name}: no chunk bound `{name}`; check the name, or bind it in the cell",
                name,
            )
    gathered: dict[str, Any] = {}
    for name in names:
        values = [out.get(name, _MISSING) for out in outputs]
        rule = rules.get(name)
        if any(v is _MISSING for v in values):  # `in` would compare arrays
            if rule not in (None, "list"):
                lacking = [str(i) for i, v in enumerate(values) if v is _MISSING]
                raise SerializationError(
                    f"--gather {name}:{rule}: chunk(s) {', '.join(lacking)} did not bind "
                    f"`{name}`; bind it in every chunk, or gather it with {name}:list",
                    name,
                )
            values = [None if v is _MISSING else v for v in values]
            rule = "list"
        rule = rule or default_rule(values, lengths, axes)
        axis = concat_axis(name, values, lengths, axes) if rule == "concat" else axes[0]
        gathered[name] = gather(name, rule, values, axis)
    return gathered
