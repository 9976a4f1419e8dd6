"""A child's stdout and stderr into the worker's log: cut short, rate-limited, and
never in the way of noticing that the child ended."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest

from worker_kernel import child_output
from worker_kernel.child_output import BURST, MAX_LINE, _Relay


def test_a_flood_is_a_burst_of_lines_then_one_summary(caplog):
    caplog.set_level(logging.INFO, logger=child_output.__name__)
    relay = _Relay("executor 1")
    now = 1000.0
    relay.feed(b"x" * 5000 + b"\n", now)  # one long line: cut, its length said
    relay.feed(b"line\n" * 10_000, now)  # same instant: no refill
    relay.feed(b"no end " * 10, now)
    relay.close(now)
    messages = [r.getMessage() for r in caplog.records]
    logged = [m for m in messages if m.startswith("executor 1: ") and "more lines" not in m]
    assert len(logged) == BURST
    assert len(logged[0]) < MAX_LINE + 100 and "(5000 bytes)" in logged[0]
    (summary,) = [m for m in messages if "more lines of output" in m]
    assert f"{10_000 + 1 - (BURST - 1)} more lines" in summary  # the unended one too


def test_the_budget_refills_with_time(caplog):
    caplog.set_level(logging.INFO, logger=child_output.__name__)
    relay = _Relay("kernel k")
    relay.feed(b"a\n" * (BURST + 50), 0.0)
    relay.feed(b"b\n" * 30, 1.0)  # 20 lines a second come back
    relay.close(1.0)
    later = [r.getMessage() for r in caplog.records if r.getMessage() == "kernel k: b"]
    assert len(later) == 20


def test_a_child_that_leaves_a_process_behind_is_seen_to_end(caplog):
    caplog.set_level(logging.INFO, logger=child_output.__name__)

    async def main() -> tuple[float, float]:
        process, output = await child_output.spawn(
            "executor", "sh", "-c", "sleep 60 & echo started", start_new_session=True
        )
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(process.wait(), 10)  # the sleep still holds the pipe
            waited = time.monotonic() - t0
            t1 = time.monotonic()
            await output.close(grace=0.5)
            return waited, time.monotonic() - t1
        finally:
            os.killpg(process.pid, signal.SIGKILL)

    waited, closed = asyncio.run(main())
    assert waited < 5 and closed < 3
    assert any(r.getMessage().endswith(": started") for r in caplog.records)


def test_a_failed_spawn_leaves_no_descriptor_open():
    before = len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        with pytest.raises(FileNotFoundError):
            await child_output.spawn("executor", "/nonexistent")

    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_process_that_is_no_subreaper_never_reaps_its_children():
    """Only the worker's service (a subreaper) takes unknown children for orphans: in any
    other process, its own children are left alone."""
    import subprocess
    import sys

    from worker_kernel import reaper

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert reaper.reap() == []
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
