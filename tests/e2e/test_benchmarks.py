"""The benchmark's smoke version runs with the tests, so it cannot rot.

No timing is asserted: only that every system and section ran and produced numbers.
"""

from __future__ import annotations

from benchmarks.smoke import errors, run_smoke


def test_benchmark_smoke(tmp_path):
    tables = run_smoke(tmp_path)
    for section in ("## Trivial call", "## Array round trip", "## Same lan2gpu cell run twice",
                    "## Many clients on one worker"):  # fmt: skip
        assert section in tables
    for system in ("raw pyzmq", "lan2gpu", "ipyparallel", "Dask"):
        assert system in tables
    assert errors(tables) == []
    crowd = tables.split("## Many clients on one worker", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.split("|")
        for line in crowd.splitlines()
        if line.startswith("| ") and "clients" not in line
    ]
    assert [r[1].strip() for r in rows] == ["2", "4"], crowd
    assert all(r[6].strip() == "0" for r in rows), crowd  # no result wrong or lost
