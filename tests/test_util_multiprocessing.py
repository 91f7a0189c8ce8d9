"""``zray.util.multiprocessing.Pool`` on a real local cluster (workers are real actor
processes; no mocks).

Runs on zray and, with ``ZRAY_TEST_BACKEND=ray``, on Ray 2.60 to check that the
semantics match. Sleeps inside worker functions are workload; waiting is done with
the pool's own get/next timeouts.
"""

import importlib
import os
import threading
import time

import pytest
from backend import BACKEND, local_cluster, pickle_by_value

mp = importlib.import_module(BACKEND + ".util.multiprocessing")
Pool = mp.Pool

pickle_by_value(__name__)

pytestmark = pytest.mark.timeout(180)


cluster = local_cluster(num_cpus=2)


def square(x):
    return x * x


def add(a, b):
    return a + b


def pid_of(_):
    return os.getpid()


def slow_identity(x):
    time.sleep(x)
    return x


def fails_on_three(x):
    if x == 3:
        raise ValueError("three is bad")
    return x


def remember(tag):
    # the worker's environment: a global of this module would not do on Ray, which
    # ships this module's functions by value (each with its own copy of the globals)
    os.environ["POOL_TEST_TAG"] = tag


def recall(_):
    return os.environ.get("POOL_TEST_TAG")


def test_exports_are_rays():
    import multiprocessing

    assert mp.TimeoutError is multiprocessing.TimeoutError


def test_map_starmap_apply(cluster):
    with Pool(processes=2) as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert pool.map(square, range(10), chunksize=3) == [x * x for x in range(10)]
        assert pool.map(square, []) == []
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.apply(add, (1, 2)) == 3
        assert pool.apply(add, (1,), {"b": 5}) == 6
        assert pool.apply(add, (1,), kwargs={"b": 6}) == 7  # Ray's name for kwds
        assert len(set(pool.map(pid_of, range(20), chunksize=1))) == 2


def test_async_results(cluster):
    with Pool(processes=2) as pool:
        r = pool.map_async(square, range(5))
        assert r.get(timeout=60) == [0, 1, 4, 9, 16]
        assert r.ready() and r.successful()
        r = pool.starmap_async(add, [(1, 1), (2, 2)])
        assert r.get(timeout=60) == [2, 4]
        r = pool.apply_async(slow_identity, (2.0,))
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()  # not ready yet
        with pytest.raises(mp.TimeoutError):
            r.get(timeout=0.1)
        r.wait(timeout=0.1)  # no error, just returns
        assert r.get(timeout=60) == 2.0
        bad = pool.apply_async(fails_on_three, (3,))
        bad.wait(60)
        assert bad.ready() and not bad.successful()
        with pytest.raises(ValueError, match="three is bad"):
            bad.get()


def test_callbacks(cluster):
    got, errors = [], []
    done = threading.Event()

    def on_result(v):
        got.append(v)
        done.set()

    def on_error(e):
        errors.append(e)
        done.set()

    with Pool(processes=2) as pool:
        pool.map_async(square, [1, 2, 3], callback=on_result)
        assert done.wait(60)
        if BACKEND == "ray":  # Ray 2.60 hands the callback the results as they finished
            assert sorted(got[0]) == [1, 4, 9]
        else:  # in order, as multiprocessing and get() give them
            assert got == [[1, 4, 9]]
        done.clear()
        pool.apply_async(fails_on_three, (3,), error_callback=on_error)
        assert done.wait(60)
        if BACKEND == "ray":  # Ray 2.60 passes its PoolTaskError wrapper
            assert "three is bad" in repr(errors[0])
        else:  # the exception itself, as multiprocessing does
            assert isinstance(errors[0], ValueError)


def test_errors_reach_the_caller(cluster):
    with Pool(processes=2) as pool:
        with pytest.raises(ValueError, match="three is bad"):
            pool.map(fails_on_three, range(6))
        # the pool still works after a failed item
        assert pool.map(fails_on_three, [1, 2]) == [1, 2]
        if BACKEND == "ray":  # Ray 2.60's imap returns a PoolTaskError instead of raising
            return
        it = pool.imap(fails_on_three, range(5))  # raises at the failed item, as stdlib
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        with pytest.raises(ValueError, match="three is bad"):
            next(it)
        assert next(it) == 4


def test_imap_and_imap_unordered(cluster):
    with Pool(processes=2) as pool:
        assert list(pool.imap(square, range(7))) == [x * x for x in range(7)]
        assert list(pool.imap(square, range(7), chunksize=3)) == [x * x for x in range(7)]
        assert len(set(pool.map(pid_of, range(2), chunksize=1))) == 2  # both workers up
        out = list(pool.imap_unordered(slow_identity, [2.0, 0.0, 0.0, 0.0]))
        assert sorted(out) == [0.0, 0.0, 0.0, 2.0]
        if BACKEND == "zray":  # the free worker takes the next chunk: the slow one is last
            assert out[-1] == 2.0
        it = pool.imap(slow_identity, [3.0])
        with pytest.raises(mp.TimeoutError):
            it.next(timeout=0.1)
        assert it.next(timeout=60) == 3.0
        with pytest.raises(StopIteration):
            next(it)


def test_imap_reads_a_generator_lazily(cluster):
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    with Pool(processes=2) as pool:
        it = pool.imap(square, endless())
        assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]


def test_initializer_runs_in_every_worker(cluster):
    with Pool(processes=2, initializer=remember, initargs=("hello",)) as pool:
        assert pool.map(recall, range(8), chunksize=1) == ["hello"] * 8


def test_maxtasksperchild_replaces_workers(cluster):
    with Pool(processes=1, maxtasksperchild=1) as pool:
        pids = pool.map(pid_of, range(3), chunksize=1)
    assert len(set(pids)) == 3


def test_close_join_and_terminate(cluster):
    pool = Pool(processes=2)
    r = pool.map_async(slow_identity, [0.5, 0.5])
    pool.close()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])
    with pytest.raises(ValueError, match="Pool not running"):
        pool.apply_async(square, (1,))
    pool.join()  # waits for the submitted work
    assert r.ready() and r.get(timeout=1) == [0.5, 0.5]

    pool = Pool(processes=2)
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()
    pool.terminate()
    pool.join()
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(square, [1])


def test_bad_arguments(cluster):
    with pytest.raises(ValueError):
        Pool(processes=0)
    with pytest.raises(ValueError, match="only 2 CPUs"):
        Pool(processes=3)  # more workers than the cluster has CPUs
    if BACKEND == "ray":  # Ray 2.60 accepts maxtasksperchild=0, asserts on chunksize=0
        return
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(processes=1, maxtasksperchild=0)
    with Pool(processes=1) as pool:
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(square, [1], chunksize=0)


@pytest.mark.skipif(BACKEND == "ray", reason="Ray 2.60 logs a warning and ignores context")
def test_context_is_refused(cluster):
    import multiprocessing

    with pytest.raises(ValueError, match="context"):
        Pool(processes=1, context=multiprocessing.get_context("spawn"))


def test_pool_starts_a_local_cluster_sized_for_it(run_driver):
    out = run_driver(
        f"import {BACKEND} as ray\n"
        f"from {BACKEND}.util.multiprocessing import Pool\n"
        "def square(x):\n"
        "    return x * x\n"
        "with Pool(processes=3) as pool:\n"
        "    print(pool.map(square, range(4)))\n"
        "    print(int(ray.cluster_resources()['CPU']))\n", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[0, 1, 4, 9]", "3"]


def test_default_processes_is_the_cluster_cpus(cluster):
    with Pool() as pool:
        assert len(set(pool.map(pid_of, range(40), chunksize=1))) == 2
