"""Moving arrays: the content cache and compression, against a real worker."""

from __future__ import annotations

import numpy as np
import pytest

from lan2gpu_magic import connect
from lan2gpu_magic.client import Client
from worker_kernel.protocol import buffer_pool

from ..conftest import proc_rss

MB = 1 << 20


@pytest.fixture
def big() -> np.ndarray:
    return np.random.default_rng(3).random(2 * MB // 8)  # 2 MiB of incompressible data


def test_an_unchanged_input_and_identical_output_travel_as_digests(client: Client, big):
    ns = {"a": big}
    first = client.run("b = -a", ns)
    assert first.stats["bytes_out"] >= big.nbytes and first.stats["cached_in"] == 0
    second = client.run("b = -a", ns)
    assert second.stats["bytes_in"] < 10_000  # `a` went as a digest...
    assert second.stats["cached_in"] == 1
    assert second.stats["cached_out"] == 1  # ...and so did `b`, which this side holds
    assert second.stats["bytes_out"] < 10_000
    assert np.array_equal(ns["b"], -big)
    ns["b"][0] = 42.0  # the new `b` does not alias the old one
    assert ns["b"][1] == -big[1]


def test_an_output_used_as_the_next_input_is_not_sent_back(client: Client, big):
    ns = {"a": big}
    client.run("b = a * 2", ns)
    third = client.run("c = b.sum()", ns)
    assert third.stats["cached_in"] == 1 and third.stats["bytes_in"] < 10_000
    assert ns["c"] == pytest.approx(2 * big.sum())


def test_changes_on_either_side_are_never_served_stale(client: Client, big):
    ns = {"a": big.copy()}
    client.run("s = a.sum()", ns)
    ns["a"][0] = 1e6  # changed here: a new digest, sent in full
    again = client.run("s = a.sum()", ns)
    assert again.stats["cached_in"] == 0 and ns["s"] == pytest.approx(ns["a"].sum())
    client.run("a[1] = -7.0\nt = a.sum()", ns)  # changed there, in place: comes back
    assert ns["a"][1] == -7.0
    # The worker's cached copy was changed in place: it notices, asks, gets it again.
    ns["a"][1] = big[1]
    assert client.run("u = a.sum()", ns).outputs["u"] == pytest.approx(ns["a"].sum())


def test_a_replaced_executor_means_a_resend_not_an_error(client: Client, big):
    ns = {"a": big}
    client.run("s = a.sum()", ns)
    with pytest.raises(Exception, match="exit code 3"):
        client.run("import os\nos._exit(3)", {})
    result = client.run("s2 = a.sum()", ns)  # the new executor has no cache
    assert ns["s2"] == pytest.approx(big.sum())
    assert result.stats["cached_in"] == 0


def test_no_cache_sends_everything(shared_worker, big):
    with connect(shared_worker.address, key_file=shared_worker.key_file) as c:
        c.cache = False
        ns = {"a": big}
        c.run("b = -a", ns)
        again = c.run("b = -a", ns)
        assert again.stats["cached_in"] == 0 and again.stats["bytes_out"] >= big.nbytes


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_compression_modes_give_the_same_arrays(shared_worker, mode):
    smooth = np.zeros(3 * MB // 4, dtype=np.float32)
    smooth[::1000] = 1.0
    with connect(shared_worker.address, key_file=shared_worker.key_file) as c:
        c.compress = mode
        c.cache = False
        ns = {"a": smooth}
        c.run("b = a + 1", ns)
        assert np.array_equal(ns["b"], smooth + 1)


@pytest.mark.parametrize(
    "what",
    ["ten thousand names", "thirty thousand small arrays", "1.5 MiB of source"],
)
def test_results_of_any_size_come_back(client: Client, what):
    # Each of these once made a header larger than a receiver's largest frame:
    # libzmq dropped the connection and the notebook hung.
    if what == "ten thousand names":
        code, check = "\n".join(f"v{i} = {i}" for i in range(10_000)), "v9999"
    elif what == "thirty thousand small arrays":
        code = "import numpy as np\nd = {i: np.arange(3) + i for i in range(30_000)}"
        check = "d"
    else:
        code, check = "x = 7\n# " + "y" * 1_500_000 + "\n", "x"
    ns: dict[str, object] = {}
    result = client.run(code, ns, timeout=60)
    if what == "ten thousand names":
        assert len(result.outputs) == 10_000 and ns[check] == 9999
    elif what == "thirty thousand small arrays":
        assert len(ns["d"]) == 30_000 and list(ns["d"][29_999]) == [29_999, 30_000, 30_001]
    else:
        assert ns[check] == 7


_IN_POOL = """
from worker_kernel.protocol import buffer_pool
pool = buffer_pool.current()
b = -a
where = (pool.budget, pool.holds(a))
"""


def test_large_arrays_land_in_each_sides_pool_and_it_is_reused(client: Client):
    """The worker's executor receives `a` into its pool, this process receives `b`
    into its own, and pieces come back to the pools cell after cell (buffer_pool.py)."""
    pool = buffer_pool.current()
    a = np.random.default_rng(4).random(24 * MB // 8)
    for i in range(6):  # 144 MiB in all through a 64 MiB pool on either side: reused
        a += i
        ns = {"a": a}
        client.run(_IN_POOL, ns)
        budget, executor_pooled = ns["where"]
        assert budget > 0 and executor_pooled
        assert pool.holds(ns["b"]) and np.array_equal(ns["b"], -a)
    del ns
    assert pool.leased == 0


def test_results_the_client_has_are_not_kept_by_the_worker(shared_worker, client: Client):
    """A result stays on the worker only until the client says it has it (the next
    request says so): 8 results of 32 MiB do not pile up in the worker's service."""
    before = proc_rss(shared_worker.pid)
    for i in range(8):
        ns: dict[str, object] = {}
        client.run(f"import numpy as np\nb = np.full({32 * MB // 4}, {i}, np.float32)", ns)
    client.run("pass", {})  # says the last one arrived
    grown = proc_rss(shared_worker.pid) - before
    # The last result, and freed frames the heap keeps for the next large cell
    # (LAN2GPU_POOL_MEMORY=64M in the suite); all eight would be 256 MiB.
    assert grown < 160 * MB, f"the worker's service grew by {grown / MB:.0f} MiB"


_RESIDENT = """
import re
from worker_kernel.protocol import buffer_pool
pool = buffer_pool.current()
pool.faulted.wait(60)
status = open("/proc/self/status").read()
resident = int(re.search(r"RssAnon:\\s+(\\d+) kB", status).group(1)) << 10
budget = pool.budget
"""


@pytest.mark.parametrize("prefault", [False, True])
def test_an_executors_pool_is_faulted_in_at_start_only_when_asked(worker_factory, prefault):
    flags = ["--pool-memory", "256M", *(["--pool-prefault"] if prefault else [])]
    worker = worker_factory("pool", *flags)
    with connect(worker.address, key_file=worker.key_file) as c:
        ns: dict[str, int] = {}
        c.run(_RESIDENT, ns)
    assert ns["budget"] == 256 * MB
    if prefault:
        assert ns["resident"] > 256 * MB
    else:  # a session that moves no large array does not hold the pool
        assert ns["resident"] < 200 * MB
