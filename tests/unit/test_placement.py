"""Placement policy on plain data: many shapes of fleets."""

from __future__ import annotations

import pytest

from lan2gpu_magic.errors import ConfigurationError, NoWorkerAvailable
from lan2gpu_magic.placement import GpuView, Requirements, WorkerView, choose_worker, parse_cc

GB = 2**30


def gpu(
    index=0, name="NVIDIA A100 80GB", cc=(8, 0), total=80, free=80, util=0.0, queue=0, sim=False
):
    return GpuView(index, name, cc, total * GB, free * GB, util, queue, sim)


def worker(name, *gpus, address=None, sim=False, cpus=16, load=0.0, cpu_queue=0, latency=0.001):
    return WorkerView(
        name, address or f"tcp://{name}:7340", sim, tuple(gpus), cpus, load, cpu_queue, latency
    )


def sim(name="sim", n=1):
    return worker(
        name, *(gpu(i, "CUDA simulator", (5, 0), 32, 30, sim=True) for i in range(n)), sim=True
    )


def place(fleet, **req):
    return choose_worker(Requirements(**req), fleet)


def test_idle_gpu_beats_a_busy_one_with_more_memory():
    fleet = [worker("a", gpu(free=79, queue=2)), worker("b", gpu(free=40))]
    assert place(fleet).worker.name == "b"


def test_same_queue_more_free_memory_wins_then_utilization_then_latency():
    fleet = [worker("a", gpu(free=40)), worker("b", gpu(free=70))]
    assert place(fleet).worker.name == "b"
    fleet = [worker("a", gpu(free=70, util=90)), worker("b", gpu(free=70, util=10))]
    assert place(fleet).worker.name == "b"
    fleet = [worker("a", gpu(), latency=0.01), worker("b", gpu(), latency=0.002)]
    assert place(fleet).worker.name == "b"


def test_ties_break_by_name_whatever_the_order():
    a, b = worker("a", gpu()), worker("b", gpu())
    assert place([b, a]).worker.name == "a"
    assert place([a, b]).worker.name == "a"


def test_gpu_pattern_is_a_case_insensitive_regex():
    fleet = [worker("old", gpu(name="Tesla V100-SXM2-32GB", cc=(7, 0), total=32, free=32)),
             worker("new", gpu(name="NVIDIA H100 80GB HBM3", cc=(9, 0)))]  # fmt: skip
    assert place(fleet, gpu="a100|h100").worker.name == "new"
    assert place(fleet, gpu="V100").worker.name == "old"
    with pytest.raises(NoWorkerAvailable, match="named like 'A40'"):
        place(fleet, gpu="A40")
    with pytest.raises(ConfigurationError, match="not a valid pattern"):
        place(fleet, gpu="(")


def test_min_memory_counts_free_memory_and_picks_the_right_gpu_on_a_host():
    box = worker("box", gpu(0, free=10), gpu(1, free=50), gpu(2, free=45))
    chosen = place([box], min_memory=40 * GB)
    assert [g.index for g in chosen.gpus] == [1]
    with pytest.raises(NoWorkerAvailable, match="with 60 GiB free"):
        place([box], min_memory=60 * GB)


def test_min_compute_capability():
    fleet = [worker("v100", gpu(cc=(7, 0))), worker("a100", gpu(cc=(8, 0), free=10))]
    assert place(fleet, min_cc=(8, 0)).worker.name == "a100"
    assert place(fleet, min_cc=(7, 5)).worker.name == "a100"
    with pytest.raises(NoWorkerAvailable, match=r"compute capability >= 9\.0"):
        place(fleet, min_cc=(9, 0))


def test_several_gpus_must_come_from_one_host():
    fleet = [worker("one-a", gpu(0)), worker("one-b", gpu(0)),
             worker("two", gpu(0, queue=1), gpu(1), gpu(2))]  # fmt: skip
    chosen = place(fleet, gpus=2)
    assert chosen.worker.name == "two"
    assert [g.index for g in chosen.gpus] == [1, 2]  # the idle ones
    with pytest.raises(NoWorkerAvailable, match="4 GPUs"):
        place(fleet, gpus=4)


def test_multi_gpu_hosts_rank_by_their_worst_chosen_gpu():
    fleet = [worker("a", gpu(0), gpu(1, queue=3)), worker("b", gpu(0, queue=1), gpu(1, queue=1))]
    assert place(fleet, gpus=2).worker.name == "b"


def test_simulators_only_with_consent_when_real_gpus_exist():
    fleet = [sim(), worker("real", gpu(name="NVIDIA A100", queue=5))]
    assert place(fleet).worker.name == "real"
    assert place(fleet, gpu="simulator", allow_simulator=True).worker.name == "sim"
    with pytest.raises(NoWorkerAvailable, match="fit but were left out: add --simulate"):
        place(fleet, gpu="simulator")
    with pytest.raises(NoWorkerAvailable) as info:  # a simulator would not fit either
        place(fleet, gpu="H100")
    assert "--simulate" not in str(info.value)
    # Naming a simulator worker is consent.
    assert place(fleet, worker="sim").worker.name == "sim"


def test_real_gpus_rank_before_simulators_even_when_allowed():
    fleet = [sim(), worker("real", gpu(queue=3))]
    assert place(fleet, allow_simulator=True).worker.name == "real"


def test_a_fleet_of_simulators_is_used_without_asking():
    fleet = [sim("s1"), sim("s2", n=2)]
    assert place(fleet).worker.name == "s1"
    assert place(fleet, gpus=2).worker.name == "s2"


def test_cpu_cells_go_to_the_least_loaded_worker_simulators_included():
    fleet = [worker("busy", gpu(), cpus=8, load=7.0),
             worker("idle", gpu(), cpus=8, load=0.5),
             worker("queued", gpu(), cpus=64, load=0.0, cpu_queue=2)]  # fmt: skip
    chosen = place(fleet, cpu=True)
    assert chosen.worker.name == "idle" and chosen.cpu and not chosen.gpus
    assert place([sim(), worker("real", gpu(), load=4.0, cpus=1)], cpu=True).worker.name == "sim"


def test_by_name_or_address():
    fleet = [worker("a", gpu()), worker("b", gpu(queue=9), address="tcp://10.0.0.9:7340")]
    assert place(fleet, worker="b").worker.name == "b"
    assert place(fleet, worker="tcp://10.0.0.9:7340").worker.name == "b"


def test_no_match_lists_what_was_asked_and_what_each_worker_offers():
    fleet = [worker("box1", gpu(name="NVIDIA A100 80GB", free=12, queue=1))]
    with pytest.raises(NoWorkerAvailable) as info:
        place(fleet, gpu="H100", min_memory=40 * GB)
    text = str(info.value)
    assert "1 GPU, named like 'H100', with 40 GiB free" in text
    assert "box1 (tcp://box1:7340: NVIDIA A100 80GB cc 8.0 12 GiB free, queue 1)" in text
    with pytest.raises(NoWorkerAvailable, match="known workers: none"):
        place([])


def test_placement_line_names_worker_gpu_memory_and_queue():
    chosen = place([worker("box1", gpu(name="NVIDIA A100 80GB", free=71))])
    assert chosen.describe() == "box1 GPU0 (NVIDIA A100 80GB, 71 GiB free), queue 0"


@pytest.mark.parametrize(("text", "cc"), [("8.0", (8, 0)), ("9", (9, 0)), (" 7.5 ", (7, 5))])
def test_parse_cc(text, cc):
    assert parse_cc(text) == cc


def test_parse_cc_rejects_garbage():
    with pytest.raises(ConfigurationError, match=r"like 8\.0"):
        parse_cc("eight")


def test_a_real_gpu_worker_seen_before_still_means_no_simulator_by_accident():
    with pytest.raises(NoWorkerAvailable):
        choose_worker(Requirements(), [sim()], real_gpus_known=True)
    assert (
        choose_worker(Requirements(allow_simulator=True), [sim()], real_gpus_known=True).worker.name
        == "sim"
    )


def test_a_session_stays_on_the_gpu_where_its_executor_lives():
    home = GpuView(1, "NVIDIA A100", (8, 0), 80 * GB, 40 * GB, sticky=True)
    roomier = GpuView(0, "NVIDIA A100", (8, 0), 80 * GB, 70 * GB)
    assert [g.index for g in place([worker("box", roomier, home)]).gpus] == [1]
    busy_home = GpuView(1, "NVIDIA A100", (8, 0), 80 * GB, 40 * GB, queue=2, sticky=True)
    # Home beats a shorter queue too: its variables and compiled kernels are there.
    assert [g.index for g in place([worker("box", roomier, busy_home)]).gpus] == [1]
