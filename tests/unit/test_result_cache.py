"""The worker's short-lived store of sent results, and its record of what it answered."""

from __future__ import annotations

from worker_kernel.result_cache import ResultCache


def test_an_answered_cell_is_listed_until_acknowledged_even_when_its_result_is_not_kept():
    now = [0.0]
    cache = ResultCache(ttl=60, max_bytes=100, clock=lambda: now[0])
    cache.put("small", [b"x" * 10], "alice")
    cache.put("huge", [b"x" * 1000], "alice")  # larger than the cache: not kept
    cache.put("bobs", [b"x" * 10], "bob")
    assert cache.get("huge", "alice") is None and cache.get("small", "alice") == [b"x" * 10]
    assert cache.held_for("alice") == ["small", "huge"]  # answered, kept or not
    assert cache.held_for("bob") == ["bobs"]
    cache.forget(["small", "huge"], "alice")  # its next request said it got them
    assert cache.held_for("alice") == [] and cache.get("small", "alice") is None
    cache.forget(["bobs"], "alice")  # not alice's to forget
    assert cache.held_for("bob") == ["bobs"]
    now[0] = 61.0
    assert cache.held_for("bob") == [] and len(cache) == 0  # expired


def test_results_pushed_out_by_others_are_still_known_as_answered():
    cache = ResultCache(ttl=60, max_bytes=100)
    cache.put("first", [b"x" * 60], "alice")
    cache.put("second", [b"x" * 60], "bob")  # pushes alice's result out
    assert cache.get("first", "alice") is None
    assert cache.held_for("alice") == ["first"]


def test_a_client_has_its_newest_answered_cells_listed_and_no_more():
    from worker_kernel.result_cache import LISTED

    cache = ResultCache(ttl=60, max_bytes=1 << 20)
    ids = [f"cell{i:04d}" for i in range(LISTED + 10)]
    for cell_id in ids:
        cache.put(cell_id, [b"x"], "alice")
    assert cache.held_for("alice") == ids[-LISTED:]
