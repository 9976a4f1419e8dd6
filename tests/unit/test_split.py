"""Splitting inputs, gathering outputs, choosing slots, prefixing output: pure parts."""

from __future__ import annotations

import numpy as np
import pytest

from lan2gpu_magic.errors import ConfigurationError, NoWorkerAvailable, SerializationError
from lan2gpu_magic.fanout import PrefixedOutput, slot_label
from lan2gpu_magic.placement import GpuView, Requirements, WorkerView, choose_slots
from lan2gpu_magic.split import (
    SplitSpec,
    bounds,
    combine,
    default_rule,
    gather,
    parse_gather,
    parse_split,
    split_length,
    take,
)


def test_parse_split_and_gather() -> None:
    assert parse_split("x, y:1") == [SplitSpec("x", 0), SplitSpec("y", 1)]
    assert parse_gather("out:concat,total:sum") == {"out": "concat", "total": "sum"}
    assert parse_gather(None) == {}
    assert parse_split("x:-1") == [SplitSpec("x", -1)]
    for bad in ("x,x", "1x", "x:a", "x:--1", "x:\u00b2"):
        with pytest.raises(ConfigurationError, match="--split"):
            parse_split(bad)
    with pytest.raises(ConfigurationError, match="RULE one of"):
        parse_gather("out:mean")


@pytest.mark.parametrize(
    ("length", "weights", "expected"),
    [
        (10, [1, 1, 1], [(0, 4), (4, 7), (7, 10)]),
        (2, [1, 1, 1], [(0, 1), (1, 2)]),  # never more chunks than rows
        (0, [1, 1], [(0, 0)]),  # an empty array: one empty chunk
        (10, [3, 1], [(0, 8), (8, 10)]),  # weighted
        (5, [100, 1], [(0, 4), (4, 5)]),  # every chunk gets a row
        (7, [0, 0], [(0, 4), (4, 7)]),  # no weight known: equal
        (100, [1, 2, 3, 4], [(0, 10), (10, 30), (30, 60), (60, 100)]),
    ],
)
def test_bounds_cover_every_row_once(length, weights, expected) -> None:
    assert bounds(length, weights) == expected


def test_take_cuts_views_along_the_axis() -> None:
    m = np.arange(24).reshape(4, 6)
    piece = take(m, 1, (2, 4))
    assert np.shares_memory(piece, m) and piece.tolist() == m[:, 2:4].tolist()


def test_split_length_checks_what_it_splits() -> None:
    ns = {"a": np.zeros((4, 3)), "b": np.zeros(4), "c": np.zeros(3), "s": [1, 2]}
    assert split_length([SplitSpec("a"), SplitSpec("b")], ns) == 4
    assert split_length([SplitSpec("a", 1), SplitSpec("c")], ns) == 3
    with pytest.raises(ConfigurationError, match="same length"):
        split_length([SplitSpec("a"), SplitSpec("c")], ns)
    with pytest.raises(ConfigurationError, match="not a numpy array"):
        split_length([SplitSpec("s")], ns)
    with pytest.raises(ConfigurationError, match="0-dimensional array"):
        split_length([SplitSpec("z")], {"z": np.array(1.0)})
    with pytest.raises(ConfigurationError, match="2 dimension"):
        split_length([SplitSpec("a", 2)], ns)
    with pytest.raises(ConfigurationError, match="no variable"):
        split_length([SplitSpec("zzz")], ns)


def test_gather_rules() -> None:
    parts = [np.arange(3), np.arange(3, 5)]
    assert gather("o", "concat", parts, 0).tolist() == [0, 1, 2, 3, 4]
    assert gather("o", "sum", [1, 2, 3], 0) == 6
    assert gather("o", "min", [np.array([1, 5]), np.array([3, 2])], 0).tolist() == [1, 2]
    assert gather("o", "max", [4.0, 7.0], 0) == 7.0
    assert gather("o", "list", ["a", "b"], 0) == ["a", "b"]
    with pytest.raises(SerializationError, match="o:list"):
        gather("o", "concat", [1, 2], 0)
    with pytest.raises(SerializationError, match="do not fit"):
        gather("o", "concat", [np.zeros((2, 2)), np.zeros((2, 3))], 0)
    assert default_rule(parts, [3, 2], [0]) == "concat"
    assert default_rule([np.zeros(1), np.zeros(1)], [3, 2], [0]) == "list"
    assert default_rule([1.0, 2.0], [3, 2], [0]) == "list"


def test_outputs_of_arrays_split_along_different_axes_join_where_they_fit() -> None:
    # x was cut along axis 0 and y along axis 1, into chunks of 2 and 1 rows.
    rows = [2, 1]
    along_1 = [np.zeros((3, 2)), np.ones((3, 1))]  # e.g. y * 2
    along_0 = [np.zeros(2), np.ones(1)]  # e.g. x + 1
    assert combine([{"o": v} for v in along_1], rows, {}, [0, 1])["o"].shape == (3, 3)
    assert combine([{"o": v} for v in along_0], rows, {}, [0, 1])["o"].tolist() == [0, 0, 1]
    explicit = combine([{"o": v} for v in along_1], rows, {"o": "concat"}, [0, 1])["o"]
    assert explicit.shape == (3, 3)  # not (6, 2) or (4, ...): along the axis that fits
    both = [np.zeros((2, 2)), np.ones((1, 1))]  # fits axis 0 and axis 1 alike
    assert default_rule(both, rows, [0, 1]) == "list"
    with pytest.raises(SerializationError, match="gather it with o:list"):
        combine([{"o": v} for v in both], rows, {"o": "concat"}, [0, 1])


def test_combine_uses_rules_then_defaults_and_names_what_is_missing() -> None:
    outs = [
        {"y": np.arange(2), "t": 1, "lan2gpu_rank": 0},
        {"y": np.arange(2, 3), "t": 2, "only": "here"},
    ]
    got = combine(outs, [2, 1], {"t": "sum"}, [0])
    assert got["y"].tolist() == [0, 1, 2] and got["t"] == 3
    assert got["only"] == [None, "here"] and "lan2gpu_rank" not in got
    with pytest.raises(SerializationError, match=r"chunk\(s\) 0 did not bind `only`"):
        combine(outs, [2, 1], {"only": "max"}, [0])
    with pytest.raises(SerializationError, match="no chunk bound `nope`"):
        combine(outs, [2, 1], {"nope": "sum"}, [0])


def _gpu(index: int, queue: int = 0) -> GpuView:
    return GpuView(index, "RTX", (8, 6), 8 << 30, 8 << 30, queue=queue)


def test_slots_spread_over_hosts_first_and_honour_the_requirements() -> None:
    a = WorkerView("a", "tcp://a:1", False, (_gpu(0), _gpu(1, queue=2), _gpu(2)))
    b = WorkerView("b", "tcp://b:1", False, (_gpu(0),))
    sim = WorkerView("sim", "tcp://s:1", True, (_gpu(0),))
    labels = [slot_label(p) for p in choose_slots(Requirements(), [a, b, sim], None)]
    assert labels == ["a gpu0", "b gpu0", "a gpu2", "a gpu1"]  # no simulator: real GPUs known
    two = choose_slots(Requirements(), [a, b], 2)
    assert [slot_label(p) for p in two] == ["a gpu0", "b gpu0"]
    pairs = choose_slots(Requirements(gpus=2), [a, b], None)
    assert [slot_label(p) for p in pairs] == ["a gpu0+gpu2"]
    cpu = choose_slots(Requirements(cpu=True), [a, sim], None)
    assert [slot_label(p) for p in cpu] == ["a cpu", "sim cpu"]
    with pytest.raises(NoWorkerAvailable):
        choose_slots(Requirements(gpu="H100"), [a, b], None)


def test_output_is_prefixed_with_the_rank_at_every_line_start() -> None:
    written: list[tuple[str, str]] = []
    out = PrefixedOutput(2, lambda name, text: written.append((name, text)))
    out.stream("stdout", "one\ntw")
    out.stream("stdout", "o\nthree\n")
    out.stream("stderr", "oops\n")
    assert "".join(t for n, t in written if n == "stdout") == "[2] one\n[2] two\n[2] three\n"
    assert written[-1] == ("stderr", "[2] oops\n")
    out.stream("stdout", "10%\r50%\r100%\r\ndone\r\n")  # a progress bar redrawn in place
    assert written[-1] == ("stdout", "[2] 10%\r[2] 50%\r[2] 100%\r\n[2] done\r\n")
