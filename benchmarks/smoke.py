"""The smoke run for the test suite: ``run_smoke(tmp_path)`` runs ``--quick``.

It runs ``python -m benchmarks.run --quick`` as a subprocess (its own IPython
shell, Dask cluster and signal handlers stay out of the test process) and
returns what it printed: the markdown tables. It needs no root: without it the
LAN section says it was skipped. It asserts nothing about timings; a test can
check that every section is there and that :func:`errors` finds nothing::

    from benchmarks.smoke import errors, run_smoke

    def test_benchmark_smoke(tmp_path):
        tables = run_smoke(tmp_path)
        assert "## Array round trip" in tables
        assert errors(tables) == []
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .procs import REPO

DEADLINE = 240.0  # the quick run takes about 20 s on 2 cores; this only stops a hang


class SmokeFailed(RuntimeError):
    pass


def run_smoke(tmp_path: Path, *extra: str) -> str:
    """Run the quick benchmark (plus ``extra`` options); return its stdout (the tables)."""
    work = Path(tmp_path) / "benchmark"
    argv = [sys.executable, "-m", "benchmarks.run", "--quick", "--work-dir", str(work), *extra]
    try:
        done = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=DEADLINE, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SmokeFailed(f"`{' '.join(argv)}` did not finish within {DEADLINE:.0f} s") from exc
    if done.returncode != 0:
        raise SmokeFailed(
            f"`{' '.join(argv)}` exited with {done.returncode}\n"
            f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}\n"
            f"(logs of the processes it started: {work})"
        )
    return done.stdout


def errors(tables: str) -> list[str]:
    """Table lines that report a failed measurement instead of figures."""
    return [line for line in tables.splitlines() if "error (" in line or "- error:" in line]
