"""Refs inside an inline reply (a leased task's, a direct actor call's) are handed to
the caller (REFS 2 from the executor, REFS 3 from the caller): they live while the
caller holds the result, and are freed once it lets go, like results that come
through the broker. They used to be marked escaped, and stayed until the executor
exited (issue 14)."""

import pytest
from conftest import poll_until

import zray as ray
from zray import _runtime
from zray.util.state import list_objects

MB = 1 << 20


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@ray.remote
def three_puts(tag):
    return [ray.put(bytes([tag]) * MB) for _ in range(3)]


@ray.remote
def one_put_of_a_mib(tag):
    return [ray.put(bytes([tag]) * MB)]


@ray.remote
def one_small_put(tag):
    return [ray.put(tag)]


@ray.remote
class Maker:
    def three_puts(self, tag):
        return [ray.put(bytes([tag]) * MB) for _ in range(3)]

    def pair(self, tag):  # the same ref in both returns
        ref = ray.put(tag)
        return [ref], {"again": ref}

    def warm(self):
        return True


def _ids():
    return {o["object_id"] for o in list_objects() if o["reference_type"] != "ACTOR_HANDLE"}


def _all_freed(what: str, timeout: float = 30):
    try:
        poll_until(lambda: not _ids(), timeout, interval=0.05, what=what)
    except AssertionError as e:  # say which are left
        left = [o for o in list_objects() if o["reference_type"] != "ACTOR_HANDLE"]
        raise AssertionError(f"{e}: {len(left)} left, e.g. {left[:3]}") from None


def _leased_sent() -> int:
    leases = _runtime.client.leases
    return leases.sent if leases is not None else 0


@pytest.mark.timeout(120)
def test_leased_results_with_refs_are_freed(cluster):
    before = _leased_sent()
    for i in range(6):
        inner = ray.get(three_puts.remote(i), timeout=60)
        assert [len(b) for b in ray.get(inner, timeout=60)] == [MB] * 3
        assert ray.get(inner[2], timeout=60)[:1] == bytes([i])
    assert _leased_sent() > before  # (they went on a lease: the inline path)
    del inner
    _all_freed("the refs inside leased results to be freed")


@pytest.mark.timeout(180)
def test_a_leased_burst_with_refs_is_freed(cluster):
    """An async burst on leases (a window of calls per lease, a backlog at the caller):
    every reply's refs are handed over, whichever way it is read (the calling thread, the
    I/O thread), and freed once the caller lets go."""
    for _ in range(3):  # (a first burst may take the broker's path: no streak yet)
        before = _leased_sent()
        refs = [one_put_of_a_mib.remote(i % 256) for i in range(200)]
        inner = [v[0] for v in ray.get(refs, timeout=120)]
        assert [ray.get(r, timeout=60)[:1] for r in inner[::50]] == [bytes([i]) for i in
                                                                      range(0, 200, 50)]
        del refs, inner
        if _leased_sent() > before:
            break
    assert _leased_sent() > before  # (the burst went on leases: the inline path)
    _all_freed("the refs inside a leased burst's results to be freed")


@pytest.mark.timeout(120)
def test_direct_call_results_with_refs_are_freed(cluster):
    maker = Maker.remote()
    assert ray.get(maker.warm.remote(), timeout=60)  # (its route: later calls go direct)
    for i in range(6):
        inner = ray.get(maker.three_puts.remote(i), timeout=60)
        assert ray.get(inner[0], timeout=60) == bytes([i]) * MB
    del inner
    _all_freed("the refs inside direct call results to be freed")
    ray.kill(maker)


@pytest.mark.timeout(120)
def test_a_held_result_keeps_its_refs_after_the_executor_lets_go(cluster):
    """The caller holds the result (never reading the refs inside it) while the
    executor drops its own refs: the values stay. Proof that the executor's releases
    came in: a later object of the same executor, released after them on the same
    socket, is freed first."""
    held = three_puts.remote(7)
    ray.wait([held], timeout=60)
    marker = ray.get(one_small_put.remote("marker"), timeout=60)[0]
    marker_id = marker.hex()
    del marker
    poll_until(lambda: marker_id not in _ids(), 30, interval=0.05,
               what="a later object of the same executor to be freed")
    inner = ray.get(held, timeout=60)
    assert [ray.get(r, timeout=60)[:2] for r in inner] == [bytes([7, 7])] * 3
    del held, inner
    _all_freed("the held result's refs to be freed after all")


@pytest.mark.timeout(120)
def test_one_ref_in_two_returns(cluster):
    maker = Maker.remote()
    assert ray.get(maker.warm.remote(), timeout=60)
    first, second = maker.pair.options(num_returns=2).remote("both")
    ref = ray.get(second, timeout=60)["again"]
    del second
    assert ray.get(ray.get(first, timeout=60)[0], timeout=60) == "both"
    assert ray.get(ref, timeout=60) == "both"
    del first, ref
    _all_freed("a ref handed in two returns to be freed")
    ray.kill(maker)


@pytest.mark.timeout(120)
def test_results_dropped_before_they_arrive_free_their_refs(cluster):
    """Async bursts whose refs the caller drops at once: each reply's refs are taken
    and let go again on arrival."""
    maker = Maker.remote()
    assert ray.get(maker.warm.remote(), timeout=60)
    for _ in range(3):
        refs = [maker.three_puts.remote(i) for i in range(10)]
        ray.wait(refs[-1:], timeout=60)
        del refs
    done = [three_puts.remote(i) for i in range(10)]
    ray.get(done, timeout=60)
    del done
    _all_freed("the refs of dropped results to be freed")
    ray.kill(maker)
