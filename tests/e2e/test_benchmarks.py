"""The benchmark's smoke version runs with the tests, so it cannot rot.

No timing is asserted: only that every system and section ran and produced numbers.
"""

from __future__ import annotations

from benchmarks.smoke import errors, run_smoke


def test_benchmark_smoke(tmp_path):
    tables = run_smoke(tmp_path)
    for section in ("## Trivial call", "## Array round trip", "## Same lan2gpu cell run twice"):
        assert section in tables
    for system in ("raw pyzmq", "lan2gpu", "ipyparallel", "Dask"):
        assert system in tables
    assert errors(tables) == []
