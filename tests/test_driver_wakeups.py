"""The driver's waits (zray/_client.py "Wake-ups"): a get() of many refs is woken when
the last one it still misses arrives, not per result; wait(num_returns < n) and
streams by any arrival; a burst's queued SUBMITs go out while the caller does other
work; a driver with many tasks in flight takes their results a few per wake-up.
None of this may change what a user sees: results in any order, from several
threads at once, timeouts, errors.

Run on Ray too (ZRAY_TEST_BACKEND=ray).
"""

import os
import threading

import pytest
from _gates import after_file
from backend import BACKEND, local_cluster, pickle_by_value, ray
from conftest import poll_until

pickle_by_value(__name__)
cluster = local_cluster(num_cpus=2)


@ray.remote
def echo(x):
    return x


@ray.remote
def touch(path):
    with open(path, "w") as f:
        f.write("ran")
    return path


@ray.remote
def fail(msg):
    raise ValueError(msg)


def _release(path):
    with open(path, "w") as f:
        f.write("go")


@pytest.mark.timeout(120)
def test_get_of_refs_that_finish_last_first(cluster, tmp_path):
    # The ref get() watches (the last) is the first to finish; the rest come after.
    gates = [str(tmp_path / f"g{i}") for i in range(2)]
    first = after_file.remote(gates[0], "first")
    last = echo.remote("last")
    assert ray.get(last, timeout=60) == "last"
    result = {}

    def getter():
        result["values"] = ray.get([first, last], timeout=60)

    t = threading.Thread(target=getter)
    t.start()
    _release(gates[0])
    t.join(90)
    assert not t.is_alive()
    assert result["values"] == ["first", "last"]


@pytest.mark.timeout(120)
def test_get_of_many_refs_in_reverse_order(cluster, tmp_path):
    # Results arrive in the reverse of the list's order: every one must still wake get().
    n = 6
    gates = [str(tmp_path / f"g{i}") for i in range(n)]
    refs = [after_file.remote(gates[i], i) for i in range(n)]
    result = {}

    def getter():
        result["values"] = ray.get(refs, timeout=90)

    t = threading.Thread(target=getter)
    t.start()
    for i in reversed(range(n)):
        _release(gates[i])
    t.join(100)
    assert not t.is_alive()
    assert result["values"] == list(range(n))


@pytest.mark.timeout(120)
def test_threads_getting_the_same_refs_all_return(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    slow = after_file.remote(gate, "slow")
    fast = [echo.remote(i) for i in range(50)]
    results = [None] * 4
    lists = [fast + [slow], [slow] + fast, [slow], fast[:10] + [slow]]

    def getter(i):
        results[i] = ray.get(lists[i], timeout=60)

    threads = [threading.Thread(target=getter, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    _release(gate)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads)
    assert results[0] == list(range(50)) + ["slow"]
    assert results[1] == ["slow"] + list(range(50))
    assert results[2] == ["slow"]
    assert results[3] == list(range(10)) + ["slow"]


@pytest.mark.timeout(120)
def test_get_timeout_names_what_is_missing(cluster, tmp_path):
    done = [echo.remote(i) for i in range(3)]
    assert ray.get(done, timeout=60) == [0, 1, 2]
    gate = str(tmp_path / "gate")
    slow = after_file.remote(gate, "slow")
    with pytest.raises(ray.exceptions.GetTimeoutError) as info:
        ray.get(done + [slow], timeout=0.5)
    if BACKEND == "zray":
        assert "1 of 4 objects" in str(info.value)
    _release(gate)
    assert ray.get(done + [slow], timeout=60) == [0, 1, 2, "slow"]


@pytest.mark.timeout(120)
def test_wait_for_some_wakes_on_any_arrival(cluster, tmp_path):
    # Two CPUs: the first two run; they finish last-listed first, the third stays.
    gates = [str(tmp_path / f"g{i}") for i in range(3)]
    refs = [after_file.remote(g, i) for i, g in enumerate(gates)]
    result = {}

    def waiter():
        result["rv"] = ray.wait(refs, num_returns=2, timeout=60)

    t = threading.Thread(target=waiter)
    t.start()
    _release(gates[1])
    _release(gates[0])
    t.join(90)
    assert not t.is_alive()
    ready, not_ready = result["rv"]
    assert sorted(ray.get(ready)) == [0, 1]
    assert not_ready == [refs[2]]
    _release(gates[2])
    assert ray.get(refs, timeout=60) == [0, 1, 2]


@pytest.mark.timeout(120)
def test_a_burst_runs_while_the_caller_does_not_block(cluster, tmp_path):
    # Submitted back to back (queued for one BATCH), then the driver does no zray call:
    # every task still runs.
    paths = [str(tmp_path / f"t{i}") for i in range(40)]
    refs = [touch.remote(p) for p in paths]
    poll_until(lambda: all(os.path.exists(p) for p in paths), 60, what="the burst's tasks")
    assert ray.get(refs, timeout=60) == paths


@pytest.mark.timeout(180)
def test_many_in_flight_results_and_errors_all_arrive(cluster):
    # Enough tasks in flight that the driver takes their results a few per wake-up.
    for _ in range(3):
        refs = [echo.remote(i) for i in range(1000)]
        assert ray.get(refs, timeout=120) == list(range(1000))
    refs = [echo.remote(i) if i % 7 else fail.remote(f"bad {i}") for i in range(300)]
    ready, _ = ray.wait(refs, num_returns=300, timeout=120)
    assert len(ready) == 300
    for i, r in enumerate(refs):
        if i % 7:
            assert ray.get(r) == i
        else:
            with pytest.raises(ValueError, match=f"bad {i}"):
                ray.get(r)


@pytest.mark.timeout(120)
def test_wait_one_by_one_over_a_burst(cluster):
    not_ready = [echo.remote(i) for i in range(500)]
    seen = []
    while not_ready:
        ready, not_ready = ray.wait(not_ready, timeout=60)
        assert len(ready) == 1
        seen.extend(ray.get(ready))
    assert sorted(seen) == list(range(500))
