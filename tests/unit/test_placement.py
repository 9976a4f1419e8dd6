"""Choosing a worker: hard filters, then real GPUs, queue, latency, stable names."""

from __future__ import annotations

import pytest

from lan2gpu_magic.errors import NoWorkerAvailable
from lan2gpu_magic.placement import Candidate, Requirements, choose_worker

SIM = Candidate("sim", "tcp://h1:1", simulator=True)
GPU_BUSY = Candidate("gpu-a", "tcp://h2:1", simulator=False, gpus=("A100",), queue=3)
GPU_IDLE = Candidate("gpu-b", "tcp://h3:1", simulator=False, gpus=("A100",), queue=0)


def test_real_gpu_beats_simulator_and_idle_beats_busy():
    assert choose_worker(Requirements(), [SIM, GPU_BUSY, GPU_IDLE]) == GPU_IDLE
    assert choose_worker(Requirements(), [SIM, GPU_BUSY]) == GPU_BUSY


def test_by_name_or_address():
    assert choose_worker(Requirements(worker="sim"), [SIM, GPU_IDLE]) == SIM
    assert choose_worker(Requirements(worker="tcp://h2:1"), [SIM, GPU_BUSY]) == GPU_BUSY


def test_ties_break_by_name_whatever_the_order():
    a = Candidate("a", "tcp://x:1", simulator=False)
    b = Candidate("b", "tcp://x:2", simulator=False)
    assert choose_worker(Requirements(), [b, a]) == a
    assert choose_worker(Requirements(), [a, b]) == a


def test_no_match_lists_what_was_asked_and_what_exists():
    with pytest.raises(NoWorkerAvailable, match=r"'gpu-z'.*sim \(tcp://h1:1: simulator"):
        choose_worker(Requirements(worker="gpu-z"), [SIM])
    with pytest.raises(NoWorkerAvailable, match="known workers: none"):
        choose_worker(Requirements(), [])
